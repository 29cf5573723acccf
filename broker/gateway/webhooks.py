"""Completion webhooks: one POST per finished job, HMAC-SHA256 signed, retried with backoff.

Headers: ``Webhook-Id`` (the job id: receivers dedupe on it), ``Webhook-Timestamp`` (unix seconds) and
``Webhook-Signature: v1=<hex>`` where the hex is HMAC-SHA256(secret, f"{timestamp}.{body}"). Receivers
check the signature with :func:`verify` and reject stale timestamps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

log = logging.getLogger("broker.gateway.webhooks")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify(secret: str, headers: Any, body: bytes, *, tolerance_s: float = 300.0) -> bool:
    try:
        ts = int(headers["webhook-timestamp"])
    except (KeyError, ValueError, TypeError):
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), str(headers.get("webhook-signature", "")))


async def deliver(url: str, secret: str, event: dict[str, Any], *, attempts: int = 6, backoff_s: float = 0.5,
                  timeout_s: float = 10.0, transport: httpx.AsyncBaseTransport | None = None,
                  before_attempt: Callable[[], Awaitable[None]] | None = None) -> bool:
    """POST ``event``; 2xx ends it. 4xx other than 408/429 is final (the receiver refused); the rest retry."""
    body = json.dumps(event, separators=(",", ":")).encode()
    async with httpx.AsyncClient(timeout=timeout_s, transport=transport, follow_redirects=False) as client:
        for i in range(attempts):
            if before_attempt is not None:
                await before_attempt()
            ts = int(time.time())
            headers = {"content-type": "application/json", "webhook-id": str(event.get("id", "")),
                       "webhook-timestamp": str(ts), "webhook-signature": sign(secret, ts, body)}
            try:
                r = await client.post(url, content=body, headers=headers)
                if 200 <= r.status_code < 300:
                    return True
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    log.warning("webhook for %s refused with %s; not retrying", event.get("id"), r.status_code)
                    return False
            except httpx.HTTPError as exc:
                log.info("webhook for %s failed (%s); retrying", event.get("id"), type(exc).__name__)
            if i + 1 < attempts:
                await asyncio.sleep(backoff_s * (2**i))
    return False

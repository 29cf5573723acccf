"""Credentials never travel back: one scrubber for every text that may hold an upstream's words.

An upstream that echoes our request (headers included) into its error body would otherwise put our
keys into error messages, ``--json``, ``broker providers`` and the ledger. ``BrokerError`` runs every
message through ``scrub`` when it is built, and the ledger scrubs what it writes: two choke points,
not one per call site. Configured secrets are registered by ``Settings`` (and by whoever holds a key
that did not come from settings); the credential variables are read at scrub time too, and anything
shaped like an ``Authorization``/``X-API-Key``/``Modal-Key`` header or a bearer token is masked.
"""

from __future__ import annotations

import os
import re
import threading
from urllib.parse import urlsplit, urlunsplit

MASK = "[redacted]"
#: shorter values are not secrets worth masking (and masking "1" would wreck every message)
MIN_SECRET_CHARS = 6
#: the credential variables every provider reads (see broker.settings)
SECRET_ENV_VARS = ("RUNPOD_API_KEY", "REPLICATE_API_TOKEN", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET",
                   "BROKER_WORKER_API_KEY", "BROKER_MODAL__PROXY_KEY", "BROKER_MODAL__PROXY_SECRET",
                   "BROKER_HTTP__API_KEY", "BROKER_RUNPOD__API_KEY", "BROKER_REPLICATE__API_TOKEN")

_lock = threading.Lock()
_secrets: set[str] = set()

#: `Authorization: Bearer x`, `"x-api-key": "x"`, `Modal-Secret=x`, ... (JSON, header and query forms)
_HEADER = re.compile(
    r"(?i)((?:proxy-)?authorization|x-api-key|api[-_]?key|api[-_]?token|modal-key|modal-secret|token)"
    r"""(["']?\s*[:=]\s*["']?)(?!(?:(?:bearer|token|basic|key)\s+)?\[redacted\])((?:bearer|token|basic|key)\s+)?[^\s"',;&}\]]+"""
)
_BEARER = re.compile(r"(?i)\b(bearer|token)\s+[A-Za-z0-9._~+/=-]{8,}")


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears in an error or a ledger row from now on."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _lock:
            _secrets.add(value)


def _known() -> list[str]:
    with _lock:
        values = set(_secrets)
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= MIN_SECRET_CHARS:
            values.add(value)
    return sorted(values, key=len, reverse=True)  # longest first: a key containing another is masked whole


def scrub(text: str) -> str:
    """``text`` with every known secret and every credential-shaped header value masked."""
    if not text:
        return text
    for secret in _known():
        if secret in text:
            text = text.replace(secret, MASK)
    text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)


def redact_url(url: str) -> str:
    """The URL with any password replaced (``https://user:****@host/``); other text is returned as is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:****@{host}"))


def url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def redact_urls(text: str) -> str:
    """``text`` (a repr, say) with the password of every URL in it masked."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), text)

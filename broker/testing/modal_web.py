"""A loopback stand-in for the proxy in front of a Modal web endpoint (``*.modal.run``).

Wrap the real ASGI app (``BrokerWorker().web.local()``) in ``ModalWebProxy`` and serve it with
uvicorn to exercise what Modal's front does before the app sees a request, as Modal documents it:

- ``requires_proxy_auth=True``: requests without the right ``Modal-Key`` / ``Modal-Secret`` get
  401 ``modal-http: missing credentials for proxy authorization``
  (https://modal.com/docs/guide/webhook-proxy-auth, read 2026-11-23);
- a request whose response has not started after ``redirect_after_s`` (150 s on Modal) gets
  ``303 See Other`` to the same path with ``?__modal_function_call_id=fc-…``; that result URL is
  fetched with GET, blocks up to the same window, and redirects again while the call still runs
  (https://modal.com/docs/guide/webhook-timeouts, read 2026-11-23). POSTing to it is rejected with
  400 ``modal-http: bad redirect method``.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]
Message = dict[str, Any]

CALL_PARAM = "__modal_function_call_id"


class _Call:
    """One request running in the app; its response events are replayed to whoever holds the result URL."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[Message] = asyncio.Queue()
        self.started = asyncio.Event()
        self.client_gone = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class ModalWebProxy:
    def __init__(self, app: Any, *, token_id: str, token_secret: str, redirect_after_s: float = 150.0) -> None:
        self.app = app
        self._token = (token_id.encode(), token_secret.encode())
        self.redirect_after_s = redirect_after_s
        self.calls: dict[str, _Call] = {}
        #: how many 303s were sent (tests assert the redirect path was taken)
        self.redirects = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan passes through
            return
        if not self._authorized(scope):
            await _text(send, 401, "modal-http: missing credentials for proxy authorization")
            return
        call_id = parse_qs(scope.get("query_string", b"").decode()).get(CALL_PARAM, [None])[0]
        if call_id is not None:
            if scope["method"] != "GET":
                await _text(send, 400, "modal-http: bad redirect method")
                return
            call = self.calls.get(call_id)
            if call is None:
                await _text(send, 404, "modal-http: unknown function call")
                return
            await self._answer(call_id, call, send)
            return
        call_id = f"fc-{uuid.uuid4().hex[:20]}"
        call = await self._start(scope, receive)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if call_id not in self.calls:  # hung up while still attached (not after a redirect)
                call.client_gone.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self._answer(call_id, call, send)
        finally:
            watcher.cancel()

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        key, secret = headers.get(b"modal-key", b""), headers.get(b"modal-secret", b"")
        return hmac.compare_digest(key, self._token[0]) and hmac.compare_digest(secret, self._token[1])

    async def _start(self, scope: Scope, receive: Any) -> _Call:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        call = _Call()
        delivered = False

        async def app_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            await call.client_gone.wait()
            return {"type": "http.disconnect"}

        async def app_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.started.set()
            await call.events.put(message)

        # Modal's proxy strips the auth headers before the app sees the request.
        inner = {**scope, "headers": [(k, v) for k, v in scope.get("headers", [])
                                      if k not in (b"modal-key", b"modal-secret")]}
        call.task = asyncio.get_running_loop().create_task(self.app(inner, app_receive, app_send))
        return call

    async def _answer(self, call_id: str, call: _Call, send: Any) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(call.started.wait()), self.redirect_after_s)
        except TimeoutError:
            self.calls[call_id] = call
            self.redirects += 1
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", f"?{CALL_PARAM}={call_id}".encode()), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        self.calls.pop(call_id, None)
        try:
            while True:
                message = await call.events.get()
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    return
        except OSError:
            call.client_gone.set()  # the caller left mid-response: the app sees a disconnect
            raise
        except asyncio.CancelledError:
            call.client_gone.set()
            raise


async def _text(send: Any, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

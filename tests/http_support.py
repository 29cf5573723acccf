"""A loopback HTTP server for the media-by-URL tests: fixed files, redirects, and every path it was asked for."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from broker.media import SAMPLE_RATE, Audio

#: one second of a 220 Hz tone, as FLAC
TONE_FLAC = Audio((0.3 * np.sin(2 * np.pi * 220 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
                  ).to_bytes("flac")


class MediaHost(ThreadingHTTPServer):
    """Serves ``files`` (path → (Content-Type or None, body)) with their length; ``unsized`` the same way but
    without one, so the body ends only when the connection closes (nothing to refuse it by in advance);
    ``redirects`` (path → Location) as 302s, changeable between requests; 404 for anything else.
    ``requests`` lists every path asked for, so "refused" can mean "never asked"."""

    def __init__(self, files: dict[str, tuple[str | None, bytes]], *,
                 unsized: dict[str, tuple[str | None, bytes]] | None = None,
                 redirects: dict[str, str] | None = None, host: str = "127.0.0.1") -> None:
        self.files, self.unsized, self.redirects = dict(files), dict(unsized or {}), dict(redirects or {})
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # an unsized body ends by closing

            def do_GET(self) -> None:
                server.requests.append(self.path)
                sized = self.path in server.files
                if sized or self.path in server.unsized:
                    ctype, body = (server.files if sized else server.unsized)[self.path]
                    self.send_response(200)
                    if ctype is not None:
                        self.send_header("Content-Type", ctype)
                    if sized:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__((host, 0), Handler)

    def url(self, path: str, scheme: str = "http") -> str:
        host, port = self.server_address[:2]
        return f"{scheme}://{host}:{port}{path}"


def serving(server: MediaHost) -> Iterator[MediaHost]:
    """``server`` answering on a thread for as long as the fixture that yields from this lasts."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()

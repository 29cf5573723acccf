"""One gateway replica with fake providers, as its own process: ``python -m tests.gateway_replica …``.

The replica tests start two of these on one PostgreSQL database and kill one with SIGKILL mid-run.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import uvicorn

from broker.testing.fake import FakeProvider
from tests.gateway_support import fake_manager, gateway_app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--ledger", required=True)
    ap.add_argument("--outputs", type=Path, help="output folder shared with the other replicas")
    ap.add_argument("--port-file", required=True, type=Path)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--webhook-secret", default="replica-secret")
    args = ap.parse_args()
    fast = FakeProvider("fast", usd_per_second=0.001, latency_s=args.latency)
    manager = fake_manager(args.dir, fast, ledger_path=args.ledger)
    # Short heartbeats so a killed replica's jobs move within seconds (production defaults are longer).
    app = gateway_app(args.dir, manager, db_url=args.db, concurrency=args.concurrency,
                      webhook_secret=args.webhook_secret, outputs=args.outputs,
                      queue_options={"heartbeat_s": 0.5, "stalled_after_s": 2.0, "sweep_s": 0.5})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(sock.getsockname()[1]))
    tmp.rename(args.port_file)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()

"""Memory a `broker worker serve` process gains from each hostile request that once cost gigabytes.

Starts the real worker as a subprocess on loopback, waits until it is ready, then sends each case and
samples the process's resident memory (VmRSS in /proc) while it runs. Prints a table:

    python scripts/worker_memory.py            # the cases of issue 11, item 7
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx

KEY = "memory-probe-key"
MiB = 1024 * 1024


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakRSS(threading.Thread):
    """Samples the process's resident memory every few ms while a case runs (VmHWM never comes down)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.base, self.peak = pid, _rss_mib(pid), 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_mib(self.pid))
            time.sleep(0.002)


def _huge_png(side: int = 20_000) -> bytes:
    """A complete, valid grayscale PNG of side x side black pixels: ~400 KB that decode to 400 MB+."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + one byte per pixel
    idat = b"".join(packer.compress(row * 100) for _ in range(side // 100)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    import base64

    port = _free_port()
    env = {**os.environ, "BROKER_WORKER_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "broker", "worker", "serve", "--port", str(port),
                             "--max-body-mb", "64"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=2).json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        png = base64.b64encode(_huge_png()).decode()
        cases: list[tuple[str, bytes, int]] = [
            ("render fps 2e-6",
             json.dumps({"v": 1, "task": "render", "input": {"text": "Hi.", "fps": 2e-6}}).encode(), 1),
            (f"20000x20000 PNG avatar ({len(png) * 3 // 4 // 1024} KB)",
             json.dumps({"v": 1, "task": "render", "input": {"text": "Hi.", "avatar": {"b64": png}}}).encode(), 1),
            ("JSON nested 1,000 deep", b"[" * 1000 + b"]" * 1000, 1),
            ("60 MB '{}' body", b"{}" + b" " * (60 * MiB), 1),
            ("60 MB '{}' body x 4 at once", b"{}" + b" " * (60 * MiB), 4),
        ]
        print(f"{'case':<36} {'status':>8} {'peak RSS growth':>16}")
        for name, body, copies in cases:
            monitor = PeakRSS(proc.pid)
            monitor.start()
            statuses: list[int] = []

            def send(data: bytes = body, statuses: list[int] = statuses) -> None:
                statuses.append(httpx.post(f"{url}/run", content=data, headers=auth, timeout=120).status_code)

            threads = [threading.Thread(target=send) for _ in range(copies)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            monitor.stop.set()
            monitor.join()
            grown = max(0.0, monitor.peak - monitor.base)
            time.sleep(1.0)  # let the allocator hand memory back before the next case
            print(f"{name:<36} {','.join(map(str, sorted(set(statuses)))):>8} {grown:>13.1f} MB")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()

"""How long `broker worker serve` takes from spawn to /ready 200, with the renderer loaded at start or lazily.

    PYTHONPATH=. python scripts/bench_worker_start.py --runs 3

Prints one table row per mode (milliseconds: median, max, min). What an autoscaler waits for before a new
worker takes jobs (plus the image pull and the node's own start on a real platform).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def time_to_ready(extra: list[str], timeout: float = 300.0) -> float:
    port = _free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "broker", "worker", "serve", "--port", str(port),
                             "--log-level", "warning", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "BROKER_LOCAL__DEVICE": "cpu"})
    try:
        while time.perf_counter() - started < timeout:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    return (time.perf_counter() - started) * 1000
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("worker did not get ready")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| mode | median ms | max ms | min ms | runs |\n| --- | ---: | ---: | ---: | ---: |")
    for label, extra in (("default (Piper + renderer before /ready)", []),
                         ("`--lazy-render` (Piper only)", ["--lazy-render"])):
        times = [time_to_ready(extra) for _ in range(args.runs)]
        print(f"| {label} | {statistics.median(times):.0f} | {max(times):.0f} | {min(times):.0f} | {args.runs} |")


if __name__ == "__main__":
    main()

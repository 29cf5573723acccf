"""Start the real Cog runtime (coglet) on loopback, serving ``handlers/replicate`` without Docker.

``python -m cog.server.http`` is what a Cog image runs. It reads the runner from
``COG_PREDICT_TYPE_STUB`` (``run.py:Runner``), the port from ``PORT``, and the OpenAPI
schema from ``.cog/openapi_schema.json`` relative to its working directory, which is
why it is started with ``cwd`` = the handler folder. Its Python worker subprocess is
spawned as ``python -c ...``, so the interpreter's folder goes first on ``PATH``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from broker.errors import ConfigurationError, ProviderUnavailable

#: the handler folder in a source checkout (the Cog model `broker deploy replicate` pushes)
HANDLER_DIR = Path(__file__).resolve().parents[2] / "handlers" / "replicate"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class CogRuntime:
    """One ``python -m cog.server.http`` subprocess; a context manager that waits for READY."""

    def __init__(
        self,
        handler_dir: Path | str = HANDLER_DIR,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        setup_timeout_s: float = 120.0,
    ) -> None:
        self.handler_dir = Path(handler_dir)
        if not (self.handler_dir / "run.py").is_file():
            raise ConfigurationError(f"no Cog runner at {self.handler_dir / 'run.py'}")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.setup_timeout_s = setup_timeout_s
        self._extra_env = env or {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the runtime; closed on exit)

    def start(self) -> CogRuntime:
        repo_root = str(self.handler_dir.parents[1])
        env = {**os.environ, **self._extra_env}
        env.update(
            PORT=str(self.port),
            COG_PREDICT_TYPE_STUB="run.py:Runner",
            LOG_FORMAT="console",
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            PYTHONPATH=os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")])),
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=self.handler_dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.setup_timeout_s
        status = "not started"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ProviderUnavailable(f"the Cog runtime exited ({self._proc.returncode}):\n{self.logs()[-2000:]}")
            try:
                status = httpx.get(f"{self.url}/health-check", timeout=2.0).json().get("status", "?")
            except (httpx.HTTPError, ValueError):
                status = "unreachable"
            if status == "READY":
                return
            if status in ("SETUP_FAILED", "DEFUNCT"):
                break
            time.sleep(0.2)
        self.stop()
        raise ProviderUnavailable(f"the Cog runtime is {status}:\n{self.logs()[-2000:]}")

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until no prediction holds the slot (Cog answers 409 instead of queueing)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/health-check", timeout=5.0).json().get("status") == "READY":
                return
            time.sleep(0.05)
        raise ProviderUnavailable(f"the Cog runtime stayed busy for {timeout_s:g}s")

    def logs(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> CogRuntime:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self._log.close()

"""The CLI battery: every bad input or bad configuration is one line on stderr and exit 2, never a
traceback, and nothing is run or written. Each case runs the real `broker` command in a subprocess."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.media import SAMPLE_RATE, Audio
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
EMPTY = str(ROOT / "tests" / "data" / "empty.toml")

#: (argv, extra env) from the test's tmp_path; each must exit 2 with one error line
Case = Callable[[Path], tuple[list[str], dict[str, str]]]


def _wav(tmp: Path, name: str = "in.wav") -> Path:
    path = tmp / name
    t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
    path.write_bytes(Audio((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)).to_bytes("wav"))
    return path


def _dir_named(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def _file(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


def _sparse(tmp: Path) -> Path:
    path = tmp / "huge.wav"
    with path.open("wb") as fh:
        fh.truncate(2 * 1024**3)  # 2 GiB that take no disk: the size alone must refuse it
    return path


CASES: dict[str, Case] = {
    "-o into /proc": lambda t: (["speak", "Hi there.", "-o", "/proc/out.wav"], {}),
    "-o read-only path": lambda t: (["speak", "Hi there.", "-o", "/sys/kernel/out.wav"], {}),
    "-o a directory": lambda t: (["speak", "Hi there.", "-o", str(_dir_named(t, "d.wav"))], {}),
    "-o a missing folder": lambda t: (["speak", "Hi there.", "-o", str(t / "no" / "out.wav")], {}),
    "-o is --audio": lambda t: (["render", "--audio", str(_wav(t, "same.mp4")), "-o", str(t / "same.mp4")], {}),
    "-o is --avatar": lambda t: (["render", "--text", "Hi.", "--avatar", str(_file(t, "face.mp4", "x")),
                                  "-o", str(t / "face.mp4")], {}),
    "--audio /dev/zero": lambda t: (["render", "--audio", "/dev/zero", "-o", str(t / "o.mp4")], {}),
    "--audio huge": lambda t: (["render", "--audio", str(_sparse(t)), "-o", str(t / "o.mp4")], {}),
    "--avatar /dev/zero": lambda t: (["render", "--text", "Hi.", "--avatar", "/dev/zero", "-o", str(t / "o.mp4")],
                                     {}),
    "negative --deadline": lambda t: (["quote", "Hi there.", "--deadline", "-5"], {}),
    "negative --days": lambda t: (["costs", "--days", "-1"], {}),
    "unknown --engine speak": lambda t: (["speak", "Hi.", "--engine", "bogus", "-o", str(t / "o.wav")], {}),
    "unknown --engine quote": lambda t: (["quote", "Hi.", "--engine", "bogus"], {}),
    "corrupt ledger (costs)": lambda t: (["costs"], {"BROKER_LEDGER__PATH": str(_file(t, "l.sqlite", "junk" * 99))}),
    "corrupt ledger (speak)": lambda t: (["speak", "Hi there.", "-o", str(t / "o.wav")],
                                         {"BROKER_LEDGER__PATH": str(_file(t, "l.sqlite", "junk" * 99))}),
    "malformed broker.toml": lambda t: (["costs"], {"BROKER_CONFIG": str(_file(t, "b.toml", "[runpod\nx = "))}),
    "BROKER_CONFIG missing": lambda t: (["costs"], {"BROKER_CONFIG": str(t / "nowhere.toml")}),
    "BROKER_CONFIG a directory": lambda t: (["quote", "Hi."], {"BROKER_CONFIG": str(t)}),
    "not UTF-8 text": lambda t: (["speak", os.fsdecode(b"caf\xe9"), "-o", str(t / "o.wav")], {}),
    "NUL in text": lambda t: (["speak", "a\x01b", "-o", str(t / "o.wav")], {}),
    "nothing speakable": lambda t: (["speak", "?!.", "-o", str(t / "o.wav")], {}),
    "fps under 1": lambda t: (["render", "--text", "Hi.", "--fps", "0.000002", "-o", str(t / "o.mp4")], {}),
}

#: one bad value per settings section; each variable alone must be exit 2 naming it
BAD_ENV = {
    "BROKER_MANAGER__BREAKER_FAILURES": "many",
    "BROKER_MANAGER__DEADLINE_S": "-5",
    "BROKER_LOCAL__CONCURRENCY": "two",
    "BROKER_LIMITS__MAX_TEXT_CHARS": "lots",
    "BROKER_HTTP__REQUEST_TIMEOUT_S": "soon",
    "BROKER_RUNPOD__ENGINES": "[piper",
    "BROKER_WORKER__ALLOW_PRIVATE_URLS": "perhaps",
    "BROKER_MODAL__SCALEDOWN_WINDOW_S": "1",
}


class Counting(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                server.requests += 1
                self.send_response(503)
                self.end_headers()

            do_GET = do_POST = _any

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def worker_url() -> Iterator[tuple[str, Counting]]:
    server = Counting()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


def _base_env(tmp: Path, worker: str) -> dict[str, str]:
    # A configured worker that counts requests: no case may reach it.
    return {"BROKER_CONFIG": EMPTY, "BROKER_LEDGER__PATH": str(tmp / "ledger.sqlite"), "BROKER_LOCAL__DEVICE": "cpu",
            "BROKER_HTTP__URL": worker, "BROKER_MANAGER__PROVIDERS": '["http"]', "COLUMNS": "80"}


def _assert_one_line_exit_2(result: Any) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path, worker_url: tuple[str, Counting]) -> None:
    argv, env = CASES[case](tmp_path)
    before = set(tmp_path.iterdir())
    result = run_cli(*argv, env={**_base_env(tmp_path, worker_url[0]), **env}, timeout=60)
    _assert_one_line_exit_2(result)
    assert worker_url[1].requests == 0  # nothing reached a provider
    assert not {p for p in set(tmp_path.iterdir()) - before if p.suffix in (".wav", ".mp4")}  # nothing written


@pytest.mark.parametrize("var", list(BAD_ENV))
def test_a_bad_broker_variable_is_one_line_naming_it(var: str, tmp_path: Path) -> None:
    env = {"BROKER_CONFIG": EMPTY, "BROKER_LEDGER__PATH": str(tmp_path / "l.sqlite"), var: BAD_ENV[var]}
    result = run_cli("quote", "Hi there.", env=env, timeout=60)
    _assert_one_line_exit_2(result)
    key = var.removeprefix("BROKER_").lower().split("__")[1]
    assert key in result.stderr.lower(), result.stderr  # as runpod.engines or as BROKER_RUNPOD__ENGINES


def test_unknown_config_keys_warn_with_the_nearest_name(tmp_path: Path) -> None:
    config = _file(tmp_path, "broker.toml", '[runpod]\nendpoint = "abc"\n[managr]\npolicy = "fastest"\n')
    env = {"BROKER_CONFIG": str(config), "BROKER_LEDGER__PATH": str(tmp_path / "l.sqlite"),
           "BROKER_RUNPOD__QUEUE_TIMEOUT": "5"}
    result = run_cli("costs", "--json", env=env, timeout=60)
    assert result.returncode == 0, result.stderr  # a warning, not an error: the command runs
    assert "unknown key 'runpod.endpoint'" in result.stderr and "did you mean 'runpod.endpoint_id'" in result.stderr
    assert "'managr'" in result.stderr and "did you mean 'manager'" in result.stderr
    assert "BROKER_RUNPOD__QUEUE_TIMEOUT is ignored; did you mean BROKER_RUNPOD__QUEUE_TIMEOUT_S" in result.stderr


def test_deploy_may_name_a_config_file_it_will_create(tmp_path: Path) -> None:
    env = {"BROKER_CONFIG": str(tmp_path / "new.toml"), "RUNPOD_API_KEY": ""}
    result = run_cli("deploy", "runpod", "--dry-run", env=env, timeout=60)
    assert "does not exist" not in result.stderr and "Traceback" not in result.stderr

"""Shared parts of the Replicate tests: one real Cog runtime for the whole run, emulators per test.

The Cog runtime costs a few seconds to start (it loads the Piper voice in ``setup``), so
every Replicate test module shares one; it stops when the test process exits.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from broker.providers.replicate import ReplicateProvider
from broker.testing.cog_runtime import CogRuntime
from broker.testing.replicate_emulator import EmulatorServer, ReplicateEmulator

TOKEN = "r8_test_Tok3n_never_to_be_printed"

_runtime: CogRuntime | None = None


def shared_runtime() -> CogRuntime:
    global _runtime
    if _runtime is None:
        pytest.importorskip("cog")
        pytest.importorskip("piper")
        _runtime = CogRuntime().start()
        atexit.register(_runtime.stop)
    return _runtime


@contextmanager
def emulator(**kwargs: object) -> Iterator[EmulatorServer]:
    with EmulatorServer(ReplicateEmulator(shared_runtime().url, token=TOKEN, seed=7, **kwargs)) as server:  # type: ignore[arg-type]
        yield server


def provider(server: EmulatorServer, **overrides: object) -> ReplicateProvider:
    kwargs: dict[str, object] = {"api_token": TOKEN, "model": "broker/broker", "base_url": f"{server.url}/v1"}
    kwargs.update(overrides)
    return ReplicateProvider(**kwargs)  # type: ignore[arg-type]

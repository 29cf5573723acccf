"""The broker worker on Modal: `broker deploy modal` (or `modal deploy handlers/modal/app.py`).

One GPU class. Its engines load once, before Modal takes a memory snapshot, so a cold start restores
them instead of loading them again. ``run_job`` runs one wire job, ``stream_job`` yields its chunks,
and ``web`` serves the same HTTP job API as `broker worker serve` behind Modal's proxy auth
(clients send a proxy auth token as ``Modal-Key`` / ``Modal-Secret``).

Everything tunable comes from ``BROKER_MODAL__*`` variables (or the [modal] section of the broker
config), read when this module is imported: by `modal deploy` on your machine, and again inside the
container, which is given the same values through ``env=``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import modal

from broker.settings import Settings

cfg = Settings().modal
# parent.parent.parent rather than parents[2]: inside the container this file sits at /root/app.py.
ROOT = Path(__file__).resolve().parent.parent.parent

app = modal.App(cfg.app_name)


def _image() -> modal.Image:
    if cfg.image:
        # Built from containers/worker.Dockerfile and pushed by you; broker is installed in it.
        return modal.Image.from_registry(cfg.image)
    image = (
        modal.Image.debian_slim(python_version="3.11")
        .apt_install("libsndfile1", "ffmpeg")
        # torch is pinned in the [local] extra; on Linux that wheel carries CUDA.
        .pip_install_from_pyproject(str(ROOT / "pyproject.toml"), optional_dependencies=["local", "worker"])
    )
    extra = extra_pip()
    if extra:  # your own engines (`broker.engines` entry points), as EXTRA_PIP does for the Dockerfiles
        image = image.pip_install(*extra)
    return image.add_local_python_source("broker", ignore=["**/__pycache__/**", "**/*.pyc"])


def extra_pip() -> list[str]:
    """``BROKER_EXTRA_PIP`` at deploy time: more pip requirements (plugin engines) for the image."""
    import shlex

    return shlex.split(os.environ.get("BROKER_EXTRA_PIP", ""))


def _container_env() -> dict[str, str | None]:
    """The container imports this file too: give it the values the deploy used."""
    values = {
        "APP_NAME": cfg.app_name,
        "HARDWARE": cfg.hardware,
        "MIN_CONTAINERS": str(cfg.min_containers),
        "MAX_CONTAINERS": str(cfg.max_containers),
        "SCALEDOWN_WINDOW_S": str(cfg.scaledown_window_s),
        "MEMORY_SNAPSHOT": str(cfg.memory_snapshot).lower(),
        "TIMEOUT_S": str(cfg.timeout_s),
    }
    env: dict[str, str | None] = {f"BROKER_MODAL__{k}": v for k, v in values.items()}
    env.update({k: v for k, v in os.environ.items() if k.startswith("BROKER_ENGINES__")})
    return env


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@app.cls(
    gpu=cfg.hardware,
    image=_image(),
    env=_container_env(),
    min_containers=cfg.min_containers,
    max_containers=cfg.max_containers,
    scaledown_window=cfg.scaledown_window_s,
    timeout=cfg.timeout_s,
    enable_memory_snapshot=cfg.memory_snapshot,
)
class BrokerWorker:
    @modal.enter(snap=cfg.memory_snapshot)
    def load(self) -> None:
        # A CPU memory snapshot is taken without a GPU: load onto the CPU here, move after restore.
        from broker import engines

        settings = Settings()
        engines.configure(settings.engines, device="cpu")
        engines.preload((settings.engines.default,))

    @modal.enter(snap=False)
    def to_gpu(self) -> None:
        if _cuda():
            from broker import engines

            settings = Settings()
            engines.configure(settings.engines, device="cuda")
            engines.preload((settings.engines.default,))

    @modal.method()
    def run_job(self, payload: dict[str, Any]) -> dict[str, Any]:
        from broker.worker import handle

        return handle(payload, limits=Settings().limits)

    @modal.method()
    def stream_job(self, payload: dict[str, Any]) -> Any:
        from broker.worker import handle_stream

        yield from handle_stream(payload, limits=Settings().limits)

    @modal.asgi_app(requires_proxy_auth=True)
    def web(self) -> Any:
        from broker.worker.server import create_app

        # Modal's proxy checks the token; a worker key on top is optional (BROKER_WORKER_API_KEY).
        return create_app(preload=None, api_key=os.environ.get("BROKER_WORKER_API_KEY") or None,
                          limits=Settings().limits)

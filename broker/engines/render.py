"""Talking-head render engine (being built: see the foundation issue)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from broker.errors import EngineUnavailable
from broker.media import Video
from broker.types import RenderRequest


def render_video(
    request: RenderRequest,
    *,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
) -> Video:
    raise EngineUnavailable("the render engine is not built yet")


def warm_up() -> None:
    return None

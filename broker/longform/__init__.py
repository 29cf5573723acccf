"""Long work: a book (or long audio) split into pieces, run on many workers at once, stitched in order.

``speak_long(manager, text_or_chapters, output=...)`` is the whole flow; ``LongJob`` gives the parts
(its quote, its forecast, ``stream()`` for in-order audio as it is made). See ``broker.longform.run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.longform.text import Chapter, chapters_from_text, read_chapters

if TYPE_CHECKING:
    from broker.longform.run import LongJob, LongResult, Progress

#: the scheduler loads on first use: ``broker speak`` imports only ``broker.longform.writer``
_LAZY = ("LongJob", "LongResult", "Progress")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from broker.longform import run

        return getattr(run, name)
    raise AttributeError(f"module 'broker.longform' has no attribute {name!r}")


def as_chapters(text_or_chapters: str | Sequence[Chapter] | Sequence[str]) -> list[Chapter]:
    """A string is split into chapters ("Chapter N" lines, Markdown headings); a list is taken as given."""
    if isinstance(text_or_chapters, str):
        return chapters_from_text(text_or_chapters)
    out = []
    for i, c in enumerate(text_or_chapters):
        out.append(c if isinstance(c, Chapter) else Chapter(f"Chapter {i + 1}", str(c)))
    return out


async def aspeak_long(manager: Any, text_or_chapters: str | Sequence[Chapter] | Sequence[str], *,
                      output: str | Path | None = None, **options: Any) -> LongResult:
    from broker.longform.run import LongJob

    job = LongJob(manager, as_chapters(text_or_chapters), output=Path(output) if output else None, **options)
    try:
        return await job.run()
    finally:
        job.close()


__all__ = ["Chapter", "LongJob", "LongResult", "Progress", "as_chapters", "aspeak_long", "read_chapters"]

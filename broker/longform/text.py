"""Reading long input into chapters: plain text, Markdown, EPUB, or stdin.

A chapter is a title and its text. Plain text splits at blank-line-separated "Chapter N" lines,
Markdown at headings, EPUB at its spine items. Bad input (empty, binary, not UTF-8, an EPUB with no
text) is an ``InvalidRequest`` naming the field, raised before anything is quoted or run.
"""

from __future__ import annotations

import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from broker.errors import InvalidRequest


@dataclass(frozen=True)
class Chapter:
    title: str
    text: str


_CHAPTER_LINE = re.compile(r"^\s*(chapter|part|book)\s+([0-9]+|[ivxlcdm]+|[a-z-]+)\b.*$", re.IGNORECASE)
_MD_HEADING = re.compile(r"^(#{1,3})\s+(.+?)\s*#*\s*$")
_MD_NOISE = [
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),  # images say nothing
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links keep their words
    (re.compile(r"`{1,3}([^`]*)`{1,3}"), r"\1"),
    (re.compile(r"(\*\*|__|\*|_)(\S(?:.*?\S)?)\1"), r"\2"),
    (re.compile(r"^\s*(?:[-*+]|\d+\.)\s+", re.MULTILINE), ""),
    (re.compile(r"^\s*>\s?", re.MULTILINE), ""),
    (re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,})\s*$", re.MULTILINE), ""),
]


def read_chapters(path: str | Path, field: str = "file") -> list[Chapter]:
    """The chapters in ``path`` (``-`` reads stdin as plain text or Markdown)."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        return chapters_from_text(_decode(data, "stdin", field), markdown=None, field=field)
    p = Path(path).expanduser()
    if p.is_dir():
        raise InvalidRequest(field, f"{p} is a directory, not a text, Markdown or EPUB file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InvalidRequest(field, f"cannot read {p}: {exc.strerror}") from None
    if p.suffix.lower() == ".epub" or data.startswith(b"PK\x03\x04"):
        return chapters_from_epub(p, field)
    md = p.suffix.lower() in (".md", ".markdown")
    return chapters_from_text(_decode(data, str(p), field), markdown=md, field=field)


def _decode(data: bytes, name: str, field: str) -> str:
    if not data.strip():
        raise InvalidRequest(field, f"{name} is empty")
    if b"\x00" in data[:8192]:
        raise InvalidRequest(field, f"{name} looks binary (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(field, f"{name} is not UTF-8 text (byte {exc.start}: {data[exc.start]:#04x})") from None


def chapters_from_text(text: str, *, markdown: bool | None = None, field: str = "text") -> list[Chapter]:
    """Chapters of plain text or Markdown (``markdown=None``: Markdown if it has headings)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if markdown is None:
        markdown = any(_MD_HEADING.match(line) for line in lines)
    chapters: list[Chapter] = []
    title, body = "", list[str]()

    def close() -> None:
        words = " ".join(body)
        if markdown:
            for pattern, repl in _MD_NOISE:
                words = pattern.sub(repl, words)
        words = re.sub(r"\s+", " ", words).strip()
        if words or title:
            chapters.append(Chapter(title or f"Chapter {len(chapters) + 1}", words))

    prev_blank = True
    for line in lines:
        heading = _MD_HEADING.match(line) if markdown else None
        marker = not markdown and prev_blank and _CHAPTER_LINE.match(line)
        if heading or marker:
            close()
            title, body = (heading.group(2) if heading else line).strip(), []
        else:
            body.append(line)
        prev_blank = not line.strip()
    close()
    # a heading with nothing under it is folded into the next chapter's title, not spoken alone
    kept = [c for c in chapters if c.text]
    if not kept:
        raise InvalidRequest(field, "there is no text to speak")
    return kept


def chapters_from_epub(path: Path, field: str = "file") -> list[Chapter]:
    try:
        import ebooklib
        from ebooklib import epub
    except ImportError:
        raise InvalidRequest(field, "reading EPUB needs ebooklib: pip install 'broker[books]'") from None
    try:
        book = epub.read_epub(str(path), options={"ignore_ncx": True})
    except Exception as exc:  # ebooklib raises zipfile, KeyError and its own errors for broken books
        raise InvalidRequest(field, f"{path} is not a readable EPUB ({type(exc).__name__}: {exc})") from None
    chapters: list[Chapter] = []
    for item_id, _linear in book.spine:
        item = book.get_item_with_id(item_id)
        if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT:
            continue
        markup = item.get_content().decode("utf-8", errors="replace")
        title_m = re.search(r"<h[1-3][^>]*>(.*?)</h[1-3]>", markup, re.IGNORECASE | re.DOTALL)
        text = _html_text(markup)
        if not text:
            continue
        title = _html_text(title_m.group(1)).rstrip(".") if title_m else ""
        if title and text.startswith(title):
            text = text[len(title):].lstrip(" .") or text
        chapters.append(Chapter(title or f"Chapter {len(chapters) + 1}", text))
    if not chapters:
        raise InvalidRequest(field, f"{path} is an EPUB with no text in its spine")
    return chapters


def _html_text(markup: str) -> str:
    """The words of an XHTML document; each block (paragraph, heading) ends as a sentence."""
    markup = re.sub(r"<(script|style|head)\b.*?</\1>", " ", markup, flags=re.IGNORECASE | re.DOTALL)
    markup = re.sub(r"<br\s*/?>|</(?:p|div|h[1-6]|li|blockquote)>", "\n", markup, flags=re.IGNORECASE)
    text = html.unescape(re.sub(r"<[^>]+>", " ", markup))
    blocks = [re.sub(r"\s+", " ", b).strip() for b in text.split("\n")]
    return " ".join(b if b[-1] in ".!?:;\"'”" else b + "." for b in blocks if b)


__all__ = ["Chapter", "chapters_from_epub", "chapters_from_text", "read_chapters"]

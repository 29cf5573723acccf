"""Cutting chapters into pieces: each piece one routed job of ~10-30 s compute on the chosen hardware.

Pieces end at sentence ends; a sentence too long for one piece is cut at a clause mark, else before a
function word (a phrase boundary), else at a space — never inside a word — and no piece crosses a
chapter. The size target comes from the quote (words per piece = target seconds ÷ compute seconds per
word), so a CSM piece on a slow card is shorter than a Piper piece on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from broker.longform.text import Chapter

#: audio seconds per word at narration pace (estimate_speech_seconds: 2.5 words a second)
SECONDS_PER_WORD = 0.4
#: aim each piece at this much compute time (the issue's 10-30 s window, at its low-middle)
TARGET_RUN_S = 15.0
MIN_WORDS, MAX_WORDS = 8, 400

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'\u201d\u2019)\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:\u2014])\s+")
_PHRASE_START = frozenset((
    "and", "but", "or", "nor", "so", "as", "when", "while", "because", "which", "that", "who", "whose",
    "with", "without", "for", "to", "in", "on", "at", "of", "from", "before", "after", "into", "over",
    "under", "by", "about", "since", "until", "the", "a", "an",
))


@dataclass(frozen=True)
class Piece:
    index: int
    chapter: int
    text: str
    #: sha256 of text + voice + engine + settings: the journal's key (same content = same audio)
    key: str
    #: last piece of its chapter (the stitcher leaves a longer pause after it)
    chapter_end: bool = False

    @property
    def words(self) -> int:
        return len(self.text.split())


def words_per_piece(rtf: float, target_run_s: float = TARGET_RUN_S) -> int:
    """How many words make a piece of ``target_run_s`` compute at real-time factor ``rtf``."""
    audio_s = target_run_s / max(rtf, 1e-6)
    return max(MIN_WORDS, min(MAX_WORDS, int(audio_s / SECONDS_PER_WORD)))


def piece_key(text: str, settings: dict[str, object]) -> str:
    blob = json.dumps({"text": text, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def split_pieces(chapters: Sequence[Chapter], max_words: int, settings: dict[str, object],
                 max_chars: int | None = None, first_words: int | None = None) -> list[Piece]:
    """Every chapter cut into pieces of at most ``max_words`` (and ``max_chars``), in reading order.

    ``first_words`` caps the book's first piece: it is what the listener waits for (and, for CSM
    without a caller's context, what every other piece waits for), so it is kept short."""
    pieces: list[Piece] = []
    for ci, ch in enumerate(chapters):
        first = first_words if ci == 0 and first_words else max_words
        texts = list(_pack(_units(ch.text, max_words, max_chars), max_words, max_chars, first))
        for j, t in enumerate(texts):
            pieces.append(Piece(len(pieces), ci, t, piece_key(t, settings), chapter_end=j == len(texts) - 1))
    return pieces


def _units(text: str, max_words: int, max_chars: int | None) -> Iterator[str]:
    """Sentences, with any over-long one cut into phrases that fit."""
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if sentence:
            yield from _fit(sentence, max_words, max_chars)


def _too_long(text: str, max_words: int, max_chars: int | None) -> bool:
    return len(text.split()) > max_words or (max_chars is not None and len(text) > max_chars)


def _fit(sentence: str, max_words: int, max_chars: int | None) -> Iterator[str]:
    if not _too_long(sentence, max_words, max_chars):
        yield sentence
        return
    clauses = [c for c in _CLAUSE_END.split(sentence) if c.strip()]
    if len(clauses) > 1:
        for packed in _pack(iter(clauses), max_words, max_chars):
            yield from _fit(packed, max_words, max_chars) if _too_long(packed, max_words, max_chars) else [packed]
        return
    words = sentence.split()
    limit = max_words if max_chars is None else min(max_words, max(1, max_chars // 8))
    while words:
        if len(words) <= limit and not _too_long(" ".join(words), max_words, max_chars):
            yield " ".join(words)
            return
        cut = _phrase_cut(words, limit)
        yield " ".join(words[:cut])
        words = words[cut:]


def _phrase_cut(words: list[str], limit: int) -> int:
    """Index to cut before: the last function word in the back half of the window, else the window's end."""
    window = min(limit, len(words) - 1)
    for j in range(window, max(1, window // 2), -1):
        if words[j].lower().strip("\"'(") in _PHRASE_START and words[j - 1].lower() not in _PHRASE_START:
            return j
    return max(1, window)


def _pack(units: Iterator[str], max_words: int, max_chars: int | None,
          first_words: int | None = None) -> Iterator[str]:
    """Join consecutive units while the piece stays within the limits (the first within ``first_words``)."""
    buf: list[str] = []
    words = chars = 0
    limit = first_words or max_words
    for u in units:
        n, c = len(u.split()), len(u) + 1
        if buf and (words + n > limit or (max_chars is not None and chars + c > max_chars)):
            yield " ".join(buf)
            buf, words, chars = [], 0, 0
            limit = max_words
        buf.append(u)
        words += n
        chars += c
    if buf:
        yield " ".join(buf)


__all__ = ["Piece", "piece_key", "split_pieces", "words_per_piece"]

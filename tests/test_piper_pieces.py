"""How Piper's input is cut into pieces: the first one short (time to first audio), nothing lost."""

from __future__ import annotations

import pytest

from broker.engines.piper_engine import _FIRST_PIECE_CHARS, _pieces

TEXTS = [
    "The lighthouse keeper climbed the spiral stairs an hour before dusk, as he had every evening. Then he slept.",
    "In the beginning God created the heaven and the earth and everything in it that was good.",
    "Four score and seven years ago our fathers brought forth on this continent a new nation.",
    "It was the best of times, it was the worst of times.",
    "Short one. Another short one.",
]


@pytest.mark.parametrize("text", TEXTS)
def test_first_piece_is_short_and_nothing_is_lost(text: str) -> None:
    pieces = list(_pieces(text))
    assert len(pieces[0]) <= _FIRST_PIECE_CHARS
    assert " ".join(pieces).split() == text.split()


def test_cuts_fall_at_clauses_or_before_function_words() -> None:
    assert list(_pieces(TEXTS[0]))[:3] == [
        "The lighthouse keeper climbed", "the spiral stairs an hour before dusk,", "as he had every evening.",
    ]
    assert next(_pieces(TEXTS[1])) == "In the beginning God created the heaven"
    assert next(_pieces(TEXTS[3])) == "It was the best of times,"
    # later sentences are never cut
    assert list(_pieces(TEXTS[4])) == ["Short one.", "Another short one."]

"""Long work: chunking, in-order stitching of out-of-order pieces, failover per piece, budget stop and resume."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from broker.errors import BudgetStopped, InvalidRequest, PieceFailed
from broker.longform import LongJob, as_chapters
from broker.longform.chunk import split_pieces
from broker.longform.journal import Journal
from broker.longform.stitch import pause, prepare
from broker.longform.text import Chapter, chapters_from_text
from broker.longform.writer import partial_path
from broker.media import SAMPLE_RATE, Audio
from broker.money.ledger import Ledger
from broker.routing.manager import CloudGPUManager
from broker.settings import Settings
from broker.testing.fake import FakeProvider, fake_catalog
from broker.types import SpeechRequest

SENTENCES = [f"Sentence number {i} tells part {i} of the story." for i in range(60)]


def distinct(request: object, behaviour: str) -> Audio:
    """Audio that says which text it was made from: a tone whose pitch and length come from the text."""
    assert isinstance(request, SpeechRequest)
    h = int(hashlib.sha256(request.text.encode()).hexdigest()[:6], 16)
    n = int(SAMPLE_RATE * (0.36 * len(request.text.split()) + 0.01 * (h % 7)))
    t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
    return Audio((0.2 * np.sin(2 * np.pi * (150 + h % 400) * t)).astype(np.float32))


def manager_for(tmp_path: Path, *providers: FakeProvider) -> CloudGPUManager:
    s = Settings()
    s.ledger.path = str(tmp_path / "ledger.sqlite")
    s.manager.fallback_local = False
    s.manager.backoff_initial_s = s.manager.backoff_jitter_s = 0.0
    return CloudGPUManager(list(providers), settings=s, catalog=fake_catalog(*providers))


def book(chapters: int = 3, per: int = 20) -> list[Chapter]:
    return [Chapter(f"Part {c + 1}", " ".join(SENTENCES[c * per:(c + 1) * per])) for c in range(chapters)]


def expected_book(job: LongJob) -> np.ndarray:
    """What the stitcher must write: every piece levelled and faded, in order, with its pause."""
    parts = []
    done = job.journal.done([p.key for p in job.pieces])
    for p in job.pieces:
        parts.append(prepare(job.journal.load_piece(done[p.key]), SAMPLE_RATE))
        if p.index < len(job.pieces) - 1:
            parts.append(pause(SAMPLE_RATE, p.chapter_end))
    return np.concatenate(parts)


# -- chunking ------------------------------------------------------------------------------------------
def test_pieces_end_at_sentences_and_never_cross_a_chapter() -> None:
    chapters = book(3, 20)
    pieces = split_pieces(chapters, 40, {"engine": "piper"})
    assert {p.chapter for p in pieces} == {0, 1, 2}
    for p in pieces:
        assert p.text.endswith("story."), p.text
        assert p.words <= 40
        assert p.text in chapters[p.chapter].text
    # every word appears exactly once, in order
    assert " ".join(p.text for p in pieces).split() == " ".join(c.text for c in chapters).split()
    assert [p.chapter_end for p in pieces].count(True) == 3


def test_a_very_long_sentence_is_cut_at_phrases_never_inside_a_word() -> None:
    sentence = ("the quick brown fox jumped over the lazy dog " * 30).strip() + "."
    pieces = split_pieces([Chapter("One", sentence)], 25, {})
    assert len(pieces) > 4
    words = sentence.split()
    assert " ".join(p.text for p in pieces).split() == words
    assert all(p.words <= 25 for p in pieces)
    assert sum(p.text.split()[0] in ("over", "the") for p in pieces[1:]) >= len(pieces) // 2  # phrase starts


def test_chapters_from_chapter_lines_and_markdown() -> None:
    text = "Chapter 1\n\nIt began. Then more.\n\nChapter Two\n\nIt ended.\n"
    assert [c.title for c in chapters_from_text(text)] == ["Chapter 1", "Chapter Two"]
    md = "# Intro\n\nSome **bold** [link](http://x). ![img](a.png)\n\n## Next\n\n- a list item.\n"
    got = chapters_from_text(md)
    assert [c.title for c in got] == ["Intro", "Next"]
    assert got[0].text == "Some bold link." and got[1].text == "a list item."
    with pytest.raises(InvalidRequest, match="no text"):
        chapters_from_text("# Only a heading\n")


# -- stitching -----------------------------------------------------------------------------------------
async def test_out_of_order_pieces_are_stitched_in_exact_order(tmp_path: Path) -> None:
    # the cheap endpoint has one slow worker, so piece 0 finishes after the pieces the fast one takes
    slow = FakeProvider("slow", latency_s=0.3, usd_per_second=0.0001, max_concurrency=1, make=distinct)
    fast = FakeProvider("fast", latency_s=0.01, usd_per_second=0.001, max_concurrency=8, make=distinct)
    m = manager_for(tmp_path, slow, fast)
    out = tmp_path / "book.wav"
    job = LongJob(m, book(3, 20), output=out, target_run_s=0.4)
    finished: list[int] = []
    job.on_progress = lambda p: finished.append(p.done)
    result = await job.run()
    assert result.pieces == len(job.pieces) >= 6
    assert result.providers["fast"] >= 1 and result.providers["slow"] >= 1
    written, rate = sf.read(out, dtype="float32")
    assert rate == SAMPLE_RATE
    want = expected_book(job)
    assert len(written) == len(want)  # no gap, no duplicate
    np.testing.assert_allclose(written, want, atol=1.5 / 32768)  # sample-exact at 16 bits
    # and each stored piece is the one made from its own text, so the order is the text's order
    done = job.journal.done([p.key for p in job.pieces])
    for p in job.pieces:
        ref = distinct(SpeechRequest(text=p.text), "ok").samples
        np.testing.assert_allclose(job.journal.load_piece(done[p.key]), ref, atol=1e-6)
    job.close()


async def test_stream_yields_the_book_in_order(tmp_path: Path) -> None:
    fast = FakeProvider("fast", latency_s=0.01, usd_per_second=0.001, max_concurrency=4, make=distinct)
    m = manager_for(tmp_path, fast)
    job = LongJob(m, book(2, 10), target_run_s=0.4)
    chunks = [c async for c in job.stream()]
    assert [c.index for c in chunks] == list(range(len(job.pieces)))
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    np.testing.assert_allclose(np.concatenate([c.audio.samples for c in chunks]), expected_book(job), atol=1e-6)
    job.close()


# -- failover and budgets ------------------------------------------------------------------------------
async def test_a_piece_failing_on_a_is_served_by_b(tmp_path: Path) -> None:
    a = FakeProvider("a", script=["ok", "failed", "ok"], usd_per_second=0.0001, max_concurrency=1, make=distinct)
    b = FakeProvider("b", usd_per_second=0.01, max_concurrency=1, make=distinct)
    m = manager_for(tmp_path, a, b)
    out = tmp_path / "book.flac"
    job = LongJob(m, book(1, 12), output=out, workers=1, target_run_s=0.4)
    result = await job.run()
    failed = [r for r in result.attempts if len(r["attempts"]) > 1]
    assert len(failed) == 1
    assert [x["provider"] for x in failed[0]["attempts"]] == ["a", "b"]
    assert failed[0]["attempts"][0]["outcome"] == "failed" and failed[0]["provider"] == "b"
    assert out.is_file()
    job.close()


async def test_budget_stops_cleanly_then_resumes_without_paying_twice(tmp_path: Path) -> None:
    a = FakeProvider("a", usd_per_second=1.0, billed_seconds=1.0, max_concurrency=1, make=distinct)
    m = manager_for(tmp_path, a)
    out = tmp_path / "book.m4b"
    chapters = book(2, 10)
    job = LongJob(m, chapters, output=out, max_usd=3.0, target_run_s=0.4, workers=1)
    total = len(job.pieces)
    assert total > 4
    with pytest.raises(BudgetStopped, match="resume") as info:
        await job.run()
    assert not out.exists()  # nothing misleading at -o
    assert info.value.partial == str(partial_path(out)) and partial_path(out).is_file()
    first_run = a.submits
    assert 2 <= first_run < total
    assert info.value.spent_usd == pytest.approx(first_run) and info.value.spent_usd <= 3.0  # at the cap, not past
    job.close()
    # later, a bigger budget: only the missing pieces run
    job2 = LongJob(m, chapters, output=out, max_usd=100.0, target_run_s=0.4)
    result = await job2.run()
    assert (result.pieces_reused, result.pieces_run) == (first_run, total - first_run)
    assert a.submits == total
    m.ledger.flush()
    ledger = Ledger(m.settings.ledger.path)
    succeeded = [r for r in ledger.attempts() if r["status"] == "succeeded"]
    assert len(succeeded) == total  # each piece paid exactly once
    ledger.close()
    assert out.is_file()
    job2.close()


async def test_first_piece_failing_everywhere_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    bad = FakeProvider("bad", script=["silent"], usd_per_second=0.001, make=None)
    worse = FakeProvider("worse", script=["nan"], usd_per_second=0.002)
    m = manager_for(tmp_path, bad, worse)
    out = tmp_path / "book.wav"
    job = LongJob(m, book(1, 6), output=out, workers=1, target_run_s=0.4)
    with pytest.raises(PieceFailed, match="piece 0") as info:
        await job.run()
    assert info.value.piece == 0
    assert not out.exists() and not partial_path(out).exists()
    assert not list(tmp_path.glob(".book.wav*"))  # no temporary left either
    job.close()


def test_bad_job_options_are_typed_errors(tmp_path: Path) -> None:
    m = manager_for(tmp_path, FakeProvider("a"))
    with pytest.raises(InvalidRequest, match="output"):
        LongJob(m, book(1, 2), output=tmp_path / "x.ogg")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InvalidRequest, match="split_chapters"):
        LongJob(m, book(1, 2), split_dir=f)
    with pytest.raises(InvalidRequest, match="text"):
        LongJob(m, as_chapters([]))


def test_journal_lists_jobs_with_progress(tmp_path: Path) -> None:
    a = FakeProvider("a", usd_per_second=0.5, billed_seconds=1.0, make=distinct)
    m = manager_for(tmp_path, a)
    r = m.speak_long(book(2, 6), output=tmp_path / "b.wav", target_run_s=0.4)
    j = Journal(m.settings.ledger.path)
    (row,) = j.jobs()
    assert row["status"] == "done" and row["pieces_done"] == row["pieces"] == r.pieces
    assert row["cost_usd"] == pytest.approx(r.cost_usd) and row["chapters"] == 2
    j.close()

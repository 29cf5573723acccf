"""A long job: pieces fan out through the manager, finish in any order, and are stitched strictly in order.

Each piece is one ordinary routed job (``manager.submit``: ranking, retries, failover, validation,
budgets, the ledger). The scheduler gives each piece a lane — the cheapest endpoint with a free slot —
as the manager's ``prefer``, and names the saturated endpoints in ``avoid``, so pieces spill onto the
next endpoint instead of queueing behind the first. A finished piece goes to the journal (audio on disk)
before anything else happens, so a crash loses at most the pieces in flight. The stitcher waits for the
head of the book, levels and fades each piece, and writes it (and yields it) as soon as it is next.

CSM continuity: every piece gets the same reference context — the caller's context segments, else the
first piece's audio — so no piece waits for the one before it. The trade-off: the voice is anchored to
one reference instead of drifting naturally from sentence to sentence, and prosody does not carry across
a join (each piece starts "fresh" from the same anchor); in exchange N pieces run at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import BrokerError, BudgetExceeded, BudgetStopped, InvalidRequest, PieceFailed
from broker.longform.chunk import MIN_WORDS, SECONDS_PER_WORD, TARGET_RUN_S, Piece, split_pieces, words_per_piece
from broker.longform.journal import Journal, PieceRecord, open_journal
from broker.longform.plan import Lane, lanes_for, simulate, workers_for_deadline
from broker.longform.schedule import Slots
from broker.longform.stitch import pause, prepare
from broker.longform.text import Chapter
from broker.longform.writer import AudioWriter, chapter_file_name, check_output_path
from broker.media import SAMPLE_RATE, Audio, AudioChunk
from broker.money.budget import TenantBudget
from broker.types import Segment, SpeechRequest, build

log = logging.getLogger("broker.longform")

_SAMPLE_WORDS = 100
#: CSM stops at 90 s of audio; keep its pieces well inside that
_ENGINE_MAX_WORDS = {"csm": 150}


@dataclass
class Progress:
    done: int
    total: int
    audio_seconds: float
    cost_usd: float
    eta_s: float | None


@dataclass
class LongResult:
    output: str | None
    pieces: int
    pieces_run: int
    pieces_reused: int
    chapters: int
    audio_seconds: float
    cost_usd: float
    providers: dict[str, int]
    attempts: list[dict[str, Any]]
    wall_seconds: float
    first_audio_s: float | None
    workers: int
    job: str
    files: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class LongJob:
    """``await run()`` writes the book; ``stream()`` yields its audio in order as it is made."""

    def __init__(self, manager: Any, chapters: Sequence[Chapter], *, output: Path | None = None,
                 split_dir: Path | None = None, speaker: int | str = 0, engine: str | None = None,
                 context: Sequence[Segment] = (), temperature: float = 0.9, topk: int = 50,
                 workers: int | None = None, deadline_s: float | None = None, max_usd: float | None = None,
                 target_run_s: float = TARGET_RUN_S, journal: Journal | None = None,
                 on_progress: Callable[[Progress], None] | None = None, command: str = "",
                 tenant: TenantBudget | None = None) -> None:
        if not chapters:
            raise InvalidRequest("text", "there is no text to speak")
        if output is not None:
            check_output_path(output)
        if split_dir is not None and split_dir.exists() and not split_dir.is_dir():
            raise InvalidRequest("split_chapters", f"{split_dir} is a file, not a directory")
        if max_usd is not None and max_usd <= 0:
            raise InvalidRequest("max_usd", "must be a positive number of dollars")
        if workers is not None and workers < 1:
            raise InvalidRequest("workers", "must be at least 1")
        self.manager, self.chapters = manager, list(chapters)
        self.output, self.split_dir = output, split_dir
        self.engine = engine or manager.settings.engines.default
        self.speaker, self.context = speaker, list(context)
        self.max_usd, self.on_progress, self.command = max_usd, on_progress, command
        self.tenant = tenant  # every piece is this tenant's, under its budgets
        self._fields = {"speaker": speaker, "engine": engine, "temperature": temperature, "topk": topk}
        # the request every piece shares, checked now: bad settings fail before anything runs
        sample = build(SpeechRequest, text="word " * _SAMPLE_WORDS, context=self.context, **self._fields)
        lanes = lanes_for(manager, sample, self.engine, _SAMPLE_WORDS)
        rtf = lanes[0].run_s / (_SAMPLE_WORDS * SECONDS_PER_WORD)
        max_words = min(words_per_piece(rtf, target_run_s), _ENGINE_MAX_WORDS.get(self.engine, 10**6))
        # quoted again for a piece of the size chosen, so cold starts and minimum bills weigh right
        self.lanes = lanes_for(manager, sample.model_copy(update={"text": "word " * max_words}), self.engine,
                               max_words)
        ctx_key = hashlib.sha256(b"".join(s.audio.samples.tobytes() + s.text.encode() for s in self.context))
        key_settings = {**self._fields, "engine": self.engine, "context": ctx_key.hexdigest()}
        self.pieces: list[Piece] = split_pieces(self.chapters, max_words, key_settings,
                                                manager.settings.limits.max_text_chars,
                                                first_words=max(MIN_WORDS, max_words // 4))
        titles = [c.title for c in self.chapters]
        self.key = hashlib.sha256(json.dumps([[p.key for p in self.pieces], titles]).encode()).hexdigest()[:16]
        self.journal = journal or open_journal(manager.settings)  # SQLite beside the ledger, or PostgreSQL
        self._own_journal = journal is None
        capacity = sum(lane.limit for lane in self.lanes)
        self.workers = min(workers or capacity, capacity)
        if deadline_s is not None and workers is None:
            self.workers, _ = workers_for_deadline(len(self.pieces), self.lanes, deadline_s)
        self._queue: asyncio.Queue[AudioChunk | None] | None = None

    def forecast(self, workers: int) -> Any:
        return simulate(len(self.pieces), self.lanes, workers)

    # -- running ----------------------------------------------------------------------------------
    async def run(self) -> LongResult:
        t0 = asyncio.get_running_loop().time()
        j = self.journal
        self._records: dict[int, PieceRecord] = {}
        self.slots = Slots(self.lanes, self.workers, self.max_usd)
        known = await asyncio.to_thread(j.done, [p.key for p in self.pieces])
        for p in self.pieces:
            if p.key in known:
                self._records[p.index] = known[p.key]
        self._reused = len(self._records)
        self._events = {p.index: asyncio.Event() for p in self.pieces if p.index not in self._records}
        self._ran: dict[int, dict[str, Any]] = {}
        self._twins: dict[str, list[int]] = {}
        self._dispatch_done = asyncio.Event()
        self._first_audio: float | None = None
        self._audio_s = 0.0
        self._t0 = t0
        self._handoff: dict[int, np.ndarray] = {}
        self._head = 0
        dispatcher = asyncio.create_task(self._dispatch())
        try:
            await asyncio.to_thread(j.begin_job, self.key, self.pieces, [c.title for c in self.chapters],
                                    output=str(self.output or self.split_dir or ""), command=self.command)
            files = await self._stitch()
        except BaseException:
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
            raise
        await dispatcher
        status = "done"
        await asyncio.to_thread(j.end_job, self.key, status, None, files[0] if files else None)
        providers: dict[str, int] = {}
        for info in self._ran.values():
            if info.get("provider"):
                providers[info["provider"]] = providers.get(info["provider"], 0) + 1
        return LongResult(
            output=str(self.output) if self.output else (str(self.split_dir) if self.split_dir else None),
            pieces=len(self.pieces), pieces_run=len(self._ran), pieces_reused=self._reused,
            chapters=len(self.chapters), audio_seconds=self._audio_s, cost_usd=self.slots.spent, providers=providers,
            attempts=[{"piece": i, **self._ran[i]} for i in sorted(self._ran)],
            wall_seconds=asyncio.get_running_loop().time() - t0,
            first_audio_s=self._first_audio, workers=self.workers, job=self.key, files=files)

    async def stream(self) -> AsyncIterator[AudioChunk]:
        """Run the job, yielding each piece's audio (pause included) in order as soon as it is next."""
        self._queue = asyncio.Queue(maxsize=4)
        task = asyncio.create_task(self.run())
        try:
            while True:
                getter = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    task.result()  # raises the job's error, if it stopped
                    while not self._queue.empty():
                        item = self._queue.get_nowait()
                        if item is not None:
                            yield item
                    return
                item = getter.result()
                if item is None:
                    break
                yield item
            self.result = await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _dispatch(self) -> None:
        try:
            missing: list[Piece] = []
            for p in self.pieces:
                if p.index not in self._records:
                    # the same text twice in one book is made once
                    twins = self._twins.setdefault(p.key, [])
                    if not twins:
                        missing.append(p)
                    twins.append(p.index)
            anchor = self.engine == "csm" and not self.context
            tasks: set[asyncio.Task[None]] = set()
            for n, piece in enumerate(missing):
                lane = await self.slots.take(piece)
                if lane is None:
                    break
                t = asyncio.create_task(self._run_piece(piece, lane))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                if anchor and n == 0 and piece.index == 0:
                    await t  # the first piece's audio becomes every other piece's reference
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._dispatch_done.set()
            for ev in self._events.values():
                ev.set()  # wake the stitcher: it sees which pieces never came

    def _context_for(self, piece: Piece) -> list[Segment]:
        if self.context or self.engine != "csm" or piece.index == 0:
            return self.context
        first = self._records.get(0)
        if first is None:
            return []
        audio = Audio(self.journal.load_piece(first), SAMPLE_RATE)
        speaker = self.speaker if isinstance(self.speaker, int) else 0
        return [Segment(speaker=speaker, text=self.pieces[0].text, audio=audio)]

    async def _run_piece(self, piece: Piece, lane: Lane) -> None:
        job: Any = None
        held = True

        async def release() -> None:
            # the worker is free the moment its job ends: the next piece starts while this one is saved
            nonlocal held
            if held:
                held = False
                await self.slots.release(lane, piece)

        try:
            request = build(SpeechRequest, text=piece.text, context=self._context_for(piece), **self._fields)
            job = await self.manager.submit(request, prefer=[lane.name], avoid=self.slots.saturated(lane),
                                            max_usd=self.slots.cap_for(piece), tenant=self.tenant)
            await asyncio.to_thread(self.journal.mark_running, piece.key, job.id)
            out = await job.result()
            report = out.report
            cost = report.cost_usd if report else 0.0
            self.slots.paid(cost, piece)
            await release()
            if self._head in self._twins.get(piece.key, [piece.index]):
                self._handoff[self._head] = out.samples  # the stitcher is waiting for it: no disk round trip
                self._events[self._head].set()
            attempts = [{"provider": a.provider, "outcome": a.outcome, "cost_usd": round(a.cost_usd, 8),
                         **({"error": f"{a.error_class}: {a.message}"} if a.error_class else {})}
                        for a in (report.attempts if report else [])]
            provider = report.provider if report else None
            path = await asyncio.to_thread(self._save, piece, out, provider, cost, attempts, job.id)
            record = PieceRecord(piece.key, "done", str(path), len(out), provider, cost, job.id)
            for index in self._twins.get(piece.key, [piece.index]):
                self._records[index] = record
                self._events[index].set()
            self._ran[piece.index] = {"provider": provider, "cost_usd": round(cost, 8), "attempts": attempts}
            self._report_progress()
        except BrokerError as exc:
            report = getattr(job, "report", None)
            if report is not None:
                self.slots.paid(report.cost_usd)
            await asyncio.to_thread(self.journal.mark_failed, piece.key, f"{type(exc).__name__}: {exc.message}")
            if self.slots.stop is None:
                if isinstance(exc, BudgetExceeded):
                    self.slots.stop = BudgetStopped(f"the budget stopped piece {piece.index}: {exc.message}",
                                               spent_usd=self.slots.spent)
                else:
                    self.slots.stop = PieceFailed(
                        f"piece {piece.index} (chapter {piece.chapter + 1}, \"{_clip(piece.text)}\") failed: "
                        f"{exc.message}", getattr(exc, "attempts", ()), piece=piece.index)
        except Exception as exc:  # a bug must still stop the job with a typed error, and say what it was
            log.exception("piece %d: internal error", piece.index)
            if self.slots.stop is None:
                self.slots.stop = PieceFailed(f"piece {piece.index}: internal error: {type(exc).__name__}: {exc}",
                                         piece=piece.index)
        finally:
            if job is not None and not job.state.terminal:
                await asyncio.shield(job.cancel())
            ev = self._events.get(piece.index)
            if ev is not None:
                ev.set()
            await release()

    def _save(self, piece: Piece, out: Audio, provider: str | None, cost: float, attempts: list[dict[str, Any]],
              job_id: str) -> Path:
        # the ledger's rows for this piece are on disk before the journal calls it done, so after any
        # crash "done" always comes with the proof of what it cost (and a rerun never pays again)
        ledger = getattr(self.manager, "ledger", None)
        if ledger is not None:
            ledger.flush()
        return self.journal.save_piece(piece.key, out.samples, out.sample_rate, provider=provider, cost_usd=cost,
                                       attempts=attempts, manager_job_id=job_id)

    async def _next(self, piece: Piece) -> np.ndarray | None:
        """The piece's audio once it is made (handed over if it was the head, else from the journal)."""
        self._head = piece.index
        ev = self._events.get(piece.index)
        if ev is not None:
            await ev.wait()
        samples = self._handoff.pop(piece.index, None)
        if samples is not None:
            return samples
        record = self._records.get(piece.index)
        return None if record is None else await asyncio.to_thread(self.journal.load_piece, record)

    async def _stitch(self) -> list[str]:
        files: list[str] = []
        book = AudioWriter(self.output) if self.output is not None else None
        chapter_out: AudioWriter | None = None
        if self.split_dir is not None:
            self.split_dir.mkdir(parents=True, exist_ok=True)
        ext = self.output.suffix.lower() if self.output is not None else ".wav"
        try:
            for piece in self.pieces:
                made = await self._next(piece)
                if made is None:
                    raise self.slots.stop or PieceFailed(f"piece {piece.index} was not made", piece=piece.index)
                samples = prepare(made, SAMPLE_RATE)
                last = piece.index == len(self.pieces) - 1
                gap = pause(SAMPLE_RATE, piece.chapter_end) if not last else np.zeros(0, np.float32)
                first_of_chapter = piece.index == 0 or self.pieces[piece.index - 1].chapter != piece.chapter
                if first_of_chapter:
                    title = self.chapters[piece.chapter].title
                    if book is not None:
                        book.chapter(title)
                    if self.split_dir is not None:
                        chapter_out = AudioWriter(self.split_dir / chapter_file_name(piece.chapter, title, ext))
                for w in (book, chapter_out):
                    if w is not None:
                        w.write(samples)
                        w.write(gap if w is book else np.zeros(0, np.float32))
                if chapter_out is not None and piece.chapter_end:
                    files.append(str(chapter_out.finish()))
                    chapter_out = None
                self._audio_s += (len(samples) + len(gap)) / SAMPLE_RATE
                if self._first_audio is None:
                    self._first_audio = asyncio.get_running_loop().time() - self._t0
                if self._queue is not None:
                    await self._queue.put(AudioChunk(Audio(np.concatenate([samples, gap])), piece.index,
                                                     final=last, text=piece.text))
                self._report_progress()
            if book is not None:
                files.insert(0, str(book.finish()))
            if self._queue is not None:
                await self._queue.put(None)
            return files
        except BaseException as exc:
            kept = [w.stop(keep_partial=True) for w in (book, chapter_out) if w is not None]
            partial = next((str(p) for p in kept if p is not None), None)
            if isinstance(exc, BrokerError):
                await self._stopped(exc, partial)
            raise

    async def _stopped(self, exc: BrokerError, partial: str | None) -> None:
        done = len(self._records)
        hint = (f"; {done}/{len(self.pieces)} pieces are saved"
                + (f", partial audio at {partial}" if partial else "")
                + "; run the same command again to resume (finished pieces are not paid again)")
        exc.message += hint
        exc.args = (exc.message,)
        if isinstance(exc, (PieceFailed, BudgetStopped)):
            exc.partial = partial
        status = "stopped" if isinstance(exc, BudgetExceeded) else "failed"
        await asyncio.to_thread(self.journal.end_job, self.key, status, exc.message)

    def _report_progress(self) -> None:
        if self.on_progress is None:
            return
        done = len(self._records)
        elapsed = asyncio.get_running_loop().time() - self._t0
        run_now = done - self._reused
        left = len(self.pieces) - done
        eta = elapsed / run_now * left if run_now else None
        self.on_progress(Progress(done, len(self.pieces), self._audio_s, self.slots.spent, eta))

    def close(self) -> None:
        if self._own_journal:
            self.journal.close()


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


__all__ = ["LongJob", "LongResult", "Progress"]

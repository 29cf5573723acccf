"""The long-work journal: every piece's state and audio, so a rerun redoes only what is missing.

All of the journal's SQL lives in this module, behind the small ``Journal`` class (a PostgreSQL
backend implements the same methods). It shares the ledger's SQLite file (``settings.ledger.path``):
one file holds what was paid and what it bought. A piece is keyed by a content hash of its text,
voice, engine and settings, so the same piece in any job is made once; its audio is a FLAC file under
``pieces/`` beside the database, written to a temporary name and renamed before the row says "done",
so a kill -9 at any moment leaves either a finished piece or a missing one, never a torn one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker.longform.chunk import Piece

_SCHEMA = """
CREATE TABLE IF NOT EXISTS longform_jobs (
    job_key TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    command TEXT,
    pieces_total INTEGER NOT NULL,
    chapters TEXT NOT NULL,
    message TEXT
);
CREATE TABLE IF NOT EXISTS longform_job_pieces (
    job_key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    piece_key TEXT NOT NULL,
    chapter INTEGER NOT NULL,
    words INTEGER NOT NULL,
    PRIMARY KEY (job_key, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS longform_pieces (
    piece_key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    audio_path TEXT,
    samples INTEGER,
    sample_rate INTEGER,
    provider TEXT,
    cost_usd REAL NOT NULL DEFAULT 0,
    attempts TEXT,
    manager_job_id TEXT,
    error TEXT,
    updated_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class PieceRecord:
    key: str
    state: str
    audio_path: str | None
    samples: int | None
    provider: str | None
    cost_usd: float
    manager_job_id: str | None


class Journal:
    """SQLite journal of long jobs and their pieces (thread-safe; one connection per instance)."""

    def __init__(self, path: str | Path, pieces_dir: str | Path | None = None) -> None:
        self.path = str(path)
        if self.path == ":memory:":
            self._tmp = tempfile.TemporaryDirectory(prefix="broker-pieces-")
            self.pieces_dir = Path(pieces_dir or self._tmp.name)
        else:
            db = Path(self.path).expanduser()
            db.parent.mkdir(parents=True, exist_ok=True)
            self.path = str(db)
            self.pieces_dir = Path(pieces_dir) if pieces_dir else db.parent / "pieces"
        self.pieces_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ------------------------------------------------------------------------------------
    def begin_job(self, job_key: str, pieces: Sequence[Piece], chapters: Sequence[str], *, output: str,
                  command: str) -> None:
        """Record the job and its piece list (idempotent: a rerun of the same job updates it)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO longform_jobs (job_key, created_at, updated_at, status, output, command, "
                    "pieces_total, chapters) VALUES (?, ?, ?, 'running', ?, ?, ?, ?) ON CONFLICT(job_key) DO "
                    "UPDATE SET updated_at = excluded.updated_at, status = 'running', output = excluded.output, "
                    "command = excluded.command, message = NULL",
                    (job_key, now, now, output, command, len(pieces), json.dumps(list(chapters))))
                self._db.executemany(
                    "INSERT OR IGNORE INTO longform_job_pieces (job_key, idx, piece_key, chapter, words) "
                    "VALUES (?, ?, ?, ?, ?)", [(job_key, p.index, p.key, p.chapter, p.words) for p in pieces])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def end_job(self, job_key: str, status: str, message: str | None = None, output: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE longform_jobs SET status = ?, message = ?, updated_at = ?, "
                             "output = COALESCE(?, output) WHERE job_key = ?",
                             (status, message, time.time(), output, job_key))

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Long jobs, newest first, with progress and what their finished pieces cost."""
        with self._lock:
            rows = self._db.execute(
                "SELECT j.job_key, j.created_at, j.updated_at, j.status, j.output, j.command, j.pieces_total, "
                "j.chapters, j.message, COUNT(p.piece_key), COALESCE(SUM(p.cost_usd), 0), COALESCE(SUM(p.samples), 0) "
                "FROM longform_jobs j LEFT JOIN longform_job_pieces jp ON jp.job_key = j.job_key "
                "LEFT JOIN longform_pieces p ON p.piece_key = jp.piece_key AND p.state = 'done' "
                "GROUP BY j.job_key ORDER BY j.updated_at DESC LIMIT ?", (limit,)).fetchall()
        out = []
        for r in rows:
            out.append({"job": r[0], "created_at": r[1], "updated_at": r[2], "status": r[3], "output": r[4],
                        "command": r[5], "pieces": r[6], "chapters": len(json.loads(r[7])), "message": r[8],
                        "pieces_done": r[9], "cost_usd": round(r[10], 8), "audio_seconds": round(r[11] / 24000, 3)})
        return out

    # -- pieces ----------------------------------------------------------------------------------
    def done(self, keys: Sequence[str]) -> dict[str, PieceRecord]:
        """The finished pieces among ``keys`` whose audio is still on disk."""
        found: dict[str, PieceRecord] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                batch = list(keys[i:i + 500])
                marks = ",".join("?" * len(batch))
                for r in self._db.execute(
                        "SELECT piece_key, state, audio_path, samples, provider, cost_usd, manager_job_id "
                        f"FROM longform_pieces WHERE state = 'done' AND piece_key IN ({marks})", batch):
                    if r[2] and Path(r[2]).is_file():
                        found[r[0]] = PieceRecord(*r)
        return found

    def mark_running(self, key: str, manager_job_id: str | None = None) -> None:
        self._upsert(key, "running", manager_job_id=manager_job_id)

    def mark_failed(self, key: str, error: str, attempts: list[dict[str, Any]] | None = None) -> None:
        self._upsert(key, "failed", error=error, attempts=json.dumps(attempts or []))

    def save_piece(self, key: str, samples: np.ndarray, sample_rate: int, *, provider: str | None,
                   cost_usd: float, attempts: list[dict[str, Any]], manager_job_id: str | None) -> Path:
        """Write the piece's audio (atomically), then record it as done."""
        import soundfile as sf

        dest = self.pieces_dir / key[:2] / f"{key}.flac"
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{key[:12]}.", suffix=".flac.tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            sf.write(str(tmp), np.clip(samples, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_24")
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        self._upsert(key, "done", audio_path=str(dest), samples=len(samples), sample_rate=sample_rate,
                     provider=provider, cost_usd=cost_usd, attempts=json.dumps(attempts),
                     manager_job_id=manager_job_id)
        return dest

    def load_piece(self, record: PieceRecord) -> np.ndarray:
        import soundfile as sf

        assert record.audio_path is not None
        data, _rate = sf.read(record.audio_path, dtype="float32", always_2d=False)
        return np.asarray(data, dtype=np.float32)

    def _upsert(self, key: str, state: str, **fields: Any) -> None:
        cols = ["piece_key", "state", "updated_at", *fields]
        values = [key, state, time.time(), *fields.values()]
        sets = ", ".join(f"{c} = excluded.{c}" for c in cols[1:])
        sql = (f"INSERT INTO longform_pieces ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
               f"ON CONFLICT(piece_key) DO UPDATE SET {sets}")
        with self._lock:
            # a finished piece is never demoted by a late failure report from another run
            if state != "done":
                row = self._db.execute("SELECT state FROM longform_pieces WHERE piece_key = ?", (key,)).fetchone()
                if row is not None and row[0] == "done":
                    return
            self._db.execute(sql, values)




def open_journal(settings: Any) -> Any:
    """The journal the configuration names: beside the SQLite ledger, or on the shared PostgreSQL store."""
    from broker.store import store_url

    url = store_url(settings)
    if url.dialect == "postgresql":
        from broker.longform.pg_journal import PostgresJournal

        return PostgresJournal(url)
    return Journal(url.dsn)


__all__ = ["Journal", "PieceRecord", "open_journal"]

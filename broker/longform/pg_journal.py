"""The long-work journal on PostgreSQL: the same methods as ``Journal``, shared by every machine.

Selected by ``ledger.url = "postgresql://…"`` (``open_journal``). The schema is the store's migration
``003_journal.sql``. A finished piece's audio is stored in the database as FLAC, in the same
transaction that marks the piece done, so a rerun on any machine finds exactly the pieces that are
complete — never a row without its audio, never audio without its row.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from psycopg import sql

from broker.longform.chunk import Piece
from broker.longform.journal import PieceRecord
from broker.store.pg_pool import open_pool
from broker.store.url import StoreURL

_PIECE = "piece_key, state, audio_path, samples, provider, cost_usd, manager_job_id"


class PostgresJournal:
    """``Journal`` on PostgreSQL (psycopg 3, a small pool); ``audio_path`` is ``pg:<piece key>``."""

    def __init__(self, url: str | StoreURL) -> None:
        self.url = url if isinstance(url, StoreURL) else StoreURL.parse(url)
        self.path = str(self.url)
        self._pool = open_pool(self.url, max_size=2)

    def __repr__(self) -> str:
        return f"<PostgresJournal {self.url}>"

    def close(self) -> None:
        self._pool.close()

    # -- jobs ------------------------------------------------------------------------------------
    def begin_job(self, job_key: str, pieces: Sequence[Piece], chapters: Sequence[str], *, output: str,
                  command: str) -> None:
        now = time.time()
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(
                "INSERT INTO longform_jobs (job_key, created_at, updated_at, status, output, command, pieces_total, "
                "chapters) VALUES (%s, %s, %s, 'running', %s, %s, %s, %s) ON CONFLICT (job_key) DO UPDATE SET "
                "updated_at = excluded.updated_at, status = 'running', output = excluded.output, "
                "command = excluded.command, message = NULL",
                (job_key, now, now, output, command, len(pieces), json.dumps(list(chapters))))
            cur.executemany(
                "INSERT INTO longform_job_pieces (job_key, idx, piece_key, chapter, words) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING", [(job_key, p.index, p.key, p.chapter, p.words) for p in pieces])

    def end_job(self, job_key: str, status: str, message: str | None = None, output: str | None = None) -> None:
        with self._pool.connection() as conn:
            conn.execute("UPDATE longform_jobs SET status = %s, message = %s, updated_at = %s, "
                         "output = COALESCE(%s, output) WHERE job_key = %s",
                         (status, message, time.time(), output, job_key))

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        """Long jobs, newest first, with progress and what their finished pieces cost."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT j.job_key, j.created_at, j.updated_at, j.status, j.output, j.command, j.pieces_total, "
                "j.chapters, j.message, COUNT(p.piece_key), COALESCE(SUM(p.cost_usd), 0), COALESCE(SUM(p.samples), 0) "
                "FROM longform_jobs j LEFT JOIN longform_job_pieces jp ON jp.job_key = j.job_key "
                "LEFT JOIN longform_pieces p ON p.piece_key = jp.piece_key AND p.state = 'done' "
                "GROUP BY j.job_key ORDER BY j.updated_at DESC LIMIT %s", (limit,)).fetchall()
        return [{"job": r[0], "created_at": r[1], "updated_at": r[2], "status": r[3], "output": r[4],
                 "command": r[5], "pieces": r[6], "chapters": len(json.loads(r[7])), "message": r[8],
                 "pieces_done": r[9], "cost_usd": round(float(r[10]), 8), "audio_seconds": round(int(r[11]) / 24000, 3)}
                for r in rows]

    # -- pieces ----------------------------------------------------------------------------------
    def done(self, keys: Sequence[str]) -> dict[str, PieceRecord]:
        """The finished pieces among ``keys`` (their audio is in the database with them)."""
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT {_PIECE} FROM longform_pieces p WHERE state = 'done' AND piece_key = ANY(%s) "
                                "AND EXISTS (SELECT 1 FROM longform_audio a WHERE a.piece_key = p.piece_key)",
                                (list(keys),)).fetchall()
        return {r[0]: PieceRecord(*r) for r in rows}

    def mark_running(self, key: str, manager_job_id: str | None = None) -> None:
        self._upsert(key, "running", manager_job_id=manager_job_id)

    def mark_failed(self, key: str, error: str, attempts: list[dict[str, Any]] | None = None) -> None:
        self._upsert(key, "failed", error=error, attempts=json.dumps(attempts or []))

    def save_piece(self, key: str, samples: np.ndarray, sample_rate: int, *, provider: str | None,
                   cost_usd: float, attempts: list[dict[str, Any]], manager_job_id: str | None) -> Path:
        """Store the piece's audio and mark it done, in one transaction."""
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_24")
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("INSERT INTO longform_audio VALUES (%s, %s) ON CONFLICT (piece_key) DO UPDATE "
                         "SET flac = excluded.flac", (key, buf.getvalue()))
            self._upsert(key, "done", conn=conn, audio_path=f"pg:{key}", samples=len(samples),
                         sample_rate=sample_rate, provider=provider, cost_usd=cost_usd, attempts=json.dumps(attempts),
                         manager_job_id=manager_job_id)
        return Path(f"pg:{key}")

    def load_piece(self, record: PieceRecord) -> np.ndarray:
        import soundfile as sf

        with self._pool.connection() as conn:
            row = conn.execute("SELECT flac FROM longform_audio WHERE piece_key = %s", (record.key,)).fetchone()
        if row is None:
            raise FileNotFoundError(f"piece {record.key}: no audio in the journal")
        data, _rate = sf.read(io.BytesIO(bytes(row[0])), dtype="float32", always_2d=False)
        return np.asarray(data, dtype=np.float32)

    def _upsert(self, key: str, state: str, conn: Any = None, **fields: Any) -> None:
        cols = ["piece_key", "state", "updated_at", *fields]
        values = [key, state, time.time(), *fields.values()]
        query = sql.SQL("INSERT INTO longform_pieces ({}) VALUES ({}) ON CONFLICT (piece_key) DO UPDATE SET {}").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c)) for c in cols[1:]))
        if state != "done":
            # a finished piece is never demoted by a late failure report from another run (one statement)
            query = sql.Composed([query, sql.SQL(" WHERE longform_pieces.state <> 'done'")])
        if conn is not None:
            conn.execute(query, values)
            return
        with self._pool.connection() as own:
            own.execute(query, values)


__all__ = ["PostgresJournal"]

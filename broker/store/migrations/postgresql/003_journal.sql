-- The long-work journal (broker/longform): long jobs, their pieces, and each finished piece's audio.
-- Same tables as the SQLite journal, plus the audio itself (FLAC) in the database: pieces made on one
-- machine are reused by a rerun on any other.
CREATE TABLE longform_jobs (
    job_key TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    command TEXT,
    pieces_total INTEGER NOT NULL,
    chapters TEXT NOT NULL,
    message TEXT
);
CREATE TABLE longform_job_pieces (
    job_key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    piece_key TEXT NOT NULL,
    chapter INTEGER NOT NULL,
    words INTEGER NOT NULL,
    PRIMARY KEY (job_key, idx)
);
CREATE TABLE longform_pieces (
    piece_key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    audio_path TEXT,
    samples INTEGER,
    sample_rate INTEGER,
    provider TEXT,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    attempts TEXT,
    manager_job_id TEXT,
    error TEXT,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE longform_audio (
    piece_key TEXT PRIMARY KEY,
    flac BYTEA NOT NULL
);

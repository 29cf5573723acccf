-- The ledger: one row per attempt, settled spend in minute/hour buckets, live owners, the budget lock.
-- Columns mirror the SQLite ledger (REAL -> DOUBLE PRECISION, times in Unix seconds) so both backends
-- return the same rows.
CREATE TABLE attempts (
    id BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    task TEXT,
    provider TEXT NOT NULL,
    hardware TEXT,
    provider_job_id TEXT,
    status TEXT NOT NULL,
    error_class TEXT,
    message TEXT,
    reserved_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    billed_seconds DOUBLE PRECISION,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_estimated INTEGER NOT NULL DEFAULT 1,
    hedge INTEGER NOT NULL DEFAULT 0,
    started_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION,
    expires_at DOUBLE PRECISION,
    -- the process that reserved it (owners.owner), and the pid/host/heartbeat the SQLite ledger keeps too
    -- (reconciliation finds a dead process's rows by them)
    owner TEXT,
    owner_pid INTEGER,
    owner_host TEXT,
    heartbeat_at DOUBLE PRECISION,
    -- the hardware had no price row: cost_usd is what the provider stated, not a price (unknown is not $0)
    unpriced INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX attempts_started ON attempts (started_at);
CREATE INDEX attempts_job ON attempts (job_id);
CREATE INDEX attempts_open ON attempts (started_at) WHERE status IN ('reserved', 'running', 'cancelling');

CREATE TABLE spend_buckets (
    width INTEGER NOT NULL,
    start BIGINT NOT NULL,
    usd DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (width, start)
);

-- One row per live process; heartbeat_at is refreshed every few seconds by a thread of its own.
CREATE TABLE owners (
    owner TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);

-- The budget row: every reservation takes its lock for the length of one short transaction, so the
-- check and the insert of two processes (on any machine) never interleave.
CREATE TABLE budget_lock (id INTEGER PRIMARY KEY);
INSERT INTO budget_lock VALUES (1);

-- Settled dollars only (what is left once every open reservation settles at $0): a full budget is worth
-- waiting for only if this leaves room.
CREATE FUNCTION broker_settled(p_now DOUBLE PRECISION, p_window_s DOUBLE PRECISION, p_job_id TEXT)
RETURNS DOUBLE PRECISION LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    w INTEGER := CASE WHEN p_window_s IS NOT NULL AND p_window_s <= 172800 THEN 60 ELSE 3600 END;
    since DOUBLE PRECISION := COALESCE(p_now - p_window_s, 0);
    result DOUBLE PRECISION;
BEGIN
    IF p_job_id IS NOT NULL THEN
        SELECT COALESCE(SUM(cost_usd), 0) INTO result FROM attempts
        WHERE job_id = p_job_id AND status NOT IN ('reserved', 'running', 'cancelling');
    ELSE
        SELECT COALESCE(SUM(usd), 0) INTO result FROM spend_buckets WHERE width = w AND start >= floor(since / w) * w;
    END IF;
    RETURN result;
END
$$;

-- Dollars spent and still reserved: over the window starting at p_since (p_window_s NULL: ever), or by
-- one job. One statement, so one snapshot: a settlement committing meanwhile moves a reservation into
-- the buckets atomically and is seen either before or after, never half.
CREATE FUNCTION broker_spent(p_now DOUBLE PRECISION, p_alive_after DOUBLE PRECISION,
                             p_window_s DOUBLE PRECISION, p_job_id TEXT)
RETURNS DOUBLE PRECISION LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    -- minute buckets for windows up to two days, hour buckets beyond; the bucket holding the window's
    -- start counts whole: an early "no", never an overspend
    w INTEGER := CASE WHEN p_window_s IS NOT NULL AND p_window_s <= 172800 THEN 60 ELSE 3600 END;
    since DOUBLE PRECISION := COALESCE(p_now - p_window_s, 0);
    result DOUBLE PRECISION;
BEGIN
    IF p_job_id IS NOT NULL THEN
        SELECT COALESCE(SUM(CASE WHEN a.status IN ('reserved', 'running', 'cancelling')
                                      AND (a.expires_at IS NULL OR a.expires_at > p_now)
                                      AND (a.owner IS NULL OR a.provider_job_id IS NOT NULL
                                           OR EXISTS (SELECT 1 FROM owners o WHERE o.owner = a.owner
                                                      AND o.heartbeat_at >= p_alive_after))
                                 THEN GREATEST(a.reserved_usd, a.cost_usd) ELSE a.cost_usd END), 0)
        INTO result FROM attempts a WHERE a.job_id = p_job_id;
        RETURN result;
    END IF;
    SELECT (SELECT COALESCE(SUM(b.usd), 0) FROM spend_buckets b
            WHERE b.width = w AND b.start >= floor(since / w) * w)
         + (SELECT COALESCE(SUM(GREATEST(a.reserved_usd, a.cost_usd)), 0) FROM attempts a
            WHERE a.status IN ('reserved', 'running', 'cancelling') AND (a.expires_at IS NULL OR a.expires_at > p_now)
              AND a.started_at >= since
              AND (a.owner IS NULL OR a.provider_job_id IS NOT NULL
                   OR EXISTS (SELECT 1 FROM owners o WHERE o.owner = a.owner AND o.heartbeat_at >= p_alive_after)))
    INTO result;
    RETURN result;
END
$$;

-- Check every limit and insert the reservation in one transaction under the budget row's lock.
-- Returns the new attempt's id and amount, or (NULL, 0, i, spent) when limit i (1-based) has no room.
CREATE FUNCTION broker_reserve(
    p_job_id TEXT, p_task TEXT, p_provider TEXT, p_hardware TEXT, p_hedge INTEGER,
    p_wanted DOUBLE PRECISION, p_floor DOUBLE PRECISION, p_expires_at DOUBLE PRECISION, p_owner TEXT,
    p_now DOUBLE PRECISION, p_alive_after DOUBLE PRECISION,
    p_caps DOUBLE PRECISION[], p_windows DOUBLE PRECISION[], p_jobs TEXT[], p_nowait BOOLEAN,
    p_owner_pid INTEGER, p_owner_host TEXT, p_provider_job_id TEXT)
RETURNS TABLE (attempt_id BIGINT, amount DOUBLE PRECISION, failed INTEGER, spent DOUBLE PRECISION,
               settled DOUBLE PRECISION)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i INTEGER;
    s DOUBLE PRECISION;
    amt DOUBLE PRECISION := p_wanted;
    new_id BIGINT;
BEGIN
    IF p_nowait THEN
        PERFORM 1 FROM budget_lock WHERE id = 1 FOR UPDATE NOWAIT;
    ELSE
        PERFORM 1 FROM budget_lock WHERE id = 1 FOR UPDATE;
    END IF;
    FOR i IN 1 .. COALESCE(array_length(p_caps, 1), 0) LOOP
        -- a statement after the lock: its snapshot includes every reservation committed before it
        s := broker_spent(p_now, p_alive_after, p_windows[i], p_jobs[i]);
        IF p_caps[i] - s + 1e-12 < p_floor THEN
            RETURN QUERY SELECT NULL::BIGINT, 0::DOUBLE PRECISION, i, s,
                                broker_settled(p_now, p_windows[i], p_jobs[i]);
            RETURN;
        END IF;
        amt := LEAST(amt, p_caps[i] - s);
    END LOOP;
    amt := GREATEST(amt, p_floor);
    -- with the provider's job id already known (write-ahead of a job that needed no budget check): running
    INSERT INTO attempts (job_id, task, provider, hardware, status, reserved_usd, hedge, started_at, expires_at, owner,
                          owner_pid, owner_host, heartbeat_at, provider_job_id)
    VALUES (p_job_id, p_task, p_provider, p_hardware,
            CASE WHEN p_provider_job_id IS NULL THEN 'reserved' ELSE 'running' END, amt, p_hedge, p_now, p_expires_at,
            p_owner, p_owner_pid, p_owner_host, p_now, p_provider_job_id)
    RETURNING id INTO new_id;
    RETURN QUERY SELECT new_id, amt, 0, 0::DOUBLE PRECISION, 0::DOUBLE PRECISION;
END
$$;

-- Write a batch of finished attempts in one call: new rows (no reservation was needed), settled
-- reservations, and their cost into the spend buckets — one transaction, one round trip, so the bucket
-- rows every process adds to are locked only while the server works. Buckets are upserted in key order:
-- two batches never wait on each other in a cycle.
CREATE FUNCTION broker_settle(
    i_job_id TEXT[], i_task TEXT[], i_provider TEXT[], i_hardware TEXT[], i_provider_job_id TEXT[],
    i_status TEXT[], i_error_class TEXT[], i_message TEXT[], i_reserved_usd DOUBLE PRECISION[],
    i_billed_seconds DOUBLE PRECISION[], i_cost_usd DOUBLE PRECISION[], i_cost_estimated INTEGER[],
    i_hedge INTEGER[], i_started_at DOUBLE PRECISION[], i_ended_at DOUBLE PRECISION[], i_unpriced INTEGER[],
    u_status TEXT[], u_provider_job_id TEXT[], u_billed_seconds DOUBLE PRECISION[], u_cost_usd DOUBLE PRECISION[],
    u_cost_estimated INTEGER[], u_error_class TEXT[], u_message TEXT[], u_ended_at DOUBLE PRECISION[],
    u_unpriced INTEGER[], u_id BIGINT[])
RETURNS VOID LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i INTEGER;
BEGIN
    INSERT INTO attempts (job_id, task, provider, hardware, provider_job_id, status, error_class, message,
                          reserved_usd, billed_seconds, cost_usd, cost_estimated, hedge, started_at, ended_at,
                          unpriced)
    SELECT * FROM unnest(i_job_id, i_task, i_provider, i_hardware, i_provider_job_id, i_status, i_error_class,
                         i_message, i_reserved_usd, i_billed_seconds, i_cost_usd, i_cost_estimated, i_hedge,
                         i_started_at, i_ended_at, i_unpriced);
    -- one indexed update per row (a join against unnest() would be planned as a scan of the whole table)
    FOR i IN 1 .. COALESCE(array_length(u_id, 1), 0) LOOP
        UPDATE attempts SET status = u_status[i], provider_job_id = COALESCE(u_provider_job_id[i], provider_job_id),
               billed_seconds = u_billed_seconds[i], cost_usd = u_cost_usd[i], cost_estimated = u_cost_estimated[i],
               error_class = u_error_class[i], message = u_message[i], ended_at = u_ended_at[i],
               unpriced = u_unpriced[i]
        WHERE id = u_id[i];
    END LOOP;
    INSERT INTO spend_buckets (width, start, usd)
    SELECT w.width, (floor(s.ended / w.width) * w.width)::BIGINT AS start, SUM(s.usd)
    FROM (SELECT * FROM unnest(i_ended_at, i_cost_usd) AS x(ended, usd)
          UNION ALL SELECT * FROM unnest(u_ended_at, u_cost_usd) AS y(ended, usd)) s
    CROSS JOIN (VALUES (60), (3600)) AS w(width)
    WHERE s.usd <> 0
    GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (width, start) DO UPDATE SET usd = spend_buckets.usd + excluded.usd;
END
$$;

-- A reservation that also writes the caller's finished attempts first, in the same transaction and the
-- same round trip (all or nothing: if the budget lock is busy, neither happens).
CREATE FUNCTION broker_settle_reserve(
    i_job_id TEXT[], i_task TEXT[], i_provider TEXT[], i_hardware TEXT[], i_provider_job_id TEXT[],
    i_status TEXT[], i_error_class TEXT[], i_message TEXT[], i_reserved_usd DOUBLE PRECISION[],
    i_billed_seconds DOUBLE PRECISION[], i_cost_usd DOUBLE PRECISION[], i_cost_estimated INTEGER[],
    i_hedge INTEGER[], i_started_at DOUBLE PRECISION[], i_ended_at DOUBLE PRECISION[], i_unpriced INTEGER[],
    u_status TEXT[], u_provider_job_id TEXT[], u_billed_seconds DOUBLE PRECISION[], u_cost_usd DOUBLE PRECISION[],
    u_cost_estimated INTEGER[], u_error_class TEXT[], u_message TEXT[], u_ended_at DOUBLE PRECISION[],
    u_unpriced INTEGER[], u_id BIGINT[],
    p_job_id TEXT, p_task TEXT, p_provider TEXT, p_hardware TEXT, p_hedge INTEGER,
    p_wanted DOUBLE PRECISION, p_floor DOUBLE PRECISION, p_expires_at DOUBLE PRECISION, p_owner TEXT,
    p_now DOUBLE PRECISION, p_alive_after DOUBLE PRECISION,
    p_caps DOUBLE PRECISION[], p_windows DOUBLE PRECISION[], p_jobs TEXT[], p_nowait BOOLEAN,
    p_owner_pid INTEGER, p_owner_host TEXT, p_provider_job_id TEXT)
RETURNS TABLE (attempt_id BIGINT, amount DOUBLE PRECISION, failed INTEGER, spent DOUBLE PRECISION,
               settled DOUBLE PRECISION)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM broker_settle(i_job_id, i_task, i_provider, i_hardware, i_provider_job_id, i_status, i_error_class,
                          i_message, i_reserved_usd, i_billed_seconds, i_cost_usd, i_cost_estimated, i_hedge,
                          i_started_at, i_ended_at, i_unpriced, u_status, u_provider_job_id, u_billed_seconds,
                          u_cost_usd, u_cost_estimated, u_error_class, u_message, u_ended_at, u_unpriced, u_id);
    RETURN QUERY SELECT * FROM broker_reserve(p_job_id, p_task, p_provider, p_hardware, p_hedge, p_wanted, p_floor,
                                              p_expires_at, p_owner, p_now, p_alive_after, p_caps, p_windows,
                                              p_jobs, p_nowait, p_owner_pid, p_owner_host, p_provider_job_id);
END
$$;

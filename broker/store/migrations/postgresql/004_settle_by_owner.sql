-- A settle changes only the attempts its writer still owns, and the spend buckets move by what changed.
--
-- Why: an owner whose heartbeat went stale (paused, partitioned, or killed with its last settle still in
-- the server's socket buffer) can settle after a reconciler claimed its row and settled it from the
-- provider's bill. Before this, that late settle overwrote the row and added its cost to the buckets a
-- second time. Now the claim decides: the row is the reconciler's. A row the same owner settles twice (or
-- one closed 'lost' at $0 by release_dead, whose owner is unchanged) moves the buckets by the difference,
-- so the buckets always sum to the rows' costs.

DROP FUNCTION broker_settle_reserve(
    TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], DOUBLE PRECISION[], DOUBLE PRECISION[],
    DOUBLE PRECISION[], INTEGER[], INTEGER[], DOUBLE PRECISION[], DOUBLE PRECISION[], INTEGER[],
    TEXT[], TEXT[], DOUBLE PRECISION[], DOUBLE PRECISION[], INTEGER[], TEXT[], TEXT[], DOUBLE PRECISION[],
    INTEGER[], BIGINT[],
    TEXT, TEXT, TEXT, TEXT, INTEGER, DOUBLE PRECISION, DOUBLE PRECISION, DOUBLE PRECISION, TEXT,
    DOUBLE PRECISION, DOUBLE PRECISION, DOUBLE PRECISION[], DOUBLE PRECISION[], TEXT[], BOOLEAN,
    INTEGER, TEXT, TEXT);
DROP FUNCTION broker_settle(
    TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], DOUBLE PRECISION[], DOUBLE PRECISION[],
    DOUBLE PRECISION[], INTEGER[], INTEGER[], DOUBLE PRECISION[], DOUBLE PRECISION[], INTEGER[],
    TEXT[], TEXT[], DOUBLE PRECISION[], DOUBLE PRECISION[], INTEGER[], TEXT[], TEXT[], DOUBLE PRECISION[],
    INTEGER[], BIGINT[]);

CREATE FUNCTION broker_settle(
    i_job_id TEXT[], i_task TEXT[], i_provider TEXT[], i_hardware TEXT[], i_provider_job_id TEXT[],
    i_status TEXT[], i_error_class TEXT[], i_message TEXT[], i_reserved_usd DOUBLE PRECISION[],
    i_billed_seconds DOUBLE PRECISION[], i_cost_usd DOUBLE PRECISION[], i_cost_estimated INTEGER[],
    i_hedge INTEGER[], i_started_at DOUBLE PRECISION[], i_ended_at DOUBLE PRECISION[], i_unpriced INTEGER[],
    u_status TEXT[], u_provider_job_id TEXT[], u_billed_seconds DOUBLE PRECISION[], u_cost_usd DOUBLE PRECISION[],
    u_cost_estimated INTEGER[], u_error_class TEXT[], u_message TEXT[], u_ended_at DOUBLE PRECISION[],
    u_unpriced INTEGER[], u_id BIGINT[], p_settler TEXT)
RETURNS VOID LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i INTEGER;
    old_cost DOUBLE PRECISION;
    old_ended DOUBLE PRECISION;
    d_ended DOUBLE PRECISION[] := '{}';
    d_usd DOUBLE PRECISION[] := '{}';
BEGIN
    INSERT INTO attempts (job_id, task, provider, hardware, provider_job_id, status, error_class, message,
                          reserved_usd, billed_seconds, cost_usd, cost_estimated, hedge, started_at, ended_at,
                          unpriced)
    SELECT * FROM unnest(i_job_id, i_task, i_provider, i_hardware, i_provider_job_id, i_status, i_error_class,
                         i_message, i_reserved_usd, i_billed_seconds, i_cost_usd, i_cost_estimated, i_hedge,
                         i_started_at, i_ended_at, i_unpriced);
    -- one indexed update per row (a join against unnest() would be planned as a scan of the whole table)
    FOR i IN 1 .. COALESCE(array_length(u_id, 1), 0) LOOP
        SELECT cost_usd, ended_at INTO old_cost, old_ended FROM attempts
        WHERE id = u_id[i] AND owner IS NOT DISTINCT FROM p_settler FOR UPDATE;
        IF NOT FOUND THEN
            CONTINUE;  -- claimed by another process since: its settle is the one that counts
        END IF;
        UPDATE attempts SET status = u_status[i], provider_job_id = COALESCE(u_provider_job_id[i], provider_job_id),
               billed_seconds = u_billed_seconds[i], cost_usd = u_cost_usd[i], cost_estimated = u_cost_estimated[i],
               error_class = u_error_class[i], message = u_message[i], ended_at = u_ended_at[i],
               unpriced = u_unpriced[i]
        WHERE id = u_id[i];
        IF COALESCE(old_cost, 0) <> 0 AND old_ended IS NOT NULL THEN
            d_ended := d_ended || old_ended;
            d_usd := d_usd || -old_cost;
        END IF;
        d_ended := d_ended || u_ended_at[i];
        d_usd := d_usd || u_cost_usd[i];
    END LOOP;
    INSERT INTO spend_buckets (width, start, usd)
    SELECT w.width, (floor(s.ended / w.width) * w.width)::BIGINT AS start, SUM(s.usd)
    FROM (SELECT * FROM unnest(i_ended_at, i_cost_usd) AS x(ended, usd)
          UNION ALL SELECT * FROM unnest(d_ended, d_usd) AS y(ended, usd)) s
    CROSS JOIN (VALUES (60), (3600)) AS w(width)
    WHERE s.usd <> 0 AND s.ended IS NOT NULL
    GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (width, start) DO UPDATE SET usd = spend_buckets.usd + excluded.usd;
END
$$;

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
                          u_cost_usd, u_cost_estimated, u_error_class, u_message, u_ended_at, u_unpriced, u_id,
                          p_owner);
    RETURN QUERY SELECT * FROM broker_reserve(p_job_id, p_task, p_provider, p_hardware, p_hedge, p_wanted, p_floor,
                                              p_expires_at, p_owner, p_now, p_alive_after, p_caps, p_windows,
                                              p_jobs, p_nowait, p_owner_pid, p_owner_host, p_provider_job_id);
END
$$;

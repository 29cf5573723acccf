-- Two changes to the money functions (each is dropped and re-created with its new arguments):
--
-- 1. Attempts carry the tenant they were run for (the gateway's API keys), and a spend limit may be scoped
--    to one tenant: a tenant's daily/monthly budget is checked in the same transaction, under the same
--    lock, as every other limit.
-- 2. A settle changes only the attempts its writer still owns, and the spend buckets move by what changed.
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
DROP FUNCTION broker_reserve(
    TEXT, TEXT, TEXT, TEXT, INTEGER, DOUBLE PRECISION, DOUBLE PRECISION, DOUBLE PRECISION, TEXT,
    DOUBLE PRECISION, DOUBLE PRECISION, DOUBLE PRECISION[], DOUBLE PRECISION[], TEXT[], BOOLEAN,
    INTEGER, TEXT, TEXT);
DROP FUNCTION broker_spent(DOUBLE PRECISION, DOUBLE PRECISION, DOUBLE PRECISION, TEXT);
DROP FUNCTION broker_settled(DOUBLE PRECISION, DOUBLE PRECISION, TEXT);
DROP FUNCTION broker_settle(
    TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], DOUBLE PRECISION[], DOUBLE PRECISION[],
    DOUBLE PRECISION[], INTEGER[], INTEGER[], DOUBLE PRECISION[], DOUBLE PRECISION[], INTEGER[],
    TEXT[], TEXT[], DOUBLE PRECISION[], DOUBLE PRECISION[], INTEGER[], TEXT[], TEXT[], DOUBLE PRECISION[],
    INTEGER[], BIGINT[]);

ALTER TABLE attempts ADD COLUMN tenant TEXT;
CREATE INDEX attempts_tenant ON attempts (tenant, ended_at) WHERE tenant IS NOT NULL;

-- Settled dollars only: over a window (p_window_s NULL: ever), by one job, or by one tenant over a window.
CREATE FUNCTION broker_settled(p_now DOUBLE PRECISION, p_window_s DOUBLE PRECISION, p_job_id TEXT,
                               p_tenant TEXT)
RETURNS DOUBLE PRECISION LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    w INTEGER := CASE WHEN p_window_s IS NOT NULL AND p_window_s <= 172800 THEN 60 ELSE 3600 END;
    since DOUBLE PRECISION := COALESCE(p_now - p_window_s, 0);
    result DOUBLE PRECISION;
BEGIN
    IF p_job_id IS NOT NULL THEN
        SELECT COALESCE(SUM(cost_usd), 0) INTO result FROM attempts
        WHERE job_id = p_job_id AND status NOT IN ('reserved', 'running', 'cancelling');
    ELSIF p_tenant IS NOT NULL THEN
        -- a tenant's own rows, by when they ended (the buckets are fleet-wide, not per tenant)
        SELECT COALESCE(SUM(cost_usd), 0) INTO result FROM attempts
        WHERE tenant = p_tenant AND status NOT IN ('reserved', 'running', 'cancelling') AND ended_at >= since;
    ELSE
        SELECT COALESCE(SUM(usd), 0) INTO result FROM spend_buckets WHERE width = w AND start >= floor(since / w) * w;
    END IF;
    RETURN result;
END
$$;

-- Dollars spent and still reserved, fleet-wide over a window, by one job, or by one tenant over a window.
-- One statement per case, so one snapshot (see 001).
CREATE FUNCTION broker_spent(p_now DOUBLE PRECISION, p_alive_after DOUBLE PRECISION,
                             p_window_s DOUBLE PRECISION, p_job_id TEXT, p_tenant TEXT)
RETURNS DOUBLE PRECISION LANGUAGE plpgsql VOLATILE AS $$
DECLARE
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
    IF p_tenant IS NOT NULL THEN
        SELECT COALESCE(SUM(CASE WHEN a.status NOT IN ('reserved', 'running', 'cancelling')
                                 THEN CASE WHEN a.ended_at >= since THEN a.cost_usd ELSE 0 END
                                 WHEN (a.expires_at IS NULL OR a.expires_at > p_now) AND a.started_at >= since
                                      AND (a.owner IS NULL OR a.provider_job_id IS NOT NULL
                                           OR EXISTS (SELECT 1 FROM owners o WHERE o.owner = a.owner
                                                      AND o.heartbeat_at >= p_alive_after))
                                 THEN GREATEST(a.reserved_usd, a.cost_usd) ELSE 0 END), 0)
        INTO result FROM attempts a
        WHERE a.tenant = p_tenant AND (a.ended_at >= since OR a.status IN ('reserved', 'running', 'cancelling'));
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

-- Check every limit and insert the reservation in one transaction under the budget row's lock (see 001);
-- p_tenant is the attempt's tenant, p_tenants[i] scopes limit i to one tenant.
CREATE FUNCTION broker_reserve(
    p_job_id TEXT, p_task TEXT, p_provider TEXT, p_hardware TEXT, p_hedge INTEGER,
    p_wanted DOUBLE PRECISION, p_floor DOUBLE PRECISION, p_expires_at DOUBLE PRECISION, p_owner TEXT,
    p_now DOUBLE PRECISION, p_alive_after DOUBLE PRECISION,
    p_caps DOUBLE PRECISION[], p_windows DOUBLE PRECISION[], p_jobs TEXT[], p_nowait BOOLEAN,
    p_owner_pid INTEGER, p_owner_host TEXT, p_provider_job_id TEXT, p_tenant TEXT, p_tenants TEXT[])
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
        s := broker_spent(p_now, p_alive_after, p_windows[i], p_jobs[i], p_tenants[i]);
        IF p_caps[i] - s + 1e-12 < p_floor THEN
            RETURN QUERY SELECT NULL::BIGINT, 0::DOUBLE PRECISION, i, s,
                                broker_settled(p_now, p_windows[i], p_jobs[i], p_tenants[i]);
            RETURN;
        END IF;
        amt := LEAST(amt, p_caps[i] - s);
    END LOOP;
    amt := GREATEST(amt, p_floor);
    INSERT INTO attempts (job_id, task, provider, hardware, status, reserved_usd, hedge, started_at, expires_at, owner,
                          owner_pid, owner_host, heartbeat_at, provider_job_id, tenant)
    VALUES (p_job_id, p_task, p_provider, p_hardware,
            CASE WHEN p_provider_job_id IS NULL THEN 'reserved' ELSE 'running' END, amt, p_hedge, p_now, p_expires_at,
            p_owner, p_owner_pid, p_owner_host, p_now, p_provider_job_id, p_tenant)
    RETURNING id INTO new_id;
    RETURN QUERY SELECT new_id, amt, 0, 0::DOUBLE PRECISION, 0::DOUBLE PRECISION;
END
$$;

CREATE FUNCTION broker_settle(
    i_job_id TEXT[], i_task TEXT[], i_provider TEXT[], i_hardware TEXT[], i_provider_job_id TEXT[],
    i_status TEXT[], i_error_class TEXT[], i_message TEXT[], i_reserved_usd DOUBLE PRECISION[],
    i_billed_seconds DOUBLE PRECISION[], i_cost_usd DOUBLE PRECISION[], i_cost_estimated INTEGER[],
    i_hedge INTEGER[], i_started_at DOUBLE PRECISION[], i_ended_at DOUBLE PRECISION[], i_unpriced INTEGER[],
    i_tenant TEXT[],
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
                          unpriced, tenant)
    SELECT * FROM unnest(i_job_id, i_task, i_provider, i_hardware, i_provider_job_id, i_status, i_error_class,
                         i_message, i_reserved_usd, i_billed_seconds, i_cost_usd, i_cost_estimated, i_hedge,
                         i_started_at, i_ended_at, i_unpriced, i_tenant);
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
    i_tenant TEXT[],
    u_status TEXT[], u_provider_job_id TEXT[], u_billed_seconds DOUBLE PRECISION[], u_cost_usd DOUBLE PRECISION[],
    u_cost_estimated INTEGER[], u_error_class TEXT[], u_message TEXT[], u_ended_at DOUBLE PRECISION[],
    u_unpriced INTEGER[], u_id BIGINT[],
    p_job_id TEXT, p_task TEXT, p_provider TEXT, p_hardware TEXT, p_hedge INTEGER,
    p_wanted DOUBLE PRECISION, p_floor DOUBLE PRECISION, p_expires_at DOUBLE PRECISION, p_owner TEXT,
    p_now DOUBLE PRECISION, p_alive_after DOUBLE PRECISION,
    p_caps DOUBLE PRECISION[], p_windows DOUBLE PRECISION[], p_jobs TEXT[], p_nowait BOOLEAN,
    p_owner_pid INTEGER, p_owner_host TEXT, p_provider_job_id TEXT, p_tenant TEXT, p_tenants TEXT[])
RETURNS TABLE (attempt_id BIGINT, amount DOUBLE PRECISION, failed INTEGER, spent DOUBLE PRECISION,
               settled DOUBLE PRECISION)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM broker_settle(i_job_id, i_task, i_provider, i_hardware, i_provider_job_id, i_status, i_error_class,
                          i_message, i_reserved_usd, i_billed_seconds, i_cost_usd, i_cost_estimated, i_hedge,
                          i_started_at, i_ended_at, i_unpriced, i_tenant, u_status, u_provider_job_id, u_billed_seconds,
                          u_cost_usd, u_cost_estimated, u_error_class, u_message, u_ended_at, u_unpriced, u_id,
                          p_owner);
    RETURN QUERY SELECT * FROM broker_reserve(p_job_id, p_task, p_provider, p_hardware, p_hedge, p_wanted, p_floor,
                                              p_expires_at, p_owner, p_now, p_alive_after, p_caps, p_windows,
                                              p_jobs, p_nowait, p_owner_pid, p_owner_host, p_provider_job_id,
                                              p_tenant, p_tenants);
END
$$;

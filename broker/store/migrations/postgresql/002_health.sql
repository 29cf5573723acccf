-- Shared endpoint health: the current circuit and cooldown of every endpoint (the source of truth;
-- NOTIFY on the schema's channel tells listeners within milliseconds) and the fleet-wide trial lease.
CREATE TABLE endpoint_health (
    endpoint TEXT PRIMARY KEY,
    open_until DOUBLE PRECISION,
    ejections INTEGER NOT NULL DEFAULT 0,
    cooldown_until DOUBLE PRECISION,
    trial_owner TEXT,
    trial_until DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL
);

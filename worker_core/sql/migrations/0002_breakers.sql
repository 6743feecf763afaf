-- worker_core schema, version 2: circuit breaker state shared by every worker.
-- Placeholders: {schema} (a quoted identifier).

-- One row per named breaker. A worker that trips a breaker writes it here, and the
-- others read it before calling the service, so one outage opens the circuit of
-- the whole fleet. Rows change only when calls fail, trip, probe or recover, so the
-- table is a regular (logged) one: an open circuit survives a server restart and
-- is visible on replicas, at no measurable write cost.
CREATE TABLE {schema}.breakers (
    name             text        PRIMARY KEY,
    -- closed or open; "half-open" is derived: open, reopen_at passed, trial permit held.
    state            text        NOT NULL DEFAULT 'closed',
    -- Failures since the last success or close, counted across the fleet.
    failures         integer     NOT NULL DEFAULT 0,
    -- Bumped on every open/close, to at least the epoch in milliseconds, so it keeps
    -- growing even after an operator deletes the row; workers apply newer ones only.
    generation       bigint      NOT NULL DEFAULT 0,
    opened_at        timestamptz,
    -- When the circuit may be probed (opened_at + reset_timeout, database clock).
    reopen_at        timestamptz,
    -- The one worker allowed to probe the service, until trial_expires_at (so a
    -- worker that dies mid-trial does not hold the permit forever).
    trial_owner      text,
    trial_expires_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    updated_by       text,
    CONSTRAINT breakers_state_valid CHECK (state IN ('closed', 'open')),
    CONSTRAINT breakers_open_has_reopen_at CHECK ((state = 'open') = (reopen_at IS NOT NULL)),
    CONSTRAINT breakers_trial_has_expiry
        CHECK ((trial_owner IS NULL) = (trial_expires_at IS NULL)),
    CONSTRAINT breakers_failures_valid CHECK (failures >= 0)
);

-- worker_core schema, version 8: job kinds, schedule slots, fleet-wide rate limits.
-- Placeholders: {schema} (a quoted identifier).

-- Every job has a kind ("default" unless enqueue says otherwise). A constant
-- default makes this a catalog-only change: no table rewrite, however many rows.
ALTER TABLE {schema}.jobs ADD COLUMN kind text NOT NULL DEFAULT 'default';

-- A worker that knows only some kinds claims with `kind = ANY(...)`. Under the
-- queue's claim index it would walk past every ready job of the other kinds; this
-- one reaches each known kind's jobs directly, in claim order within the kind.
-- Partial on queued rows like the claim index, so claims (which move rows out of
-- 'queued') add nothing to it and it stays as small as the backlog.
CREATE INDEX jobs_claim_kind_idx ON {schema}.jobs (queue, kind, priority DESC, run_at, id)
    WHERE status = 'queued';

-- One row per schedule name (worker_core.schedules). last_slot is the latest
-- slot whose job exists (or that was deliberately skipped); a worker fires a slot
-- by moving last_slot from the value it read to the slot, in the transaction that
-- enqueues the job, so of all the workers evaluating a schedule exactly one wins
-- each slot (the others' compare-and-set matches no row once the winner commits).
-- A new schedule starts with last_slot = the time its first worker saw it.
CREATE TABLE {schema}.schedules (
    name        text        PRIMARY KEY,
    last_slot   timestamptz NOT NULL,
    last_job_id bigint,
    fired_at    timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One token bucket per fleet-wide rate limit (worker_core.fleetlimit). Workers
-- lease tokens in batches: each lease refills the bucket for the time since
-- updated_at and takes its tokens, letting the balance go negative (a debt the
-- refill pays off, which tells each token when it may be used). A single row that
-- is updated many times a second: fillfactor leaves room for HOT updates and
-- autovacuum keeps its dead versions from piling up.
CREATE TABLE {schema}.rate_limits (
    name       text        PRIMARY KEY,
    rate       float8      NOT NULL,
    burst      integer     NOT NULL,
    tokens     float8      NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT rate_limits_rate_valid CHECK (rate > 0 AND rate < 'infinity'::float8),
    CONSTRAINT rate_limits_burst_valid CHECK (burst >= 1)
) WITH (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

-- worker_core schema, version 7: the operations console's data.
-- Placeholders: {schema} (a quoted identifier).
--
-- Four small tables, none on the claim path: per-minute metrics history, the
-- registry of running workers, paused queues, and the alert evaluator's lease
-- and state. Queries in sql/console.sql.

-- Per-minute rollups written by every worker (one upsert per flush adds its
-- counts to the row of the minute). stage = '' is the job-level row (an attempt's
-- outcome); a stage name holds that stage's completions (succeeded) and failures.
-- buckets counts durations per bound of worker_core.history.BOUNDS (the last one
-- is +Inf), coarse enough for p50/p95 and small enough to add element-wise.
CREATE TABLE {schema}.history (
    minute        timestamptz NOT NULL,
    queue         text        NOT NULL,
    kind          text        NOT NULL DEFAULT 'default',
    stage         text        NOT NULL DEFAULT '',
    succeeded     bigint      NOT NULL DEFAULT 0,
    failed        bigint      NOT NULL DEFAULT 0,
    retried       bigint      NOT NULL DEFAULT 0,
    deferred      bigint      NOT NULL DEFAULT 0,
    dead_lettered bigint      NOT NULL DEFAULT 0,
    seconds_sum   float8      NOT NULL DEFAULT 0,
    buckets       bigint[]    NOT NULL DEFAULT '{}',
    PRIMARY KEY (minute, queue, kind, stage),
    CONSTRAINT history_minute_aligned CHECK (date_trunc('minute', minute) = minute)
);

-- One row per running worker, upserted at start and on every refresh. A worker
-- that stops gracefully deletes its row; one that dies stays, shown as gone once
-- last_seen + lease_seconds has passed, and is removed a day later.
CREATE TABLE {schema}.workers (
    id            text        PRIMARY KEY,
    host          text        NOT NULL,
    pid           integer     NOT NULL,
    version       text        NOT NULL,
    queues        text[]      NOT NULL,
    -- NULL: every kind of its queues.
    kinds         text[],
    concurrency   integer     NOT NULL,
    in_flight     integer     NOT NULL DEFAULT 0,
    lease_seconds float8      NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT workers_counts_valid CHECK (concurrency >= 1 AND in_flight >= 0),
    CONSTRAINT workers_lease_valid CHECK (lease_seconds > 0)
);

-- Queues whose jobs no worker claims (Queue.pause / resume). A row is the pause;
-- claims test it by primary key.
CREATE TABLE {schema}.paused_queues (
    queue     text        PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now(),
    paused_by text
);

-- Named leases: at most one holder per name until expires_at (the alert evaluator
-- uses 'alerts'). Taken and renewed by one guarded upsert; no advisory lock, so it
-- works through PgBouncer's transaction pooling.
CREATE TABLE {schema}.leases (
    name       text        PRIMARY KEY,
    owner      text        NOT NULL,
    expires_at timestamptz NOT NULL
);

-- One row per (alert, subject): the subject is a queue name, or a breaker name for
-- breaker_open_seconds. status: ok, pending (condition true, not yet for
-- for_seconds), firing, resolving (condition false, not yet for resolve_after).
-- notified is the last status announced (firing or resolved); when it differs from
-- what the status says, a notification is owed and the evaluator delivers it.
CREATE TABLE {schema}.alerts (
    alert      text        NOT NULL,
    subject    text        NOT NULL,
    status     text        NOT NULL,
    since      timestamptz NOT NULL,
    value      float8      NOT NULL,
    threshold  float8      NOT NULL,
    notified   text        NOT NULL DEFAULT 'resolved',
    changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alert, subject),
    CONSTRAINT alerts_status_valid CHECK (status IN ('ok', 'pending', 'firing', 'resolving')),
    CONSTRAINT alerts_notified_valid CHECK (notified IN ('firing', 'resolved'))
);

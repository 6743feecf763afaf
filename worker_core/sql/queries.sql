-- Named queries of worker_core. {schema} is the quoted schema identifier; other
-- {placeholders} are filled by queue.py with SQL it builds itself. Every claim
-- sets a fresh random lease_token, and every statement that renews or moves a
-- running job is fenced by (status = 'running', lease_token), so a run whose
-- lease was taken over (by another worker, or by a newer claim of its own
-- worker) can never renew or overwrite the job.

-- name: migrate_lock
-- Serialises concurrent migrate() calls on one schema; released at commit.
SELECT pg_advisory_xact_lock(hashtext('worker_core.migrate'), hashtext(%(schema)s))

-- name: backend_pid
-- The server process running this session's statements. A connection pooler
-- (PgBouncer) hands the client a cancel key of its own at connect time, so this
-- differs from the pid the client was told: that is how a pooler is recognised.
SELECT pg_backend_pid()

-- name: migrations_table
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: applied_migrations
SELECT version, name, checksum FROM {schema}.schema_migrations ORDER BY version

-- name: record_migration
INSERT INTO {schema}.schema_migrations (version, name, checksum)
VALUES (%(version)s, %(name)s, %(checksum)s)

-- name: vector_schema
SELECT extnamespace::regnamespace::text AS schema FROM pg_extension WHERE extname = 'vector'

-- name: enqueue
-- One statement per batch: the payloads arrive as one JSON array (parsed by the
-- server, not adapted item by item), dedupe keys and correlation ids as arrays or
-- NULL. Ids come back in input order (identity values follow the ORDER BY), and
-- at most one NOTIFY is sent, only when something became claimable now. The
-- initial state is NULL (an empty object) unless tracing stores its context there.
WITH ins AS (
    INSERT INTO {schema}.jobs
        (queue, payload, priority, run_at, max_attempts, dedupe_key, correlation_id, state)
    SELECT %(queue)s, r.payload, %(priority)s,
           coalesce(%(run_at)s::timestamptz, now() + %(delay)s::float8 * interval '1 second', now()),
           %(max_attempts)s, (%(dedupe_keys)s::text[])[r.ord],
           coalesce((%(correlation_ids)s::text[])[r.ord], gen_random_uuid()::text),
           coalesce(%(state)s::jsonb, '{}'::jsonb)
    FROM jsonb_array_elements(%(payloads)s::jsonb) WITH ORDINALITY AS r(payload, ord)
    ORDER BY r.ord
    {on_conflict}
    RETURNING id, dedupe_key, run_at
), wake AS (
    SELECT pg_notify(%(channel)s, %(queue)s) FROM ins WHERE ins.run_at <= now() LIMIT 1
)
SELECT ins.id, ins.dedupe_key FROM ins CROSS JOIN (SELECT count(*) FROM wake) AS w ORDER BY ins.id

-- name: active_by_dedupe_key
SELECT id, dedupe_key FROM {schema}.jobs
WHERE queue = %(queue)s AND dedupe_key = ANY(%(keys)s::text[]) AND status IN ('queued', 'running')

-- name: get
SELECT * FROM {schema}.jobs WHERE id = %(id)s

-- name: stats
SELECT status, count(*) AS n FROM {schema}.jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
GROUP BY status

-- name: dead_letters
SELECT * FROM {schema}.jobs
WHERE status = 'dead' AND (%(queue)s::text IS NULL OR queue = %(queue)s)
ORDER BY id DESC
LIMIT %(limit)s

-- name: requeue
-- Dead jobs go back to queued with fresh attempts, keeping their checkpointed
-- stage and state (so they resume) and their error history. A job whose dedupe
-- key is now held by another active job stays dead.
WITH moved AS (
    UPDATE {schema}.jobs AS j
    SET status = 'queued', attempt = 0, deferrals = 0, run_at = now(),
        finished_at = NULL, updated_at = now()
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.status = 'dead'
      AND (j.dedupe_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM {schema}.jobs AS o
            WHERE o.queue = j.queue AND o.dedupe_key = j.dedupe_key
              AND o.status IN ('queued', 'running')))
    RETURNING j.id, j.queue
), wake AS (
    SELECT pg_notify(%(channel)s, q.queue) FROM (SELECT DISTINCT queue FROM moved) AS q
)
SELECT moved.id FROM moved CROSS JOIN (SELECT count(*) FROM wake) AS w

-- name: cancel
UPDATE {schema}.jobs
SET status = 'cancelled', finished_at = now(), updated_at = now()
WHERE id = %(id)s AND status = 'queued'
RETURNING id

-- name: claim
-- Claims up to %(limit)s ready jobs in one autocommit statement. MATERIALIZED
-- fences the LIMIT from the planner (so it cannot lock more rows than asked);
-- NO KEY UPDATE does not conflict with foreign-key KEY SHARE locks.
WITH picked AS MATERIALIZED (
    SELECT id FROM {schema}.jobs
    WHERE queue = %(queue)s AND status = 'queued' AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs AS j
SET status = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + %(lease)s::float8 * interval '1 second', updated_at = now()
FROM picked
WHERE j.id = picked.id
-- The columns come back in the field order of worker_core.jobs.Job.
RETURNING j.id, j.queue, j.payload, j.status, j.stage, j.state, j.attempt, j.max_attempts,
          j.deferrals, j.priority, j.run_at, j.correlation_id, j.last_error, j.errors,
          j.created_at, j.updated_at, j.finished_at, j.dedupe_key, j.lease_owner,
          j.lease_expires_at, j.lease_token::text, j.errors_dropped

-- name: heartbeat
-- One statement renews every lease a worker holds: (id, token) pairs, so a stale
-- run and a newer claim of the same job are told apart. A token missing from the
-- result is a lease this worker lost. Rows are found by primary key (a nested
-- loop over the pairs), never through the lease index and its dead entries.
UPDATE {schema}.jobs AS j
SET lease_expires_at = now() + %(lease)s::float8 * interval '1 second'
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS h(id, token)
WHERE j.id = h.id AND j.status = 'running' AND j.lease_token = h.token
RETURNING j.lease_token::text

-- name: finish
-- Writes a batch of outcomes (checkpoint, succeed, retry, defer, bury, release,
-- cancel) in one statement, each fenced by its run's lease token. The batch is one
-- JSON array of objects read by field name and type. An outcome names an event,
-- not a status: the new status, and whether the attempt is refunded or a deferral
-- counted, come from {transitions}, the table rendered from worker_core.jobs, so
-- a status change it does not allow is not written. Delays are computed on the
-- database clock, so worker clock skew cannot move run_at. Error histories keep
-- the first and the latest %(keep_errors)s records (append_error).
WITH o AS (
    SELECT * FROM jsonb_to_recordset(%(outcomes)s::jsonb) AS o(
        id bigint, token uuid, event text, stage text, state jsonb, delay float8, error jsonb)
)
UPDATE {schema}.jobs AS j
SET status = t.to_status,
    stage = o.stage,
    state = coalesce(o.state, j.state),
    attempt = j.attempt - t.refund,
    deferrals = j.deferrals + t.deferral,
    run_at = CASE WHEN o.delay IS NULL THEN j.run_at
                  ELSE now() + o.delay * interval '1 second' END,
    lease_owner = CASE WHEN t.to_status = 'running' THEN j.lease_owner END,
    lease_token = CASE WHEN t.to_status = 'running' THEN j.lease_token END,
    lease_expires_at = CASE WHEN t.to_status = 'running' THEN j.lease_expires_at END,
    last_error = coalesce(o.error, j.last_error),
    errors = {schema}.append_error(j.errors, o.error, %(keep_errors)s),
    errors_dropped = j.errors_dropped + CASE WHEN o.error IS NULL THEN 0
        ELSE greatest(jsonb_array_length(j.errors) + 1 - %(keep_errors)s, 0) END,
    finished_at = CASE WHEN t.to_status IN ('succeeded', 'dead', 'cancelled') THEN now() END,
    updated_at = now()
FROM o JOIN {transitions} AS t(from_status, event, to_status, refund, deferral)
    ON t.event = o.event
WHERE j.id = o.id AND j.status = 'running' AND j.lease_token = o.token
  AND t.from_status = j.status
RETURNING o.token::text

-- name: rescue
-- Any worker returns jobs whose lease expired (their worker died or hung) to
-- queued, or to dead when their attempts are spent. The status guard lives in
-- the statement itself, so a job completed meanwhile is never touched. Clearing
-- the token fences off the run that held the lease, should it wake up.
WITH expired AS MATERIALIZED (
    SELECT id, jsonb_build_object(
               'type', 'LeaseExpired',
               'message', 'lease of worker ' || lease_owner || ' expired; job rescued',
               'stage', stage, 'attempt', attempt, 'kind', 'transient',
               'at', now(), 'worker', lease_owner) AS err,
           attempt >= max_attempts AS exhausted
    FROM {schema}.jobs
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs AS j
SET status = CASE WHEN e.exhausted THEN 'dead' ELSE 'queued' END,
    lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, run_at = now(),
    last_error = e.err, errors = {schema}.append_error(j.errors, e.err, %(keep_errors)s),
    errors_dropped = j.errors_dropped
        + greatest(jsonb_array_length(j.errors) + 1 - %(keep_errors)s, 0),
    finished_at = CASE WHEN e.exhausted THEN now() END, updated_at = now()
FROM expired AS e
WHERE j.id = e.id AND j.status = 'running'
RETURNING j.id, j.queue, j.status

-- name: notify
SELECT pg_notify(%(channel)s, %(queue)s)

-- name: next_run_at
-- When the next queued job of a queue becomes ready (for the idle wait).
SELECT min(run_at) AS run_at FROM {schema}.jobs WHERE queue = %(queue)s AND status = 'queued'

-- name: prune
-- Retention: deletes finished jobs older than the cutoffs, a bounded batch at a
-- time, oldest first. Only one worker of the fleet prunes at a time (the others
-- find the advisory lock taken and delete nothing).
WITH lock AS (
    SELECT pg_try_advisory_xact_lock(hashtext('worker_core.prune'), hashtext(%(schema)s)) AS held
), doomed AS (
    SELECT id FROM {schema}.jobs
    WHERE (SELECT held FROM lock)
      AND status IN ('succeeded', 'cancelled', 'dead')
      AND ((status <> 'dead'
            AND finished_at < now() - %(retention)s::float8 * interval '1 second')
        OR (status = 'dead'
            AND finished_at < now() - %(dead_retention)s::float8 * interval '1 second'))
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.jobs AS j USING doomed WHERE j.id = doomed.id

-- name: depth
-- Queue depth for metrics and health: ready and scheduled jobs, running jobs,
-- and how long the oldest ready job has waited (the number to alert on).
SELECT count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'queued' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'running') AS running,
       coalesce(extract(epoch FROM now() - min(run_at)
                FILTER (WHERE status = 'queued' AND run_at <= now())), 0)::float8 AS oldest_ready_age
FROM {schema}.jobs
WHERE queue = %(queue)s AND status IN ('queued', 'running')

-- name: table_health
-- Hygiene of the jobs table: dead tuples, and what holds back vacuum (the
-- oldest snapshot of any session, prepared transaction or replication slot).
SELECT s.n_live_tup, s.n_dead_tup, s.last_autovacuum, s.last_vacuum,
       (SELECT max(age(a.backend_xmin)) FROM pg_stat_activity AS a
         WHERE a.backend_xmin IS NOT NULL) AS oldest_xmin_age,
       (SELECT coalesce(extract(epoch FROM now() - min(a.xact_start)), 0)::float8
          FROM pg_stat_activity AS a
         WHERE a.xact_start IS NOT NULL AND a.backend_type = 'client backend'
           AND a.pid <> pg_backend_pid()) AS oldest_transaction_seconds,
       (SELECT max(age(p.transaction)) FROM pg_prepared_xacts AS p) AS oldest_prepared_xact_age,
       (SELECT max(age(r.xmin)) FROM pg_replication_slots AS r) AS oldest_slot_xmin_age
FROM pg_stat_user_tables AS s
WHERE s.schemaname = %(schema)s AND s.relname = 'jobs'

-- name: vacuum_check
-- Dead rows on the jobs table (from the statistics system: no scan), and whether
-- this role may VACUUM it (it owns the table or is a member of the owner role).
SELECT s.n_dead_tup AS dead_rows, pg_has_role(c.relowner, 'USAGE') AS may_vacuum
FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
WHERE s.schemaname = %(schema)s AND s.relname = 'jobs'

-- name: stage_counts
-- For `worker-core status`: jobs by status and last completed stage.
SELECT status, coalesce(stage, '-') AS stage, count(*) AS n
FROM {schema}.jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
GROUP BY status, stage
ORDER BY status, stage

-- name: jobs_by_dedupe_key
-- For a retried import (`worker-core enqueue --file --dedupe-key-field`): the newest
-- job of the queue holding each key, in any status, so lines whose job already ran
-- are skipped too. No index covers finished jobs' keys; an operator command runs it
-- once per batch of keys.
SELECT DISTINCT ON (dedupe_key) dedupe_key, id
FROM {schema}.jobs
WHERE queue = %(queue)s AND dedupe_key = ANY(%(keys)s::text[])
ORDER BY dedupe_key, id DESC

-- Named queries of worker_core. {schema} is the quoted schema identifier; other
-- {placeholders} are filled by _statements.py with SQL it builds itself. Every
-- claim sets a fresh random lease_token (_statements._LEASE_TOKEN), and every
-- statement that renews or moves a running job is fenced by that token (which
-- only a running job has: constraint jobs_lease_token_only_when_running), so a
-- run whose lease was taken over (by another worker, or by a newer claim of its
-- own worker) can never renew or overwrite the job.

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
        (queue, kind, payload, priority, run_at, max_attempts, dedupe_key, correlation_id, state)
    SELECT %(queue)s, %(kind)s, r.payload, %(priority)s,
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
-- A queued job is cancelled at once; a running one gets a cancel request that its
-- worker acts on (a NOTIFY on the control channel tells it now; its next heartbeat
-- would otherwise). One UPDATE decides on the row's latest version, so a job
-- claimed meanwhile is treated as running. Waiters hear of a job cancelled here.
WITH c AS (
    UPDATE {schema}.jobs
    SET status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
        finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
        cancel_requested_at = CASE WHEN status = 'running'
                                   THEN coalesce(cancel_requested_at, now()) END,
        updated_at = now()
    WHERE id = %(id)s AND status IN ('queued', 'running')
    RETURNING id, status, waited
), told AS (
    SELECT pg_notify(%(control)s, json_build_object('op', 'cancel', 'id', id)::text)
    FROM c WHERE status = 'running'
    UNION ALL
    SELECT pg_notify(%(done)s, id::text) FROM c WHERE status = 'cancelled' AND waited
)
SELECT c.status FROM c CROSS JOIN (SELECT count(*) FROM told) AS w

-- name: claim
-- Claims up to %(limit)s ready jobs of any kind from the queues %(queues)s in one
-- autocommit statement, best first (priority, then run_at) across the queues.
-- Each queue is one index scan of jobs_claim_idx in claim order (a LATERAL with
-- its own LIMIT), so several queues cost no sort of the backlog. MATERIALIZED
-- fences the LIMITs from the planner (so it cannot lock more rows than asked);
-- NO KEY UPDATE does not conflict with foreign-key KEY SHARE locks.
WITH wanted AS MATERIALIZED (
    -- Per queue: how many it may give (the worker's free slots for it, capped by
    -- queue.max_running's room). A paused queue gives none. Queues come sorted by
    -- name, so running_room takes its locks in the same order in every claim.
    SELECT w.queue,
           CASE WHEN w.cap IS NULL THEN w.n
                ELSE least(w.n, {schema}.running_room(w.queue, w.cap)) END AS n
    FROM unnest(%(queues)s::text[], %(rooms)s::int[], %(caps)s::int[])
         WITH ORDINALITY AS w(queue, n, cap, ord)
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.paused_queues AS p WHERE p.queue = w.queue)
    ORDER BY w.ord
), picked AS MATERIALIZED (
    SELECT c.id
    FROM wanted AS w
    CROSS JOIN LATERAL (
        SELECT q.id, q.priority, q.run_at FROM {schema}.jobs AS q
        WHERE q.queue = w.queue AND q.status = 'queued' AND q.run_at <= now()
        ORDER BY q.priority DESC, q.run_at, q.id
        LIMIT w.n
        FOR NO KEY UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.priority DESC, c.run_at, c.id
    LIMIT %(limit)s
)
UPDATE {schema}.jobs AS j
SET status = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
    lease_token = {lease_token},
    lease_expires_at = now() + %(lease)s::float8 * interval '1 second', updated_at = now()
FROM picked
WHERE j.id = picked.id
-- The columns of worker_core.jobs.Job.from_claim: the fields in their order, but
-- for status, finished_at and lease_owner (running, NULL and %(owner)s here). An
-- empty state or error history comes as NULL: no JSON to decode for a fresh job.
RETURNING j.id, j.queue, j.payload, j.stage, nullif(j.state, '{}'::jsonb), j.attempt,
          j.max_attempts, j.deferrals, j.priority, j.run_at, j.correlation_id, j.last_error,
          nullif(j.errors, '[]'::jsonb),
          j.created_at, j.updated_at, j.dedupe_key, j.lease_expires_at,
          j.lease_token::text, j.errors_dropped, j.kind

-- name: claim_one
-- The claim of the common case: one queue, any kind, no max_running. The rows are
-- picked and locked by one scan of jobs_claim_idx in claim order (an InitPlan: no
-- CTE, join, lateral or sort to plan, a third less planning for each custom plan),
-- after a one-time probe of paused_queues, then updated by primary key. Its cached
-- generic plan is made for the table's size at the time: workers ANALYZE the table
-- once it outgrows that size (Queue.analyze). The same row lock, fresh lease_token
-- and returned columns as `claim`.
UPDATE {schema}.jobs AS j
SET status = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
    lease_token = {lease_token},
    lease_expires_at = now() + %(lease)s::float8 * interval '1 second', updated_at = now()
WHERE j.id = ANY(ARRAY(
    SELECT q.id FROM {schema}.jobs AS q
    WHERE q.queue = %(queue)s AND q.status = 'queued' AND q.run_at <= now()
      AND NOT EXISTS (SELECT 1 FROM {schema}.paused_queues AS p WHERE p.queue = %(queue)s)
    ORDER BY q.priority DESC, q.run_at, q.id
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
))
-- The columns of worker_core.jobs.Job.from_claim: the fields in their order, but
-- for status, finished_at and lease_owner (running, NULL and %(owner)s here). An
-- empty state or error history comes as NULL: no JSON to decode for a fresh job.
RETURNING j.id, j.queue, j.payload, j.stage, nullif(j.state, '{}'::jsonb), j.attempt,
          j.max_attempts, j.deferrals, j.priority, j.run_at, j.correlation_id, j.last_error,
          nullif(j.errors, '[]'::jsonb),
          j.created_at, j.updated_at, j.dedupe_key, j.lease_expires_at,
          j.lease_token::text, j.errors_dropped, j.kind

-- name: claim_kinds
-- The claim of a worker that knows only the kinds %(kinds)s (it defines
-- pipelines()): one index scan of jobs_claim_kind_idx per (queue, kind) in claim
-- order, merged best first; row_number keeps each queue within its share.
WITH wanted AS MATERIALIZED (
    -- Per queue: how many it may give (the worker's free slots for it, capped by
    -- queue.max_running's room). A paused queue gives none. Queues come sorted by
    -- name, so running_room takes its locks in the same order in every claim.
    SELECT w.queue,
           CASE WHEN w.cap IS NULL THEN w.n
                ELSE least(w.n, {schema}.running_room(w.queue, w.cap)) END AS n
    FROM unnest(%(queues)s::text[], %(rooms)s::int[], %(caps)s::int[])
         WITH ORDINALITY AS w(queue, n, cap, ord)
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.paused_queues AS p WHERE p.queue = w.queue)
    ORDER BY w.ord
), picked AS MATERIALIZED (
    SELECT r.id FROM (
        SELECT c.id, c.priority, c.run_at, w.n,
               row_number() OVER (PARTITION BY w.queue
                                  ORDER BY c.priority DESC, c.run_at, c.id) AS nth
        FROM wanted AS w
        CROSS JOIN unnest(%(kinds)s::text[]) AS k(kind)
        CROSS JOIN LATERAL (
            SELECT q.id, q.priority, q.run_at FROM {schema}.jobs AS q
            WHERE q.queue = w.queue AND q.kind = k.kind AND q.status = 'queued'
              AND q.run_at <= now()
            ORDER BY q.priority DESC, q.run_at, q.id
            LIMIT w.n
            FOR NO KEY UPDATE SKIP LOCKED
        ) AS c
    ) AS r
    WHERE r.nth <= r.n
    ORDER BY r.priority DESC, r.run_at, r.id
    LIMIT %(limit)s
)
UPDATE {schema}.jobs AS j
SET status = 'running', attempt = j.attempt + 1, lease_owner = %(owner)s,
    lease_token = {lease_token},
    lease_expires_at = now() + %(lease)s::float8 * interval '1 second', updated_at = now()
FROM picked
WHERE j.id = picked.id
-- The columns of worker_core.jobs.Job.from_claim: the fields in their order, but
-- for status, finished_at and lease_owner (running, NULL and %(owner)s here). An
-- empty state or error history comes as NULL: no JSON to decode for a fresh job.
RETURNING j.id, j.queue, j.payload, j.stage, nullif(j.state, '{}'::jsonb), j.attempt,
          j.max_attempts, j.deferrals, j.priority, j.run_at, j.correlation_id, j.last_error,
          nullif(j.errors, '[]'::jsonb),
          j.created_at, j.updated_at, j.dedupe_key, j.lease_expires_at,
          j.lease_token::text, j.errors_dropped, j.kind

-- name: heartbeat
-- One statement renews every lease a worker holds: (id, token) pairs, so a stale
-- run and a newer claim of the same job are told apart. A token missing from the
-- result is a lease this worker lost. A token implies status 'running'
-- (constraint jobs_lease_token_only_when_running), so the token fence alone holds
-- the status too, and the rows are found by primary key (a nested loop over the
-- pairs): a `status = 'running'` condition would let the planner pick a partial
-- index of running jobs instead and walk all of them, dead entries included, for
-- every pair. The second column says an operator asked to cancel the job: the
-- polling fallback for a worker that missed the NOTIFY.
UPDATE {schema}.jobs AS j
SET lease_expires_at = now() + %(lease)s::float8 * interval '1 second'
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS h(id, token)
WHERE j.id = h.id AND j.lease_token = h.token
RETURNING j.lease_token::text, j.cancel_requested_at IS NOT NULL

-- name: finish
-- Writes a batch of outcomes (checkpoint, succeed, retry, defer, bury, release,
-- cancel) in one statement, each fenced by its run's lease token. The batch is one
-- JSON array of objects read by field name and type. An outcome names an event,
-- not a status: the new status, and whether the attempt is refunded or a deferral
-- counted, come from {transitions}, the table rendered from worker_core.jobs: one
-- row per event, each column a pair [without, with a cancel request] (with one,
-- an outcome that would queue the job again cancels it), indexed by {cancel_pair}.
-- A status change the table does not allow is not written. Delays are computed on
-- the database clock, so worker clock skew cannot move run_at. Error histories
-- keep the first and the latest %(keep_errors)s records (append_error, called only
-- for an outcome that brings an error: the planner does not inline it). The same
-- statement wakes idle workers of each queue that has a job ready again, and
-- tells waiters (Queue.wait) of each waited-for job that finished: NOTIFYs from
-- its RETURNING list, sent at commit (the server delivers a notification repeated
-- in one transaction once), with no CTE or aggregate to run when nothing is told.
WITH o AS (
    SELECT * FROM jsonb_to_recordset(%(outcomes)s::jsonb) AS o(
        id bigint, token uuid, event text, stage text, state jsonb, delay float8, error jsonb)
)
UPDATE {schema}.jobs AS j
SET status = t.to_status[{cancel_pair}],
    stage = o.stage,
    state = coalesce(o.state, j.state),
    attempt = j.attempt - t.refund[{cancel_pair}],
    deferrals = j.deferrals + t.deferral[{cancel_pair}],
    run_at = CASE WHEN o.delay IS NULL THEN j.run_at
                  ELSE now() + o.delay * interval '1 second' END,
    lease_owner = CASE WHEN t.to_status[{cancel_pair}] = 'running' THEN j.lease_owner END,
    lease_token = CASE WHEN t.to_status[{cancel_pair}] = 'running' THEN j.lease_token END,
    lease_expires_at = CASE WHEN t.to_status[{cancel_pair}] = 'running'
                            THEN j.lease_expires_at END,
    cancel_requested_at = CASE WHEN t.to_status[{cancel_pair}] = 'running'
                               THEN j.cancel_requested_at END,
    last_error = coalesce(o.error, j.last_error),
    errors = CASE WHEN o.error IS NULL THEN j.errors
                  ELSE {schema}.append_error(j.errors, o.error, %(keep_errors)s) END,
    errors_dropped = j.errors_dropped + CASE WHEN o.error IS NULL THEN 0
        ELSE greatest(jsonb_array_length(j.errors) + 1 - %(keep_errors)s, 0) END,
    finished_at = CASE WHEN t.to_status[{cancel_pair}] IN ('succeeded', 'dead', 'cancelled')
                       THEN now() END,
    updated_at = now()
FROM o JOIN {transitions} AS t(from_status, event, to_status, refund, deferral)
     ON t.event = o.event
-- The token fence implies status 'running' (constraint
-- jobs_lease_token_only_when_running) and the transition row checks the status
-- again; no `j.status = 'running'` here, which would let the planner walk a
-- partial index of every running job for each outcome instead of the primary key.
WHERE j.id = o.id AND j.lease_token = o.token AND t.from_status = j.status
RETURNING o.token::text AS token, j.status,
          CASE WHEN j.status = 'queued' AND j.run_at <= now()
               THEN pg_notify(%(channel)s, j.queue)
               WHEN j.waited AND j.status IN ('succeeded', 'dead', 'cancelled')
               THEN pg_notify(%(done_channel)s, j.id::text) END IS NOT NULL AS told

-- name: finish_succeeded
-- `finish` for the common batch: every outcome a success without error or delay.
-- It writes what `finish` writes for the event succeed (running -> succeeded, in
-- the transition table with or without a cancel request; no refund, no deferral, the
-- error history untouched), without reading the transition table, and tells only
-- waiters (a succeeded job is never ready again). The same token fence.
UPDATE {schema}.jobs AS j
SET status = 'succeeded',
    stage = o.stage,
    state = coalesce(o.state, j.state),
    lease_owner = NULL,
    lease_token = NULL,
    lease_expires_at = NULL,
    cancel_requested_at = NULL,
    finished_at = now(),
    updated_at = now()
FROM jsonb_to_recordset(%(outcomes)s::jsonb) AS o(id bigint, token uuid, stage text, state jsonb)
WHERE j.id = o.id AND j.lease_token = o.token
RETURNING o.token::text AS token, j.status,
          CASE WHEN j.waited THEN pg_notify(%(done_channel)s, j.id::text) END IS NOT NULL AS told

-- name: rescue
-- Any worker returns jobs whose lease expired (their worker died or hung) to
-- queued, or to dead when their attempts are spent, or to cancelled when an
-- operator asked to cancel them. The status guard lives in the statement itself,
-- so a job completed meanwhile is never touched; the row is locked, so the cancel
-- request read is the latest. Clearing the token fences off the run that held
-- the lease, should it wake up. Waiters hear of jobs that end here.
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
), moved AS (
    UPDATE {schema}.jobs AS j
    SET status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN e.exhausted THEN 'dead' ELSE 'queued' END,
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
        cancel_requested_at = NULL, run_at = now(),
        last_error = e.err, errors = {schema}.append_error(j.errors, e.err, %(keep_errors)s),
        errors_dropped = j.errors_dropped
            + greatest(jsonb_array_length(j.errors) + 1 - %(keep_errors)s, 0),
        finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL OR e.exhausted THEN now() END,
        updated_at = now()
    FROM expired AS e
    WHERE j.id = e.id AND j.status = 'running'
    RETURNING j.id, j.queue, j.status, j.waited
), told AS (
    SELECT pg_notify(%(done_channel)s, id::text) FROM moved WHERE waited AND status <> 'queued'
)
SELECT moved.id, moved.queue, moved.status FROM moved CROSS JOIN (SELECT count(*) FROM told) AS w

-- name: notify
SELECT pg_notify(%(channel)s, %(queue)s)

-- name: next_run_at
-- When the next queued job this worker could claim becomes ready (for the idle
-- wait of run(until_empty=True)): its queues, its kinds (NULL: any), none paused.
SELECT min(run_at) AS run_at FROM {schema}.jobs AS j
WHERE j.queue = ANY(%(queues)s::text[]) AND j.status = 'queued'
  AND (%(kinds)s::text[] IS NULL OR j.kind = ANY(%(kinds)s::text[]))
  AND NOT EXISTS (SELECT 1 FROM {schema}.paused_queues AS p WHERE p.queue = j.queue)

-- name: wait_for
-- Queue.wait: mark a job as waited for (the statement that finishes it will send
-- a NOTIFY). Only an unfinished job that is not marked yet is written.
UPDATE {schema}.jobs SET waited = true
WHERE id = %(id)s AND status IN ('queued', 'running') AND NOT waited

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
-- and how long the oldest ready job has waited (the number to alert on), over
-- the queues of a worker.
SELECT count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'queued' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'running') AS running,
       coalesce(extract(epoch FROM now() - min(run_at)
                FILTER (WHERE status = 'queued' AND run_at <= now())), 0)::float8 AS oldest_ready_age
FROM {schema}.jobs
WHERE queue = ANY(%(queues)s::text[]) AND status IN ('queued', 'running')

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
-- this role may VACUUM or ANALYZE it (it owns the table or is a member of the
-- owner role); its size in pages now and as of its last VACUUM or ANALYZE
-- (relpages: 0 if never).
SELECT s.n_dead_tup AS dead_rows, pg_has_role(c.relowner, 'USAGE') AS may_vacuum,
       pg_relation_size(c.oid) / current_setting('block_size')::int8 AS pages,
       c.relpages::int8 AS stats_pages
FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
WHERE s.schemaname = %(schema)s AND s.relname = 'jobs'

-- name: claim_index_size
-- A claim index's size on disk and its live entries as of the last VACUUM or
-- ANALYZE (reltuples), and whether this role may rebuild it (it owns the table).
SELECT pg_relation_size(i.oid) AS bytes, greatest(i.reltuples, 0)::float8 AS entries,
       pg_has_role(t.relowner, 'USAGE') AS may_reindex
FROM pg_class AS i
JOIN pg_index AS x ON x.indexrelid = i.oid
JOIN pg_class AS t ON t.oid = x.indrelid
WHERE i.oid = to_regclass(format('%%I.%%I', %(schema)s::text, %(index)s::text))

-- name: claim_index_entries
-- The live entries of the claim indexes, counted: both hold the queued jobs. Read
-- only when their size looks bloated against reltuples, which an index never
-- analyzed (0 when it was created on an empty table) or grown since understates.
-- Counting stops at %(enough)s: that many entries already make the index healthy.
SELECT count(*) FROM (SELECT FROM {schema}.jobs WHERE status = 'queued' LIMIT %(enough)s) AS q

-- name: claim_index_leftovers
-- Invalid copies of the claim indexes that an interrupted REINDEX CONCURRENTLY
-- left behind (it names them <index>_ccnew, _ccnew1, ..., _ccold): every write
-- still maintains them until they are dropped.
SELECT c.relname AS name
FROM pg_index AS x JOIN pg_class AS c ON c.oid = x.indexrelid
WHERE x.indrelid = to_regclass(format('%%I.jobs', %(schema)s::text)) AND NOT x.indisvalid
  AND c.relname ~ '^jobs_claim(_kind)?_idx_cc(new|old)[0-9]*$'

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

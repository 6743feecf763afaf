-- Named queries of the operations console (migration 0007): queue pause, metrics
-- history, the workers registry, the alert evaluator, and the dashboard's reads.
-- Run only by worker_core.queue.Queue. {kind} is the job's kind expression
-- (the literal 'default' until the jobs table has a kind column).

-- name: pause
-- The NOTIFY on the control channel tells every worker at once: they stop
-- starting the queue's jobs they hold in their prefetch buffer (claims already
-- skip a paused queue).
WITH p AS (
    INSERT INTO {schema}.paused_queues (queue, paused_by) VALUES (%(queue)s, %(by)s)
    ON CONFLICT (queue) DO NOTHING
    RETURNING queue
)
SELECT pg_notify(%(control)s, json_build_object('op', 'pause', 'queue', queue)::text) FROM p

-- name: resume
-- Resuming tells every worker (control channel) and wakes the queue's idle
-- workers (the NOTIFY of an enqueue).
WITH r AS (
    DELETE FROM {schema}.paused_queues WHERE queue = %(queue)s RETURNING queue
)
SELECT pg_notify(%(control)s, json_build_object('op', 'resume', 'queue', queue)::text),
       pg_notify(%(channel)s, queue)
FROM r

-- name: paused
SELECT queue FROM {schema}.paused_queues ORDER BY queue

-- name: record_history
-- One statement per flush: rows arrive as one JSON array of
-- [minute epoch, queue, kind, stage, succeeded, failed, retried, deferred,
-- dead_lettered, seconds_sum, [bucket counts]] sorted by key, so two workers
-- flushing the same minutes lock rows in the same order (no deadlock). Counts add
-- up; buckets add element-wise.
INSERT INTO {schema}.history AS h
    (minute, queue, kind, stage, succeeded, failed, retried, deferred, dead_lettered,
     seconds_sum, buckets)
SELECT to_timestamp((r->>0)::float8), r->>1, r->>2, r->>3, (r->>4)::bigint, (r->>5)::bigint,
       (r->>6)::bigint, (r->>7)::bigint, (r->>8)::bigint, (r->>9)::float8,
       ARRAY(SELECT b::bigint FROM jsonb_array_elements_text(r->10) AS b)
FROM jsonb_array_elements(%(rows)s::jsonb) AS r
ON CONFLICT (minute, queue, kind, stage) DO UPDATE SET
    succeeded = h.succeeded + excluded.succeeded,
    failed = h.failed + excluded.failed,
    retried = h.retried + excluded.retried,
    deferred = h.deferred + excluded.deferred,
    dead_lettered = h.dead_lettered + excluded.dead_lettered,
    seconds_sum = h.seconds_sum + excluded.seconds_sum,
    buckets = ARRAY(SELECT coalesce(a, 0) + coalesce(b, 0)
                    FROM unnest(h.buckets, excluded.buckets) WITH ORDINALITY AS u(a, b, i)
                    ORDER BY i)

-- name: history
-- Rows of the last %(minutes)s minutes (the current one included), oldest first.
SELECT minute, queue, kind, nullif(stage, '') AS stage, succeeded, failed, retried, deferred,
       dead_lettered, seconds_sum, buckets
FROM {schema}.history
WHERE minute >= date_trunc('minute', now()) - (%(minutes)s::int - 1) * interval '1 minute'
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(stages)s OR stage = '')
ORDER BY minute, queue, kind, stage

-- name: prune_history
-- Retention of the history; a bounded batch per call, oldest first.
DELETE FROM {schema}.history AS h
USING (
    SELECT minute, queue, kind, stage FROM {schema}.history
    WHERE minute < now() - %(days)s::float8 * interval '1 day'
    ORDER BY minute
    LIMIT %(limit)s
) AS old
WHERE h.minute = old.minute AND h.queue = old.queue AND h.kind = old.kind
  AND h.stage = old.stage

-- name: register_worker
-- At start and on every refresh: one upsert keeps the row (re-created if an
-- operator or the pruning of gone workers removed it meanwhile).
INSERT INTO {schema}.workers
    (id, host, pid, version, queues, kinds, concurrency, in_flight, lease_seconds)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(queues)s, %(kinds)s, %(concurrency)s,
        %(in_flight)s, %(lease)s)
ON CONFLICT (id) DO UPDATE SET
    in_flight = excluded.in_flight, last_seen = now(), queues = excluded.queues,
    kinds = excluded.kinds, concurrency = excluded.concurrency,
    lease_seconds = excluded.lease_seconds

-- name: leave_worker
DELETE FROM {schema}.workers WHERE id = %(id)s

-- name: prune_workers
-- Workers gone (no refresh within their lease) for more than a day.
DELETE FROM {schema}.workers
WHERE last_seen + lease_seconds * interval '1 second' < now() - interval '1 day'

-- name: workers
SELECT id, host, pid, version, queues, kinds, concurrency, in_flight, lease_seconds,
       started_at, last_seen,
       last_seen + lease_seconds * interval '1 second' >= now() AS alive,
       extract(epoch FROM now() - last_seen)::float8 AS seen_seconds_ago
FROM {schema}.workers
ORDER BY alive DESC, started_at, id

-- name: take_lease
-- The named lease for %(owner)s when it is free, expired or already its own;
-- returns the holder and the database clock either way.
WITH taken AS (
    INSERT INTO {schema}.leases AS l (name, owner, expires_at)
    VALUES (%(name)s, %(owner)s, now() + %(ttl)s::float8 * interval '1 second')
    ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
    WHERE l.owner = excluded.owner OR l.expires_at < now()
    RETURNING owner
)
SELECT coalesce((SELECT owner FROM taken),
                (SELECT owner FROM {schema}.leases WHERE name = %(name)s)) AS owner,
       extract(epoch FROM now())::float8 AS now

-- name: release_lease
DELETE FROM {schema}.leases WHERE name = %(name)s AND owner = %(owner)s

-- name: alert_states
SELECT alert, subject, status, extract(epoch FROM since)::float8 AS since, value, threshold,
       notified
FROM {schema}.alerts
ORDER BY alert, subject

-- name: save_alert_states
-- Written only while the writer holds the lease (a stalled evaluator whose lease
-- was taken over writes nothing). Rows: [alert, subject, status, since epoch,
-- value, threshold, notified].
WITH lease AS (
    SELECT 1 FROM {schema}.leases
    WHERE name = %(lease)s AND owner = %(owner)s AND expires_at > now()
)
INSERT INTO {schema}.alerts AS a (alert, subject, status, since, value, threshold, notified)
SELECT r->>0, r->>1, r->>2, to_timestamp((r->>3)::float8), (r->>4)::float8, (r->>5)::float8,
       r->>6
FROM jsonb_array_elements(%(rows)s::jsonb) AS r
WHERE EXISTS (SELECT 1 FROM lease)
ON CONFLICT (alert, subject) DO UPDATE SET
    status = excluded.status, since = excluded.since, value = excluded.value,
    threshold = excluded.threshold, notified = excluded.notified,
    changed_at = CASE WHEN a.status IS DISTINCT FROM excluded.status
                       OR a.notified IS DISTINCT FROM excluded.notified
                      THEN now() ELSE a.changed_at END
RETURNING alert, subject

-- name: prune_alerts
-- Alerts that stayed quiet for a week (their subject is likely gone).
DELETE FROM {schema}.alerts
WHERE status = 'ok' AND notified = 'resolved' AND changed_at < now() - interval '7 days'

-- name: alert_dead_letters
-- Jobs that went dead within the window, per queue.
SELECT queue AS subject, count(*)::float8 AS value
FROM {schema}.jobs
WHERE status = 'dead' AND finished_at >= now() - %(window)s::float8 * interval '1 second'
GROUP BY queue

-- name: alert_oldest_ready_seconds
SELECT queue AS subject, extract(epoch FROM now() - min(run_at))::float8 AS value
FROM {schema}.jobs
WHERE status = 'queued' AND run_at <= now()
GROUP BY queue

-- name: alert_breaker_open_seconds
SELECT name AS subject, extract(epoch FROM now() - opened_at)::float8 AS value
FROM {schema}.breakers
WHERE state = 'open' AND opened_at IS NOT NULL

-- name: alert_no_workers_seconds
-- Per queue with ready jobs: seconds for which none of its workers was alive (0
-- when one is), counted from the later of the oldest ready job and the moment
-- the last of its workers went quiet. A paused queue is left alone.
WITH ready AS (
    SELECT queue, min(run_at) AS since FROM {schema}.jobs
    WHERE status = 'queued' AND run_at <= now()
      AND queue NOT IN (SELECT queue FROM {schema}.paused_queues)
    GROUP BY queue
)
SELECT r.queue AS subject,
       greatest(extract(epoch FROM now() - greatest(r.since, w.alive_until)), 0)::float8 AS value
FROM ready AS r
LEFT JOIN LATERAL (
    SELECT max(last_seen + lease_seconds * interval '1 second') AS alive_until
    FROM {schema}.workers WHERE r.queue = ANY(queues)
) AS w ON true

-- name: alert_failure_ratio
-- Failed attempts / all attempts over the window, where at least %(min_count)s ran.
SELECT queue AS subject,
       (sum(failed)::float8 / (sum(failed) + sum(succeeded))) AS value
FROM {schema}.history
WHERE stage = '' AND minute >= date_trunc('minute', now() - %(window)s::float8 * interval '1 second')
GROUP BY queue
HAVING sum(failed) + sum(succeeded) >= greatest(%(min_count)s::bigint, 1)

-- name: firing_alerts
-- For the worker_core_alert_firing gauge: every known alert, 1 while it fires.
SELECT alert, subject, (status IN ('firing', 'resolving'))::int::float8 AS firing
FROM {schema}.alerts
ORDER BY alert, subject

-- name: discard
-- Dead jobs an operator gave up on move to cancelled (out of the dead-letter
-- queue, kept until retention).
UPDATE {schema}.jobs
SET status = 'cancelled', finished_at = now(), updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'dead'
RETURNING id

-- name: overview
-- Counts per queue and status for the dashboard, with ready vs scheduled and the
-- oldest ready job's age. One scan of the jobs table: the dashboard caches it and
-- spaces its refreshes by how long it took.
SELECT queue,
       count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'queued' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       coalesce(extract(epoch FROM now() - min(run_at)
                FILTER (WHERE status = 'queued' AND run_at <= now())), 0)::float8
           AS oldest_ready_seconds
FROM {schema}.jobs
GROUP BY queue
ORDER BY queue

-- name: list_jobs
-- The jobs page: newest first, keyset-paginated on id (%(before)s), every filter
-- optional. %(search)s matches a correlation id exactly or a payload key (payload
-- ? key), %(search_id)s the id; with %(search_value)s, a key's text value instead.
SELECT id, queue, {kind} AS kind, status, stage, attempt, max_attempts, deferrals, priority,
       run_at, correlation_id, last_error, created_at, updated_at, finished_at, lease_owner
FROM {schema}.jobs
WHERE (%(before)s::bigint IS NULL OR id < %(before)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(kind)s::text IS NULL OR {kind} = %(kind)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(stage)s::text IS NULL OR stage = %(stage)s)
  AND (%(search)s::text IS NULL
       OR (%(search_value)s::text IS NULL
           AND (id = %(search_id)s::bigint OR correlation_id = %(search)s
                OR payload ? %(search)s))
       OR payload->>%(search)s = %(search_value)s)
ORDER BY id DESC
LIMIT %(limit)s

-- name: fleet_breakers
-- The breakers page: shared circuit state, times on the database clock.
SELECT name,
       CASE WHEN state = 'open' AND reopen_at <= now() AND trial_owner IS NOT NULL
                 AND trial_expires_at > now() THEN 'half_open'
            ELSE state END AS state,
       failures, opened_at, updated_at, updated_by, trial_owner,
       coalesce(greatest(extract(epoch FROM reopen_at - now()), 0), 0)::float8 AS half_open_in,
       CASE WHEN state = 'open' THEN extract(epoch FROM now() - opened_at)::float8 END
           AS open_seconds
FROM {schema}.breakers
ORDER BY name

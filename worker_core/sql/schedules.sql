-- Named queries of the schedule slots ({schema}.schedules, migration 8), run only
-- by worker_core.fleet.ScheduleStore for worker_core.schedules.ScheduleRunner.

-- name: ensure
-- A schedule seen for the first time starts at %(since)s (the caller's clock when
-- it passes one, else the database's): slots before it never fire.
INSERT INTO {schema}.schedules (name, last_slot)
SELECT unnest(%(names)s::text[]), coalesce(%(since)s::timestamptz, clock_timestamp())
ON CONFLICT (name) DO NOTHING

-- name: fetch
-- The database clock, and the last slot of each schedule (one row with a NULL name
-- when none exists), in one round trip.
SELECT c.now, s.name, s.last_slot
FROM (SELECT clock_timestamp() AS now) AS c
LEFT JOIN {schema}.schedules AS s ON s.name = ANY(%(names)s::text[])

-- name: advance
-- The compare-and-set that wins a slot: it moves last_slot only from the value the
-- caller read. Of several workers running it at once, the first takes the row lock;
-- the others wait, then find last_slot changed and match nothing.
UPDATE {schema}.schedules
SET last_slot = %(slot)s, updated_at = now()
WHERE name = %(name)s AND last_slot = %(seen)s
RETURNING name

-- name: fired
UPDATE {schema}.schedules
SET last_job_id = %(job_id)s, fired_at = now()
WHERE name = %(name)s

-- name: list
SELECT name, last_slot, last_job_id, fired_at, created_at FROM {schema}.schedules ORDER BY name

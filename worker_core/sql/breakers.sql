-- Named queries of the fleet-wide circuit breaker state ({schema}.breakers,
-- migration 0002), run only by worker_core.breaker.FleetStore.
--
-- Times are compared on the database clock and returned as seconds from now
-- (remaining), so workers whose host clocks disagree still agree on when a circuit
-- may be probed. Each write locks its row first (FOR UPDATE in the cur CTE, which
-- returns the latest committed version), decides from that version, and returns
-- one row either way: the row after the change (changed = true) or, when its guard
-- refused the change, the row as it is (changed = false). Queries that take
-- %(owner)s report in "mine" whether that owner holds a live trial permit.

-- name: ensure
INSERT INTO {schema}.breakers (name)
SELECT unnest(%(names)s::text[])
ON CONFLICT (name) DO NOTHING

-- name: fetch
SELECT name, state, failures, generation,
       coalesce(greatest(extract(epoch FROM reopen_at - now()), 0), 0)::float8 AS remaining,
       coalesce(trial_owner = %(owner)s AND trial_expires_at > now(), false) AS mine,
       true AS changed
FROM {schema}.breakers
WHERE name = ANY(%(names)s::text[])

-- name: record_failure
-- A counted failure. It trips the circuit when the fleet's failures reach fail_max,
-- or when the caller's own breaker tripped (%(trip)s) and the row is closed, or when
-- the caller's trial failed: it holds the permit, or (fallback after a database
-- outage) nobody does and the reset timeout has passed.
WITH cur AS (
    SELECT name, state, failures, generation, reopen_at, trial_owner, trial_expires_at,
           (state = 'closed' AND (%(trip)s OR failures + 1 >= %(fail_max)s))
           OR (state = 'open' AND %(trip)s
               AND (trial_owner = %(owner)s
                    OR (reopen_at <= now()
                        AND (trial_owner IS NULL OR trial_expires_at <= now())))) AS trips
    FROM {schema}.breakers
    WHERE name = %(name)s
    FOR UPDATE
), up AS (
    UPDATE {schema}.breakers AS b SET
        failures = b.failures + 1,
        state = CASE WHEN cur.trips THEN 'open' ELSE b.state END,
        opened_at = CASE WHEN cur.trips THEN now() ELSE b.opened_at END,
        reopen_at = CASE WHEN cur.trips
                         THEN now() + make_interval(secs => %(reset_timeout)s::float8)
                         ELSE b.reopen_at END,
        trial_owner = CASE WHEN cur.trips THEN NULL ELSE b.trial_owner END,
        trial_expires_at = CASE WHEN cur.trips THEN NULL ELSE b.trial_expires_at END,
        generation = CASE WHEN cur.trips
                          THEN greatest(b.generation + 1,
                                        (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                          ELSE b.generation END,
        updated_at = now(),
        updated_by = %(owner)s
    FROM cur
    WHERE b.name = cur.name
    RETURNING b.name, b.state, b.failures, b.generation, b.reopen_at, b.trial_owner,
              b.trial_expires_at, cur.trips AS changed
), wake AS (
    -- The first failure of a streak and the trip are pushed to every worker at once
    -- (they LISTEN on this channel): after the first, each reads the shared state
    -- before every call (it is suspect), after the trip each refuses at once. So no
    -- worker keeps calling a dead service on a cached "closed" read.
    SELECT pg_notify(%(channel)s, up.name) FROM up
    WHERE (up.changed AND up.state = 'open') OR up.failures = 1
    LIMIT 1
)
SELECT name, state, failures, generation,
       coalesce(greatest(extract(epoch FROM reopen_at - now()), 0), 0)::float8 AS remaining,
       coalesce(trial_owner = %(owner)s AND trial_expires_at > now(), false) AS mine,
       changed
FROM up CROSS JOIN (SELECT count(*) FROM wake) AS w

-- name: record_success
-- A success resets the fleet's failure count; a successful trial closes the circuit
-- when the caller holds the permit, or (fallback) nobody does and the reset passed.
WITH cur AS (
    SELECT name, state, failures, generation, reopen_at, trial_owner, trial_expires_at,
           (state = 'closed' AND failures > 0)
           OR (state = 'open'
               AND (trial_owner = %(owner)s
                    OR (%(trial)s AND reopen_at <= now()
                        AND (trial_owner IS NULL OR trial_expires_at <= now())))) AS ok
    FROM {schema}.breakers
    WHERE name = %(name)s
    FOR UPDATE
), up AS (
    UPDATE {schema}.breakers AS b SET
        state = 'closed',
        failures = 0,
        reopen_at = NULL,
        trial_owner = NULL,
        trial_expires_at = NULL,
        generation = CASE WHEN b.state = 'open'
                          THEN greatest(b.generation + 1,
                                        (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                          ELSE b.generation END,
        updated_at = now(),
        updated_by = %(owner)s
    FROM cur
    WHERE b.name = cur.name AND cur.ok
    RETURNING b.name, b.state, b.failures, b.generation, b.reopen_at, b.trial_owner,
              b.trial_expires_at, true AS changed
), r AS (
    SELECT name, state, failures, generation, reopen_at, trial_owner, trial_expires_at, changed
    FROM up
    UNION ALL
    SELECT name, state, failures, generation, reopen_at, trial_owner, trial_expires_at, false
    FROM cur
    WHERE NOT cur.ok
)
SELECT name, state, failures, generation,
       coalesce(greatest(extract(epoch FROM reopen_at - now()), 0), 0)::float8 AS remaining,
       coalesce(trial_owner = %(owner)s AND trial_expires_at > now(), false) AS mine,
       changed
FROM r

-- name: claim_trial
-- The single trial permit of an open circuit whose reset timeout has passed. The
-- holder may renew it; an expired permit is up for grabs.
WITH cur AS (
    SELECT name, state, failures, generation, reopen_at, trial_owner, trial_expires_at,
           state = 'open' AND reopen_at <= now()
           AND (trial_owner IS NULL OR trial_owner = %(owner)s OR trial_expires_at <= now()) AS ok
    FROM {schema}.breakers
    WHERE name = %(name)s
    FOR UPDATE
), up AS (
    UPDATE {schema}.breakers AS b SET
        trial_owner = %(owner)s,
        trial_expires_at = now() + make_interval(secs => %(lease)s::float8),
        updated_at = now(),
        updated_by = %(owner)s
    FROM cur
    WHERE b.name = cur.name AND cur.ok
    RETURNING b.name, b.state, b.failures, b.generation, b.reopen_at, b.trial_owner,
              b.trial_expires_at, true AS changed
), r AS (
    SELECT name, state, failures, generation, reopen_at, trial_owner, trial_expires_at, changed
    FROM up
    UNION ALL
    SELECT name, state, failures, generation, reopen_at, trial_owner, trial_expires_at, false
    FROM cur
    WHERE NOT cur.ok
)
SELECT name, state, failures, generation,
       coalesce(greatest(extract(epoch FROM reopen_at - now()), 0), 0)::float8 AS remaining,
       coalesce(trial_owner = %(owner)s AND trial_expires_at > now(), false) AS mine,
       changed
FROM r

-- name: release_trial
-- A trial that ended without a verdict (cancelled, or an excluded error) hands
-- the permit back so another worker can probe at once.
UPDATE {schema}.breakers
SET trial_owner = NULL, trial_expires_at = NULL, updated_at = now()
WHERE name = %(name)s AND trial_owner = %(owner)s

-- name: release_owner
-- Every permit of a registry that stops (worker shutdown).
UPDATE {schema}.breakers
SET trial_owner = NULL, trial_expires_at = NULL, updated_at = now()
WHERE trial_owner = %(owner)s

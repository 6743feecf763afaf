-- Named queries of the fleet-wide token buckets ({schema}.rate_limits, migration 8),
-- run only by worker_core.fleet.TokenLeaseStore for worker_core.fleetlimit.FleetBucket.

-- name: lease
-- Takes %(want)s tokens from the bucket %(name)s and returns the balance before
-- (after the refill). The balance may go negative: a debt the refill pays off, so
-- token k of the lease (1-based) may be used (k - before) / rate seconds from now
-- (at once when that is <= 0). Leases are thereby served in the order the row lock
-- serialises them, and the fleet never uses more than burst + rate * elapsed.
-- The bucket is created full on first use; each lease sets rate and burst to the
-- caller's configuration. The clock is read once, before the row lock: a lease
-- that waited for the lock refills from updated_at to the later of the two times
-- only, so no interval is ever refilled twice, whatever order the clocks say.
WITH c AS MATERIALIZED (SELECT clock_timestamp() AS now)
INSERT INTO {schema}.rate_limits AS r (name, rate, burst, tokens, updated_at)
SELECT %(name)s, %(rate)s, %(burst)s, %(burst)s::float8 - %(want)s, c.now FROM c
ON CONFLICT (name) DO UPDATE SET
    tokens = least(excluded.burst::float8,
                   r.tokens + excluded.rate
                              * greatest(0, extract(epoch FROM excluded.updated_at - r.updated_at)))
             - %(want)s,
    rate = excluded.rate,
    burst = excluded.burst,
    updated_at = greatest(r.updated_at, excluded.updated_at)
RETURNING (r.tokens + %(want)s)::float8 AS before

-- name: give_back
-- Tokens a worker leased but will not use (it stops): the debt they added is
-- cancelled, as if they had never been taken.
UPDATE {schema}.rate_limits
SET tokens = tokens + %(n)s
WHERE name = %(name)s

-- worker_core schema, version 10: one index of running jobs instead of two.
-- Placeholders: {schema} (a quoted identifier).

-- Every claim moves a row into 'running' and every heartbeat moves its lease
-- expiry, and neither can be a HOT update (status and lease_expires_at are
-- indexed): each writes one entry into every index whose predicate the new row
-- version matches. Version 9 added jobs_running_idx (queue) next to
-- jobs_lease_idx (lease_expires_at), both on running rows, so each claim and
-- each heartbeat paid for two entries. This one index serves both readers:
-- max_running counts a queue's running jobs by its leading column, and rescue
-- finds expired leases by the second one (an index filter, no heap visit for a
-- live lease; a skip scan on PostgreSQL 18), then sorts the few it found.
CREATE INDEX jobs_running_lease_idx ON {schema}.jobs (queue, lease_expires_at)
    WHERE status = 'running';
DROP INDEX {schema}.jobs_running_idx;
DROP INDEX {schema}.jobs_lease_idx;

-- worker_core schema, version 4: a lease owner only on running jobs.
-- Placeholders: {schema} (a quoted identifier).

-- Every statement already keeps this invariant (claim sets the owner with
-- status 'running'; every way out of 'running' clears it). The constraint makes
-- the database hold it too, which lets heartbeat and finish fence on the owner
-- alone and find their rows by primary key: a `status = 'running'` condition lets
-- the planner pick the partial lease index instead, whose dead entries (one per
-- job ever run, until vacuum) it then walks on every batch.
-- NOT VALID: enforced for every new row version at once, without a full-table
-- scan under an exclusive lock while workers run.
ALTER TABLE {schema}.jobs
    ADD CONSTRAINT jobs_lease_owner_only_when_running
    CHECK (lease_owner IS NULL OR status = 'running') NOT VALID;

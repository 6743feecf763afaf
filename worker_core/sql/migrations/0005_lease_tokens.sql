-- worker_core schema, version 5: a lease token per claim, and a bounded error history.
-- Placeholders: {schema} (a quoted identifier).

-- Every claim sets a fresh random token; every later write of that run (heartbeat,
-- checkpoint, outcome, release) names it. (lease_owner, attempt) was not unique
-- over a job's life: a deferral gives the attempt back, so a stale run of the same
-- worker could match a newer claim of the same job. A token never repeats.
ALTER TABLE {schema}.jobs ADD COLUMN lease_token uuid;

-- Only a running job has a token: every way out of 'running' clears it. The
-- database holds this too, so no token outlives its claim, even while workers of
-- the previous release (which know nothing of tokens) still run during a rolling
-- deploy: their rescue statement fails on a job claimed by a new worker (and
-- logs "heartbeat failed") instead of leaving its token on a queued row, and the
-- new workers rescue it. NOT VALID: no full-table scan under an exclusive lock;
-- every existing row has no token.
ALTER TABLE {schema}.jobs
    ADD CONSTRAINT jobs_lease_token_only_when_running
    CHECK (lease_token IS NULL OR status = 'running') NOT VALID;

-- How many error records were dropped from the middle of `errors` to keep it
-- bounded: the first record and the latest ones are kept (see append_error).
ALTER TABLE {schema}.jobs ADD COLUMN errors_dropped integer NOT NULL DEFAULT 0;

-- The error history after one more failure: every record while fewer than `keep`
-- are stored, then the first (why it started failing) and the latest ones (why it
-- fails now), so a job that is deferred thousands of times stays one small row.
-- A plain SQL function: the planner inlines it into the statements that call it.
CREATE FUNCTION {schema}.append_error(errors jsonb, error jsonb, keep integer)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN error IS NULL THEN errors
        WHEN jsonb_array_length(errors) < keep THEN errors || jsonb_build_array(error)
        ELSE jsonb_build_array(errors -> 0)
             || jsonb_path_query_array(errors, '$[last - $n to last]',
                                       jsonb_build_object('n', greatest(keep - 3, 0)))
             || jsonb_build_array(error)
    END
$$;

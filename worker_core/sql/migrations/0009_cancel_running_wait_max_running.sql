-- worker_core schema, version 9: cancelling running jobs, waiting for a job, and
-- a fleet-wide cap on the jobs of a queue running at once.
-- Placeholders: {schema} (a quoted identifier).

-- Queue.cancel on a running job records the request here; the owning worker is
-- told (NOTIFY, or its next heartbeat) and stops the run, whose outcome is then
-- written as 'cancel'. While it is set, an outcome that would put the job back in
-- the queue (retry, defer, release) is written as 'cancel' instead, and rescue
-- moves the job to 'cancelled' rather than back to 'queued'. Nullable without a
-- default: a catalog-only change, however many rows.
ALTER TABLE {schema}.jobs ADD COLUMN cancel_requested_at timestamptz;

-- Only a running job has a pending cancel request: every way out of 'running'
-- clears it, so a requeued job never starts with a stale one. NOT VALID: no
-- full-table scan under an exclusive lock; every existing row has none.
ALTER TABLE {schema}.jobs
    ADD CONSTRAINT jobs_cancel_request_only_when_running
    CHECK (cancel_requested_at IS NULL OR status = 'running') NOT VALID;

-- Someone waits for this job (Queue.wait): the statement that moves it to
-- succeeded, dead or cancelled sends a NOTIFY with its id. Jobs nobody waits for
-- cost no notification, so the hot path's commits do not queue on the server's
-- notification lock. A constant default: a catalog-only change.
ALTER TABLE {schema}.jobs ADD COLUMN waited boolean NOT NULL DEFAULT false;

-- Running jobs by queue, for queue.max_running: the claim counts them per capped
-- queue. Partial, so it holds only the running jobs (the fleet's concurrency),
-- never the backlog or the finished rows.
CREATE INDEX jobs_running_idx ON {schema}.jobs (queue) WHERE status = 'running';

-- How many more jobs of `q` may start now under a fleet-wide cap of `cap`. The
-- advisory lock (per schema and queue, held until the calling claim commits)
-- makes the count and the claim that follows atomic across the fleet: a second
-- claim of the same queue waits here until the first commits, and then counts
-- its jobs. VOLATILE plpgsql, so the count takes a snapshot after the lock is
-- granted (the calling statement's own snapshot is older: it would miss them).
-- Claims take these locks in the order of their queue names (sorted by the
-- caller), so two claims never wait on each other in a cycle.
CREATE FUNCTION {schema}.running_room(q text, cap integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('worker_core.max_running {schema}'), hashtext(q));
    RETURN greatest(cap - (SELECT count(*) FROM {schema}.jobs
                           WHERE queue = q AND status = 'running'), 0)::integer;
END
$$;

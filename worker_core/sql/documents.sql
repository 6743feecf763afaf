-- Named queries of the document lifecycle (worker_core/ingest/catalog.py): pins,
-- the switch to a new version, deletes, the embeddings backfill's work list and
-- the listing a bucket sync compares against. {schema} is the quoted schema.
-- Times come from the database's clock only, so that the pins of every worker of
-- a fleet are ordered by one clock.

-- name: pin
-- The moment a version is first read, and what the document is now.
SELECT clock_timestamp() AS pinned_at,
       d.version, d.pinned_at AS current_pinned_at, d.deleted_at IS NOT NULL AS deleted,
       d.chunks, d.embeddings_pending
FROM (SELECT 1) AS one
LEFT JOIN {schema}.documents AS d ON d.document_id = %(document_id)s

-- name: document
SELECT version, pinned_at, deleted_at IS NOT NULL AS deleted, chunks, embeddings_pending
FROM {schema}.documents
WHERE document_id = %(document_id)s

-- name: ensure_document
-- A placeholder to lock when the document has no row yet: deleted and pinned in
-- 1970, so any real pin wins. The caller overwrites it in the same
-- transaction, so no one else ever sees it.
INSERT INTO {schema}.documents (document_id, storage_key, chunks, version, pinned_at, deleted_at)
VALUES (%(document_id)s, %(storage_key)s, 0, '', '1970-01-01 00:00:00+00', now())
ON CONFLICT (document_id) DO NOTHING
RETURNING true

-- name: lock_document
-- Serialises finalize and delete of one document across the fleet.
SELECT version, pinned_at, deleted_at IS NOT NULL AS deleted, chunks, embeddings_pending
FROM {schema}.documents
WHERE document_id = %(document_id)s
FOR UPDATE

-- name: make_current
UPDATE {schema}.documents
SET version = %(version)s,
    pinned_at = %(pinned_at)s,
    storage_key = %(storage_key)s,
    chunks = %(chunks)s,
    job_id = %(job_id)s,
    deleted_at = NULL,
    embeddings_pending = %(pending)s,
    ingested_at = now()
WHERE document_id = %(document_id)s

-- name: set_pending
UPDATE {schema}.documents
SET embeddings_pending = %(pending)s
WHERE document_id = %(document_id)s AND embeddings_pending <> %(pending)s

-- name: drop_replaced_chunks
-- After a switch: the old current version's chunks, and those of any other
-- version written before this one was pinned (a restarted or superseded read).
-- Chunks of other versions written later belong to a read still in flight that
-- pinned after this one; they stay, and its own finalize decides.
DELETE FROM {schema}.chunks
WHERE document_id = %(document_id)s AND version <> %(version)s
  AND (version = %(old_version)s OR created_at < %(pinned_at)s)

-- name: discard_version
-- Chunks of a version that is not (or no longer) the current one: a read that
-- restarted because the object changed, or one that was superseded.
DELETE FROM {schema}.chunks AS c
WHERE c.document_id = %(document_id)s AND c.version = %(version)s
  AND NOT EXISTS (
      SELECT 1 FROM {schema}.documents AS d
      WHERE d.document_id = c.document_id AND d.version = c.version AND d.deleted_at IS NULL
  )

-- name: delete_chunks
DELETE FROM {schema}.chunks WHERE document_id = %(document_id)s

-- name: mark_deleted
-- The pin moves to now: a read that began before the delete is superseded by it.
UPDATE {schema}.documents
SET deleted_at = coalesce(deleted_at, now()),
    pinned_at = greatest(pinned_at, clock_timestamp()),
    chunks = 0,
    embeddings_pending = false
WHERE document_id = %(document_id)s

-- name: pending_documents
-- The backfill's work list, served by the partial index documents_pending_idx.
SELECT document_id, version
FROM {schema}.documents
WHERE embeddings_pending AND document_id > %(after)s
ORDER BY document_id
LIMIT %(limit)s

-- name: sync_started
SELECT clock_timestamp()

-- name: listed_keys
-- What earlier syncs recorded for one page of a listing.
SELECT storage_key, document_id, version
FROM {schema}.sync_objects
WHERE storage_key = ANY(%(keys)s::text[])

-- name: record_listed
-- Every key of the page: new and changed ones with the job just enqueued for
-- them (job NULL keeps the earlier job of an unchanged key), all marked seen.
INSERT INTO {schema}.sync_objects (storage_key, document_id, version, job_id)
SELECT * FROM unnest(%(keys)s::text[], %(documents)s::text[], %(versions)s::text[],
                     %(jobs)s::bigint[])
ON CONFLICT (storage_key) DO UPDATE
SET document_id = EXCLUDED.document_id,
    version = EXCLUDED.version,
    job_id = coalesce(EXCLUDED.job_id, {schema}.sync_objects.job_id),
    seen_at = now()

-- name: vanished_keys
-- Keys under the prefix that this sync did not see (upper: the first key past
-- the prefix, NULL for none), a page at a time; the caller forgets each page.
SELECT storage_key, document_id
FROM {schema}.sync_objects
WHERE storage_key >= %(prefix)s
  AND (%(upper)s::text IS NULL OR storage_key < %(upper)s::text)
  AND seen_at < %(started)s
ORDER BY storage_key
LIMIT %(limit)s

-- name: forget_listed
DELETE FROM {schema}.sync_objects WHERE storage_key = ANY(%(keys)s::text[])

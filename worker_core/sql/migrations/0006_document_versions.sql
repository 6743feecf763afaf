-- worker_core schema, version 6: document versions, deletes, embeddings awaiting a
-- backfill, and the listing a bucket sync compares against.
-- Placeholders: {schema} (a quoted identifier).

-- Every chunk belongs to one version of its document ('' for chunks written
-- without one, as every chunk was before this version). While a new version is
-- ingested, both versions' chunks exist side by side; finalize then makes the new
-- one current and removes the old one in one transaction. embedding_model names
-- the model that made the vector (NULL: written before models were recorded), so
-- vectors of two models are never counted as one document's embeddings.
ALTER TABLE {schema}.chunks
    ADD COLUMN version text NOT NULL DEFAULT '',
    ADD COLUMN embedding_model text;

DROP INDEX {schema}.chunks_document_idx;
CREATE UNIQUE INDEX chunks_document_idx ON {schema}.chunks (document_id, version, chunk_index);

DROP INDEX {schema}.chunks_unembedded_idx;
CREATE INDEX chunks_unembedded_idx ON {schema}.chunks (document_id, version, chunk_index)
    WHERE embedding IS NULL;

-- version: the current version (its chunks are the document's chunks).
-- pinned_at: when that version was first read, on the database's clock. Reads
--   pinned later saw a newer state of the object, so a slow job that pinned an
--   older version can never replace a newer one (it is "superseded"). Rows from
--   before this version get 1970: any new read is newer.
-- deleted_at: the document was deleted (a tombstone that also supersedes jobs
--   that read the object before the delete).
-- embeddings_pending: finalized while the embedding service was unavailable;
--   its chunks are searchable by text and the backfill fills the vectors.
ALTER TABLE {schema}.documents
    ADD COLUMN version text NOT NULL DEFAULT '',
    ADD COLUMN pinned_at timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00',
    ADD COLUMN deleted_at timestamptz,
    ADD COLUMN embeddings_pending boolean NOT NULL DEFAULT false;

-- The backfill's work list.
CREATE INDEX documents_pending_idx ON {schema}.documents (document_id) WHERE embeddings_pending;

-- What readers query: the chunks of each document's current version. Finalize
-- switches documents.version and deletes the old chunks in one transaction, so
-- one snapshot sees the old complete set or the new complete set, never a mix
-- and never nothing.
CREATE VIEW {schema}.current_chunks AS
SELECT c.id, c.document_id, c.version, c.chunk_index, c.content, c.embedding,
       c.embedding_model, c.metadata, c.created_at
FROM {schema}.chunks AS c
JOIN {schema}.documents AS d ON d.document_id = c.document_id AND d.version = c.version
WHERE d.deleted_at IS NULL;

-- What bucket syncs listed and enqueued, one row per storage key. A sync looks up
-- each page of its listing here (listings need not be in any particular order:
-- S3 lists keys in byte order, SeaweedFS folder by folder), marks what it saw
-- with seen_at, and afterwards finds the vanished keys of its prefix as those it
-- did not mark. seen_at compares with the sync's start on the database's clock,
-- so two syncs of one prefix at once never take each other's keys for vanished.
CREATE TABLE {schema}.sync_objects (
    storage_key text        COLLATE "C" PRIMARY KEY,
    document_id text        NOT NULL,
    version     text        NOT NULL,
    job_id      bigint,
    seen_at     timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);  -- every sync rewrites seen_at: room for HOT updates

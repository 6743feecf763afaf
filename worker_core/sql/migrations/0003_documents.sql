-- worker_core schema, version 3: the documents DocumentWorker has ingested.
-- Placeholders: {schema} (a quoted identifier).

-- One row per document whose chunks were verified complete and embedded. The
-- finalize stage inserts with ON CONFLICT DO NOTHING, so re-ingesting a document
-- keeps the first record and reports that nothing new was written.
CREATE TABLE {schema}.documents (
    document_id text        PRIMARY KEY,
    storage_key text        NOT NULL,
    chunks      integer     NOT NULL,
    job_id      bigint,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT documents_chunks_valid CHECK (chunks >= 0)
);

-- Named queries of the idempotent write path (writes.py). {schema} is the quoted
-- schema identifier; {table}, {stage}, {source}, {columns}, {names},
-- {conflict} and {order} are filled by writes.py with identifiers it quotes
-- itself and column types read from the catalog (never user text).

-- name: table_columns
-- The target's columns with the exact types to stage them in. typmod carries a
-- pgvector column's dimension (-1 when unconstrained). base_type, without the
-- modifier, is what small batches cast their parameters to: an explicit cast to
-- varchar(n) would truncate silently where the insert must fail.
SELECT a.attname AS name,
       format_type(a.atttypid, a.atttypmod) AS sql_type,
       format_type(a.atttypid, NULL) AS base_type,
       a.atttypid::int AS oid,
       t.typname AS type_name,
       a.atttypmod AS typmod
FROM pg_attribute AS a
JOIN pg_class AS c ON c.oid = a.attrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_type AS t ON t.oid = a.atttypid
WHERE n.nspname = %(schema)s AND c.relname = %(table)s
  AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum

-- name: create_stage
-- A private staging table. ON COMMIT DROP keeps it safe behind PgBouncer in
-- transaction mode; writes.py also drops it explicitly, so one transaction can
-- write many batches.
CREATE TEMP TABLE {stage} ({columns}) ON COMMIT DROP

-- name: copy_stage
COPY {stage} ({names}) FROM STDIN (FORMAT BINARY)

-- name: copy_target
-- The optimistic path: while batches keep arriving without conflicts (a first
-- ingestion), rows are copied straight into the target, as fast as COPY goes.
-- The first unique violation rolls this back and the batch takes the staging
-- path below.
COPY {schema}.{table} ({names}) FROM STDIN (FORMAT BINARY)

-- name: insert_from_stage
-- The source is the staging table, or for small batches a VALUES list with
-- the same name and columns. Rows go in key order so that two writers offering
-- overlapping batches take their unique-index locks in the same order and
-- cannot deadlock. Duplicates, against the table or inside the batch, are
-- skipped; the row count is what was actually written.
INSERT INTO {schema}.{table} ({names})
SELECT {names} FROM {source}
ORDER BY {order}
ON CONFLICT {conflict} DO NOTHING

-- name: drop_stage
DROP TABLE {stage}

-- name: missing_embeddings
-- The embed stage's work list: chunks of one version without a vector, or with
-- one made by another recorded model (NULL: a vector from before models were
-- recorded, kept). Keyset paging (chunk_index > after) starts each batch where
-- the last ended instead of stepping over index entries of rows filled a moment
-- ago; chunks_document_idx serves it.
SELECT id, chunk_index, content
FROM {schema}.chunks
WHERE document_id = %(document_id)s AND version = %(version)s AND chunk_index > %(after)s
  AND (embedding IS NULL
       OR (%(model)s::text IS NOT NULL AND embedding_model <> %(model)s::text))
ORDER BY chunk_index
LIMIT %(limit)s

-- name: set_embeddings_from_stage
-- Fenced on embedding IS NULL: a replayed or concurrent embed batch never
-- overwrites a vector that is already stored, unless that vector was made by
-- another recorded model than this batch's (the two must never be mixed).
UPDATE {schema}.chunks AS c
SET embedding = {stage}.embedding, embedding_model = {stage}.embedding_model
FROM {source}
WHERE c.id = {stage}.id
  AND (c.embedding IS NULL
       OR (c.embedding_model <> {stage}.embedding_model))

-- name: document_counts
-- chunks: rows of the version stored; embedded: rows with a vector of the model
-- (or of any model when none is given; a vector with no recorded model counts);
-- next_index: one past the highest index (equals chunks when there is no gap).
SELECT count(*)::bigint AS chunks,
       count(*) FILTER (
           WHERE embedding IS NOT NULL
             AND (%(model)s::text IS NULL OR embedding_model IS NULL
                  OR embedding_model = %(model)s::text)
       )::bigint AS embedded,
       coalesce(max(chunk_index) + 1, 0)::bigint AS next_index
FROM {schema}.chunks
WHERE document_id = %(document_id)s AND version = %(version)s

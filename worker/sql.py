"""Every SQL statement the worker runs, and a store's copy of them with its schema filled in.

Templates name ``{schema}`` (and ``{vector_type}``); :class:`Statements` fills them once per
store. A batch write is: lock the batch's documents in key order (``lock_states``), upsert them,
COPY new documents' chunks straight into ``chunks``, COPY the others' into ``incoming_chunks`` and
merge them into ``chunks`` (unchanged ones untouched), trim the surplus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MIGRATION_LOCK: Final = 0x656D6265  # pg_advisory_xact_lock key: concurrent `migrate`s queue up
# One HNSW build at a time. Taken with pg_try_advisory_lock and polled from outside any
# transaction: a session blocked on a lock inside a statement holds a snapshot, which a
# CREATE INDEX CONCURRENTLY waits for, and the two would wait for each other.
ANN_BUILD_LOCK: Final = 0x656D6269

# What the schema needs, each created only when it is missing: `CREATE ... IF NOT EXISTS` still
# asks for CREATE on the database or schema (or table ownership), so a least-privilege role
# (USAGE and DML on tables someone else migrated) could not even start `run` otherwise.
# Each step: what kind of object, its name (for the existence check), how to create it.
MIGRATION_STEPS: Final = (
    ("extension", "vector", "CREATE EXTENSION IF NOT EXISTS vector"),
    ("schema", "{schema}", "CREATE SCHEMA IF NOT EXISTS {schema}"),
    (
        "relation",
        "{schema}.documents",
        """CREATE TABLE IF NOT EXISTS {schema}.documents (
    id              text PRIMARY KEY,
    version         bigint,
    deleted         boolean NOT NULL DEFAULT false,
    metadata        jsonb,
    tenant          text,
    chunk_count     integer NOT NULL DEFAULT 0,
    content_sha256  bytea,
    source_topic    text,
    source_partition integer,
    source_offset   bigint,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    text            text
)""",
    ),
    # The text itself (what `reindex` re-chunks from), for a documents table made before it.
    (
        "column",
        "{schema}.documents text",
        "ALTER TABLE {schema}.documents ADD COLUMN IF NOT EXISTS text text",
    ),
    (
        "relation",
        "{schema}.source_offsets",
        """CREATE TABLE IF NOT EXISTS {schema}.source_offsets (
    topic           text NOT NULL,
    partition       integer NOT NULL,
    next_offset     bigint NOT NULL,
    owner_epoch     bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
)""",
    ),
    ("relation", "{schema}.owner_epochs", "CREATE SEQUENCE IF NOT EXISTS {schema}.owner_epochs"),
    (
        "relation",
        "{schema}.embedding_ledger",
        """CREATE TABLE IF NOT EXISTS {schema}.embedding_ledger (
    model           text NOT NULL,
    content_sha256  bytea NOT NULL,
    embedding       vector,
    buyer           bigint,
    bought_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, content_sha256)
)""",
    ),
    (
        "relation",
        "{schema}.embedding_usage",
        """CREATE TABLE IF NOT EXISTS {schema}.embedding_usage (
    day             date NOT NULL,
    tenant          text NOT NULL,
    model           text NOT NULL,
    requests        bigint NOT NULL DEFAULT 0,
    inputs          bigint NOT NULL DEFAULT 0,
    tokens          bigint NOT NULL DEFAULT 0,
    saved_inputs    bigint NOT NULL DEFAULT 0,
    saved_tokens    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant, model)
)""",
    ),
    (
        "relation",
        "{schema}.documents_tenant_idx",
        "CREATE INDEX IF NOT EXISTS documents_tenant_idx ON {schema}.documents (tenant) WHERE NOT deleted",
    ),
    # The ledger serves every generation: its vectors are of any dimensions (a schema from before
    # generations typed them as its one column's), its rows keyed by model@dimensions.
    (
        "vector",
        "{schema}.embedding_ledger embedding",
        "ALTER TABLE {schema}.embedding_ledger ALTER COLUMN embedding TYPE vector USING embedding::vector",
    ),
    # The index's generations (worker.generations): each a model, dimensions, vector type and
    # chunking, with its own chunks table; `chunks` is a view of the served one.
    (
        "relation",
        "{schema}.generations",
        """CREATE TABLE IF NOT EXISTS {schema}.generations (
    id              integer PRIMARY KEY,
    model           text NOT NULL,
    dimensions      integer NOT NULL,
    vector_type     text NOT NULL,
    chunk_size      integer NOT NULL,
    chunk_overlap   integer NOT NULL,
    chunk_unit      text NOT NULL,
    state           text NOT NULL CHECK (state IN ('building', 'served', 'kept')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    served_at       timestamptz
)""",
    ),
    # Documents a generation is behind on: every live one when it is registered, then every one a
    # write changes in the other generations' tables. A filler claims rows (its buyer number, as in
    # the ledger), writes their chunks and removes them; `problem` holds why one cannot be filled.
    (
        "relation",
        "{schema}.generation_pending",
        """CREATE TABLE IF NOT EXISTS {schema}.generation_pending (
    generation      integer NOT NULL REFERENCES {schema}.generations (id) ON DELETE CASCADE,
    doc_id          text NOT NULL,
    claimed_by      bigint,
    claimed_at      timestamptz,
    problem         text,
    PRIMARY KEY (generation, doc_id)
)""",
    ),
)
# A generation's own chunks table and its content index, made by `migrate` (the first) and
# `reindex start` (the others).
GENERATION_TABLE_SQL: Final = (
    """CREATE TABLE IF NOT EXISTS {chunks} (
    doc_id          text NOT NULL REFERENCES {schema}.documents (id) ON DELETE CASCADE,
    chunk_index     integer NOT NULL,
    content         text NOT NULL,
    embedding       {vector_type}({dimensions}) NOT NULL,
    char_start      integer NOT NULL,
    char_end        integer NOT NULL,
    model           text NOT NULL,
    content_sha256  bytea NOT NULL,
    PRIMARY KEY (doc_id, chunk_index)
)""",
    "CREATE INDEX IF NOT EXISTS {table_sha_index} ON {chunks} (content_sha256)",
)
# A schema from before generations: its chunks table becomes generation 1's, under a view.
ADOPT_CHUNKS_TABLE_SQL: Final = (
    "ALTER TABLE {schema}.chunks RENAME TO {table}",
    "ALTER INDEX IF EXISTS {schema}.chunks_embedding_hnsw_idx RENAME TO {ann_index}",
    "ALTER INDEX IF EXISTS {schema}.chunks_content_sha256_idx RENAME TO {table_sha_index}",
)
# What `chunks` is: a view of the served generation's table (replaced by a switch, in its
# transaction: a view's column types cannot change in place).
CHUNKS_VIEW_SQL: Final = (
    "DROP VIEW IF EXISTS {schema}.chunks",
    "CREATE VIEW {schema}.chunks AS SELECT * FROM {chunks}",
)
RELKIND_SQL: Final = "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)"
# Before generations, a schema recorded its one model here; `migrate` reads it to register
# generation 1 of such a schema.
LEGACY_MODEL_SQL: Final = "SELECT embedding_model FROM {schema}.index_settings"
# What a write needs, as a list of what is missing ('' when nothing is): what the database
# dependency's probe checks, so a revoked grant keeps the breaker open instead of flapping.
# (has_table_privilege with several privileges is true when any one is held: one call each.)
# The ledger ($3) only where it exists: a schema migrated before it has none, and runs without.
_WRITE_NEEDS: Final = (
    ("$1", "documents", ("SELECT", "INSERT", "UPDATE")),
    ("$2", "chunks", ("SELECT", "INSERT", "UPDATE", "DELETE")),
    ("$3", "embedding_ledger", ("SELECT", "INSERT", "UPDATE", "DELETE")),
)
WRITE_PRIVILEGES_SQL: Final = "SELECT concat_ws(', ', {})".format(
    ", ".join(
        [f"CASE WHEN to_regclass({p}) IS NULL THEN 'the {t} table' END" for p, t, _ in _WRITE_NEEDS[:2]]
        + [
            f"CASE WHEN to_regclass({p}) IS NOT NULL AND NOT has_table_privilege(to_regclass({p}), "
            f"'{priv}') THEN '{priv} on {t}' END"
            for p, t, privileges in _WRITE_NEEDS
            for priv in privileges
        ]
        + ["CASE WHEN NOT has_database_privilege(current_database(), 'TEMPORARY') THEN 'TEMPORARY' END"]
    )
)
EXISTS_SQL: Final = {
    "extension": "SELECT 1 FROM pg_extension WHERE extname = $1",
    "schema": "SELECT to_regnamespace($1)",
    "relation": "SELECT to_regclass($1)",
    "column": """SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(split_part($1, ' ', 1))
                  AND attname = split_part($1, ' ', 2) AND NOT attisdropped""",
    "vector": """SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(split_part($1, ' ', 1))
                  AND attname = split_part($1, ' ', 2) AND NOT attisdropped
                  AND format_type(atttypid, atttypmod) = 'vector'""",
}
# CONCURRENTLY: writers go on while it builds (a plain CREATE INDEX blocks every write for as long
# as the build takes, minutes on a large table). It cannot run inside a transaction block.
HNSW_INDEX_SQL: Final = """
CREATE INDEX CONCURRENTLY IF NOT EXISTS {ann_index}
    ON {chunks} USING hnsw (embedding {vector_type}_cosine_ops)
"""
# A generation not served: only fillers write its table, and they wait (FILL_LOCK_SQL) while this
# builds; ingestion goes on (it marks documents pending there, see MARK_PENDING_SQL). No second
# pass over the table as CONCURRENTLY makes, and an interrupted build leaves nothing behind.
HNSW_INDEX_UNSERVED_SQL: Final = """
CREATE INDEX IF NOT EXISTS {ann_index}
    ON {chunks} USING hnsw (embedding {vector_type}_cosine_ops)
"""
# "missing", "invalid" (a concurrent build that failed half-way leaves one) or "ready".
ANN_INDEX_STATE_SQL: Final = """
SELECT CASE WHEN to_regclass($1) IS NULL THEN 'missing'
            WHEN (SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)) THEN 'ready'
            ELSE 'invalid' END
"""
DROP_INVALID_ANN_INDEX_SQL: Final = "DROP INDEX CONCURRENTLY IF EXISTS {schema}.{ann_index}"
CHUNKS_EMPTY_SQL: Final = "SELECT NOT EXISTS (SELECT 1 FROM {chunks})"
EMBEDDING_TYPE_SQL: Final = """
SELECT format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attname = 'embedding' AND NOT a.attisdropped
"""
EXTENSION_SCHEMA_SQL: Final = """
SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'
"""
READ_STATES_SQL: Final = """
SELECT id, version, deleted, source_topic, source_partition, source_offset
FROM {schema}.documents WHERE id = ANY($1::text[])"""
LOCK_STATES_SQL: Final = READ_STATES_SQL + " ORDER BY id FOR UPDATE"
UPSERT_DOCUMENTS_SQL: Final = """
INSERT INTO {schema}.documents AS d (id, version, deleted, metadata, tenant, chunk_count, content_sha256,
                                     source_topic, source_partition, source_offset, text, updated_at)
SELECT u.id, u.version, u.deleted, u.metadata::jsonb, u.tenant, u.chunk_count, u.content_sha256,
       u.source_topic, u.source_partition, u.source_offset, u.text, now()
FROM unnest($1::text[], $2::bigint[], $3::boolean[], $4::text[], $5::text[], $6::integer[], $7::bytea[],
            $8::text[], $9::integer[], $10::bigint[], $11::text[])
     AS u (id, version, deleted, metadata, tenant, chunk_count, content_sha256,
           source_topic, source_partition, source_offset, text)
ON CONFLICT (id) DO UPDATE SET
    version = EXCLUDED.version, deleted = EXCLUDED.deleted, metadata = EXCLUDED.metadata,
    tenant = EXCLUDED.tenant, chunk_count = EXCLUDED.chunk_count, content_sha256 = EXCLUDED.content_sha256,
    source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
    source_offset = EXCLUDED.source_offset, text = EXCLUDED.text, updated_at = now()
"""
# The same for a schema migrated before documents had their text (a worker run with --no-migrate
# by a role that may not alter the table): the text is left out, everything else as above.
UPSERT_DOCUMENTS_WITHOUT_TEXT_SQL: Final = """
INSERT INTO {schema}.documents AS d (id, version, deleted, metadata, tenant, chunk_count, content_sha256,
                                     source_topic, source_partition, source_offset, updated_at)
SELECT u.id, u.version, u.deleted, u.metadata::jsonb, u.tenant, u.chunk_count, u.content_sha256,
       u.source_topic, u.source_partition, u.source_offset, now()
FROM unnest($1::text[], $2::bigint[], $3::boolean[], $4::text[], $5::text[], $6::integer[], $7::bytea[],
            $8::text[], $9::integer[], $10::bigint[])
     AS u (id, version, deleted, metadata, tenant, chunk_count, content_sha256,
           source_topic, source_partition, source_offset)
ON CONFLICT (id) DO UPDATE SET
    version = EXCLUDED.version, deleted = EXCLUDED.deleted, metadata = EXCLUDED.metadata,
    tenant = EXCLUDED.tenant, chunk_count = EXCLUDED.chunk_count, content_sha256 = EXCLUDED.content_sha256,
    source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
    source_offset = EXCLUDED.source_offset, updated_at = now()
"""
# Chunks arrive by binary COPY into a per-session temporary table, then merge: unchanged chunks
# are left alone (no new tuple, no HNSW insert), changed ones updated, surplus ones deleted.
INCOMING_TABLE_SQL: Final = """
CREATE TEMP TABLE IF NOT EXISTS {incoming} (LIKE {chunks} INCLUDING DEFAULTS)
    ON COMMIT DELETE ROWS
"""
MERGE_CHUNKS_SQL: Final = """
INSERT INTO {chunks} AS c (doc_id, chunk_index, content, embedding, char_start, char_end, model,
                                  content_sha256)
SELECT doc_id, chunk_index, content, embedding, char_start, char_end, model, content_sha256
FROM {incoming} ORDER BY doc_id, chunk_index
ON CONFLICT (doc_id, chunk_index) DO UPDATE SET
    content = EXCLUDED.content, embedding = EXCLUDED.embedding, char_start = EXCLUDED.char_start,
    char_end = EXCLUDED.char_end, model = EXCLUDED.model, content_sha256 = EXCLUDED.content_sha256
WHERE (c.content_sha256, c.char_start, c.char_end, c.model)
      IS DISTINCT FROM (EXCLUDED.content_sha256, EXCLUDED.char_start, EXCLUDED.char_end, EXCLUDED.model)
"""
TRIM_CHUNKS_SQL: Final = """
DELETE FROM {chunks} c
USING unnest($1::text[], $2::integer[]) AS keep (doc_id, count)
WHERE c.doc_id = keep.doc_id AND c.chunk_index >= keep.count
"""
# How far the database got, per source partition: recorded in each write's own transaction (the
# watermarks before it: every record below was stored, or dead-lettered, by then), so that a
# database restored from a backup says how far *it* got, and the worker rewinds to there.
# Each assignment claims its partitions under a new owner epoch (a sequence: later assignments
# draw higher ones); every write, and every progress record, first locks its partitions' rows in
# key order and goes ahead only if they still carry its epoch. A member that lost its partitions
# while frozen (a zombie) is thereby refused, its work abandoned, and never overwrites what the
# partitions' new owner stored. A partition the database has no row for starts at $3.
CLAIM_SQL: Final = """
INSERT INTO {schema}.source_offsets AS o (topic, partition, next_offset, owner_epoch, updated_at)
SELECT t, p, n, e.epoch, now()
FROM unnest($1::text[], $2::integer[], $3::bigint[]) AS u (t, p, n),
     (SELECT nextval('{schema}.owner_epochs') AS epoch) AS e
ORDER BY t, p
ON CONFLICT (topic, partition) DO UPDATE SET owner_epoch = EXCLUDED.owner_epoch, updated_at = now()
RETURNING owner_epoch
"""
LOCK_OWNED_SQL: Final = """
SELECT o.topic, o.partition, o.owner_epoch FROM {schema}.source_offsets o
WHERE (o.topic, o.partition) IN (SELECT * FROM unnest($1::text[], $2::integer[]))
ORDER BY o.topic, o.partition
FOR UPDATE
"""
RECORD_OFFSETS_SQL: Final = """
UPDATE {schema}.source_offsets AS o SET next_offset = u.n, updated_at = now()
FROM unnest($1::text[], $2::integer[], $3::bigint[]) AS u (t, p, n)
WHERE o.topic = u.t AND o.partition = u.p AND u.n > o.next_offset
"""
READ_OFFSETS_SQL: Final = """
SELECT topic, partition, next_offset FROM {schema}.source_offsets
WHERE (topic, partition) IN (SELECT * FROM unnest($1::text[], $2::integer[]))
"""
CHUNK_COLUMNS: Final = (
    "doc_id",
    "chunk_index",
    "content",
    "embedding",
    "char_start",
    "char_end",
    "model",
    "content_sha256",
)
# Embeddings already paid for: the same content embedded by the same model (the table fixes dimensions).
KNOWN_EMBEDDINGS_SQL: Final = """
SELECT DISTINCT ON (content_sha256) content_sha256, embedding
FROM {chunks} WHERE content_sha256 = ANY($1::bytea[]) AND model = $2
"""
# The embedding ledger: every embedding the moment it is paid for, so that work abandoned on a
# revoke, a stop or a kill -9 never buys it again. A row with no embedding is a purchase in
# progress ("intent"): its buyer, a process holding the session advisory lock of that number, is
# sending it now, and other processes wanting the content wait for it instead of buying it too.
# A buyer is alive while its lock is held: a killed process's connection closes, its lock goes,
# and its intents are taken over at once. An intent is also a lease, renewed by its buyer while it
# waits for the answer: one that a frozen process (SIGSTOP, a stalled VM) no longer renews is
# taken over once it is $lease seconds old.
LIVE_BUYERS_SQL: Final = """(SELECT (k.classid::bigint << 32) | k.objid::bigint FROM pg_locks k
    WHERE k.locktype = 'advisory' AND k.objsubid = 1 AND k.granted
      AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"""
KNOWN_EMBEDDINGS_WITH_LEDGER_SQL: Final = """
SELECT DISTINCT ON (content_sha256) content_sha256, embedding FROM (
    SELECT content_sha256, embedding::vector AS embedding FROM {chunks}
    WHERE content_sha256 = ANY($1::bytea[]) AND model = $2
    UNION ALL
    SELECT content_sha256, embedding FROM {schema}.embedding_ledger
    WHERE content_sha256 = ANY($1::bytea[]) AND model = $3 AND embedding IS NOT NULL
) AS known
"""
# Take the purchase of these contents ($2, distinct) for buyer $3: new ones, ones nobody is
# buying any more (the buyer is gone, or has not renewed it for $4 seconds). Returns those taken; the
# rest are being bought by a live buyer (or were bought since the caller looked).
CLAIM_PURCHASES_SQL: Final = """
INSERT INTO {schema}.embedding_ledger AS l (model, content_sha256, buyer, bought_at)
SELECT $1, h, $3, now() FROM unnest($2::bytea[]) AS h ORDER BY h
ON CONFLICT (model, content_sha256) DO UPDATE SET buyer = EXCLUDED.buyer, bought_at = now()
WHERE l.embedding IS NULL
  AND (l.buyer IS NULL OR l.buyer = EXCLUDED.buyer OR l.bought_at < now() - make_interval(secs => $4)
       OR l.buyer NOT IN {live})
RETURNING l.content_sha256
"""
# Paid for: the vectors ($3) of these contents ($2, distinct), whoever held the intent by now. One
# statement for the lot: as many executions of a one-row statement cost the worker and the
# database several times as much (the ledger then wrote a twelfth of the worker's CPU).
KEEP_EMBEDDINGS_SQL: Final = """
INSERT INTO {schema}.embedding_ledger AS l (model, content_sha256, embedding, buyer, bought_at)
SELECT $1, u.h, u.e, NULL, now() FROM unnest($2::bytea[], $3::vector[]) AS u (h, e) ORDER BY u.h
ON CONFLICT (model, content_sha256) DO UPDATE SET embedding = EXCLUDED.embedding, buyer = NULL
WHERE l.embedding IS NULL
"""
RENEW_PURCHASES_SQL: Final = """
UPDATE {schema}.embedding_ledger SET bought_at = now()
WHERE model = $1 AND content_sha256 = ANY($2::bytea[]) AND embedding IS NULL AND buyer = $3
"""
# Not bought after all (withdrawn before it was sent, or failed): others may buy it.
DROP_PURCHASES_SQL: Final = """
DELETE FROM {schema}.embedding_ledger
WHERE model = $1 AND content_sha256 = ANY($2::bytea[]) AND embedding IS NULL AND buyer = $3
"""
# Contents another process is buying: each one's vector once it is known (in the ledger, or
# stored), else whether its buyer still holds it (false: the caller may take the purchase over).
WATCH_PURCHASES_SQL: Final = """
SELECT h AS content_sha256,
       coalesce(l.embedding, (SELECT c.embedding::vector FROM {chunks} c
                              WHERE c.content_sha256 = h AND c.model = $4 LIMIT 1)) AS embedding,
       coalesce(l.embedding IS NULL AND l.buyer IN {live}
                AND l.bought_at >= now() - make_interval(secs => $3), false) AS pending
FROM unnest($2::bytea[]) AS h
LEFT JOIN {schema}.embedding_ledger l ON l.model = $1 AND l.content_sha256 = h
"""
# A process buying one model's embeddings alone holds the sole-buyer lock of its key (the two-key
# advisory lock SOLE_BUYER_LOCK, a number of the key): it announces nothing (claims and their
# drops were a sixth of a reindex's fill). Others hold it shared and announce every purchase. One
# that finds it held exclusively asks for it shared and waits; the sole buyer sees that request
# waiting, announces what it is buying and has not written yet, and shares the lock: from then on
# both announce.
SOLE_BUYER_LOCK: Final = 0x656D6273
WAITING_TO_SHARE_SQL: Final = """
SELECT EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND NOT granted AND objsubid = 2
                 AND classid = $1::bigint::oid AND objid = $2::bigint::oid
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
"""
# Bounded by the ledger's retention, and nothing kept twice: a vector a stored chunk holds, an
# intent whose buyer is gone, and anything older than $1 hours go (at most {limit} rows a turn).
PRUNE_LEDGER_SQL: Final = """
DELETE FROM {schema}.embedding_ledger
WHERE ctid = ANY(ARRAY(
    SELECT l.ctid FROM {schema}.embedding_ledger l
    WHERE l.bought_at < now() - $1::float8 * interval '1 hour'
       OR (l.embedding IS NULL AND l.buyer NOT IN {live})
       OR EXISTS (SELECT 1 FROM {chunks} c
                  WHERE c.content_sha256 = l.content_sha256 AND l.model = $2)
    LIMIT {limit}))
"""
LEDGER_PRUNE_LIMIT: Final = 10_000
LEDGER_PRUNE_LOCK: Final = 0x656D626C  # pg_try_advisory_xact_lock key: one pruner at a time
# A search's candidates: chunks embedded by the configured model ($1) only. index_settings records
# the schema's model, but each row says its own: a schema older than that record may hold rows of
# two models (and `run --no-migrate` there wrote whatever model it was given), and a query vector
# compared with another model's vectors gives meaningless scores. With a tenant ($2), only chunks
# of that tenant's live documents (documents_tenant_idx). The queries below take {candidates} and
# number their own arguments ({limit}, {query}, {k}) after these.
SEARCH_CANDIDATES_SQL: Final = "{chunks} c WHERE c.model = $1"
SEARCH_TENANT_CANDIDATES_SQL: Final = """{chunks} c JOIN {schema}.documents d ON d.id = c.doc_id
WHERE c.model = $1 AND d.tenant = $2 AND NOT d.deleted"""
# How many candidates there are, counting no further than {limit}: what chooses exact or HNSW.
COUNT_CANDIDATES_SQL: Final = "SELECT count(*) FROM (SELECT 1 FROM {candidates} LIMIT {limit}) AS s"
# Exact: every candidate's distance, the nearest k kept (a top-k sort holds only k rows). OFFSET 0
# keeps the subquery from being flattened, so the ORDER BY cannot be served by the HNSW index.
EXACT_SEARCH_SQL: Final = """
SELECT doc_id, chunk_index, content, 1 - distance AS score
FROM (SELECT c.doc_id, c.chunk_index, c.content, c.embedding <=> {query} AS distance
      FROM {candidates} OFFSET 0) AS scored
ORDER BY distance, doc_id, chunk_index
LIMIT {k}
"""
# Through the HNSW index, with ANN_SEARCH_SETTINGS_SQL: an iterative scan (relaxed order) goes on
# past rows the filters drop until k are found, and the outer query puts them in exact order.
ANN_SEARCH_SQL: Final = """
SELECT doc_id, chunk_index, content, 1 - distance AS score
FROM (SELECT c.doc_id, c.chunk_index, c.content, c.embedding <=> {query} AS distance
      FROM {candidates} ORDER BY c.embedding <=> {query} LIMIT {k}) AS nearest
ORDER BY distance, doc_id, chunk_index
"""
ANN_SEARCH_SETTINGS_SQL: Final = """
SELECT set_config('hnsw.ef_search', $1, true), set_config('hnsw.iterative_scan', 'relaxed_order', true),
       set_config('hnsw.max_scan_tuples', $2, true)
"""


# What the embeddings cost: counts added up per UTC day, tenant ('' for none) and model.
ADD_USAGE_SQL: Final = """
INSERT INTO {schema}.embedding_usage AS u
    (day, tenant, model, requests, inputs, tokens, saved_inputs, saved_tokens)
SELECT * FROM unnest($1::date[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                     $7::bigint[], $8::bigint[])
ON CONFLICT (day, tenant, model) DO UPDATE SET
    requests = u.requests + excluded.requests,
    inputs = u.inputs + excluded.inputs,
    tokens = u.tokens + excluded.tokens,
    saved_inputs = u.saved_inputs + excluded.saved_inputs,
    saved_tokens = u.saved_tokens + excluded.saved_tokens
"""
USAGE_SQL: Final = """
SELECT day, tenant, model, requests, inputs, tokens, saved_inputs, saved_tokens
FROM {schema}.embedding_usage
WHERE day >= $1 AND ($2::text IS NULL OR tenant = $2)
ORDER BY day, tenant, model
"""

# `verify`: the stored state's checks, each a document id per (check, document) that fails it.
# One pass over the chunks, each joined with its document (a hash or merge join, not a lookup per
# document), and two over the documents; counted and sampled by check at the end. Each chunk's
# checks are computed below the grouping (OFFSET 0 keeps that subquery whole), so that only
# booleans reach it, whichever way the planner groups: left to it, a sort would carry every
# chunk's content and its document's text. $1 the column's declared dimensions (NULL when it
# declares none: only then is each vector read, for its dimensions), $2 EMBEDDING_DIMENSIONS,
# $3 the model index_settings records, $4 EMBEDDING_MODEL, $5 examples kept per check,
# $6 VERIFY_NOT_BLANK. Python's string indices are code points, as are PostgreSQL's substr and
# char_length on text; substr finds a code point by walking the text from its start, so a
# document costs its length times its chunks (measured: a 200 KB document of 200 chunks, 60 ms).
# documents.chunk_count is the count of the generation that wrote the document last, so it is
# compared only where the text is not kept; where it is, a chunk left over from a longer version
# fails the offsets check (its content is not the text's at its offsets).
_VERIFY_STORED: Final = """
WITH per_doc AS (
    SELECT doc_id, bool_or(unknown) AS unknown, coalesce(bool_or(deleted), false) AS deleted,
           min(chunk_index) <> 0 OR max(chunk_index) <> count(*) - 1
               OR (NOT bool_or(deleted) AND bool_and(textless) AND count(*) <> max(chunk_count)) AS gaps,
           bool_or(hashes) AS hashes, bool_or(offsets) AS offsets, bool_or(dimensions) AS dimensions,
           bool_or(model) AS model
    FROM (
        SELECT c.doc_id, c.chunk_index, d.id IS NULL AS unknown, d.deleted, d.chunk_count,
               {text} IS NULL AS textless,
               c.content_sha256 IS DISTINCT FROM sha256(convert_to(c.content, 'UTF8')) AS hashes,
               c.char_start < 0 OR c.char_end - c.char_start <> char_length(c.content)
                   OR c.content <> substr({text}, c.char_start + 1, c.char_end - c.char_start) AS offsets,
               coalesce($1::integer, vector_dims(c.embedding)) <> $2 AS dimensions,
               c.model <> $3 OR c.model <> $4 AS model
        FROM {chunks} c LEFT JOIN {schema}.documents d ON d.id = c.doc_id
        OFFSET 0
    ) AS per_chunk
    GROUP BY doc_id
), failed AS (
    SELECT f.name, p.doc_id
    FROM per_doc p CROSS JOIN LATERAL (VALUES
        ('chunks_contiguous', p.gaps), ('chunk_hashes', p.hashes), ('chunk_offsets', p.offsets),
        ('embedding_dimensions', p.dimensions), ('embedding_model', p.model),
        ('deleted_documents', p.deleted), ('unknown_documents', p.unknown)) AS f (name, failed)
    WHERE f.failed
    UNION ALL
    SELECT 'document_hashes', d.id FROM {schema}.documents d
    WHERE {text} IS NOT NULL AND d.content_sha256 IS DISTINCT FROM sha256(convert_to({text}, 'UTF8'))
    UNION ALL
    -- The last chunk reaches the text's last non-blank character (none cut off the end).
    SELECT 'chunks_contiguous', d.id
    FROM {schema}.documents d
    JOIN (SELECT doc_id, max(char_end) AS reach FROM {chunks} GROUP BY doc_id) AS r ON r.doc_id = d.id
    WHERE {text} IS NOT NULL AND NOT d.deleted
      AND r.reach < char_length(regexp_replace({text}, '[' || substr($6, 3) || '+$', ''))
    UNION ALL
    SELECT 'unchunked_documents', d.id FROM {schema}.documents d
    WHERE NOT d.deleted AND (d.chunk_count > 0 OR {text} ~ $6)
      AND NOT EXISTS (SELECT 1 FROM {chunks} c WHERE c.doc_id = d.id)
), ranked AS (
    SELECT name, doc_id, row_number() OVER (PARTITION BY name ORDER BY doc_id) AS rank
    FROM (SELECT DISTINCT name, doc_id FROM failed) AS once
)
SELECT name, count(*) AS problems, array_agg(doc_id ORDER BY doc_id) FILTER (WHERE rank <= $5) AS examples
FROM ranked GROUP BY name
"""
VERIFY_STORED_SQL: Final = _VERIFY_STORED.replace("{text}", "d.text")
# A schema migrated before documents had their text: the checks against it are left out.
VERIFY_STORED_WITHOUT_TEXT_SQL: Final = _VERIFY_STORED.replace("{text}", "NULL::text")
# What chunk.py leaves unchunked: text of nothing but what Python's str.isspace() calls space (each
# listed, no ranges, as a regular expression's bracket takes them whatever the collation).
VERIFY_BLANK: Final = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
VERIFY_NOT_BLANK: Final = f"[^{VERIFY_BLANK}]"
VERIFY_COUNTS_SQL: Final = """
SELECT (SELECT count(*) FROM {schema}.documents) AS documents,
       (SELECT count(*) FROM {chunks}) AS chunks
"""
# `verify`: a generation beside the served one holds every live document it is not behind on
# (pending in it, $1), and none of a deleted one: the documents it fails that for, counted, with
# the first $3 ids ($2 VERIFY_NOT_BLANK).
_VERIFY_COVERAGE: Final = """
SELECT count(*) AS problems, (array_agg(d.id ORDER BY d.id))[1:$3] AS examples
FROM {schema}.documents d
WHERE NOT EXISTS (SELECT 1 FROM {schema}.generation_pending p WHERE p.generation = $1 AND p.doc_id = d.id)
  AND CASE WHEN d.deleted THEN EXISTS (SELECT 1 FROM {chunks} c WHERE c.doc_id = d.id)
           ELSE (d.chunk_count > 0 OR {text} ~ $2)
                AND NOT EXISTS (SELECT 1 FROM {chunks} c WHERE c.doc_id = d.id) END
"""
VERIFY_COVERAGE_SQL: Final = _VERIFY_COVERAGE.replace("{text}", "d.text")
VERIFY_COVERAGE_WITHOUT_TEXT_SQL: Final = _VERIFY_COVERAGE.replace("{text}", "NULL::text")
# `verify --topic`: each document as the topic's newest event is compared with (the text by its
# sha256: the column written with it, where the text itself is not kept), and which record wrote it.
_VERIFY_DOCUMENTS: Final = """
SELECT d.id, d.version, d.deleted,
       CASE WHEN {text} IS NULL THEN d.content_sha256
            ELSE sha256(convert_to({text}, 'UTF8')) END AS text_sha256,
       d.source_topic, d.source_partition, d.source_offset
FROM {schema}.documents d
"""
VERIFY_DOCUMENTS_SQL: Final = _VERIFY_DOCUMENTS.replace("{text}", "d.text")
VERIFY_DOCUMENTS_WITHOUT_TEXT_SQL: Final = _VERIFY_DOCUMENTS.replace("{text}", "NULL::text")

# -- generations (worker.generations, worker.fill) ----------------------------------------------
# A write's first statement: the live generations, each row key-share locked, so that a
# registration (which takes the table in EXCLUSIVE mode, then lists every document as pending)
# waits for the writes in flight and every later write sees it, and a drop waits for the writes of
# the generation it removes. Its own generation missing: dropped meanwhile.
LIVE_GENERATIONS_SQL: Final = "SELECT id FROM {schema}.generations ORDER BY id FOR KEY SHARE"
GENERATIONS_SQL: Final = "SELECT * FROM {schema}.generations ORDER BY id"
# Documents a write changed ($2) are pending in every other live generation ($1). One left with a
# problem (no text to re-chunk) is tried again: the write brought its text.
MARK_PENDING_SQL: Final = """
INSERT INTO {schema}.generation_pending AS p (generation, doc_id)
SELECT g, d FROM unnest($1::integer[]) AS g, unnest($2::text[]) AS d ORDER BY g, d
ON CONFLICT (generation, doc_id) DO UPDATE SET claimed_by = NULL, claimed_at = NULL, problem = NULL
WHERE p.problem IS NOT NULL
"""
REGISTER_LOCK_SQL: Final = "LOCK TABLE {schema}.generations IN EXCLUSIVE MODE"
REGISTER_GENERATION_SQL: Final = """
INSERT INTO {schema}.generations
    (id, model, dimensions, vector_type, chunk_size, chunk_overlap, chunk_unit, state, served_at)
SELECT coalesce(max(id), 0) + 1, $1, $2, $3, $4, $5, $6, $7,
       CASE WHEN $7 = 'served' THEN now() END
FROM {schema}.generations
RETURNING id
"""
SEED_PENDING_SQL: Final = """
INSERT INTO {schema}.generation_pending (generation, doc_id)
SELECT $1, id FROM {schema}.documents WHERE NOT deleted ORDER BY id
"""
# A filler takes up to $3 pending documents of generation $1 after $5 in key order for buyer $2:
# those nobody holds, or whose holder is gone (its advisory lock released: a kill -9) or has held
# them for $4 seconds (a frozen process). SKIP LOCKED: concurrent fillers take different ones. A
# filler goes on from the last key it took (the rows it filled before are dead tuples, which a scan
# from the first key would wade through on every claim), and from the first once none are left.
# Returns what the documents hold now (the text where $6: kept), in key order; `id` NULL where
# the document has no row (cannot be: rows stay). The keys taken go to the UPDATE as an array:
# joined to the table instead, they were matched by a hash join over a scan of every pending row
# wherever the planner guessed that cheaper (8,000 documents: 0.6 ms of a 1.5 ms claim; at
# 200,000 it chose the key).
CLAIM_PENDING_SQL: Final = """
WITH claimed AS (
    UPDATE {schema}.generation_pending p SET claimed_by = $2, claimed_at = now()
    WHERE p.generation = $1 AND p.doc_id = ANY (ARRAY(
        SELECT doc_id FROM {schema}.generation_pending
        WHERE generation = $1 AND doc_id > $5 AND problem IS NULL
          AND (claimed_by IS NULL OR claimed_by NOT IN {live}
               OR claimed_at < now() - make_interval(secs => $4))
        ORDER BY doc_id LIMIT $3 FOR UPDATE SKIP LOCKED))
    RETURNING p.doc_id
)
SELECT c.doc_id, d.id, CASE WHEN $6 THEN d.text END AS text, d.content_sha256, d.deleted, d.tenant
FROM claimed c LEFT JOIN {schema}.documents d ON d.id = c.doc_id
ORDER BY c.doc_id
"""
# A document stored before documents kept their text: the chunks another generation of the same
# chunking holds for it ({chunks} here), if it is current there (not pending in it, $2).
CHUNK_LAYOUT_SQL: Final = """
SELECT c.doc_id, c.chunk_index, c.content, c.char_start, c.char_end FROM {chunks} c
WHERE c.doc_id = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM {schema}.generation_pending p WHERE p.generation = $2 AND p.doc_id = c.doc_id)
ORDER BY c.doc_id, c.chunk_index
"""
LOCK_GENERATION_SQL: Final = "SELECT state FROM {schema}.generations WHERE id = $1 FOR KEY SHARE"
# A fill's second statement, before it locks any document: while the generation's HNSW index is
# built (HNSW_INDEX_UNSERVED_SQL holds the table in SHARE mode), it fails at once, and the filler
# waits outside any transaction, holding no document that a write may want.
FILL_LOCK_SQL: Final = "LOCK TABLE {chunks} IN ROW EXCLUSIVE MODE NOWAIT"
# The build holds (or waits for) the table in SHARE mode: fills would fail on FILL_LOCK_SQL.
INDEXING_SQL: Final = """
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = to_regclass('{chunks}') AND mode = 'ShareLock')
"""
# The documents being filled, share-locked in key order (a write holds them for update): what
# they hold now is compared with what was embedded, and only those unchanged are written.
LOCK_FILLED_SQL: Final = """
SELECT id, content_sha256, deleted FROM {schema}.documents
WHERE id = ANY($1::text[]) ORDER BY id FOR SHARE
"""
# Then, one round trip for what took two: the documents kept ($2: unchanged since read) have
# their old chunks in this generation cleared (their new ones are copied next) and are taken off
# its pending list (the changed ones go back through RELEASE_PENDING_SQL). A statement of its own
# after the locks, not a CTE beside them: its snapshot must be taken after any wait for a writer,
# whose chunks it has to clear (a worker may ingest into the generation built).
SETTLE_FILL_SQL: Final = """
WITH cleared AS (
    DELETE FROM {chunks} WHERE doc_id = ANY($2::text[])
)
DELETE FROM {schema}.generation_pending WHERE generation = $1 AND doc_id = ANY($2::text[])
"""
RELEASE_PENDING_SQL: Final = """
UPDATE {schema}.generation_pending SET claimed_by = NULL, claimed_at = NULL, problem = $4
WHERE generation = $1 AND doc_id = ANY($2::text[]) AND claimed_by = $3
"""
PENDING_COUNTS_SQL: Final = """
SELECT generation, count(*) FILTER (WHERE problem IS NULL) AS pending,
       count(*) FILTER (WHERE problem IS NOT NULL) AS problems,
       (array_agg(doc_id ORDER BY doc_id) FILTER (WHERE problem IS NOT NULL))[1:5] AS examples,
       min(problem) AS problem
FROM {schema}.generation_pending GROUP BY generation
"""
LIVE_DOCUMENTS_SQL: Final = "SELECT count(*) FROM {schema}.documents WHERE NOT deleted"
LOCK_REGISTRY_SQL: Final = "SELECT * FROM {schema}.generations ORDER BY id FOR UPDATE"
SET_STATE_SQL: Final = """
UPDATE {schema}.generations SET state = $2,
       served_at = CASE WHEN $2 = 'served' THEN now() ELSE served_at END
WHERE id = $1
"""
DROP_GENERATION_SQL: Final = "DELETE FROM {schema}.generations WHERE id = $1"


def quoted(identifier: str) -> str:
    """An identifier from configuration (DATABASE_SCHEMA) as SQL names it."""
    return '"' + identifier.replace('"', '""') + '"'


def generation_table(generation: int) -> str:
    """The name of a generation's chunks table (unquoted)."""
    return f"chunks_g{generation}"


@dataclass(frozen=True, slots=True)
class Statements:
    """This store's statements: its schema (quoted), vector type and generation's chunks table
    filled in once. Without a generation they read the `chunks` view (the served one)."""

    schema: str
    chunks: str  # the generation's table, qualified and quoted
    table: str  # its name alone, unquoted
    ann_index: str  # its HNSW index, qualified and quoted
    read_states: str
    lock_states: str
    upsert_documents: str
    upsert_documents_without_text: str
    incoming_table: str
    incoming: str  # the staging table's name (a temporary table, one per generation)
    merge_chunks: str
    trim_chunks: str
    known_embeddings: str
    chunks_empty: str
    hnsw_index: str
    hnsw_index_unserved: str
    drop_invalid_ann_index: str
    search_candidates: str
    search_tenant_candidates: str
    record_offsets: str
    read_offsets: str
    claim: str
    lock_owned: str
    known_embeddings_with_ledger: str
    claim_purchases: str
    renew_purchases: str
    keep_embeddings: str
    drop_purchases: str
    watch_purchases: str
    prune_ledger: str
    add_usage: str
    usage: str
    verify_stored: str
    verify_stored_without_text: str
    verify_counts: str
    verify_documents: str
    verify_documents_without_text: str
    verify_coverage: str
    verify_coverage_without_text: str
    legacy_model: str
    generation_table: tuple[str, ...]
    adopt_chunks_table: tuple[str, ...]
    chunks_view: tuple[str, ...]
    live_generations: str
    generations: str
    mark_pending: str
    register_lock: str
    register_generation: str
    seed_pending: str
    claim_pending: str
    chunk_layout: str
    lock_generation: str
    fill_lock: str
    indexing: str
    lock_filled: str
    settle_fill: str
    release_pending: str
    pending_counts: str
    live_documents: str
    lock_registry: str
    set_state: str
    drop_generation: str

    @classmethod
    def of(
        cls, schema: str, vector_type: str, table: str = "chunks", dimensions: int | None = None
    ) -> Statements:
        """``table``: the generation's chunks table (``chunks``: the view of the served one)."""
        chunks = f"{schema}.{quoted(table)}"
        names = {
            "schema": schema,
            "vector_type": vector_type,
            "dimensions": dimensions,
            "chunks": chunks,
            "table": quoted(table),
            "ann_index": quoted(f"{table}_embedding_hnsw_idx"),
            "table_sha_index": quoted(f"{table}_content_sha256_idx"),
            "incoming": quoted(f"incoming_{table}"),
            "live": LIVE_BUYERS_SQL,
            "limit": LEDGER_PRUNE_LIMIT,
        }

        def filled(template: str) -> str:
            return template.format(**names)

        def all_filled(templates: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(filled(t) for t in templates)

        return cls(
            schema=schema,
            chunks=chunks,
            table=table,
            ann_index=f"{schema}.{names['ann_index']}",
            read_states=filled(READ_STATES_SQL),
            lock_states=filled(LOCK_STATES_SQL),
            upsert_documents=filled(UPSERT_DOCUMENTS_SQL),
            upsert_documents_without_text=filled(UPSERT_DOCUMENTS_WITHOUT_TEXT_SQL),
            incoming_table=filled(INCOMING_TABLE_SQL),
            incoming=str(names["incoming"]),
            merge_chunks=filled(MERGE_CHUNKS_SQL),
            trim_chunks=filled(TRIM_CHUNKS_SQL),
            known_embeddings=filled(KNOWN_EMBEDDINGS_SQL),
            chunks_empty=filled(CHUNKS_EMPTY_SQL),
            hnsw_index=filled(HNSW_INDEX_SQL),
            hnsw_index_unserved=filled(HNSW_INDEX_UNSERVED_SQL),
            drop_invalid_ann_index=filled(DROP_INVALID_ANN_INDEX_SQL),
            search_candidates=filled(SEARCH_CANDIDATES_SQL),
            search_tenant_candidates=filled(SEARCH_TENANT_CANDIDATES_SQL),
            record_offsets=filled(RECORD_OFFSETS_SQL),
            read_offsets=filled(READ_OFFSETS_SQL),
            claim=filled(CLAIM_SQL),
            lock_owned=filled(LOCK_OWNED_SQL),
            known_embeddings_with_ledger=filled(KNOWN_EMBEDDINGS_WITH_LEDGER_SQL),
            claim_purchases=filled(CLAIM_PURCHASES_SQL),
            renew_purchases=filled(RENEW_PURCHASES_SQL),
            keep_embeddings=filled(KEEP_EMBEDDINGS_SQL),
            drop_purchases=filled(DROP_PURCHASES_SQL),
            watch_purchases=filled(WATCH_PURCHASES_SQL),
            prune_ledger=filled(PRUNE_LEDGER_SQL),
            add_usage=filled(ADD_USAGE_SQL),
            usage=filled(USAGE_SQL),
            verify_stored=filled(VERIFY_STORED_SQL),
            verify_stored_without_text=filled(VERIFY_STORED_WITHOUT_TEXT_SQL),
            verify_counts=filled(VERIFY_COUNTS_SQL),
            verify_documents=filled(VERIFY_DOCUMENTS_SQL),
            verify_documents_without_text=filled(VERIFY_DOCUMENTS_WITHOUT_TEXT_SQL),
            verify_coverage=filled(VERIFY_COVERAGE_SQL),
            verify_coverage_without_text=filled(VERIFY_COVERAGE_WITHOUT_TEXT_SQL),
            legacy_model=filled(LEGACY_MODEL_SQL),
            generation_table=all_filled(GENERATION_TABLE_SQL),
            adopt_chunks_table=all_filled(ADOPT_CHUNKS_TABLE_SQL),
            chunks_view=all_filled(CHUNKS_VIEW_SQL),
            live_generations=filled(LIVE_GENERATIONS_SQL),
            generations=filled(GENERATIONS_SQL),
            mark_pending=filled(MARK_PENDING_SQL),
            register_lock=filled(REGISTER_LOCK_SQL),
            register_generation=filled(REGISTER_GENERATION_SQL),
            seed_pending=filled(SEED_PENDING_SQL),
            claim_pending=filled(CLAIM_PENDING_SQL),
            chunk_layout=filled(CHUNK_LAYOUT_SQL),
            lock_generation=filled(LOCK_GENERATION_SQL),
            fill_lock=filled(FILL_LOCK_SQL),
            indexing=filled(INDEXING_SQL),
            lock_filled=filled(LOCK_FILLED_SQL),
            settle_fill=filled(SETTLE_FILL_SQL),
            release_pending=filled(RELEASE_PENDING_SQL),
            pending_counts=filled(PENDING_COUNTS_SQL),
            live_documents=filled(LIVE_DOCUMENTS_SQL),
            lock_registry=filled(LOCK_REGISTRY_SQL),
            set_state=filled(SET_STATE_SQL),
            drop_generation=filled(DROP_GENERATION_SQL),
        )

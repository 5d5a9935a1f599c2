"""Every Arrow schema of the job, in the order rows flow through it.

    listing shards   LISTING_SCHEMA   what the store said about each object
    plan shards      WORK_SCHEMA      the listing row plus what the model needs for it
    (decode tasks)   DECODED_SCHEMA / LOADED_SCHEMA  in reader.py / work.py, beside their UDFs
    actors           INFERRED_SCHEMA  tags and scores, or an error with its stage
    staged results   RESULT_SCHEMA    what a write task leaves under _staging/ (its receipt)
    the tables       TAGS_SCHEMA, ERRORS_SCHEMA  the Delta tables readers use

One module so that a column added at one step is seen, and carried, at the next.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")
SCORE_TYPE = pa.struct([("tag", pa.string()), ("score", pa.float32())])

LISTING_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("mtime", TS),
    ("list_error", pa.string()),
])

WORK_SCHEMA = pa.schema(list(LISTING_SCHEMA) + [
    ("version", pa.string()),       # the listing's version: ETag, else size and mtime
    ("need", pa.string()),          # pixels | tokens | none: what the model needs for this row
    ("base_key", pa.string()),      # grown rows: which copy rule applies (see plan.keys)
    ("base_scores", pa.list_(SCORE_TYPE)),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("tokens_file", pa.string()),
    ("tokens_row", pa.int32()),
])

#: Images the listing no longer has: removed from whichever table holds them.
DELETED_SCHEMA = pa.schema([("uri", pa.string()), ("shard", pa.int32())])

INFERRED_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("mtime", TS),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("tags", pa.list_(pa.string())),
    ("scores", pa.list_(SCORE_TYPE)),
    ("error", pa.string()),
    ("stage", pa.string()),
    ("version", pa.string()),
    ("tokens_file", pa.string()),
    ("tokens_row", pa.int32()),
])

#: The tags table: one row per image that currently has tags (uri unique).
TAGS_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("shard", pa.int32()),          # crc32(uri) % layout.shards: the partition column
    ("size", pa.int64()),
    ("etag", pa.string()),          # the store's ETag; for local files the MD5 of the bytes
    ("version", pa.string()),       # what the listing said (ETag, else size and mtime)
    ("mtime", TS),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("tags", pa.list_(pa.string())),
    ("scores", pa.list_(SCORE_TYPE)),
    ("model_id", pa.string()),
    ("vocab_id", pa.string()),
    ("score_floor", pa.float32()),  # scores under it were not kept
    ("run_id", pa.string()),
    ("tagged_at", TS),
    ("tokens_file", pa.string()),   # cached image tokens (cache.image_tokens), relative to the output
    ("tokens_row", pa.int32()),
])

#: The errors table: one row per image that currently cannot be tagged (uri unique).
ERRORS_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("shard", pa.int32()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("version", pa.string()),
    ("mtime", TS),
    ("error", pa.string()),         # one sentence
    ("stage", pa.string()),         # list | fetch | decode | infer
    ("model_id", pa.string()),
    ("run_id", pa.string()),
    ("failed_at", TS),
])

#: A write task's staged rows: both tables' columns, `error` null for tagged images.
RESULT_SCHEMA = pa.schema(list(TAGS_SCHEMA) + [
    (f.name, f.type) for f in ERRORS_SCHEMA if f.name not in TAGS_SCHEMA.names])

TABLE_SCHEMAS = {"tags": TAGS_SCHEMA, "errors": ERRORS_SCHEMA}

"""Writing tags/ and errors/ in one pass, as Hive-partitioned Parquet of a sensible size.

Why a Datasink and not `write_parquet` twice: tags and errors come out of the same stream
with different schemas. Writing them with `write_parquet` would need the whole result
materialised (or the pipeline run twice), or one mixed schema full of nulls. A datasink
sees each write task's rows once and sends each row to its table.

File size: Ray Data bundles at least `layout.rows_per_file` rows into one write task
(`min_rows_per_write`), so a file holds about rows_per_file / shards rows instead of one
inference batch. File names carry the run id, the attempt (a resumed run's second start is
attempt 02) and the write task index, so a retried task overwrites its own files instead
of adding duplicates, a resumed attempt never overwrites files an earlier one vouched for,
and readers can tell runs apart.

After its data files, each task writes a receipt under the run's staging folder: one index
row per image (uri, version, status, the file holding its row, cached tokens). The receipt
is what makes the task's work count: a resumed run skips the images of every receipt, the
manifest lists the files of every receipt, and the index delta written at the commit is
the receipts' rows. A task killed before its receipt leaves files nobody vouches for; the
runner deletes them before it commits.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from .index import INDEX_SCHEMA
from .inference import SCORE_TYPE
from .manifest import put_bytes
from .storage import Storage, join

TAGS_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("tags", pa.list_(pa.string())),
    ("scores", pa.list_(SCORE_TYPE)),
    ("model_id", pa.string()),
    ("vocab_id", pa.string()),
    ("run_id", pa.string()),
])
ERRORS_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("error", pa.string()),
    ("stage", pa.string()),
    ("run_id", pa.string()),
])


def file_prefix(run_id: str) -> str:
    """Data files of a run are named `part-<run_id>-<attempt>-<task>.parquet`."""
    return f"part-{run_id}-"


def shard_of(uris, shards: int) -> np.ndarray:
    """CRC-32 of the UTF-8 URI modulo `shards`: stable across runs, machines and languages."""
    return np.fromiter((zlib.crc32(u.encode("utf-8")) % shards for u in uris), dtype=np.int32, count=len(uris))


class TagsDatasink(Datasink):
    def __init__(self, output_uri: str, storage: Storage, *, run_id: str, run_date: str, model_id: str,
                 vocab_id: str, partition_by: tuple[str, ...], shards: int, rows_per_file: int,
                 compression: str, staging: Optional[str] = None, attempt: int = 1, score_floor: float = 0.0):
        self.output_uri = output_uri
        self.storage = storage
        self.run_id, self.run_date = run_id, run_date
        self.model_id, self.vocab_id = model_id, vocab_id
        self.staging, self.attempt, self.score_floor = staging, attempt, score_floor
        self.partition_by = tuple(partition_by)
        self.shards = shards
        self.rows_per_file = rows_per_file
        self.compression = None if compression == "none" else compression
        self.shard_width = max(2, len(str(shards - 1)))
        self.written: list[dict] = []

    @property
    def min_rows_per_write(self) -> Optional[int]:
        return self.rows_per_file

    def get_name(self) -> str:
        return "WriteTagsAndErrors"

    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="default")
        is_err = table.column("error").is_valid().to_numpy(zero_copy_only=False)
        files = []
        receipts = []
        tags = table.filter(pa.array(~is_err))
        if tags.num_rows:
            n = tags.num_rows
            rows = tags
            tags = tags.select(["uri", "size", "etag", "mtime", "width", "height", "tags", "scores"])
            tags = tags.append_column("model_id", pa.array([self.model_id] * n, pa.string()))
            tags = tags.append_column("vocab_id", pa.array([self.vocab_id] * n, pa.string()))
            tags = tags.append_column("run_id", pa.array([self.run_id] * n, pa.string()))
            written, where = self._write_partitioned("tags", tags.cast(TAGS_SCHEMA), ctx.task_idx)
            files += written
            receipts.append(self._receipt(rows, "tagged", where))
        errs = table.filter(pa.array(is_err))
        if errs.num_rows:
            n = errs.num_rows
            rows = errs
            errs = errs.select(["uri", "error", "stage"]).append_column(
                "run_id", pa.array([self.run_id] * n, pa.string()))
            written, where = self._write_partitioned("errors", errs.cast(ERRORS_SCHEMA), ctx.task_idx)
            files += written
            receipts.append(self._receipt(rows, "error", where))
        if self.staging is not None:
            sink = pa.BufferOutputStream()
            pq.write_table(pa.concat_tables(receipts), sink, compression="zstd")
            put_bytes(self.storage, join(self.staging, "done", f"{self.attempt:02d}-{ctx.task_idx:05d}.parquet"),
                      sink.getvalue().to_pybytes())
        return files

    def _receipt(self, rows: pa.Table, status: str, where: dict) -> pa.Table:
        """Index rows for a task's rows of one kind; `where` maps uri -> the file it went to."""
        n = rows.num_rows
        uris = rows.column("uri").to_pylist()

        def col(name, typ):
            return rows.column(name) if name in rows.column_names else pa.nulls(n, typ)

        ok = status == "tagged"
        return pa.table({
            "uri": rows.column("uri"), "version": col("version", pa.string()), "etag": col("etag", pa.string()),
            "size": col("size", pa.int64()), "mtime": col("mtime", pa.timestamp("us", tz="UTC")),
            "status": pa.array([status] * n, pa.string()),
            "stage": pa.nulls(n, pa.string()) if ok else rows.column("stage"),
            "model_id": pa.array([self.model_id] * n, pa.string()),
            "vocab_id": pa.array([self.vocab_id] * n, pa.string()),
            "score_floor": pa.array([self.score_floor] * n, pa.float32()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "file": pa.array([where[u] for u in uris], pa.string()),
            "tokens_file": col("tokens_file", pa.string()) if ok else pa.nulls(n, pa.string()),
            "tokens_row": col("tokens_row", pa.int32()) if ok else pa.nulls(n, pa.int32()),
        }).cast(INDEX_SCHEMA)

    def _write_partitioned(self, kind: str, table: pa.Table, task_idx: int) -> tuple[list[dict], dict]:
        fs, root = self.storage.pyarrow(join(self.output_uri, kind))
        shards = shard_of(table.column("uri").to_pylist(), self.shards) if "shard" in self.partition_by else None
        groups: dict[tuple, np.ndarray] = {}
        if shards is None:
            groups[()] = np.arange(table.num_rows)
        else:
            for s in np.unique(shards):
                groups[(int(s),)] = np.flatnonzero(shards == s)
        out = []
        where: dict = {}
        for key, idx in sorted(groups.items()):
            shard = key[0] if key else None
            dirs = []
            for col in self.partition_by:
                dirs.append(f"run_date={self.run_date}" if col == "run_date" else f"shard={shard:0{self.shard_width}d}")
            folder = "/".join([root] + dirs)
            path = f"{folder}/{file_prefix(self.run_id)}{self.attempt:02d}-{task_idx:05d}.parquet"
            part = table.take(pa.array(idx)).sort_by("uri")  # sorted: min/max stats prune uri lookups
            buf = pa.BufferOutputStream()
            pq.write_table(part, buf, compression=self.compression)
            data = buf.getvalue()
            rel = path[len(root) - len(kind):]
            put_bytes(self.storage, join(self.output_uri, rel), data.to_pybytes())  # one PUT; atomic locally
            out.append({"kind": kind, "path": rel, "rows": part.num_rows, "bytes": data.size})
            where.update(dict.fromkeys(part.column("uri").to_pylist(), rel))
        return out, where

    def on_write_complete(self, write_result) -> None:
        self.written = [f for task in write_result.write_returns for f in (task or [])]

"""The end of the pipeline: each write task stages its rows, the driver commits them later.

A write task does not touch the tables. It writes its rows (tagged and error rows alike,
RESULT_SCHEMA) as one Parquet object under the run's staging folder:

    _staging/<run_id>/done/<attempt>-<task>.parquet

That object is both the data and the receipt: it appears whole (one PUT, or a rename
locally) or not at all, so a task killed half-way leaves nothing. A resumed run skips the
images of every staged file, the exactly-once check reads them all, and the commit merges
them into the tables in one transaction per table. Names carry the attempt (a resumed
run's second start is 02) and the task index, so a retried task overwrites its own file
and never an earlier attempt's.

Why a Datasink: tags and errors come out of one stream; the datasink sees each write
task's rows once, and `min_rows_per_write` gathers about `layout.rows_per_file` rows per
file instead of one small file per inference batch.
"""

from __future__ import annotations

import zlib
from datetime import datetime, timezone
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from .manifest import put_bytes
from .schemas import RESULT_SCHEMA, TS
from .storage import Storage, join


def shard_of(uris, shards: int) -> np.ndarray:
    """CRC-32 of the UTF-8 URI modulo `shards`: stable across runs, machines and languages."""
    return np.fromiter((zlib.crc32(u.encode("utf-8", "surrogateescape")) % shards for u in uris), dtype=np.int32,
                       count=len(uris))


def staged_name(attempt: int, task_idx: int) -> str:
    return f"done/{attempt:02d}-{task_idx:05d}.parquet"


class ResultsSink(Datasink):
    def __init__(self, storage: Storage, staging: str, *, run_id: str, attempt: int, model_id: str,
                 vocab_id: str, score_floor: float, shards: int, compression: str = "zstd"):
        self.storage, self.staging = storage, staging
        self.run_id, self.attempt = run_id, attempt
        self.model_id, self.vocab_id, self.score_floor = model_id, vocab_id, score_floor
        self.shards = shards
        self.compression = None if compression == "none" else compression
        self.rows_per_file: Optional[int] = None

    @property
    def min_rows_per_write(self) -> Optional[int]:
        return self.rows_per_file

    def get_name(self) -> str:
        return "StageResults"

    def result_rows(self, table: pa.Table) -> pa.Table:
        """INFERRED rows -> RESULT_SCHEMA: the run's columns added, sorted by uri."""
        n = table.num_rows
        now = datetime.now(timezone.utc)
        is_err = table.column("error").is_valid()

        def const(v, typ):
            return pa.array([v] * n, typ)

        cols = {f.name: table.column(f.name) for f in RESULT_SCHEMA if f.name in table.column_names}
        cols["shard"] = pa.array(shard_of(table.column("uri").to_pylist(), self.shards), pa.int32())
        cols["model_id"] = const(self.model_id, pa.string())
        cols["vocab_id"] = pa.compute.if_else(is_err, pa.scalar(None, pa.string()), self.vocab_id)
        cols["score_floor"] = pa.compute.if_else(is_err, pa.scalar(None, pa.float32()),
                                                 pa.scalar(self.score_floor, pa.float32()))
        cols["run_id"] = const(self.run_id, pa.string())
        ts = pa.scalar(now, TS)
        cols["tagged_at"] = pa.compute.if_else(is_err, pa.scalar(None, TS), ts)
        cols["failed_at"] = pa.compute.if_else(is_err, ts, pa.scalar(None, TS))
        for f in RESULT_SCHEMA:
            if f.name not in cols:
                cols[f.name] = pa.nulls(n, f.type)
        return pa.table([cols[f.name] for f in RESULT_SCHEMA], schema=RESULT_SCHEMA).sort_by("uri")

    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        rows = self.result_rows(pa.concat_tables(tables, promote_options="default"))
        buf = pa.BufferOutputStream()
        pq.write_table(rows, buf, compression=self.compression)
        name = staged_name(self.attempt, ctx.task_idx)
        put_bytes(self.storage, join(self.staging, name), buf.getvalue().to_pybytes())
        tagged = rows.column("error").null_count
        return [{"path": name, "rows": rows.num_rows, "tagged": tagged, "errors": rows.num_rows - tagged}]

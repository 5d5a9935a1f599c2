"""What the tables hold now, as compact arrays that a night's listing is joined against.

A nightly run must decide, for each of millions of listed images, whether the tables already
hold a result for its content under this model and vocabulary. Holding the catalog's URIs
as Python strings would cost gigabytes, so the plan reads a few columns of the current
`tags` and `errors` versions once, in batches, into numpy arrays keyed by two independent
64-bit hashes of the URI (the same hashes the listing fingerprint uses; a false match
needs both to collide, about 2^-128 per pair) plus a 64-bit hash of the version: about
40 bytes per image, whatever the URI length.

The version of an object is its ETag when the listing has one (S3, GCS) and otherwise
`size=<bytes>,mtime=<microseconds>` (local folders, whose content hash the reader computes
only after fetching): an unchanged version means unchanged content.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .storage import Storage

TAGGED, ERROR = "tagged", "error"

_KEY1, _KEY2, _KEYV = "ramplus-uri-fp-1", "ramplus-uri-fp-2", "ramplus-version1"


# -- hashing ---------------------------------------------------------------------------------

def hash_strings(values, key: str) -> np.ndarray:
    """uint64 per string (pandas' SipHash with a 16-byte key); nulls hash like ''."""
    import pandas as pd

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.fill_null(values, "").to_numpy(zero_copy_only=False)
    arr = np.asarray(values, dtype=object)
    if len(arr) == 0:
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_array(arr, hash_key=key, categorize=False)


def uri_hashes(uris) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(uris, (pa.Array, pa.ChunkedArray)):
        uris = uris.to_numpy(zero_copy_only=False)
    return hash_strings(uris, _KEY1), hash_strings(uris, _KEY2)


def version_hash(versions) -> np.ndarray:
    return hash_strings(versions, _KEYV)


def version_strings(etag: pa.ChunkedArray | pa.Array, size, mtime) -> pa.Array:
    """The listing's version of each object: ETag, else `size=<n>,mtime=<us>`."""
    etag = _flat(etag)
    size = pc.cast(_flat(size), pa.int64())
    mt = pc.cast(pc.cast(_flat(mtime), pa.timestamp("us", tz="UTC")), pa.int64())
    fallback = pc.binary_join_element_wise(
        pa.scalar("size="), pc.fill_null(pc.cast(size, pa.string()), "?"),
        pa.scalar(",mtime="), pc.fill_null(pc.cast(mt, pa.string()), "?"), "")
    has = pc.and_(etag.is_valid(), pc.not_equal(pc.fill_null(etag, ""), ""))
    return pc.if_else(has, etag, fallback)


def _flat(a):
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


# -- the in-memory state ------------------------------------------------------------------------

@dataclass
class Code:
    status: str
    stage: Optional[str]
    model_id: Optional[str]
    vocab_id: Optional[str]
    score_floor: Optional[float]


@dataclass
class IndexState:
    """The current row per URI of both tables, sorted by (h1, h2)."""

    h1: np.ndarray
    h2: np.ndarray
    hv: np.ndarray        # version hash
    code: np.ndarray      # int32 -> codes
    tok_file: np.ndarray  # int32 -> tok_files (-1: none)
    tok_row: np.ndarray   # int32
    codes: list[Code] = field(default_factory=list)
    tok_files: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)  # table -> the version read
    rows_read: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.h1)

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, k).nbytes for k in _ARRAYS))

    @classmethod
    def empty(cls) -> "IndexState":
        z64, z32 = np.zeros(0, np.uint64), np.zeros(0, np.int32)
        return cls(z64, z64, z64, z32, z32, z32)

    @classmethod
    def of_keys(cls, h1: np.ndarray, h2: np.ndarray) -> "IndexState":
        """A state of keys only, sorted as lookup() needs: a set of URIs (by their hashes)."""
        order = np.lexsort((h2, h1))
        st = cls.empty()
        st.h1, st.h2 = h1[order], h2[order]
        return st

    def lookup(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Position of each (h1, h2) in the state, -1 where absent (queries sorted first: 5x faster)."""
        n = len(h1)
        out = np.full(n, -1, dtype=np.int64)
        if n == 0 or len(self.h1) == 0:
            return out
        order = np.argsort(h1, kind="stable")
        q1, q2 = h1[order], h2[order]
        lo = np.searchsorted(self.h1, q1, side="left")
        hi = np.searchsorted(self.h1, q1, side="right")
        one = (hi - lo) == 1
        cand = np.minimum(lo, len(self.h1) - 1)
        hit = one & (self.h2[cand] == q2)
        res = np.where(hit, lo, -1)
        for j in np.flatnonzero((hi - lo) > 1):  # equal h1, different h2: astronomically rare
            m = np.flatnonzero(self.h2[lo[j]:hi[j]] == q2[j])
            res[j] = lo[j] + m[0] if len(m) else -1
        out[order] = res
        return out


_ARRAYS = ("h1", "h2", "hv", "code", "tok_file", "tok_row")
_COLUMNS = {"tags": ["uri", "version", "model_id", "vocab_id", "score_floor", "tokens_file", "tokens_row"],
            "errors": ["uri", "version", "stage", "model_id"]}


def _encode(col, table: list[str], lookup: dict[str, int]) -> np.ndarray:
    """Dictionary-encode a string column into a global table; nulls become -1."""
    d = _flat(col).dictionary_encode()
    local = np.empty(len(d.dictionary) + 1, dtype=np.int32)
    local[-1] = -1
    for j, v in enumerate(d.dictionary.to_pylist()):
        if v not in lookup:
            lookup[v] = len(table)
            table.append(v)
        local[j] = lookup[v]
    ix = np.asarray(pc.fill_null(d.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    return local[ix]  # -1 indexes the trailing -1


def _codes(batch: pa.RecordBatch, kind: str, st: IndexState, lookup: dict) -> np.ndarray:
    """(status, stage, model, vocabulary, floor) of each row, as indices into st.codes."""
    n = batch.num_rows
    cols = {k: batch.column(k) if k in batch.schema.names else pa.nulls(n, pa.string())
            for k in ("stage", "model_id", "vocab_id")}
    floor = batch.column("score_floor") if "score_floor" in batch.schema.names else pa.nulls(n, pa.float32())
    keys = pc.binary_join_element_wise(*[pc.fill_null(pc.cast(c, pa.string()), "\x00")
                                         for c in (*cols.values(), floor)], "\x1f")
    d = _flat(keys).dictionary_encode()
    ix = d.indices.to_numpy(zero_copy_only=False)
    uniq, first = np.unique(ix, return_index=True)
    local = np.empty(len(d.dictionary), dtype=np.int32)
    status = TAGGED if kind == "tags" else ERROR
    for j, r in zip(uniq, first):
        f = floor[int(r)].as_py()
        k = (status, cols["stage"][int(r)].as_py(), cols["model_id"][int(r)].as_py(),
             cols["vocab_id"][int(r)].as_py(), f)
        if k not in lookup:
            lookup[k] = len(st.codes)
            st.codes.append(Code(*k))
        local[j] = lookup[k]
    return local[ix]


def load_state(storage: Storage, output_uri: str, versions: Optional[dict] = None) -> IndexState:
    """Read both tables' current rows (at `versions`, else the newest) into arrays."""
    from .table import KINDS, open_table

    t0 = time.perf_counter()
    st = IndexState.empty()
    parts: dict[str, list] = {k: [] for k in _ARRAYS}
    code_lookup: dict[tuple, int] = {}
    tok_lookup: dict[str, int] = {}
    for kind in KINDS:
        dt = open_table(storage, output_uri, kind, (versions or {}).get(kind))
        if dt is None:
            continue
        st.versions[kind] = dt.version()
        for batch in dt.to_pyarrow_dataset().to_batches(columns=_COLUMNS[kind], batch_size=65_536):
            n = batch.num_rows
            if not n:
                continue
            h1, h2 = uri_hashes(batch.column("uri"))
            parts["h1"].append(h1)
            parts["h2"].append(h2)
            parts["hv"].append(version_hash(batch.column("version")))
            parts["code"].append(_codes(batch, kind, st, code_lookup))
            if kind == "tags":
                parts["tok_file"].append(_encode(batch.column("tokens_file"), st.tok_files, tok_lookup))
                parts["tok_row"].append(np.asarray(pc.fill_null(batch.column("tokens_row"), -1).to_numpy(
                    zero_copy_only=False), dtype=np.int32))
            else:
                parts["tok_file"].append(np.full(n, -1, np.int32))
                parts["tok_row"].append(np.full(n, -1, np.int32))
            st.rows_read += n
    if st.rows_read:
        # one array at a time, dropping each input as soon as it is folded
        cat = {k: np.concatenate(parts.pop(k)) for k in list(parts)}
        order = np.lexsort((cat["h2"], cat["h1"]))
        for k in list(cat):
            setattr(st, k, cat.pop(k)[order])
    st.seconds = time.perf_counter() - t0
    return st

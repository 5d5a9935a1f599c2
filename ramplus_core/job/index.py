"""The index of committed results: what the next run reads instead of every past Parquet file.

A nightly run must decide, for each of millions of listed images, whether a committed result
already exists for its content under this model and vocabulary. Scanning every past
`tags/` and `errors/` file each night would cost as much as the catalog, and holding the
URIs of the catalog in the driver as Python strings would cost gigabytes. So each committed
run leaves one small Parquet file of what it decided per image:

    _index/delta-<run_id>.parquet          one row per image the run wrote or tombstoned
    _index/base-<run_id>/part-NNNNN.parquet  every current entry as of that run (compaction)

and the next run reads the newest committed base plus the committed deltas after it. Only
rows of runs with a `_SUCCESS` marker count, exactly as for readers of `tags/`.

In memory the index is a set of numpy arrays keyed by two independent 64-bit hashes of the
URI (the same hashes the listing fingerprint uses; a false match needs both to collide,
about 2^-128 per pair) plus a 64-bit hash of the version: about 48 bytes per image,
whatever the URI length. Strings are read again only for the few entries that need them
(tombstones, and the base rows of a vocabulary-growth run).

The version of an object is its ETag when the listing has one (S3, GCS) and otherwise
`size=<bytes>,mtime=<microseconds>` (local folders, whose content hash the reader computes
only after fetching): an unchanged version means unchanged content.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import Storage, join

INDEX_DIR = "_index"
TAGGED, ERROR, DELETED = "tagged", "error", "deleted"

INDEX_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("version", pa.string()),         # what the listing said: ETag, else size and mtime
    ("etag", pa.string()),            # as written to tags/ (for local files: MD5 of the bytes)
    ("size", pa.int64()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("status", pa.string()),          # tagged | error | deleted
    ("stage", pa.string()),           # of an error row: list, fetch, decode, infer
    ("model_id", pa.string()),
    ("vocab_id", pa.string()),
    ("score_floor", pa.float32()),    # scores under it were not kept in the row
    ("run_id", pa.string()),
    ("file", pa.string()),            # the data file holding the row, relative to the output
    ("tokens_file", pa.string()),     # cached image tokens (cache.image_tokens), relative
    ("tokens_row", pa.int32()),
])

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


# -- where the index lives --------------------------------------------------------------------

@dataclass
class IndexFile:
    path: str  # on the output's pyarrow filesystem
    run_id: str
    kind: str  # base or delta


def index_files(storage: Storage, output_uri: str, committed: list[str]) -> list[IndexFile]:
    """The newest committed base and the committed deltas after it, oldest first."""
    import pyarrow.fs as pafs

    fs, root = storage.pyarrow(join(output_uri, INDEX_DIR))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    except FileNotFoundError:
        return []
    ok = set(committed)
    bases: dict[str, list[str]] = {}
    deltas: dict[str, str] = {}
    for i in infos:
        if i.type != pafs.FileType.File or not i.path.endswith(".parquet"):
            continue
        rel = i.path[len(root):].lstrip("/")
        if rel.startswith("delta-"):
            rid = rel[len("delta-"):-len(".parquet")]
            if rid in ok:
                deltas[rid] = i.path
        elif rel.startswith("base-") and "/" in rel:
            rid = rel.split("/", 1)[0][len("base-"):]
            if rid in ok:
                bases.setdefault(rid, []).append(i.path)
    base_id = max(bases) if bases else None
    out = [IndexFile(p, base_id, "base") for p in sorted(bases.get(base_id, []))]
    out += [IndexFile(deltas[r], r, "delta") for r in sorted(deltas) if base_id is None or r > base_id]
    return out


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
    """The current entry per URI (the newest committed row), sorted by (h1, h2)."""

    h1: np.ndarray
    h2: np.ndarray
    hv: np.ndarray        # version hash
    code: np.ndarray      # int32 -> codes
    file: np.ndarray      # int32 -> files (-1: none)
    tok_file: np.ndarray  # int32 -> tok_files (-1: none)
    tok_row: np.ndarray   # int32
    src: np.ndarray       # int32 -> sources (which index file holds the entry)
    row: np.ndarray       # int32 row in that file
    codes: list[Code] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    tok_files: list[str] = field(default_factory=list)
    sources: list[IndexFile] = field(default_factory=list)
    rows_read: int = 0
    seconds: float = 0.0
    output_uri: str = ""

    def __len__(self) -> int:
        return len(self.h1)

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, k).nbytes for k in
                       ("h1", "h2", "hv", "code", "file", "tok_file", "tok_row", "src", "row")))

    @classmethod
    def empty(cls) -> "IndexState":
        z64, z32 = np.zeros(0, np.uint64), np.zeros(0, np.int32)
        return cls(z64, z64, z64, z32, z32, z32, z32, z32, z32)

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

    def rows_at(self, storage: Storage, positions: np.ndarray, columns: list[str]) -> pa.Table:
        """Some columns of some entries (a second, narrow read of their index files)."""
        parts = []
        src = self.src[positions]
        for s in np.unique(src):
            rows = np.sort(self.row[positions[src == s]])
            parts.append(_read(storage, self.output_uri, self.sources[s].path, columns).take(pa.array(rows)))
        if not parts:
            return INDEX_SCHEMA.empty_table().select(columns)
        return pa.concat_tables([p.cast(pa.schema([INDEX_SCHEMA.field(c) for c in columns])) for p in parts])


def _read(storage: Storage, output_uri: str, path: str, columns: list[str]) -> pa.Table:
    fs, _ = storage.pyarrow(join(output_uri, INDEX_DIR))
    return pq.read_table(path, columns=columns, filesystem=fs)


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


_STATE_COLUMNS = ["uri", "version", "status", "stage", "model_id", "vocab_id", "score_floor", "file",
                  "tokens_file", "tokens_row"]


def load_state(storage: Storage, output_uri: str, committed: list[str]) -> IndexState:
    """Read the committed index into arrays, newest entry per URI. Memory: ~48 bytes/entry."""
    t0 = time.perf_counter()
    files = index_files(storage, output_uri, committed)
    st = IndexState.empty()
    st.output_uri = output_uri
    st.sources = files
    if not files:
        st.seconds = time.perf_counter() - t0
        return st
    parts: dict[str, list] = {k: [] for k in ("h1", "h2", "hv", "code", "file", "tok_file", "tok_row", "src", "row")}
    code_lookup: dict[tuple, int] = {}
    file_lookup: dict[str, int] = {}
    tok_lookup: dict[str, int] = {}
    for s, f in enumerate(files):
        fs, _ = storage.pyarrow(join(output_uri, INDEX_DIR))
        pf = pq.ParquetFile(f.path, filesystem=fs)
        offset = 0
        for batch in pf.iter_batches(batch_size=50_000, columns=_STATE_COLUMNS):
            n = batch.num_rows
            h1, h2 = uri_hashes(batch.column("uri"))
            parts["h1"].append(h1)
            parts["h2"].append(h2)
            parts["hv"].append(version_hash(batch.column("version")))
            combo = pa.Table.from_batches([batch.select(["status", "stage", "model_id", "vocab_id", "score_floor"])])
            keys = pc.binary_join_element_wise(
                *[pc.fill_null(pc.cast(combo.column(k), pa.string()), "\x00") for k in combo.column_names], "\x1f")
            d = _flat(keys).dictionary_encode()
            ix = d.indices.to_numpy(zero_copy_only=False)
            _, first = np.unique(ix, return_index=True)
            local = np.empty(len(d.dictionary), dtype=np.int32)
            for j, r in zip(np.unique(ix), combo.take(pa.array(first)).to_pylist()):
                k = (r["status"], r["stage"], r["model_id"], r["vocab_id"], r["score_floor"])
                if k not in code_lookup:
                    code_lookup[k] = len(st.codes)
                    st.codes.append(Code(*k))
                local[j] = code_lookup[k]
            parts["code"].append(local[ix])
            parts["file"].append(_encode(batch.column("file"), st.files, file_lookup))
            parts["tok_file"].append(_encode(batch.column("tokens_file"), st.tok_files, tok_lookup))
            parts["tok_row"].append(np.asarray(pc.fill_null(batch.column("tokens_row"), -1).to_numpy(
                zero_copy_only=False), dtype=np.int32))
            parts["src"].append(np.full(n, s, dtype=np.int32))
            parts["row"].append(np.arange(offset, offset + n, dtype=np.int32))
            offset += n
            st.rows_read += n
    # one key at a time, dropping each input as soon as it is folded: the peak stays near
    # twice the arrays rather than three times
    cat = {}
    for k in list(parts):
        cat[k] = np.concatenate(parts.pop(k))
    n = len(cat["h1"])
    order = np.lexsort((cat["h2"], cat["h1"]))  # stable: equal keys stay in read order
    h1s = cat["h1"][order]
    h2s = cat["h2"][order]
    last = np.ones(n, dtype=bool)
    if n > 1:
        last[:-1] = (h1s[1:] != h1s[:-1]) | (h2s[1:] != h2s[:-1])
    del h1s, h2s
    keep = order[last]
    del order, last
    for k in list(cat):
        setattr(st, k, cat.pop(k)[keep])
    st.seconds = time.perf_counter() - t0
    return st


# -- writing ----------------------------------------------------------------------------------

def write_rows(storage: Storage, uri: str, tables: Iterable[pa.Table]) -> int:
    """Stream tables of INDEX_SCHEMA rows into one Parquet file; returns the row count."""
    from .manifest import put_bytes

    sink = pa.BufferOutputStream()
    n = 0
    with pq.ParquetWriter(sink, INDEX_SCHEMA, compression="zstd") as w:
        for t in tables:
            if t.num_rows:
                w.write_table(t.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA), row_group_size=200_000)
                n += t.num_rows
    put_bytes(storage, uri, sink.getvalue().to_pybytes())
    return n


def delta_uri(output_uri: str, run_id: str) -> str:
    return join(output_uri, INDEX_DIR, f"delta-{run_id}.parquet")


def compact(storage: Storage, output_uri: str, run_id: str, committed: list[str],
            rows_per_file: int = 1_000_000) -> dict:
    """Write `_index/base-<run_id>/`: the current entry per URI (tombstones dropped).

    Called by a run after its own delta is written and before its marker, with `committed`
    including itself, so the base equals base + deltas as readers would resolve them.
    """
    from .manifest import put_bytes

    t0 = time.perf_counter()
    st = load_state(storage, output_uri, committed)
    deleted = {i for i, c in enumerate(st.codes) if c.status == DELETED}
    live = ~np.isin(st.code, list(deleted)) if deleted else np.ones(len(st), dtype=bool)
    src, row = st.src[live], st.row[live]
    part, written, buf = 0, 0, []
    buffered = 0

    def flush():
        nonlocal part, buf, buffered
        if not buf:
            return
        sink = pa.BufferOutputStream()
        pq.write_table(pa.concat_tables(buf), sink, compression="zstd", row_group_size=200_000)
        put_bytes(storage, join(output_uri, INDEX_DIR, f"base-{run_id}", f"part-{part:05d}.parquet"),
                  sink.getvalue().to_pybytes())
        part += 1
        buf, buffered = [], 0

    for s in np.unique(src):
        rows = np.sort(row[src == s])
        t = _read(storage, output_uri, st.sources[s].path, INDEX_SCHEMA.names).take(pa.array(rows))
        buf.append(t.cast(INDEX_SCHEMA))
        buffered += t.num_rows
        written += t.num_rows
        if buffered >= rows_per_file:
            flush()
    flush()
    return {"run_id": run_id, "rows": written, "files": part, "seconds": round(time.perf_counter() - t0, 3)}

"""Which listed images this run works on, and how: the listing joined with the tables.

Per listed image, with its current row in `tags` or `errors` (mode `missing`):

| current row | same version? | result | work |
| --- | --- | --- | --- |
| none | | new | full |
| any | no | changed | full |
| tagged, this model and vocabulary (floor at or under this run's) | yes | already_done | none |
| error of stage decode | yes | already_done (the same bytes fail the same way) | none |
| error of stage list, fetch or infer (`incremental.retry_stages`) | yes | retried | full |
| tagged, this model, another vocabulary sharing tags | yes | vocab_changed | only the tags it lacks |
| tagged, another model | yes | retagged | full |

`mode: all` makes every listed image full work. In both modes, rows under the run's inputs
that the listing no longer has are deleted at the commit; rows under a folder the listing
could not read are left alone (hidden is not deleted), and so are rows outside the inputs
(another input set sharing the output).

The join is streamed: one listing shard at a time against the state arrays, writing plan
shards of work rows (`WORK_SCHEMA`) under the run's staging folder. The driver holds the
state arrays (~40 bytes per image) plus one shard; the old scores of grown images, which
are copied, are read from the tags table in batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .index import ERROR, TAGGED, IndexState, uri_hashes, version_hash, version_strings
from .listing import Fingerprint
from .manifest import OLD_INCREMENTAL_NAMES  # a plan staged by an older version, resumed
from .schemas import DELETED_SCHEMA, SCORE_TYPE, WORK_SCHEMA
from .storage import Storage, ensure_dir, join

CATEGORIES = ("already_done", "new", "changed", "retried", "vocab_changed", "retagged")
_SKIP, _RETRY, _GROW, _RETAG = 0, 1, 2, 3


@dataclass
class Plan:
    files: list[str] = field(default_factory=list)   # plan shards on the staging filesystem
    counts: dict = field(default_factory=dict)
    work: int = 0
    work_fp: tuple = (0, 0, 0)      # (count, sum1, sum2) of the work URIs
    skipped_fp: tuple = (0, 0, 0)
    keys: dict = field(default_factory=dict)          # base_key -> {vocab_id, floor, compute: [tag index]}
    need: dict = field(default_factory=dict)          # pixels/tokens/none -> rows
    deleted: Optional[dict] = None                    # {path, rows}: DELETED_SCHEMA rows in staging
    from_errors: int = 0                              # work rows whose current row is an error
    versions: dict = field(default_factory=dict)      # table -> the version the plan read
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"files": self.files, "counts": self.counts, "work": self.work, "work_fp": list(self.work_fp),
                "skipped_fp": list(self.skipped_fp), "keys": self.keys, "need": self.need,
                "deleted": self.deleted, "from_errors": self.from_errors, "versions": self.versions,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(files=d["files"], counts={OLD_INCREMENTAL_NAMES.get(k, k): v for k, v in d["counts"].items()}, work=d["work"], work_fp=tuple(d["work_fp"]),
                   skipped_fp=tuple(d["skipped_fp"]), keys=d["keys"], need=d.get("need", {}),
                   deleted=d.get("deleted"), from_errors=d.get("from_errors", 0),
                   versions=d.get("versions", {}), seconds=d.get("seconds", {}))


def _add_fp(fp: tuple, h1: np.ndarray, h2: np.ndarray) -> tuple:
    return Fingerprint(*fp).add_hashes(h1, h2).as_tuple()


def in_scope(uri: str, prefixes: list[str]) -> bool:
    return any(uri == p or uri.startswith(p.rstrip("/") + "/") for p in prefixes)


class _PlanWriter:
    def __init__(self, storage: Storage, staging: str, rows_per_file: int):
        self.fs, self.root = storage.pyarrow(join(staging, "plan"))
        ensure_dir(self.fs, self.root)
        self.rows_per_file = rows_per_file
        self.buf: list[pa.Table] = []
        self.n = 0
        self.files: list[str] = []
        self.need: dict = {}

    def add(self, t: pa.Table) -> None:
        if not t.num_rows:
            return
        for kv in pc.value_counts(t.column("need")).to_pylist():  # not np.unique: it sorts the strings
            self.need[str(kv["values"])] = self.need.get(str(kv["values"]), 0) + int(kv["counts"])
        self.buf.append(t.select(WORK_SCHEMA.names).cast(WORK_SCHEMA))
        self.n += t.num_rows
        if self.n >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        path = f"{self.root}/part-{len(self.files):05d}.parquet"
        pq.write_table(pa.concat_tables(self.buf), path, filesystem=self.fs, compression="zstd")
        self.files.append(path)
        self.buf, self.n = [], 0


def _nulls(n: int, typ) -> pa.Array:
    return pa.nulls(n, typ)


_NULL_INT = np.iinfo(np.int64).min


def _ints(col) -> np.ndarray:
    """int64 (or timestamp) column -> int64 numpy with nulls as a sentinel."""
    a = pc.cast(col, pa.int64()) if not pa.types.is_integer(col.type) else col
    return np.asarray(pc.fill_null(a, _NULL_INT).to_numpy(zero_copy_only=False), dtype=np.int64)


def _from_ints(v: np.ndarray, typ) -> pa.Array:
    return pa.array(v, pa.int64(), mask=v == _NULL_INT).cast(typ)


def _full_rows(t: pa.Table, version: pa.Array, need: np.ndarray, tok_file: list, tok_row: np.ndarray) -> pa.Table:
    n = t.num_rows
    return pa.table({
        "uri": t.column("uri"), "size": t.column("size"), "etag": t.column("etag"), "mtime": t.column("mtime"),
        "list_error": t.column("list_error"), "version": version, "need": pa.array(need, pa.string()),
        "base_key": _nulls(n, pa.string()), "base_scores": _nulls(n, pa.list_(SCORE_TYPE)),
        "width": _nulls(n, pa.int32()), "height": _nulls(n, pa.int32()),
        "tokens_file": pa.array(tok_file, pa.string()), "tokens_row": pa.array(tok_row, pa.int32()),
    }, schema=WORK_SCHEMA)


def make_plan(*, storage: Storage, output_uri: str, staging: str, listing_files: list[str], state: IndexState,
              mode: str, model_id: str, vocab_id: str, desc: dict, score_floor: float,
              retry_stages: tuple[str, ...], prefixes: list[str], token_cache: bool, rows_per_file: int,
              descriptors) -> Plan:
    """Classify every listed image, write plan shards and the deletions; see the module docstring.

    `descriptors(vocab_id)` returns the descriptor of a vocabulary applied earlier (or None).
    """
    from .vocab import copyable

    t0 = time.perf_counter()
    plan = Plan(counts={k: 0 for k in CATEGORIES} | {"deleted": 0}, versions=dict(state.versions))
    writer = _PlanWriter(storage, staging, rows_per_file)
    lfs, _ = storage.pyarrow(join(staging, "listing"))

    # what each index code means for a same-version image, and which copy rule applies
    codes = state.codes
    action = np.full(max(1, len(codes)), _RETAG, dtype=np.int8)
    key_of = np.full(max(1, len(codes)), -1, dtype=np.int32)
    error_code = np.zeros(max(1, len(codes)), dtype=bool)
    model_ok = np.zeros(max(1, len(codes)), dtype=bool)
    key_names: list[str] = []
    floor32 = np.float32(score_floor)
    for i, c in enumerate(codes):
        error_code[i] = c.status == ERROR
        model_ok[i] = c.status == TAGGED and c.model_id == model_id
        if mode == "all":
            action[i] = _RETAG
        elif c.status == ERROR:
            action[i] = _RETRY if (c.stage or "") in retry_stages else _SKIP
        elif c.status == TAGGED and c.model_id == model_id:
            same = c.vocab_id == vocab_id and c.score_floor is not None and np.float32(c.score_floor) <= floor32
            if same:
                action[i] = _SKIP
            else:
                base = descriptors(c.vocab_id) if c.vocab_id else None
                mask = copyable(desc, base, score_floor, c.score_floor) if base else None
                if mask is not None and mask.any():
                    key = f"{c.vocab_id}@{float(np.float32(c.score_floor))!r}"
                    if key not in plan.keys:
                        plan.keys[key] = {"vocab_id": c.vocab_id, "floor": c.score_floor,
                                          "compute": [int(j) for j in np.flatnonzero(~mask)],
                                          "copied_tags": int(mask.sum()),
                                          # what changed since: tags by identity (name + descriptions)
                                          "added_tags": len(set(desc["identities"]) - set(base["identities"])),
                                          "removed_tags": len(set(base["identities"]) - set(desc["identities"]))}
                        key_names.append(key)
                    action[i], key_of[i] = _GROW, key_names.index(key)

    seen = np.zeros(len(state), dtype=bool)
    grow_parts: dict[str, list] = {k: [] for k in ("h1", "h2", "pos", "key", "size", "mtime", "has_etag")}
    list_error_prefixes: list[str] = []
    tok_names = np.asarray(state.tok_files + [None], dtype=object)
    empty = len(state) == 0
    for path in listing_files:
        t = pq.read_table(path, filesystem=lfs)
        n = t.num_rows
        if not n:
            continue
        h1, h2 = uri_hashes(t.column("uri"))
        version = version_strings(t.column("etag"), t.column("size"), t.column("mtime"))
        hv = version_hash(version)
        pos = state.lookup(h1, h2)
        found = pos >= 0
        seen[pos[found]] = True
        p = np.where(found, pos, 0)
        code = np.zeros(n, np.int32) if empty else state.code[p]
        live = found
        same = live & (False if empty else state.hv[p] == hv)
        list_err = t.column("list_error").is_valid().to_numpy(zero_copy_only=False)
        if list_err.any():
            errs = t.filter(pa.array(list_err))
            list_error_prefixes += [u for u, e in zip(errs.column("uri").to_pylist(), errs.column("list_error").to_pylist())
                                    if (e or "").startswith("folder")]
        act = np.where(same, action[code], -1)
        act = np.where(list_err & (act != -1), _RETRY, act)  # a listing error is always work
        skip = act == _SKIP
        grow = act == _GROW
        plan.counts["already_done"] += int(skip.sum())
        plan.counts["new"] += int((~live).sum())
        plan.counts["changed"] += int((live & ~same).sum())
        plan.counts["retried"] += int((act == _RETRY).sum())
        plan.counts["vocab_changed"] += int(grow.sum())
        plan.counts["retagged"] += int((act == _RETAG).sum())
        plan.skipped_fp = _add_fp(plan.skipped_fp, h1[skip], h2[skip])
        full = ~skip & ~grow
        if full.any():
            # same content, same model, tokens cached: the backbone need not run again
            tok = full & same & model_ok[code] & (mode != "all") & token_cache
            if not empty:
                tok &= state.tok_file[p] >= 0
            tf = tok_names[np.where(tok, state.tok_file[p] if not empty else -1, -1)]
            tr = np.where(tok, state.tok_row[p] if not empty else 0, 0).astype(np.int32)
            idx = pa.array(np.flatnonzero(full))
            writer.add(_full_rows(t.take(idx), version.take(idx), np.where(tok, "tokens", "pixels")[full],
                                  list(tf[full]), tr[full]))
            plan.work_fp = _add_fp(plan.work_fp, h1[full], h2[full])
            plan.from_errors += int((full & live & error_code[code]).sum())
        if grow.any():
            g = np.flatnonzero(grow)
            sub = t.take(pa.array(g))
            grow_parts["h1"].append(h1[g])
            grow_parts["h2"].append(h2[g])
            grow_parts["pos"].append(pos[g])
            grow_parts["key"].append(key_of[code[g]])
            grow_parts["size"].append(_ints(sub.column("size")))
            grow_parts["mtime"].append(_ints(pc.cast(sub.column("mtime"), pa.timestamp("us", tz="UTC"))))
            grow_parts["has_etag"].append(np.asarray(pc.fill_null(pc.not_equal(sub.column("etag"), ""), False)
                                                     .to_numpy(zero_copy_only=False), dtype=bool))
    plan.seconds["join"] = round(time.perf_counter() - t0, 3)

    t1 = time.perf_counter()
    if any(len(x) for x in grow_parts["h1"]):
        g = {k: np.concatenate(v) for k, v in grow_parts.items()}
        missing = _grown_rows(storage, output_uri, state, g, key_names, plan, writer, token_cache)
        if len(missing):
            _fallback_full(lfs, listing_files, g["h1"][missing], g["h2"][missing], writer, plan)
    plan.seconds["grown_rows"] = round(time.perf_counter() - t1, 3)
    writer.flush()

    t2 = time.perf_counter()
    plan.deleted = _deleted(storage, output_uri, staging, state, seen, prefixes, list_error_prefixes, plan)
    plan.seconds["deleted"] = round(time.perf_counter() - t2, 3)
    plan.files = writer.files
    plan.need = writer.need
    plan.work = plan.work_fp[0]
    return plan


def _grown_rows(storage, output_uri, state: IndexState, g: dict, key_names, plan: Plan, writer, token_cache) -> np.ndarray:
    """Work rows for grown images with their old scores, read from the tags table in batches.

    Returns the candidates whose old row could not be found (they become full work).
    """
    from .table import scan

    order = np.lexsort((g["h2"], g["h1"]))
    for k in g:
        g[k] = g[k][order]
    grown = IndexState.of_keys(g["h1"], g["h2"])  # already sorted: its positions are g's
    emitted = np.zeros(len(order), dtype=bool)
    tok_names = np.asarray(state.tok_files + [None], dtype=object)
    computes = {i: len(plan.keys[k]["compute"]) for i, k in enumerate(key_names)}
    for batch in scan(storage, output_uri, "tags", ["uri", "etag", "width", "height", "scores"],
                      state.versions.get("tags")):
        base = pa.Table.from_batches([batch])
        h1, h2 = uri_hashes(base.column("uri"))
        m = grown.lookup(h1, h2)
        ok = m >= 0
        ok[ok] = ~emitted[m[ok]]
        if not ok.any():
            continue
        rows, cand = np.flatnonzero(ok), m[ok]
        emitted[cand] = True
        b = base.take(pa.array(rows))
        keys = g["key"][cand]
        tokpos = g["pos"][cand]
        has_tok = token_cache & (state.tok_file[tokpos] >= 0)
        no_compute = np.array([computes[k] == 0 for k in keys], dtype=bool)
        need = np.where(no_compute, "none", np.where(has_tok, "tokens", "pixels"))
        etag = pc.if_else(pa.array(g["has_etag"][cand]), b.column("etag"), pa.nulls(len(cand), pa.string()))
        size = _from_ints(g["size"][cand], pa.int64())
        mtime = _from_ints(g["mtime"][cand], pa.timestamp("us", tz="UTC"))
        version = version_strings(etag, size, mtime)
        writer.add(pa.table({
            "uri": b.column("uri"), "size": size, "etag": b.column("etag"), "mtime": mtime,
            "list_error": pa.nulls(len(cand), pa.string()), "version": version,
            "need": pa.array(need, pa.string()),
            "base_key": pa.array([key_names[k] for k in keys], pa.string()),
            "base_scores": b.column("scores"), "width": b.column("width"), "height": b.column("height"),
            "tokens_file": pa.array(list(np.where(has_tok, tok_names[np.where(has_tok, state.tok_file[tokpos], -1)],
                                                  None)), pa.string()),
            "tokens_row": pa.array(np.where(has_tok, state.tok_row[tokpos], 0).astype(np.int32), pa.int32()),
        }, schema=WORK_SCHEMA))
        plan.work_fp = _add_fp(plan.work_fp, g["h1"][cand], g["h2"][cand])
    missing = np.flatnonzero(~emitted)
    plan.counts["vocab_changed"] -= len(missing)
    plan.counts["retagged"] += len(missing)
    return missing


def _fallback_full(lfs, listing_files, h1m, h2m, writer, plan: Plan) -> None:
    """Grown images whose old row is gone: full work, from their listing rows."""
    missing = IndexState.of_keys(h1m, h2m)
    for path in listing_files:
        t = pq.read_table(path, filesystem=lfs)
        h1, h2 = uri_hashes(t.column("uri"))
        hit = missing.lookup(h1, h2) >= 0
        if hit.any():
            idx = pa.array(np.flatnonzero(hit))
            tt = t.take(idx)
            n = tt.num_rows
            version = version_strings(tt.column("etag"), tt.column("size"), tt.column("mtime"))
            writer.add(_full_rows(tt, version, np.array(["pixels"] * n), [None] * n, np.zeros(n, np.int32)))
            plan.work_fp = _add_fp(plan.work_fp, h1[hit], h2[hit])


def _deleted(storage, output_uri, staging, state: IndexState, seen, prefixes, list_error_prefixes,
             plan: Plan) -> Optional[dict]:
    """Rows under the inputs that the listing no longer has: `deleted.parquet` in staging.

    A second, narrow read of the tables' uri and shard columns, only when some row was not
    seen: a night on which nothing was deleted costs no read.
    """
    from .table import KINDS, scan

    unseen = ~seen
    if not len(state) or not unseen.any():
        return None
    parts = []
    for kind in KINDS:
        for batch in scan(storage, output_uri, kind, ["uri", "shard"], state.versions.get(kind)):
            h1, h2 = uri_hashes(batch.column("uri"))
            pos = state.lookup(h1, h2)
            hit = (pos >= 0) & unseen[np.maximum(pos, 0)]
            if not hit.any():
                continue
            t = pa.Table.from_batches([batch]).filter(pa.array(hit))
            keep = [in_scope(u, prefixes) and not in_scope(u, list_error_prefixes)
                    for u in t.column("uri").to_pylist()]
            t = t.filter(pa.array(keep, pa.bool_()))
            if t.num_rows:
                parts.append(t.cast(DELETED_SCHEMA))
    if not parts:
        return None
    gone = pa.concat_tables(parts).sort_by("uri")
    gone = gone.filter(pc.invert(_repeats(gone.column("uri"))))  # briefly in both tables: once
    fs, root = storage.pyarrow(staging)
    ensure_dir(fs, root)
    pq.write_table(gone, f"{root}/deleted.parquet", filesystem=fs, compression="zstd")
    plan.counts["deleted"] = gone.num_rows
    return {"path": f"{root}/deleted.parquet", "rows": gone.num_rows}


def _repeats(sorted_uris) -> pa.Array:
    u = sorted_uris.to_numpy(zero_copy_only=False)
    rep = np.zeros(len(u), dtype=bool)
    if len(u) > 1:
        rep[1:] = u[1:] == u[:-1]
    return pa.array(rep)

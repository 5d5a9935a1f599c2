"""From staged rows to the tables: the exactly-once proof, then the commits, then upkeep.

The proof, before anything is committed: listed = skipped (done earlier) + work, and the
staged rows of every attempt are the work, each image once. Both sides are order-free
fingerprints of URIs (count and two 64-bit sums of independent hashes), so the check
costs one read of the staged uri column whatever the catalog size. Only then does the run
merge its rows into the tables (table.commit_run), and a run that fails the check writes
`_runs/<run_id>.FAILED.json` and commits nothing.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import index as ix
from . import plan as pl
from . import table as tb
from .listing import Fingerprint, ListingResult
from .schemas import DELETED_SCHEMA
from .state import RunState
from .storage import Storage, ensure_dir, join

EXACT_DIFF_LIMIT = 1_000_000


def verify(rs: RunState, listing: ListingResult, plan: pl.Plan) -> dict:
    fp = Fingerprint()
    tagged, errors = 0, 0
    by_stage: collections.Counter = collections.Counter()
    files = []
    for path in rs.receipt_files():
        t = _read(rs, path, ["uri", "error", "stage"])
        fp.update(t.column("uri"))
        n_err = t.num_rows - t.column("error").null_count
        tagged += t.num_rows - n_err
        errors += n_err
        by_stage.update(s for s in t.column("stage").to_pylist() if s)
        files.append({"path": path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1], "rows": t.num_rows})
    work_fp, skipped_fp = Fingerprint(*plan.work_fp), Fingerprint(*plan.skipped_fp)
    problems = []
    if work_fp + skipped_fp != listing.fingerprint:
        problems.append(f"the plan does not add up to the listing ({work_fp.count} to do + {skipped_fp.count} done "
                        f"!= {listing.listed} listed)")
    if fp != work_fp:
        head = f"{work_fp.count} images to do, staged {tagged} tagged + {errors} error rows = {fp.count}"
        if work_fp.count <= EXACT_DIFF_LIMIT:
            head += "; " + _exact_diff(rs, plan)
        problems.insert(0, head)
    return {"ok": not problems, "detail": "; ".join(problems), "tagged": tagged, "errors": errors,
            "errors_by_stage": dict(by_stage), "listing_fingerprint": listing.fingerprint.as_dict(),
            "output_fingerprint": fp.as_dict(), "work_fingerprint": work_fp.as_dict(),
            "skipped_fingerprint": skipped_fp.as_dict(), "files": files}


def _read(rs: RunState, path: str, columns=None) -> pa.Table:
    fs, _ = rs.storage.pyarrow(rs.uri("done"))
    return pq.read_table(path, filesystem=fs, columns=columns)


def _exact_diff(rs: RunState, plan: pl.Plan) -> str:
    fs, _ = rs.storage.pyarrow(rs.uri("plan"))
    todo = set()
    for path in plan.files:
        todo.update(pq.read_table(path, columns=["uri"], filesystem=fs).column("uri").to_pylist())
    seen: collections.Counter = collections.Counter()
    for path in rs.receipt_files():
        seen.update(_read(rs, path, ["uri"]).column("uri").to_pylist())
    missing = sorted(todo - set(seen))
    dup = sorted(u for u, c in seen.items() if c > 1)
    extra = sorted(set(seen) - todo)
    return (f"{len(missing)} missing (e.g. {missing[:3]}), {len(dup)} staged more than once (e.g. {dup[:3]}), "
            f"{len(extra)} not to do (e.g. {extra[:3]})")


def remaining_work(storage: Storage, rs: RunState, plan: pl.Plan) -> tuple[list[str], int]:
    """Plan shards less the images earlier attempts staged; (shards, rows kept)."""
    done = [t.column("uri") for t in rs.iter_receipts(["uri"])]
    if not done:
        return list(plan.files), 0
    st = ix.IndexState.of_keys(*ix.uri_hashes(pa.chunked_array(done)))
    fs, root = storage.pyarrow(join(rs.staging, f"todo-{rs.attempt:02d}"))
    ensure_dir(fs, root)
    out = []
    for path in plan.files:
        t = pq.read_table(path, filesystem=fs)
        q1, q2 = ix.uri_hashes(t.column("uri"))
        left = st.lookup(q1, q2) < 0
        if left.any():
            dest = f"{root}/part-{len(out):05d}.parquet"
            pq.write_table(t.filter(pa.array(left)), dest, filesystem=fs, compression="zstd")
            out.append(dest)
    return out, len(st.h1)


def commit(storage: Storage, output: str, rs: RunState, plan: pl.Plan, metadata: dict, retries: int) -> dict:
    """Merge the staged rows and the deletions into the tables (idempotent; see table.py)."""
    def results() -> Iterator[pa.RecordBatch]:
        for t in rs.iter_receipts():
            yield from t.to_batches(max_chunksize=65_536)

    def deleted() -> Iterator[pa.RecordBatch]:
        if plan.deleted:
            fs, _ = storage.pyarrow(rs.staging)
            yield from pq.read_table(plan.deleted["path"], filesystem=fs).cast(DELETED_SCHEMA).to_batches()

    t0 = time.perf_counter()
    merges = tb.commit_run(storage, output, rs.run_id, results=results, deleted=deleted, metadata=metadata,
                           errors_to_tags=plan.from_errors > 0, retries=retries)
    out = {"seconds": round(time.perf_counter() - t0, 3), "versions": tb.versions(storage, output), "steps": {}}
    for step, m in merges.items():
        if m is None:
            out["steps"][step] = "committed by an earlier attempt"
            continue
        out["steps"][step] = {k: m.get(k) for k in (
            "version", "attempts", "num_target_rows_inserted", "num_target_rows_updated", "num_target_rows_deleted",
            "num_target_rows_copied", "num_target_files_added", "num_target_files_removed")}
    # the versions this run produced (a reopen could show a later run's commit on top)
    for step in ("1-errors", "2-tags", "3-errors"):
        m = out["steps"].get(step)
        if isinstance(m, dict) and m.get("version") is not None:
            out["versions"][step.split("-", 1)[1]] = m["version"]
    out["bytes_rewritten"] = rewritten_bytes(storage, output, out["steps"])
    return out


def rewritten_bytes(storage: Storage, output: str, steps: dict) -> dict:
    """Bytes of data files each commit removed (rewritten elsewhere) and added, from its log entry."""
    out = {}
    for step, m in steps.items():
        if not isinstance(m, dict) or m.get("version") is None:
            continue
        kind = "tags" if "tags" in step else "errors"
        fs, path = storage.pyarrow(join(output, kind, "_delta_log", f"{m['version']:020d}.json"))
        removed = added = 0
        try:
            with fs.open_input_stream(path) as f:
                for line in f.read().decode().splitlines():
                    a = json.loads(line)
                    if "remove" in a:
                        removed += int(a["remove"].get("size") or 0)
                    elif "add" in a:
                        added += int(a["add"].get("size") or 0)
        except (OSError, ValueError):
            continue
        out[step] = {"removed_bytes": removed, "added_bytes": added}
    return out


def upkeep(storage: Storage, output: str, cfg) -> dict:
    """Optimize every `table.optimize_every` merges, and vacuum after it (config `table`)."""
    tc = cfg.table
    if not tc.optimize_every:
        return {}
    dt = tb.open_table(storage, output, "tags")
    if dt is None or tb.commits_since_optimize(dt) < tc.optimize_every:
        return {}
    return tb.maintain(storage, output, optimize=True, vacuum_hours=tc.vacuum_retention_hours,
                       target_file_size=tc.target_file_size)

"""`ramplus maintain` and `ramplus migrate`: the tables' upkeep, and leaving the old layout.

maintain: compaction and vacuum on the operator's schedule (`table.optimize_every: 0`),
the same calls a run makes every `optimize_every` commits.

migrate: an output of ramplus before the Delta tables (`tags/run_date=.../shard=...`,
`errors/`, `tombstones/`, `_runs/<id>._SUCCESS`) into the two tables. Only rows of committed
runs count; per image the newest event wins (a tombstone after its row means deleted). The
old layout did not keep every column the tables have: `version` is rebuilt as the listing
would give it (the ETag, or size and mtime for local files), error rows get none (so the
next run retries them), and the token cache pointers are dropped. The old files stay where
they are, for the operator to delete once the tables are checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError
from . import manifest as mf
from . import table as tb
from .config import StorageConfig, redact_uri
from .index import version_strings
from .schemas import DELETED_SCHEMA, RESULT_SCHEMA, TS
from .storage import Storage, join
from .writer import shard_of


def _old_rows(storage: Storage, output: str, sub: str) -> Optional[pa.Table]:
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, root = storage.pyarrow(join(output, sub))
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    return pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()


def _committed(storage: Storage, output: str) -> dict[str, dict]:
    """run_id -> its manifest, for runs with a `_SUCCESS` marker."""
    import pyarrow.fs as pafs

    from .manifest import get_json

    fs, root = storage.pyarrow(join(output, "_runs"))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    ids = [i.base_name[:-len("._SUCCESS")] for i in infos if i.base_name.endswith("._SUCCESS")]
    return {r: get_json(storage, join(output, "_runs", f"{r}.json")) or {} for r in ids}


def migrate(storage: Storage, output: str, shards: int = 8) -> dict:
    runs = _committed(storage, output)
    if not runs:
        raise ConfigError(f"migrate: {output} has no committed run of the old layout (_runs/*._SUCCESS)")
    if tb.open_table(storage, output, "tags") is not None:
        raise ConfigError(f"migrate: {output} already has a tags table; nothing to do")
    ok = pa.array(sorted(runs), pa.string())
    events: dict[str, tuple] = {}  # uri -> (run_id, kind, row index)
    tables = {}
    for kind in ("tags", "errors", "tombstones"):
        t = _old_rows(storage, output, kind)
        if t is None:
            continue
        t = t.filter(pc.is_in(t.column("run_id"), value_set=ok))
        tables[kind] = t
        for i, (u, r) in enumerate(zip(t.column("uri").to_pylist(), t.column("run_id").to_pylist())):
            if u not in events or r >= events[u][0]:
                events[u] = (r, kind, i)
    keep = {k: sorted(i for (_, kind, i) in events.values() if kind == k) for k in ("tags", "errors")}
    parts = []
    for kind, idx in keep.items():
        if not idx:
            continue
        t = tables[kind].take(pa.array(idx, pa.int64()))
        parts.append(_as_result(t, kind, runs, shards))
    rows = pa.concat_tables(parts) if parts else RESULT_SCHEMA.empty_table()
    tb.ensure_tables(storage, output, shards, migrating=True)
    started = datetime.now(timezone.utc)
    run_id = mf.new_run_id(started, "migrat")  # sorts with the job's run ids, after the migrated runs
    empty = DELETED_SCHEMA.empty_table()
    res = tb.commit_run(storage, output, run_id, results=lambda: iter(rows.to_batches(max_chunksize=65_536)),
                        deleted=lambda: iter(empty.to_batches()), metadata={"run_id": run_id, "migrated_runs": len(runs)},
                        errors_to_tags=False, retries=0)
    tagged = rows.column("error").null_count
    steps = {k: {"version": v and v.get("version")} for k, v in res.items()}
    report = {"runs": len(runs), "tagged": tagged, "errors": rows.num_rows - tagged,
              "deleted_skipped": sum(1 for e in events.values() if e[1] == "tombstones"),
              "versions": tb.versions(storage, output), "steps": steps}
    # a manifest like a run's, so the evaluation tools and `_runs/` readers find the tables' versions
    mf.commit(storage, output, run_id, {
        "manifest_version": mf.MANIFEST_VERSION, "run_id": run_id, "status": "committed", "kind": "migrate",
        "started_at": started.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
        "output": redact_uri(output), "migrated_runs": sorted(runs),
        "counts": {"tagged": tagged, "errors": rows.num_rows - tagged},
        "tables": {"versions": report["versions"], "steps": steps}})
    report["run_id"] = run_id
    return report


def _as_result(t: pa.Table, kind: str, runs: dict, shards: int) -> pa.Table:
    n = t.num_rows
    cols = {f.name: t.column(f.name) if f.name in t.column_names else pa.nulls(n, f.type) for f in RESULT_SCHEMA}
    uris = t.column("uri").to_pylist()
    cols["shard"] = pa.array(shard_of(uris, shards), pa.int32())
    run_ids = t.column("run_id").to_pylist()
    finished = [runs[r].get("finished_at") for r in run_ids]
    when = pa.array([datetime.fromisoformat(f) if f else None for f in finished], TS)
    if kind == "tags":
        local = pc.starts_with(t.column("uri"), "file://")
        etag = pc.if_else(local, pa.scalar(None, pa.string()), t.column("etag"))
        cols["version"] = version_strings(etag, t.column("size"), t.column("mtime"))
        floors = [((runs[r].get("config") or {}).get("inference") or {}).get("score_floor") for r in run_ids]
        cols["score_floor"] = pa.array(floors, pa.float32())
        cols["tagged_at"] = when
    else:
        cols["failed_at"] = when
        cols["model_id"] = pa.array([runs[r].get("model_id") for r in run_ids], pa.string())
    return pa.table([cols[f.name].cast(f.type) for f in RESULT_SCHEMA], schema=RESULT_SCHEMA)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ramplus maintain|migrate",
                                description="Upkeep of a tagging job's Delta tables, or converting an old output.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("maintain", help="compact the tables' small files and vacuum old ones")
    m.add_argument("output", metavar="OUTPUT", help="the job's --output (local path or s3://...)")
    m.add_argument("--no-optimize", action="store_true", help="skip compaction")
    m.add_argument("--vacuum-hours", type=float, default=None, metavar="H",
                   help="delete files no version of the last H hours needs (default: no vacuum); under 168 "
                        "shortens time travel")
    m.add_argument("--target-file-size", type=int, default=None, metavar="BYTES")
    g = sub.add_parser("migrate", help="convert an output of the layout before Delta tables (committed runs only)")
    g.add_argument("output", metavar="OUTPUT")
    g.add_argument("--shards", type=int, default=8, help="partitions of the new tables (default 8)")
    args = p.parse_args(argv)
    storage = Storage.from_config(StorageConfig())  # the AWS_* environment, as the job's defaults
    try:
        if args.command == "maintain":
            if tb.open_table(storage, args.output, "tags") is None:
                raise ConfigError(f"maintain: no tags table under {args.output}")
            out = tb.maintain(storage, args.output, optimize=not args.no_optimize, vacuum_hours=args.vacuum_hours,
                              target_file_size=args.target_file_size)
        else:
            out = migrate(storage, args.output, args.shards)
    except ConfigError as e:
        print(f"ramplus: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0

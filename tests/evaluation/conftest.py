"""Runs for the evaluation tests: synthetic ones in the job's exact layout, and one real run.

Synthetic runs are written through the job's own commit path (its schemas, the Delta merges
of table.commit_run, the manifest writer), so a change to the output format breaks these
tests instead of leaving them testing a stale copy. The real run is the tagging job itself
(local Ray, golden tiny checkpoint) over the golden images and one broken file, shared by
the end-to-end tests of this folder.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "tiny"
CHECKPOINT = GOLDEN / "ram_plus_checkpoint.pth"


def write_run(output: Path, rows: Sequence[dict], errors: Sequence[dict] = (), *, run_id: str = "20260101T000000Z-aaaaaa",
              floor: float = 0.0, vocab_size: Optional[int] = None, commit: bool = True, failed: bool = False,
              deleted: Sequence[str] = (), shards: int = 4, vocab_id: str = "v" * 16,
              thresholds: Optional[dict] = None) -> str:
    """A run through the job's own commit path: rows merged into the Delta tables, then the manifest.

    rows: {uri, scores: {tag: p}, tags: [..]} (+ optional width/height/size); errors: {uri,
    error, stage}; deleted: uris the run found gone from the store. `commit=False` leaves the
    rows staged under `_staging/<run_id>/` as a run killed before its commit does (nothing
    merged, no manifest; `failed=True` adds the FAILED manifest of a run whose check failed).
    `thresholds` ({tag: t}) writes the vocabulary descriptor `_vocab/<vocab_id>.json`.
    """
    from datetime import datetime, timezone

    from ramplus_core.job import commit as cm
    from ramplus_core.job import manifest as mf
    from ramplus_core.job import table as tb
    from ramplus_core.job.schemas import DELETED_SCHEMA, RESULT_SCHEMA
    from ramplus_core.job.storage import Storage
    from ramplus_core.job.writer import shard_of

    storage, out = Storage(), str(output)
    n = tb.ensure_tables(storage, out, shards)["shards"]
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    recs = []
    for r in rows:
        scores = sorted(r["scores"].items(), key=lambda kv: -kv[1])
        recs.append({"uri": r["uri"], "size": r.get("size", 1000), "etag": "0" * 32, "version": "0" * 32,
                     "width": r.get("width", 64), "height": r.get("height", 48), "tags": list(r["tags"]),
                     "scores": [{"tag": t, "score": float(s)} for t, s in scores], "model_id": "m" * 16,
                     "vocab_id": vocab_id, "score_floor": floor, "run_id": run_id, "tagged_at": now})
    for e in errors:
        recs.append({"uri": e["uri"], "size": e.get("size", 10), "etag": "1" * 32, "version": "1" * 32,
                     "error": e["error"], "stage": e["stage"], "model_id": "m" * 16, "run_id": run_id,
                     "failed_at": now})
    for r in recs:
        r["shard"] = int(shard_of([r["uri"]], n)[0])
    staged = pa.Table.from_pylist(recs, schema=RESULT_SCHEMA)
    gone = pa.table({"uri": pa.array(list(deleted), pa.string()),
                     "shard": pa.array(shard_of(list(deleted), n), pa.int32())}, schema=DELETED_SCHEMA)
    if thresholds is not None:
        from ramplus_core.job.vocab import save_descriptor

        names = list(thresholds)
        save_descriptor(storage, out, {"vocab_id": vocab_id, "names": names, "identities": names,
                                       "thresholds": [float(np.float32(thresholds[t])) for t in names]})
    n_tags = vocab_size if vocab_size is not None else len({t for r in rows for t in r["scores"]})
    manifest = {
        "manifest_version": 1, "run_id": run_id, "status": "committed",
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00",
        "output": out, "inputs": ["/photos/"], "checkpoint": "/models/ram_plus.pth",
        "model_id": "m" * 16, "vocab_id": vocab_id,
        "vocabulary": {"tags": n_tags, "descriptions_per_tag": 51, "object_bytes": 0},
        "counts": {"listed": len(rows) + len(errors), "tagged": len(rows), "errors": len(errors), "skipped": 0,
                   "errors_by_stage": dict(collections.Counter(e["stage"] for e in errors))},
        "invariant": {"ok": True, "detail": ""}, "images_per_s": 12.5, "timings_s": {"pipeline": 4.0, "total": 6.0},
        "resources": {"actors": 1, "device": "cpu", "cluster_cpus": 2, "cluster_gpus": 0, "nodes": 1},
        "config": {"inference": {"score_floor": floor}},
    }
    if not commit:
        done = output / "_staging" / run_id / "done"
        done.mkdir(parents=True, exist_ok=True)
        pq.write_table(staged, done / "00-00000.parquet")
        if failed:
            mf.write_failed(storage, out, run_id, dict(manifest, status="failed",
                                                        invariant={"ok": False, "detail": "made up"}))
        return run_id
    was_error = False
    errs = tb.open_table(storage, out, "errors")
    if errs is not None and rows:
        have = set(errs.to_pyarrow_table(columns=["uri"]).column("uri").to_pylist())
        was_error = any(r["uri"] in have for r in rows)
    merges = tb.commit_run(storage, out, run_id, results=lambda: iter(staged.to_batches()),
                           deleted=lambda: iter(gone.to_batches()), metadata={"run_id": run_id},
                           errors_to_tags=was_error, retries=2)
    tables = {"seconds": 0.1, "versions": tb.versions(storage, out), "steps": {}}
    for step, m in merges.items():  # as commit.commit records them
        tables["steps"][step] = "committed by an earlier attempt" if m is None else {
            k: m.get(k) for k in ("version", "attempts", "num_target_rows_inserted", "num_target_rows_updated",
                                  "num_target_rows_deleted", "num_target_rows_copied")}
    for step in ("1-errors", "2-tags", "3-errors"):
        m = tables["steps"].get(step)
        if isinstance(m, dict) and m.get("version") is not None:
            tables["versions"][step.split("-", 1)[1]] = m["version"]
    tables["bytes_rewritten"] = cm.rewritten_bytes(storage, out, tables["steps"])
    manifest["tables"] = tables
    mf.commit(storage, out, run_id, manifest)
    return run_id


def brute_force_ap(scores, labels) -> float:
    """AP written the slow way: for each positive, precision among images scoring >= it."""
    scores = [float(s) for s in scores]
    pos = [i for i, y in enumerate(labels) if y]
    if not pos:
        return float("nan")
    total = 0.0
    for i in pos:
        above = [j for j in range(len(scores)) if scores[j] >= scores[i]]
        total += sum(1 for j in above if labels[j]) / len(above)
    return total / len(pos)


# -- the real run ------------------------------------------------------------------------------

@dataclass
class RealRun:
    output: Path
    images: Path
    run_id: str
    manifest: dict
    names: list
    thresholds: list


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def real_run(ray_session, tmp_path_factory) -> RealRun:
    """The tagging job over the golden images (two copies of one under other names) and a broken file."""
    import yaml

    from ramplus_core.job import load_config, run

    base = tmp_path_factory.mktemp("real")
    images = base / "images"
    images.mkdir()
    for p in sorted((GOLDEN / "images").iterdir()):
        shutil.copy(p, images / p.name)
    img = Image.open(GOLDEN / "images" / "rgb_640x480.jpg").convert("RGB")
    for name, angle in (("rotated_a.jpg", 90), ("rotated_b.jpg", 180)):
        buf = io.BytesIO()
        img.rotate(angle, expand=True).save(buf, format="JPEG", quality=85)
        (images / name).write_bytes(buf.getvalue())
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    exp = json.loads((GOLDEN / "expected.json").read_text())
    thresholds = base / "thresholds.tsv"
    thresholds.write_text("".join(f"{t}\t{v}\n" for t, v in zip(exp["tags"], exp["thresholds"])))
    cfg_path = base / "job.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "decode": {"batch_size": 4}, "inference": {"batch_size": 4, "score_floor": 0.0},
        "vocabulary": {"thresholds_file": str(thresholds)}, "layout": {"shards": 2},
        "ray": {"progress_bars": False, "progress_interval_s": 5.0}}))
    out = base / "out"
    cfg = load_config(str(cfg_path), inputs=[str(images)], output=str(out), checkpoint=str(CHECKPOINT))
    result = run(cfg, emit=lambda s: None)
    return RealRun(out, images, result.run_id, result.manifest, list(exp["tags"]), list(exp["thresholds"]))

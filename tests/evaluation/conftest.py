"""Runs for the evaluation tests: synthetic ones in the job's exact layout, and one real run.

Synthetic runs are written with the job's own schema objects and commit function, so a
change to the output format breaks these tests instead of leaving them testing a stale
copy. The real run is the tagging job itself (local Ray, golden tiny checkpoint) over the
golden images and one broken file, shared by the end-to-end tests of this folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "tiny"
CHECKPOINT = GOLDEN / "ram_plus_checkpoint.pth"


def write_run(output: Path, rows: Sequence[dict], errors: Sequence[dict] = (), *, run_id: str = "20260101T000000Z-aaaaaa",
              floor: float = 0.0, vocab_size: Optional[int] = None, commit: bool = True, files_per_kind: int = 2,
              list_files: bool = True) -> str:
    """A run in the job's layout. rows: {uri, scores: {tag: p}, tags: [..]} (+ optional width/height/size)."""
    from ramplus_core.job import manifest as mf
    from ramplus_core.job.storage import Storage
    from ramplus_core.job.writer import ERRORS_SCHEMA, TAGS_SCHEMA

    def tag_row(r):
        scores = sorted(r["scores"].items(), key=lambda kv: -kv[1])
        return {"uri": r["uri"], "size": r.get("size", 1000), "etag": "0" * 32, "mtime": None,
                "width": r.get("width", 64), "height": r.get("height", 48), "tags": list(r["tags"]),
                "scores": [{"tag": t, "score": float(s)} for t, s in scores], "model_id": "m" * 16,
                "vocab_id": "v" * 16, "run_id": run_id}

    written = []
    for kind, items, schema in (("tags", [tag_row(r) for r in rows], TAGS_SCHEMA),
                                ("errors", [dict(e, run_id=run_id) for e in errors], ERRORS_SCHEMA)):
        chunks = [items[i::files_per_kind] for i in range(files_per_kind)]
        for i, chunk in enumerate(c for c in chunks if c):
            rel = f"{kind}/run_date=2026-01-01/shard={i:02d}/part-{run_id}-{i:05d}.parquet"
            p = output / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(chunk, schema=schema), p)
            written.append({"kind": kind, "path": rel, "rows": len(chunk), "bytes": p.stat().st_size})
    n_tags = vocab_size if vocab_size is not None else len({t for r in rows for t in r["scores"]})
    manifest = {
        "manifest_version": 1, "run_id": run_id, "status": "committed",
        "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:01:00+00:00",
        "output": str(output), "inputs": ["/photos/"], "checkpoint": "/models/ram_plus.pth",
        "model_id": "m" * 16, "vocab_id": "v" * 16,
        "vocabulary": {"tags": n_tags, "descriptions_per_tag": 51, "object_bytes": 0},
        "counts": {"listed": len(rows) + len(errors), "tagged": len(rows), "errors": len(errors), "skipped": 0,
                   "errors_by_stage": {}},
        "invariant": {"ok": True, "detail": ""}, "images_per_s": 12.5, "timings_s": {"pipeline": 4.0, "total": 6.0},
        "resources": {"actors": 1, "device": "cpu", "cluster_cpus": 2, "cluster_gpus": 0, "nodes": 1},
        "config": {"inference": {"score_floor": floor}},
    }
    if list_files:
        manifest["files"] = {"tags": [f for f in written if f["kind"] == "tags"],
                             "errors": [f for f in written if f["kind"] == "errors"]}
    if commit:
        mf.commit(Storage(), str(output), run_id, manifest)
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

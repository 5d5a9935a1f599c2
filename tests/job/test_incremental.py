"""Nightly runs over a real S3 server: only new work, deletions for what is gone, the tables as the current view."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ramplus_core.job import load_config, run
from ramplus_core.job import table as tb
from ramplus_core.job.storage import Storage

from .conftest import CHECKPOINT, GOLDEN, job_config, run_tag_bucket, table_rows


def tiny_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def current_view(output: str, storage: Storage) -> dict:
    """uri -> (table, run_id) over both tables' current rows; an image twice would be a bug."""
    cur: dict = {}
    for kind in ("tags", "errors"):
        t = table_rows(output, kind, storage, columns=["uri", "run_id"])
        for u, r in zip(t.column("uri").to_pylist(), t.column("run_id").to_pylist()):
            assert u not in cur, f"{u} is in both tables"
            cur[u] = (kind, r)
    return cur


@pytest.mark.slow
def test_nightly_runs_do_only_new_work(ray_local, s3_server, tmp_path):
    fs = s3_server.fs()
    prefix = f"{s3_server.bucket}/nightly/in"
    objects = {f"{prefix}/img_{i:03d}.jpg": tiny_jpeg(i) for i in range(98)}
    objects[f"{prefix}/bad/corrupt.jpg"] = b"\xff\xd8\xff not really a jpeg"
    objects[f"{prefix}/bad/empty.jpg"] = b""
    fs.pipe(objects)
    output = f"s3://{s3_server.bucket}/nightly/out/"
    storage = Storage(endpoint_url=s3_server.endpoint, access_key_id=s3_server.key,
                      secret_access_key=s3_server.secret, region="us-east-1")
    conf = job_config(tmp_path, storage=s3_server.storage_config(), decode={"batch_size": 16},
                      inference={"batch_size": 16}, layout={"shards": 2})

    def go():
        cfg = load_config(str(conf), inputs=[f"s3://{prefix}/"], output=output, checkpoint=str(CHECKPOINT))
        return run(cfg, emit=lambda s: None).manifest

    m1 = go()
    assert (m1["counts"]["tagged"], m1["counts"]["errors"], m1["counts"]["incremental"]["new"]) == (98, 2, 100)

    m2 = go()
    inc = m2["counts"]["incremental"]
    assert (m2["counts"]["tagged"], m2["counts"]["errors"], inc["already_done"], inc["work"]) == (0, 0, 100, 0), \
        "decode errors of unchanged objects are not retried"
    assert m2["actors"] == [] and m2["timings_s"]["pipeline"] == 0, "no work: no Ray pipeline at all"

    fs.pipe({f"{prefix}/new_{i}.jpg": tiny_jpeg(1000 + i) for i in range(5)})
    fs.pipe({f"{prefix}/img_000.jpg": tiny_jpeg(2000), f"{prefix}/img_001.jpg": tiny_jpeg(2001)})
    fs.pipe({f"{prefix}/img_002.jpg": objects[f"{prefix}/img_002.jpg"]})  # re-uploaded, same bytes: same ETag
    m3 = go()
    inc = m3["counts"]["incremental"]
    assert (m3["counts"]["tagged"], inc["new"], inc["changed"], inc["already_done"]) == (7, 5, 2, 98)
    assert m3["model_work"]["backbone_images"] == 7

    fs.rm([f"{prefix}/img_010.jpg", f"{prefix}/img_011.jpg", f"{prefix}/bad/empty.jpg"])
    m4 = go()
    inc = m4["counts"]["incremental"]
    assert (m4["counts"]["tagged"], inc["deleted"], inc["already_done"]) == (0, 3, 102)
    gone = {f"s3://{prefix}/{k}" for k in ("bad/empty.jpg", "img_010.jpg", "img_011.jpg")}
    steps = m4["tables"]["steps"]
    assert steps["1-errors"]["num_target_rows_deleted"] == 1 and steps["2-tags"]["num_target_rows_deleted"] == 2
    tags = tb.open_table(storage, output, "tags")
    feed = pa.table(tags.load_cdf(starting_version=m4["tables"]["versions"]["tags"]))
    assert {u for u, k in zip(feed.column("uri").to_pylist(), feed.column("_change_type").to_pylist())
            if k == "delete"} == gone - {f"s3://{prefix}/bad/empty.jpg"}

    # the current view: every listed image exactly once, from the run that last dealt with it
    cur = current_view(output, storage)
    assert len(cur) == 102 and not gone & set(cur)
    assert {v[1] for u, v in cur.items() if "/new_" in u or u.endswith(("img_000.jpg", "img_001.jpg"))} == {m3["run_id"]}
    assert cur[f"s3://{prefix}/img_002.jpg"][1] == m1["run_id"]
    # time travel: the version before the deletions still has them
    before = tb.open_table(storage, output, "tags", version=m3["tables"]["versions"]["tags"])
    assert gone - {f"s3://{prefix}/bad/empty.jpg"} <= set(before.to_pyarrow_table(columns=["uri"]).column("uri").to_pylist())


def test_a_small_work_set_runs_in_the_driver(tmp_path):
    """A nightly run with few changes on one machine: no Ray started, same rows, receipts, index."""
    import shutil

    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(GOLDEN / "images", src)
    (src / "broken.jpg").write_bytes(b"not an image")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RAY_ADDRESS", None)
    res = run_tag_bucket("--config", str(job_config(tmp_path)), "--input", str(src), "--output", str(out),
                         "--checkpoint", str(CHECKPOINT), "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "in the driver" in res.stdout and "ray:" not in res.stdout
    (manifest,) = [p for p in (out / "_runs").iterdir() if p.name.endswith(".json")]
    m = json.loads(manifest.read_text())
    assert m["resources"]["in_driver"] and (m["counts"]["tagged"], m["counts"]["errors"]) == (6, 1)
    assert m["model_work"]["backbone_images"] == 6 and m["invariant"]["ok"]
    assert len(current_view(str(out), Storage())) == 7

"""A run killed at any point and started again finishes without redoing or doubling anything."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest

from ramplus_core.job import committed_runs, load_config, read_manifest, run
from ramplus_core.job import listing as listing_mod
from ramplus_core.job import runner as runner_mod

from .conftest import CHECKPOINT, REPO, job_config, stop_session
from .test_incremental import tiny_jpeg


def committed_rows(out) -> dict:
    """uri -> [run_id, ...] over every committed row in tags/ and errors/, as a folder-globbing reader sees it."""
    runs = set(committed_runs(str(out)))
    seen: dict = {}
    for kind in ("tags", "errors"):
        if not (out / kind).exists():
            continue
        t = pads.dataset(str(out / kind), format="parquet", partitioning="hive").to_table(columns=["uri", "run_id"])
        for u, r in zip(t.column("uri").to_pylist(), t.column("run_id").to_pylist()):
            if r in runs:
                seen.setdefault(u, []).append(r)
    return seen


def make_images(src, n: int) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (src / f"img_{i:03d}.jpg").write_bytes(tiny_jpeg(500 + i))
    (src / "broken.jpg").write_bytes(b"not an image")


@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun(ray_local, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_images(src, 39)
    # small write tasks, so receipts (and data files) appear while most of the work is left
    conf = job_config(tmp_path, layout={"rows_per_file": 4, "shards": 2}, decode={"batch_size": 4},
                      inference={"batch_size": 4})
    cmd = [sys.executable, str(REPO / "jobs" / "tag_bucket.py"), "--config", str(conf), "--input", str(src),
           "--output", str(out), "--checkpoint", str(CHECKPOINT), "--ray-address", "local",
           "--set", "ray.num_cpus=2", "--set", "inference.driver_max_images=0", "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not glob.glob(str(out / "_staging" / "*" / "done" / "*.parquet")):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no write task finished in time"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        stop_session(proc.pid)  # what the driver's embedded Ray left running (the node went away)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert committed_runs(str(out)) == [], "killed before its commit"
    killed = os.listdir(out / "_staging")
    assert len(killed) == 1

    cfg = load_config(str(conf), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
    lines: list[str] = []
    m = run(cfg, emit=lines.append).manifest
    assert m["run_id"] == killed[0] and m["resume"]["attempt"] == 2 and m["resume"]["resumed"]
    kept = m["resume"]["kept_rows"]
    assert 0 < kept < 40, "some work was done and kept, some was left"
    assert m["model_work"]["backbone_images"] <= 40 - kept, "committed work is not redone"
    assert (m["counts"]["tagged"], m["counts"]["errors"]) == (39, 1) and m["invariant"]["ok"]
    assert any(line.startswith("resuming run") for line in lines)

    # readers: every image exactly once, no file nobody vouches for, no half-written file
    seen = committed_rows(out)
    assert len(seen) == 40 and all(v == [m["run_id"]] for v in seen.values())
    listed = {f["path"] for k in ("tags", "errors") for f in m["files"][k]}
    on_disk = {str(p.relative_to(out)) for k in ("tags", "errors") for p in (out / k).rglob("*") if p.is_file()}
    assert on_disk == listed, f"orphans left: {on_disk - listed}"
    assert {p.split("-")[-2] for p in listed} <= {"01", "02"} and any(p.split("-")[-2] == "01" for p in listed)
    assert not (out / "_staging").exists()
    assert read_manifest(str(out), m["run_id"])["resume"]["kept_rows"] == kept


def test_crash_while_listing_and_after_planning(ray_local, tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    make_images(src, 7)
    conf = job_config(tmp_path, listing={"rows_per_file": 3})

    def go():
        cfg = load_config(str(conf), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
        lines: list[str] = []
        return run(cfg, emit=lines.append), lines

    class Killed(BaseException):
        """Stands in for SIGKILL: nothing in the job catches it."""

    real_flush = listing_mod._ShardWriter.flush
    calls = []

    def dying_flush(self):
        calls.append(1)
        if len(calls) == 2:
            raise Killed()
        return real_flush(self)

    monkeypatch.setattr(listing_mod._ShardWriter, "flush", dying_flush)
    with pytest.raises(Killed):
        go()
    monkeypatch.undo()
    (run_id,) = os.listdir(out / "_staging")
    assert not (out / "_staging" / run_id / "listing.json").exists()

    def dying_pipeline(*a, **k):
        raise Killed()

    monkeypatch.setattr(runner_mod, "run_pipeline", dying_pipeline)
    with pytest.raises(Killed):
        go()
    monkeypatch.undo()
    assert (out / "_staging" / run_id / "plan.json").exists()

    result, lines = go()
    m = result.manifest
    assert m["run_id"] == run_id and m["resume"]["attempt"] == 3
    assert any("listing done, plan done" in line for line in lines)
    assert (m["counts"]["tagged"], m["counts"]["errors"]) == (7, 1)
    seen = committed_rows(out)
    assert len(seen) == 8 and all(len(v) == 1 for v in seen.values())
    assert committed_runs(str(out)) == [run_id]


def test_a_live_run_is_not_taken_over(tmp_path):
    from ramplus_core.errors import ConfigError
    from ramplus_core.job.state import open_run, resume_key
    from ramplus_core.job.storage import Storage

    src, out = tmp_path / "in", tmp_path / "out"
    make_images(src, 1)
    cfg = load_config(str(job_config(tmp_path)), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
    key = resume_key(cfg, "m", "v")
    from datetime import datetime, timezone

    first = open_run(Storage(), cfg, key, datetime.now(timezone.utc), lambda s: None)
    # the same process stands in for a driver that is still running elsewhere: refuse, do not join
    first.put_json("heartbeat.json", {"host": "another-host", "pid": 1, "at": time.time()})
    with pytest.raises(ConfigError, match="may still be running"):
        open_run(Storage(), cfg, key, datetime.now(timezone.utc), lambda s: None)
    first.put_json("heartbeat.json", {"host": "another-host", "pid": 1, "at": time.time() - 3600})
    again = open_run(Storage(), cfg, key, datetime.now(timezone.utc), lambda s: None)
    assert (again.run_id, again.attempt) == (first.run_id, 2)
    other = open_run(Storage(), cfg, resume_key(cfg, "m", "other-vocab"), datetime.now(timezone.utc), lambda s: None)
    assert other.run_id != first.run_id and other.attempt == 1

"""A run killed at any point and started again finishes without redoing or doubling anything."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from ramplus_core.job import committed_runs, load_config, read_manifest, run
from ramplus_core.job import listing as listing_mod
from ramplus_core.job import pipeline as pipeline_mod
from ramplus_core.job import table as table_mod
from ramplus_core.job.storage import Storage

from .conftest import CHECKPOINT, REPO, job_config, stop_session, table_rows
from .test_incremental import tiny_jpeg


def committed_rows(out) -> dict:
    """uri -> [run_id, ...] over the current rows of both tables, as any Delta reader sees them."""
    seen: dict = {}
    for kind in ("tags", "errors"):
        t = table_rows(out, kind, columns=["uri", "run_id"])
        for u, r in zip(t.column("uri").to_pylist(), t.column("run_id").to_pylist()):
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

    # readers: every image exactly once; the killed attempt's staged rows were committed too
    seen = committed_rows(out)
    assert len(seen) == 40 and all(v == [m["run_id"]] for v in seen.values())
    attempts = {f["path"].rsplit("/", 1)[-1][:2] for f in m["staged_files"]}
    assert attempts <= {"01", "02"} and "01" in attempts
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

    monkeypatch.setattr(pipeline_mod, "run_pipeline", dying_pipeline)
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


def test_killed_between_its_table_commits_then_resumed(ray_local, tmp_path, monkeypatch):
    """Killed after the errors commit, before the tags commit: a reader may see the new errors
    early, never lose an image; the resumed run makes only the commits that are missing."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_images(src, 5)
    conf = job_config(tmp_path)

    def go():
        cfg = load_config(str(conf), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
        return run(cfg, emit=lambda s: None)

    class Killed(BaseException):
        pass

    real = table_mod._merge

    def dying(storage, output, kind, run_id, step, *a, **k):
        if step == "2-tags":
            raise Killed()
        return real(storage, output, kind, run_id, step, *a, **k)

    monkeypatch.setattr(table_mod, "_merge", dying)
    with pytest.raises(Killed):
        go()
    monkeypatch.undo()
    assert committed_runs(str(out)) == []
    assert table_rows(out, "tags").num_rows == 0 and table_rows(out, "errors").num_rows == 1
    errors_version = table_mod.versions(Storage(), str(out))["errors"]
    m = go().manifest
    assert m["resume"]["attempt"] == 2 and m["model_work"].get("backbone_images", 0) == 0, "nothing is tagged again"
    assert m["tables"]["steps"]["1-errors"] == "committed by an earlier attempt"
    assert m["tables"]["versions"]["errors"] == errors_version
    seen = committed_rows(out)
    assert len(seen) == 6 and all(v == [m["run_id"]] for v in seen.values())


def test_a_live_run_is_not_taken_over(tmp_path):
    from ramplus_core.errors import ConfigError
    from ramplus_core.job.state import open_run, resume_key

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


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_output(tmp_path):
    """Both tag everything; whichever commits second merges on top: each image once."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_images(src, 30)
    conf = job_config(tmp_path)
    cmd = [sys.executable, str(REPO / "jobs" / "tag_bucket.py"), "--config", str(conf), "--input", str(src),
           "--output", str(out), "--checkpoint", str(CHECKPOINT), "--set", "incremental.resume=false", "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    codes = [p.returncode for p in procs]
    assert all(c in (0, 4) for c in codes) and 0 in codes, outs
    seen = committed_rows(out)
    assert len(seen) == 31 and all(len(v) == 1 for v in seen.values())
    if codes == [0, 0]:
        assert len(committed_runs(str(out))) == 2

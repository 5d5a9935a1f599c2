"""Nodes lost while the job runs (issue 14, item 2): a worker node killed under a batch (its
replica is restarted on a surviving node, its batch redone, every image lands once), the
last GPU node killed (the run fails in one sentence; the next run resumes and redoes none of
the staged work), and the job's driver killed under `ray job submit` (the next submission resumes)."""

from __future__ import annotations

import collections
import signal
import time
from pathlib import Path

import pytest

from ..test_faults import assert_each_exactly_once, rows_of_run
from .conftest import manifest, small_jpegs, staged_rows, start_job, wait_for

pytestmark = pytest.mark.slow


def _exactly_once(out: Path, listed: set, m: dict) -> None:
    from ramplus_core.job.storage import Storage

    c = m["counts"]
    assert c["listed"] == c["tagged"] + c["errors"] == len(listed) and c["errors"] == 0, c
    tags, errors = rows_of_run(str(out), Storage(), m["run_id"])
    assert_each_exactly_once(listed, tags, errors)  # no duplicates in the Delta tables


def test_node_lost_under_a_batch_replica_restarts_on_a_surviving_node(ray_cluster, tmp_path):
    c = ray_cluster()
    workers = [c.add_worker() for _ in range(3)]  # 1 GPU each: two replicas, one spare node
    listed = small_jpegs(tmp_path / "in", 24)
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()
    t0 = time.time()
    job = start_job(c.address, tmp_path / "in", out, hold, **{"inference.actors": 2})
    wait_for(lambda: sum(c.busy(n) for n in workers) == 2, 300, "both replicas inside a batch", job)
    victim = next(n for n in workers if c.busy(n))
    lost_id = victim.node_id
    c.kill(victim)  # raylet and workers SIGKILLed while its replica holds a batch
    t_kill = time.time() - t0
    spare = next(n for n in workers if n is not victim and not c.replicas(n))
    wait_for(lambda: c.busy(spare) >= 1, 300, "the lost replica restarted on the spare node, inside a batch", job)
    t_back = time.time() - t0
    hold.unlink()
    assert job.wait(300) == 0, job.text()[-4000:]
    m = manifest(out)
    _exactly_once(out, listed, m)
    per_node = collections.Counter(a["node_id"] for a in m["actors"])
    # two starts before the loss, one after it: the restart, on the spare node
    assert len(m["actors"]) == 3 and per_node[lost_id] == 1 and per_node[spare.node_id] == 1, per_node
    assert lost_id not in m["vocabulary"]["object_nodes"] and spare.node_id in m["vocabulary"]["object_nodes"]
    ray_lines = [ln for ln in job.lines if "died" in ln.lower() or "restart" in ln.lower() or "retr" in ln.lower()]
    print(f"\nnode loss: killed at {t_kill:.0f}s, replica back on the spare node at {t_back:.0f}s, "
          f"committed at {time.time() - t0:.0f}s; counts {m['counts']['listed']} listed = "
          f"{m['counts']['tagged']} tagged + {m['counts']['errors']} errors; model work {m['model_work']}; "
          f"Ray said: {ray_lines[:6]}")


def test_last_gpu_node_lost_fails_in_one_sentence_and_the_next_run_resumes(ray_cluster, tmp_path):
    c = ray_cluster()
    only = c.add_worker()
    listed = small_jpegs(tmp_path / "in", 24)
    out, hold = tmp_path / "out", tmp_path / "hold"
    settings = {"inference.actors": 1, "inference.capacity_wait_s": 5.0}
    hold.write_text("2")  # two batches pass, the next wait in the replica: in flight when the node goes
    job = start_job(c.address, tmp_path / "in", out, hold, **settings)
    wait_for(lambda: staged_rows(out) >= 4, 300, "two batches staged", job)
    wait_for(lambda: c.busy(only) >= 1, 120, "the replica inside a held batch", job)
    c.kill(only)
    t_kill = time.time()
    rc = job.wait(300)
    t_fail = time.time() - t_kill
    last = job.lines[-1]
    assert rc == 3, job.text()[-3000:]
    assert last.startswith("tag_bucket: error: run ") and "NoCapacity: no live node could host an inference " \
        "replica (1 GPU and 0.25 CPU) for 5 s" in last and "start it again with the same settings" in last, last
    assert list((out / "_runs").glob("*.FAILED.json")) and not manifest_or_none(out)
    kept = staged_rows(out)
    assert 4 <= kept < len(listed)

    hold.unlink()
    c.add_worker()  # capacity is back (a new spot node)
    job2 = start_job(c.address, tmp_path / "in", out, None, **settings)
    assert job2.wait(300) == 0, job2.text()[-4000:]
    m = manifest(out)
    assert m["resume"]["attempt"] == 2 and m["resume"]["kept_rows"] == kept, m["resume"]
    assert m["model_work"]["backbone_images"] == len(listed) - kept  # nothing staged was tagged again
    _exactly_once(out, listed, m)
    print(f"\nno capacity: failed {t_fail:.0f}s after the kill (capacity_wait_s 5): {last!r}; resumed: "
          f"{kept} rows kept, {len(listed) - kept} tagged by the second run")


def manifest_or_none(out: Path):
    return [p for p in (out / "_runs").glob("*.json") if not p.name.endswith(".FAILED.json")]


def test_driver_killed_mid_run_then_started_again_resumes(ray_cluster, tmp_path):
    """The job's driver (on the head, as under `ray job submit`) SIGKILLed while batches are in
    flight: Ray ends its job, replicas and tasks with it; the next start resumes the run."""
    c = ray_cluster()
    node = c.add_worker()
    listed = small_jpegs(tmp_path / "in", 24)
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.write_text("2")  # two batches pass, the next wait in the replica
    job = start_job(c.address, tmp_path / "in", out, hold, **{"inference.actors": 1})
    wait_for(lambda: staged_rows(out) >= 4, 300, "two batches staged", job)
    wait_for(lambda: c.busy(node) >= 1, 120, "the replica inside a held batch", job)
    job.proc.send_signal(signal.SIGKILL)
    job.wait(60)
    hold.unlink()
    time.sleep(2.0)  # a write task that was running when the driver died may still land
    kept = staged_rows(out)

    job2 = start_job(c.address, tmp_path / "in", out, None, **{"inference.actors": 1})
    assert job2.wait(300) == 0, job2.text()[-4000:]
    m = manifest(out)
    assert m["resume"]["attempt"] == 2 and m["resume"]["kept_rows"] == kept >= 4, m["resume"]
    assert m["model_work"]["backbone_images"] == len(listed) - kept
    _exactly_once(out, listed, m)
    print(f"\ndriver killed: {kept} rows staged before the kill were kept, {len(listed) - kept} tagged after")

"""Progress an operator can read: live lines from the actors' counts, Ray Data's own output
only on a terminal (or when asked for)."""

from __future__ import annotations

import io
import os
import re
import time

import pytest

from ramplus_core.job.manifest import counts_of
from ramplus_core.job.progress import ProgressCounter, ProgressReporter, bars_on, progress_line, summary_table

from .conftest import CHECKPOINT, _jpeg, run_tag_bucket

LINE = re.compile(r"^progress: (\d+)/(\d+) images .*, (\d+) errors, (?:([\d.]+|\?) images/s|images/s \?), eta ([^,\s]+)")
#: what Ray Data writes when its progress output is on and stderr is not a terminal
RAY_PROGRESS = ("Running Dataset", "Total Progress", "logging_progress")


def _snap(tagged=0, errors=0, first=None, first_n=0, actors=()):
    return {"tagged": tagged, "errors": errors, "first": first, "first_n": first_n, "last": first,
            "actors": [{"pid": p} for p in actors]}


def test_manifest_counts_mean_one_thing_each_and_older_names_are_read():
    v1 = {"counts": {"listed": 5, "tagged": 4, "errors": 1, "skipped": 2,
                     "incremental": {"mode": "missing", "skipped": 7, "new": 5, "grown": 3}}}
    c = counts_of(v1)
    assert (c["not_images"], c["incremental"]["already_done"], c["incremental"]["vocab_changed"]) == (2, 7, 3)
    assert "skipped" not in c and "skipped" not in c["incremental"] and "grown" not in c["incremental"]
    m = {"run_id": "r", "status": "committed", "output": "/o", "invariant": {"ok": True}, "images_per_s": 1.0,
         "timings_s": {"total": 1.0}, **v1,
         "vocabulary": {"changed_from": {"k": {"vocab_id": "v0", "added_tags": 0, "removed_tags": 21,
                                               "copied_tags": 3, "computed_tags": 0}}}}
    table = summary_table(m)
    assert re.search(r"not images \(other names\) *\| 2$", table, re.M)
    assert re.search(r"already done *\| 7$", table, re.M)
    assert "vocab changed 3" in table and "grown" not in table and "skipped" not in table
    assert re.search(r"vocabulary change *\| from v0: \+0 tags, -21 tags", table, re.M)


def test_the_line_before_the_first_batch_says_what_the_run_waits_for():
    line = progress_line(_snap(actors=[11]), 120, 30.0, actors=2)
    assert line == ("progress: 0/120 images (0.0%), 0 tagged, 0 errors, images/s ?, eta ? "
                    "(starting: 1/2 inference actors ready), elapsed 30s")


def test_rate_and_eta_count_from_the_first_batch_not_over_the_start_up():
    # 100 s of start-up, then batches: 4 images at t=100, 40 more by t=110 -> 4 images/s, not 44/110
    snap = _snap(tagged=42, errors=2, first=100.0, first_n=4)
    line = progress_line(snap, 120, 110.0, now=110.0)
    m = LINE.match(line)
    assert m and (m.group(1), m.group(3), m.group(4), m.group(5)) == ("44", "2", "4.0", "19s"), line
    # a stall: the rate falls with time instead of freezing at its last value
    assert LINE.match(progress_line(snap, 120, 130.0, now=130.0)).group(4) == "1.3"
    assert progress_line(_snap(tagged=120, first=1.0, first_n=4), 120, 65.0, now=59.0).endswith(
        ", 2.0 images/s, eta 0s, elapsed 1m05s")


def test_bars_follow_the_setting_and_else_whether_stderr_is_a_terminal():
    assert bars_on(True, io.StringIO()) and not bars_on(False, io.StringIO())
    assert not bars_on(None, io.StringIO())
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert bars_on(None, tty) and not bars_on(False, tty)
    finally:
        os.close(master)
        os.close(slave)


def test_reporter_prints_counts_as_they_arrive(ray_local):
    """The counter actor and the driver thread on a real Ray: each add shows in the next line."""
    import ray

    counter = ProgressCounter.remote()
    lines: list[str] = []
    reporter = ProgressReporter(counter, 12, 0.1, lines.append, actors=1).start()
    try:
        ray.get(counter.actor_ready.remote({"pid": 1}))
        for k in (4, 8, 12):
            ray.get(counter.add.remote(3, 1, {"decode": 1}))
            deadline = time.monotonic() + 60  # a loaded machine delays lines, it does not lose counts
            while not any(x.startswith(f"progress: {k}/12 ") for x in lines) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        reporter.stop()
        ray.kill(counter)
    done = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    assert {4, 8, 12} <= set(done), lines
    assert done == sorted(done)
    assert any(LINE.match(x).group(3) == "2" for x in lines if x.startswith("progress: 8/"))


@pytest.mark.slow
def test_a_job_log_shows_live_progress_and_ray_data_output_only_when_asked(ray_local, tmp_path):
    """jobs/tag_bucket.py as in a nightly log (stdout and stderr are pipes), on this Ray."""
    src = tmp_path / "in"
    src.mkdir()
    n = 64
    for i in range(n):
        (src / f"img_{i:03d}.jpg").write_bytes(_jpeg(64, 48, seed=i))
    address = ray_local.get_runtime_context().gcs_address
    common = ["--input", str(src), "--checkpoint", str(CHECKPOINT), "--ray-address", address,
              "--set", "ray.progress_interval_s=0.2", "--set", "decode.batch_size=4", "--set", "inference.batch_size=4",
              "--set", "inference.actors=1", "--set", "inference.num_cpus=0.5"]

    proc = run_tag_bucket(*common, "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [int(m.group(1)) for m in map(LINE.match, proc.stdout.splitlines()) if m]
    assert any(0 < d < n for d in done), f"no intermediate progress line: {done}"
    assert done[-1] == n and done == sorted(done)
    noise = [x for x in proc.stderr.splitlines() if any(k in x for k in RAY_PROGRESS + ("Progress bars disabled",))]
    assert not noise, noise[:5]

    proc = run_tag_bucket(*common, "--output", str(tmp_path / "out2"), "--progress-bars")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(k in proc.stderr for k in RAY_PROGRESS), proc.stderr[-3000:]

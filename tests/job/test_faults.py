"""Faults the job must survive, injected for real: a replica killed mid-batch, the S3 server
gone for ten seconds, a checkpoint that cannot be loaded.

"Survive" means: the run commits with every listed image in exactly one of tags/ or errors/,
or it fails loudly (an exception / non-zero exit and a FAILED manifest). Never a silent drop.
"""

from __future__ import annotations

import collections
import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ramplus_core.errors import ImageError
from ramplus_core.job import JobFailed, load_config, run
from ramplus_core.job.config import FetchConfig
from ramplus_core.job.reader import fetch_bytes, fetch_decode
from ramplus_core.job.storage import Storage

from .conftest import (BUCKET, CHECKPOINT, WeedProcess, free_ports, job_config, proc_stats, run_tag_bucket,
                       table_rows)

KEY, SECRET = "fault-key", "fault-secret-not-logged"


def small_jpegs(n: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48 + i % 5, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out[f"img_{i:03d}.jpg"] = buf.getvalue()
    return out


def rows_of_run(output: str, storage: Storage, run_id: str) -> tuple[list, list]:
    """(uris in tags, (uri, stage, error) in errors) of one run, as a reader of the tables sees them."""
    tags = table_rows(output, "tags", storage, ["uri", "run_id"]).to_pylist()
    errors = table_rows(output, "errors", storage, ["uri", "stage", "error", "run_id"]).to_pylist()
    return ([r["uri"] for r in tags if r["run_id"] == run_id],
            [{k: r[k] for k in ("uri", "stage", "error")} for r in errors if r["run_id"] == run_id])


def assert_each_exactly_once(listed: set, tags: list, errors: list) -> None:
    seen = collections.Counter(tags + [e["uri"] for e in errors])
    assert set(seen) == listed, f"missing {sorted(listed - set(seen))[:5]}, extra {sorted(set(seen) - listed)[:5]}"
    assert max(seen.values()) == 1, [u for u, c in seen.items() if c > 1][:5]


# -- a replica killed mid-batch ------------------------------------------------------------

def _our_ray_workers() -> dict[int, str]:
    """pid -> process title of the workers of the raylet this test process started."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    out = {}
    for pid, fields in proc_stats():
        if int(fields[1]) != raylet:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return out


@pytest.mark.slow  # 30 s on a quiet machine, 60-90 s here under others' load
def test_replica_killed_mid_batch_is_restarted_and_its_batch_redone(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name, data in small_jpegs(24).items():
        (src / name).write_bytes(data)
    out = tmp_path / "out"
    # one replica of 1 CPU (the default here): decode stays in tasks, the actor only infers
    cfg = load_config(str(job_config(tmp_path, inference={"batch_size": 4, "actors": 1, "num_cpus": 1.0},
                                     ray={"progress_interval_s": 1.0})),
                      inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
    result, failure, killed = {}, [], []

    def go():
        try:
            result["r"] = run(cfg, emit=lambda s: None)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test thread
            failure.append(e)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    deadline = time.time() + 300
    while th.is_alive() and not killed and time.time() < deadline:
        # Ray titles a worker `ray::<actor>.<method>` while a call runs: `.submit` is a batch.
        busy = [pid for pid, title in _our_ray_workers().items() if "MapBatches(Tagger)" in title
                and title.endswith(".submit")]
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])
        time.sleep(0.05)
    th.join(timeout=600)
    assert not th.is_alive(), "the run did not finish after the replica was killed"
    assert killed, "no replica was seen inside a batch (the run ended first)"
    if failure:
        raise failure[0]
    m = result["r"].manifest
    assert m["status"] == "committed" and m["invariant"]["ok"], m["invariant"]
    assert (m["counts"]["listed"], m["counts"]["tagged"], m["counts"]["errors"]) == (24, 24, 0)
    # the killed replica was restarted: a second actor start (its own load, same shared vocabulary)
    pids = [a["pid"] for a in m["actors"]]
    assert killed[0] in pids and len(set(pids)) >= 2, pids
    tags, errors = rows_of_run(str(out), Storage(), m["run_id"])
    assert_each_exactly_once({f"file://{src}/{n}" for n in small_jpegs(24)}, tags, errors)


# -- the S3 server goes away -----------------------------------------------------------------

@pytest.fixture
def own_s3(tmp_path):
    """A SeaweedFS of this test's own, to kill and restart (the session's is shared)."""
    weed = WeedProcess(tmp_path / "weed", [(KEY, SECRET)]).start()
    weed.wait_writable(KEY, SECRET)
    yield weed
    weed.kill()


def _storage_cfg(weed) -> dict:
    return {"endpoint_url": weed.endpoint, "access_key_id": KEY, "secret_access_key": SECRET, "region": "us-east-1"}


@pytest.mark.slow
def test_s3_server_down_mid_run(ray_local, own_s3, tmp_path):
    """Killed twice (right after listing for 10 s, again once results flow for 5 s), restarted on
    the same ports and data: reads, data files and the manifest ride it out; nothing is lost."""
    weed = own_s3
    images = small_jpegs(16, seed=1)
    s3 = Storage(**_storage_cfg(weed))
    fs, _ = s3.fsspec(f"s3://{BUCKET}/")
    fs.pipe({f"{BUCKET}/in/{n}": d for n, d in images.items()})
    output = f"s3://{BUCKET}/out/"
    cfg = load_config(str(job_config(tmp_path, storage=_storage_cfg(weed),
                                     decode={"batch_size": 2, "tasks": 1},
                                     inference={"batch_size": 2, "actors": 1},
                                     fetch={"threads": 1},
                                     layout={"rows_per_file": 2},
                                     ray={"progress_interval_s": 0.5})),
                      inputs=[f"s3://{BUCKET}/in/"], output=output, checkpoint=str(CHECKPOINT))
    outages = []  # (what triggered it, seconds)

    def outage(why: str, seconds: float) -> None:
        weed.kill()
        outages.append((why, seconds))
        weed.restart_later(seconds)

    def emit(line: str) -> None:
        if line.startswith("listed ") and not outages:
            outage("after listing", 10.0)
        elif line.startswith("progress: ") and len(outages) == 1 and weed.is_up():
            done = int(line.split()[1].split("/")[0])
            if 0 < done < len(images):
                outage("mid-pipeline", 5.0)

    t0 = time.time()
    try:
        result = run(cfg, emit=emit)
    except JobFailed as e:  # loud is allowed; silent is not: the FAILED manifest says why
        assert weed.is_up()
        assert fs.exists(f"{BUCKET}/out/_runs/") and e.manifest_uri
        pytest.fail(f"the run failed loudly instead of riding out {outages}: {e}")
    elapsed = time.time() - t0
    assert [why for why, _ in outages] == ["after listing", "mid-pipeline"], outages
    assert elapsed > 10.0
    m = result.manifest
    assert m["status"] == "committed" and m["invariant"]["ok"], m["invariant"]
    tags, errors = rows_of_run(output, s3, m["run_id"])
    assert_each_exactly_once({f"s3://{BUCKET}/in/{n}" for n in images}, tags, errors)
    # an outage shorter than the retry budget costs time, not images
    assert errors == [] and m["counts"]["tagged"] == len(images), (errors, outages)


def test_fetch_gives_up_after_bounded_retries_as_error_rows(tmp_path):
    """A store that stays down: each image ends as an error row of stage fetch after
    retries+1 attempts and about the configured backoff, never silently missing."""
    import pyarrow as pa

    dead = Storage(endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}", access_key_id=KEY,
                   secret_access_key=SECRET, region="us-east-1")
    cfg = FetchConfig(threads=2, retries=3, backoff_s=0.2, max_backoff_s=0.4)
    batch = pa.table({"uri": [f"s3://{BUCKET}/in/{i}.jpg" for i in range(4)], "size": [100] * 4,
                      "etag": [None] * 4, "mtime": pa.array([None] * 4, pa.timestamp("us", tz="UTC")),
                      "list_error": pa.array([None] * 4, pa.string())})
    from ramplus_core.preprocess import DecodeLimits

    t0 = time.monotonic()
    out = fetch_decode(batch, storage=dead, fetch=cfg, limits=DecodeLimits(max_bytes=10_000))
    elapsed = time.monotonic() - t0
    assert out.num_rows == 4
    assert out.column("stage").to_pylist() == ["fetch"] * 4
    for reason in out.column("error").to_pylist():
        assert reason.startswith("fetch failed after 4 attempts over "), reason
        assert SECRET not in reason and KEY not in reason
    # waits: 0.2, 0.4, 0.4 (x 0.5..1.5) per image, two images at a time
    assert 2 * 0.5 * 1.0 <= elapsed < 2 * 1.5 * 1.0 + 15, elapsed


def test_fetch_does_not_retry_what_waiting_cannot_fix(s3_server):
    storage = Storage(**s3_server.storage_config())
    cfg = FetchConfig(retries=5, backoff_s=2.0, max_backoff_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="not found") as e:
        fetch_bytes(storage, f"s3://{s3_server.bucket}/no/such/object.jpg", 1000, cfg, None)
    assert e.value.stage == "fetch" and "attempts" not in e.value.reason
    assert time.monotonic() - t0 < 5.0  # one retry alone would wait >= 1 s, all five >= 5 s


def test_parquet_writes_ride_out_a_short_outage_or_fail_loudly(own_s3):
    """Data files and manifests go through pyarrow's S3 client: storage.max_attempts tries
    with exponential backoff (10: ~25 s), then an exception (the run then fails, not commits)."""
    weed = own_s3
    storage = Storage(endpoint_url=weed.endpoint, access_key_id=KEY, secret_access_key=SECRET, region="us-east-1")
    fs, path = storage.pyarrow(f"s3://{BUCKET}/w/file.bin")
    weed.kill()
    timer = threading.Timer(3.0, weed.start)
    timer.start()
    t0 = time.monotonic()
    with fs.open_output_stream(path) as f:
        f.write(b"written during an outage")
    assert time.monotonic() - t0 >= 2.5
    timer.join()
    with fs.open_input_stream(path) as f:
        assert f.read() == b"written during an outage"

    once = Storage(endpoint_url=weed.endpoint, access_key_id=KEY, secret_access_key=SECRET, region="us-east-1",
                   max_attempts=1)
    fs1, path1 = once.pyarrow(f"s3://{BUCKET}/w/other.bin")
    weed.kill()
    with pytest.raises(OSError, match="NETWORK_CONNECTION|connect"):
        with fs1.open_output_stream(path1) as f:
            f.write(b"x")


def test_s3_down_during_listing_fails_loudly_then_resumes(own_s3, tmp_path):
    """A store that stops answering while the job lists it: the run cannot know what exists,
    so it stops with one clear line (no traceback, no partial listing, nothing committed), and
    the same command run again once the store is back tags everything."""
    weed = own_s3
    images = small_jpegs(3, seed=2)
    storage_cfg = {**_storage_cfg(weed), "max_attempts": 2}
    fs, _ = Storage(**_storage_cfg(weed)).fsspec(f"s3://{BUCKET}/")
    fs.pipe({f"{BUCKET}/listed/{n}": d for n, d in images.items()})
    out = tmp_path / "out"
    cfg = load_config(str(job_config(tmp_path, storage=storage_cfg, inference={"driver_max_images": 10})),
                      inputs=[f"s3://{BUCKET}/listed/"], output=str(out), checkpoint=str(CHECKPOINT))

    def emit(line: str) -> None:
        if line.startswith("run ") and weed.proc.poll() is None:
            weed.kill()  # after the checks and the checkpoint, just before listing starts

    with pytest.raises(JobFailed, match=r"listing s3://.*/listed/ failed .*nothing was committed.*Start the job again") as e:
        run(cfg, emit=emit)
    assert "Traceback" not in str(e.value) and SECRET not in str(e.value)
    assert not list(out.glob("_runs/*.json")) and table_rows(out, "tags").num_rows == 0

    weed.start()
    result = run(cfg, emit=lambda s: None)
    m = result.manifest
    assert m["status"] == "committed" and m["counts"]["tagged"] == len(images), m["counts"]
    assert m["resume"]["resumed"], m["resume"]  # the same run, picked up where it stopped


# -- a checkpoint that cannot be loaded -----------------------------------------------------------

class _RunsCode:
    """Pickles to a call of os.system: what a malicious .pth would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tag_bucket(args: list[str], timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = run_tag_bucket(*args, timeout=timeout)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("kind", ["truncated", "pickled_code"])
def test_bad_checkpoint_fails_fast_before_listing(tmp_path, kind):
    import torch

    src = tmp_path / "in"
    src.mkdir()
    for name, data in small_jpegs(3).items():
        (src / name).write_bytes(data)
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "model.pth"
    if kind == "truncated":
        data = CHECKPOINT.read_bytes()
        ckpt.write_bytes(data[: len(data) // 3])
    else:
        torch.save({"model": {"w": torch.zeros(2)}, "extra": _RunsCode(marker)}, ckpt)
        assert b"system" in ckpt.read_bytes()
    out = tmp_path / "out"
    proc, elapsed = _tag_bucket(["--input", str(src), "--output", str(out), "--checkpoint", str(ckpt), "--quiet"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("tag_bucket: error: "), proc.stderr[-3000:]
    msg = err_lines[0]
    assert str(ckpt) in msg
    if kind == "truncated":
        assert "truncated" in msg
    else:
        assert "pickled objects" in msg and "no code in it ran" in msg
        assert not marker.exists(), "the checkpoint's pickled code ran"
    # failed before listing, before Ray, before any output
    assert "listed" not in proc.stdout and "ray:" not in proc.stdout
    assert not out.exists() or not any(out.rglob("*")), sorted(map(str, out.rglob("*")))
    assert elapsed < 90, elapsed  # the interpreter and torch import dominate; no listing, no Ray

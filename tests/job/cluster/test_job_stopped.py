"""The driver of a job submitted through the Ray Jobs API stopped while batches are in flight
(`ray job stop`: SIGTERM, then SIGKILL), then the same job submitted again: it resumes the
run, keeps what was staged before the stop, and every image lands exactly once."""

from __future__ import annotations

import time

import pytest

from ..conftest import CHECKPOINT, REPO
from ..ray_head import ray_head, submit, wait_job
from .conftest import job_settings, manifest, small_jpegs, staged_rows, wait_for
from .test_node_loss import _exactly_once

pytestmark = pytest.mark.slow


def _entrypoint(src, out) -> str:
    sets = job_settings(**{"inference.gpus_per_actor": 0, "inference.actors": 1, "inference.num_cpus": 0.5})
    return " ".join(["python", "tests/job/cluster/held_driver.py", "--input", str(src), "--output", str(out),
                     "--checkpoint", str(CHECKPOINT.relative_to(REPO)), "--quiet", *sets])


def test_submitted_job_stopped_mid_run_then_submitted_again_resumes(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    listed = small_jpegs(tmp_path / "in", 24)
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.write_text("2")  # two batches pass, the next wait inside the replica: in flight when the driver goes
    with ray_head() as head:
        client = JobSubmissionClient(head.address)
        first = submit(client, entrypoint=_entrypoint(tmp_path / "in", out),
                       runtime_env={"working_dir": str(REPO), "env_vars": {"HOLD_FILE": str(hold)}})
        wait_for(lambda: staged_rows(out) >= 4 or client.get_job_status(first).is_terminal(), 600,
                 "two batches staged")
        assert not client.get_job_status(first).is_terminal(), client.get_job_logs(first)[-3000:]
        time.sleep(1.0)  # the third batch reaches the gate
        client.stop_job(first)
        assert wait_job(client, first, 120).status == JobStatus.STOPPED
        hold.unlink()
        time.sleep(2.0)  # a write task that was running when the driver went may still land
        kept = staged_rows(out)

        second = submit(client, entrypoint=_entrypoint(tmp_path / "in", out),
                        runtime_env={"working_dir": str(REPO)})
        info = wait_job(client, second, 600)
        assert info.driver_exit_code == 0, client.get_job_logs(second)[-4000:]
    m = manifest(out)
    assert m["resume"]["attempt"] == 2 and m["resume"]["kept_rows"] == kept >= 4, m["resume"]
    assert m["model_work"]["backbone_images"] == len(listed) - kept
    _exactly_once(out, listed, m)
    print(f"\njob stopped: {kept} rows staged before the stop were kept, {len(listed) - kept} tagged after")

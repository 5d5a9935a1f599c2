"""The job submitted to a real Ray head through the Ray Jobs API, as docs/job.md shows."""

from __future__ import annotations

import json

import pytest

from .conftest import REPO
from .ray_head import ray_head as start_head, submit, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    with start_head() as head:
        yield head.address


def test_submit_through_ray_jobs_api(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "out"
    # As in docs/job.md, with the test checkpoint and a temporary output.
    client = JobSubmissionClient(ray_head)
    job_id = submit(
        client,
        entrypoint=("python jobs/tag_bucket.py --config conf/sample.yaml "
                    f"--checkpoint tests/golden/tiny/ram_plus_checkpoint.pth --output {out} --quiet"),
        runtime_env={"working_dir": str(REPO)},
    )
    info = wait_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert info.driver_exit_code == 0, logs[-4000:]
    assert info.status == JobStatus.SUCCEEDED
    assert "invariant" in logs and "committed" in logs

    runs = sorted((out / "_runs").glob("*.json"))
    assert len(runs) == 1
    run_id = runs[0].name[: -len(".json")]
    m = json.loads((out / "_runs" / f"{run_id}.json").read_text())
    samples = [p for p in (REPO / "ramplus_core" / "samples").iterdir() if p.suffix.lower() == ".jpg"]
    assert m["counts"]["listed"] == m["counts"]["tagged"] == len(samples) > 0
    assert m["counts"]["errors"] == 0 and m["invariant"]["ok"]
    assert m["actors"] and all(a["vocab_memory"]["projected"]["writeable"] is False for a in m["actors"])

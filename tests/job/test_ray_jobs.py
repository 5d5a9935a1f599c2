"""The job submitted to a real Ray head through the Ray Jobs API, as docs/job.md shows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import REPO, VENV_BIN, free_ports, stop_session

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own session; stopped by signalling that session only.

    (`ray stop` would stop every Ray on the machine, including other people's.)
    """
    d = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = free_ports(7)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_env}", f"--temp-dir={d}/raytmp", "--disable-usage-stats"]
    log = open(d / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start: {(d / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        stop_session(proc.pid)  # the session `ray start` was started in: its processes only
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_submit_through_ray_jobs_api(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "out"
    # As in docs/job.md, with the test checkpoint and a temporary output.
    client = JobSubmissionClient(ray_head)
    job_id = client.submit_job(
        entrypoint=("python jobs/tag_bucket.py --config conf/sample.yaml "
                    f"--checkpoint tests/golden/tiny/ram_plus_checkpoint.pth --output {out} --quiet"),
        runtime_env={"working_dir": str(REPO)},
    )
    deadline = time.time() + 300
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    info = client.get_job_info(job_id)
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

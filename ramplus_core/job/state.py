"""A run's state in `_staging/<run_id>/`: what lets a killed run finish instead of starting over.

    _staging/<run_id>/run.json            who started it, with which settings (resume key), run_date
    _staging/<run_id>/attempts/NN.json    one per start of the run (the first is 01)
    _staging/<run_id>/heartbeat.json      rewritten while a driver runs it
    _staging/<run_id>/listing/, listing.json   the listing, once complete
    _staging/<run_id>/plan/, plan.json    the work after the index join, once complete
    _staging/<run_id>/done/NN-TTTTT.parquet    a finished write task's rows (writer.py)
    _staging/<run_id>/deleted.parquet      images the listing no longer has (with the plan)

Every step writes its marker (`listing.json`, `plan.json`, a receipt) only after the data
it vouches for is complete, so a driver killed at any point leaves either a finished step
or one to redo. A write task's staged file is its rows and its receipt at once: a resumed
attempt skips those rows, and the commit merges the files of every attempt. Nothing in
staging is ever read by the tables' readers; a run killed during its commit finds, on
resume, which of its table commits landed (table.py) and makes only the others.

Which run to resume: started again with the same settings (`--run-id` unset), the job
resumes the newest uncommitted run whose resume key matches (the settings that decide what
is written: inputs, output, model, vocabulary, mode, decode limits, dtype, score floor,
shards; not batch sizes, actors or retries), once its driver is gone: the same host and a
dead pid, or a heartbeat older than `incremental.stale_after_s`. A run whose driver still
lives is refused rather than joined.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from . import manifest as mf
from .config import JobConfig, redact_uri, redacted
from .storage import Storage, join

STAGING_DIR = "_staging"
HEARTBEAT_S = 10.0


# What decides the rows a run writes. Everything else (batch sizes, actors, threads, retries,
# Ray) only decides how fast, so a run may be resumed with more actors or smaller batches.
_KEY_FIELDS = {
    "": ("input", "output", "mode"),
    "storage": ("endpoint_url",),
    "listing": ("extensions",),
    "decode": ("max_bytes", "max_pixels", "mode", "device", "jpeg_draft"),
    "inference": ("dtype", "score_floor"),
    "layout": ("shards",),
    "cache": ("image_tokens", "token_dtype"),
    "incremental": ("retry_stages",),
}


def resume_key(cfg: JobConfig, model_id: str, vocab_id: str) -> str:
    """Settings that decide what a run writes; equal keys may continue each other's work."""
    d = redacted(cfg)
    picked = {"model_id": model_id, "vocab_id": vocab_id}
    for section, names in _KEY_FIELDS.items():
        src = d if not section else d[section]
        picked.update({f"{section}.{k}": src[k] for k in names})
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _process_start_ticks(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start_ticks(os.getpid())}


@dataclass
class RunState:
    storage: Storage
    output: str
    run_id: str
    key: str
    attempt: int
    run_date: str
    started_at: str
    resumed: bool
    listing: Optional[dict] = None
    plan: Optional[dict] = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    @property
    def staging(self) -> str:
        return join(self.output, STAGING_DIR, self.run_id)

    def uri(self, *parts: str) -> str:
        return join(self.staging, *parts)

    def put_json(self, name: str, data: dict) -> None:
        mf.put_bytes(self.storage, self.uri(name), json.dumps(data, default=str).encode("utf-8"))

    # -- heartbeat -------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        def beat():
            while True:
                try:
                    self.put_json("heartbeat.json", {**_me(), "attempt": self.attempt, "at": time.time()})
                except Exception:  # noqa: BLE001 - a missed beat only delays a takeover
                    pass
                if self._stop.wait(HEARTBEAT_S):
                    return

        self._thread = threading.Thread(target=beat, name="ramplus-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- receipts --------------------------------------------------------------------------
    def receipt_files(self) -> list[str]:
        import pyarrow.fs as pafs

        fs, root = self.storage.pyarrow(self.uri("done"))
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except FileNotFoundError:
            return []
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                      and not i.base_name.startswith("."))

    def iter_receipts(self, columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
        fs, _ = self.storage.pyarrow(self.uri("done"))
        for path in self.receipt_files():
            yield pq.read_table(path, filesystem=fs, columns=columns)


def _alive(storage: Storage, staging: str, stale_after_s: float) -> Optional[str]:
    """Why the run's last driver may still be running, or None when it is surely gone."""
    beat = mf.get_json(storage, join(staging, "heartbeat.json")) or mf.get_json(storage, join(staging, "run.json"))
    if not beat:
        return None
    if beat.get("host") == socket.gethostname():
        pid = beat.get("pid")
        started = beat.get("pid_start")
        if pid and pid != os.getpid() and started is not None and _process_start_ticks(int(pid)) == started:
            return f"its driver (pid {pid} on this host) is still running"
        return None
    age = time.time() - float(beat.get("at") or 0)
    if age < stale_after_s:
        return f"its driver on {beat.get('host')} sent a heartbeat {age:.0f}s ago"
    return None


def _attempts(storage: Storage, staging: str) -> int:
    import pyarrow.fs as pafs

    fs, root = storage.pyarrow(join(staging, "attempts"))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except FileNotFoundError:
        return 0
    nums = [int(i.base_name.split(".")[0]) for i in infos if i.base_name.endswith(".json") and i.base_name[:2].isdigit()]
    return max(nums, default=0)


def _uncommitted_runs(storage: Storage, output: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = storage.pyarrow(join(output, STAGING_DIR))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except FileNotFoundError:
        return []
    committed = set(mf.committed_runs(output, storage))
    return sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name not in committed),
                  reverse=True)


def open_run(storage: Storage, cfg: JobConfig, key: str, started_at: datetime,
             emit: Callable[[str], None]) -> RunState:
    """Resume the matching unfinished run, or start a new one (see the module docstring)."""
    output = cfg.output
    inc = cfg.incremental
    run_id = cfg.run_id
    info = None
    if run_id:
        if run_id in set(mf.committed_runs(output, storage)):
            raise ConfigError(f"run_id: {run_id} was already used in {redact_uri(output)}; "
                              "leave run_id unset for a fresh one")
        info = mf.get_json(storage, join(output, STAGING_DIR, run_id, "run.json"))
        if info is not None and info.get("key") != key:
            raise ConfigError(f"run_id: {run_id} is an unfinished run of {redact_uri(output)} started with other "
                              "settings (inputs, model, vocabulary, mode or layout); resume it with those, or "
                              "leave run_id unset")
        fs, path = storage.pyarrow(join(output, mf.RUNS_DIR, f"{run_id}.FAILED.json"))
        import pyarrow.fs as pafs

        if info is None and fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise ConfigError(f"run_id: {run_id} was already used in {redact_uri(output)}; "
                              "leave run_id unset for a fresh one")
    elif inc.resume:
        for rid in _uncommitted_runs(storage, output):
            cand = mf.get_json(storage, join(output, STAGING_DIR, rid, "run.json"))
            if cand and cand.get("key") == key:
                run_id, info = rid, cand
                break
    if info is not None:
        staging = join(output, STAGING_DIR, run_id)
        why = _alive(storage, staging, inc.stale_after_s)
        if why:
            raise ConfigError(f"an unfinished run with these settings, {run_id}, may still be running: {why}. "
                              f"Wait for it, or start with --set incremental.resume=false for a separate run")
    if info is None:
        run_id = run_id or mf.new_run_id(started_at, os.urandom(3).hex())
        info = {"run_id": run_id, "key": key, "started_at": started_at.isoformat(),
                "run_date": started_at.date().isoformat(), **_me(), "at": time.time()}
        st = RunState(storage, output, run_id, key, 1, info["run_date"], info["started_at"], False)
        st.put_json("run.json", info)
    else:
        st = RunState(storage, output, run_id, key, _attempts(storage, join(output, STAGING_DIR, run_id)) + 1,
                      info["run_date"], info["started_at"], True)
        st.listing = mf.get_json(storage, st.uri("listing.json"))
        st.plan = mf.get_json(storage, st.uri("plan.json"))
        emit(f"resuming run {run_id} (attempt {st.attempt}): "
             + ("listing done" if st.listing else "listing again")
             + (", plan done" if st.plan else "") + f", {len(st.receipt_files())} finished write task(s) kept")
    st.put_json(f"attempts/{st.attempt:02d}.json", {**_me(), "at": time.time(),
                                                    "started_at": datetime.now(timezone.utc).isoformat()})
    return st

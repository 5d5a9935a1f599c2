"""The run manifest: the human-readable record of a run, beside the Delta tables.

    _runs/<run_id>.json          written after the run's table commits (status committed)
    _runs/<run_id>.FAILED.json   a run whose exactly-once check failed: nothing was committed

No reader needs it to find the current tags: the tables are the truth, and each of their
commits names its run. The manifest holds what a person asks about a run: counts, timings,
resources, the table versions it produced (for time travel), the config and versions.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from .storage import Storage, ensure_dir, join

RUNS_DIR = "_runs"
#: 2: count names that mean one thing each (`not_images`, `incremental.already_done`,
#: `incremental.vocab_changed`, `vocabulary.changed_from`); 1 used `skipped` for both of the first two
MANIFEST_VERSION = 2
#: manifest version 1's names, for readers of older manifests (`counts_of`)
OLD_COUNT_NAMES = {"skipped": "not_images"}
OLD_INCREMENTAL_NAMES = {"skipped": "already_done", "grown": "vocab_changed"}


def get_json(storage: Storage, uri: str) -> Optional[dict]:
    """A JSON object written by put_bytes, or None when it is missing or unreadable."""
    fs, path = storage.pyarrow(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def put_bytes(storage: Storage, uri: str, data: bytes) -> None:
    """Write an object whole, so no reader ever sees part of it.

    An object-store PUT is atomic already. A local file is written under a hidden name
    (`.<name>.inprogress`: skipped by pyarrow's dataset discovery and by `*.parquet` globs)
    and renamed, so a process killed mid-write leaves no half file under a real name.
    """
    import os
    import uuid

    import pyarrow.fs as pafs

    fs, path = storage.pyarrow(uri)
    parent, name = path.rsplit("/", 1)
    ensure_dir(fs, parent)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.inprogress"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_write = put_bytes


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")


def commit(storage: Storage, output_uri: str, run_id: str, manifest: dict) -> str:
    """Write the committed run's manifest; returns its URI."""
    uri = join(output_uri, RUNS_DIR, f"{run_id}.json")
    _write(storage, uri, manifest_bytes(manifest))
    return uri


def write_failed(storage: Storage, output_uri: str, run_id: str, manifest: dict) -> str:
    uri = join(output_uri, RUNS_DIR, f"{run_id}.FAILED.json")
    _write(storage, uri, manifest_bytes(manifest))
    return uri


def clear_failed(storage: Storage, output_uri: str, run_id: str) -> None:
    fs, path = storage.pyarrow(join(output_uri, RUNS_DIR, f"{run_id}.FAILED.json"))
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def committed_runs(output_uri: str, storage: Optional[Storage] = None) -> list[str]:
    """Run ids with a committed manifest, oldest first (run ids start with a UTC timestamp)."""
    import pyarrow.fs as pafs

    storage = storage or Storage()
    fs, path = storage.pyarrow(join(output_uri, RUNS_DIR))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.base_name[:-len(".json")] for i in infos
                  if i.base_name.endswith(".json") and not i.base_name.endswith(".FAILED.json")
                  and not i.base_name.startswith("."))


def read_manifest(output_uri: str, run_id: str, storage: Optional[Storage] = None) -> dict:
    storage = storage or Storage()
    fs, path = storage.pyarrow(join(output_uri, RUNS_DIR, f"{run_id}.json"))
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def counts_of(manifest: dict) -> dict:
    """The manifest's `counts` under this version's names, whichever version wrote it."""
    c = {OLD_COUNT_NAMES.get(k, k): v for k, v in (manifest.get("counts") or {}).items()}
    if isinstance(c.get("incremental"), dict):
        c["incremental"] = {OLD_INCREMENTAL_NAMES.get(k, k): v for k, v in c["incremental"].items()}
    return c


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def new_run_id(now, token: str) -> str:
    """`YYYYmmddTHHMMSSZ-<6 hex>`: sorts by start time and never collides in practice."""
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + _SAFE.sub("", token)[:6]

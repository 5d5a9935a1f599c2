"""The run manifest and the commit marker: how readers tell finished runs from the rest.

Layout under the output URI:

    tags/<partitions>/part-<run_id>-<task>.parquet     rows of tagged images
    errors/<partitions>/part-<run_id>-<task>.parquet   rows of images that could not be tagged
    _runs/<run_id>.json                                the manifest, written after all data
    _runs/<run_id>._SUCCESS                            the commit marker, written last

Data files of a run appear before its marker (object stores have no multi-file atomic
rename), so a reader must only use rows whose `run_id` has a `_SUCCESS` marker; a crashed
or failed run leaves data files without one and is thereby invisible. A run whose
invariant check fails writes `_runs/<run_id>.FAILED.json` and no marker.

The marker holds the SHA-256 of the manifest bytes, so a reader can tell the manifest it
reads is the one that was committed.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Optional

from .storage import Storage, ensure_dir, join

RUNS_DIR = "_runs"
MARKER_SUFFIX = "._SUCCESS"
MANIFEST_VERSION = 1


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
    """Manifest first, marker second; returns the manifest URI."""
    data = manifest_bytes(manifest)
    uri = join(output_uri, RUNS_DIR, f"{run_id}.json")
    _write(storage, uri, data)
    marker = {"run_id": run_id, "manifest": f"{run_id}.json", "manifest_sha256": hashlib.sha256(data).hexdigest()}
    _write(storage, join(output_uri, RUNS_DIR, f"{run_id}{MARKER_SUFFIX}"), json.dumps(marker).encode() + b"\n")
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
    """Run ids that have a commit marker, oldest first (run ids start with a UTC timestamp)."""
    import pyarrow.fs as pafs

    storage = storage or Storage()
    fs, path = storage.pyarrow(join(output_uri, RUNS_DIR))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    ids = [i.base_name[: -len(MARKER_SUFFIX)] for i in infos if i.base_name.endswith(MARKER_SUFFIX)]
    return sorted(ids)


def read_manifest(output_uri: str, run_id: str, storage: Optional[Storage] = None) -> dict:
    storage = storage or Storage()
    fs, path = storage.pyarrow(join(output_uri, RUNS_DIR, f"{run_id}.json"))
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def new_run_id(now, token: str) -> str:
    """`YYYYmmddTHHMMSSZ-<6 hex>`: sorts by start time and never collides in practice."""
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + _SAFE.sub("", token)[:6]

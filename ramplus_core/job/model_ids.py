"""The model's and the vocabulary's ids without loading the model, cached by what identifies the files.

A run must know `model_id` (a hash of every learned weight: reading and hashing the 3 GB
release takes minutes) and `vocab_id` (a hash of the vocabulary's names, thresholds and
description embeddings) before it can plan, because the plan compares them with the ids of
the committed rows. A night with nothing to do should cost its listing and its plan, so the
ids are kept in `<output>/_cache/model_ids.json`, keyed by what identifies the files without
reading them:

- the checkpoint: a local file's path, size, mtime (ns) and a hash of its first 64 KiB and
  last 1 MiB (a .pth is a zip whose central directory, at the end, holds a CRC32 of every
  tensor); an object's URI, size and ETag (its last-modified time where the store has none);
- the vocabulary: its settings, the bytes of the small files they name (vocabulary file,
  tags_file, thresholds_file) and the identity (size, ETag or mtime) of the files a
  vocabulary file refers to (imports, embeddings, the text encoder's folder).

A changed file has another identity, so its ids are computed again; where a file cannot be
identified (an unreachable reference) nothing is cached and the ids are computed as before.
The ids themselves are computed exactly as before, so tables written earlier stay valid.
When the run has work the model is loaded anyway, and the runner checks its ids against
the cached ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from typing import Optional

from ..errors import CheckpointError
from ..release import GET_IT
from .config import VocabularyConfig, redact_uri, uri_scheme
from .storage import Storage, join, local_path

CACHE_DIR = "_cache"
CACHE_NAME = "model_ids.json"
MAX_ENTRIES = 64  # checkpoints and vocabularies remembered; the oldest are forgotten first
_HEAD, _TAIL = 64 * 1024, 1024 * 1024


def cache_uri(output: str) -> str:
    return join(output, CACHE_DIR, CACHE_NAME)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def _sample_hash(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HEAD))
        if size > _HEAD:
            f.seek(max(_HEAD, size - _TAIL))
            h.update(f.read(_TAIL))
    return h.hexdigest()[:32]


def _remote_info(uri: str, storage: Storage) -> dict:
    fs, path = storage.fsspec(uri)
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or info.get("updated")
    return {"uri": uri, "type": info.get("type"), "size": info.get("size"), "tag": str(tag) if tag else None}


def checkpoint_identity(uri: str, storage: Storage) -> dict:
    """What identifies the checkpoint object, from its metadata (and 1 MiB of a local file).

    A missing file is the first thing a new user meets, so its error says where to get one.
    """
    if uri_scheme(uri) == "file":
        path = local_path(uri)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint: {uri} does not exist. {GET_IT}") from None
        except OSError as e:
            raise CheckpointError(f"checkpoint: cannot read {uri} ({e.strerror or e}); check its permissions") from None
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint: {uri} is not a file. {GET_IT}")
        try:
            sample = _sample_hash(path, st.st_size)
        except OSError as e:
            raise CheckpointError(f"checkpoint: cannot read {uri} ({e.strerror or e}); check its permissions") from None
        return {"uri": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": sample}
    try:
        info = _remote_info(uri, storage)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {redact_uri(uri)} does not exist. {GET_IT}") from None
    except Exception as e:  # noqa: BLE001 - client errors of any store
        raise CheckpointError(storage.scrub(f"checkpoint: cannot reach {redact_uri(uri)} "
                                            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"))
    if info["type"] == "directory":
        raise CheckpointError(f"checkpoint: {redact_uri(uri)} is a folder, not a file. {GET_IT}")
    return {"uri": redact_uri(uri), "size": info["size"], "tag": info["tag"]}


def _file_bytes_id(uri: str, storage: Storage) -> str:
    fs, path = storage.fsspec(uri)
    with fs.open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:32]


def _reference_id(uri: str, storage: Storage) -> dict:
    """Size and ETag/mtime of a file, or of every file under a folder (a text encoder)."""
    if uri_scheme(uri) == "file":
        path = local_path(uri)
        if os.path.isdir(path):
            out = []
            for root, _, files in os.walk(path):
                for name in sorted(files):
                    st = os.stat(os.path.join(root, name))
                    out.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
            return {"uri": path, "files": sorted(out)}
        st = os.stat(path)
        return {"uri": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    info = _remote_info(uri, storage)
    if info["type"] == "directory":
        fs, path = storage.fsspec(uri)
        found = fs.find(path, detail=True)
        return {"uri": redact_uri(uri), "files": sorted(
            (k, v.get("size"), str(v.get("ETag") or v.get("LastModified") or v.get("mtime"))) for k, v in found.items())}
    return {"uri": redact_uri(uri), **{k: info[k] for k in ("size", "tag")}}


def vocabulary_identity(vc: VocabularyConfig, storage: Storage) -> Optional[dict]:
    """The vocabulary settings and the content of what they read; None if a file cannot be identified."""
    out: dict = {"tags": list(vc.tags) if vc.tags else None, "threshold": vc.threshold}
    try:
        for key in ("tags_file", "thresholds_file", "file"):
            uri = getattr(vc, key)
            out[key] = _file_bytes_id(uri, storage) if uri else None
        if vc.file:
            from ..vocab_file import references  # imports torch: only when there is a file

            out["references"] = [_reference_id(u, storage) for u in references(vc.file)]
    except Exception:  # noqa: BLE001 - unidentifiable: computed as before, and its error said there
        return None
    return out


class IdCache:
    """`<output>/_cache/model_ids.json`: checkpoint key -> model_id, (checkpoint, vocabulary) key -> vocab_id.

    Last writer wins: two runs writing at once can lose an entry, which costs one
    recomputation, never a wrong id (entries are keyed by content).
    """

    def __init__(self, storage: Storage, output: str, data: Optional[dict]):
        self.storage, self.output = storage, output
        data = data if isinstance(data, dict) else {}
        self.models: dict = data.get("models") if isinstance(data.get("models"), dict) else {}
        self.vocabs: dict = data.get("vocabs") if isinstance(data.get("vocabs"), dict) else {}

    @classmethod
    def load(cls, storage: Storage, output: str) -> "IdCache":
        from .manifest import get_json

        return cls(storage, output, get_json(storage, cache_uri(output)))

    @staticmethod
    def keys(ck: dict, vocab: Optional[dict]) -> tuple[str, Optional[str]]:
        ck_key = _digest(ck)
        return ck_key, (_digest([ck_key, vocab]) if vocab is not None else None)

    def model(self, ck_key: str) -> Optional[dict]:
        e = self.models.get(ck_key)
        return e if isinstance(e, dict) and isinstance(e.get("model_id"), str) else None

    def vocab(self, v_key: Optional[str]) -> Optional[dict]:
        e = self.vocabs.get(v_key) if v_key else None
        return e if isinstance(e, dict) and isinstance(e.get("vocab_id"), str) else None

    def put(self, ck_key: str, v_key: Optional[str], model_id: str, descriptions_per_tag: int,
            vocab_id: Optional[str], vocab_width: int, checkpoint: str) -> None:
        """`descriptions_per_tag`: the checkpoint's; `vocab_width`: the run vocabulary's (padded) width."""
        now = datetime.now(timezone.utc).isoformat()
        self.models[ck_key] = {"model_id": model_id, "descriptions_per_tag": int(descriptions_per_tag),
                               "checkpoint": redact_uri(checkpoint), "at": now}
        if v_key and vocab_id:
            self.vocabs[v_key] = {"vocab_id": vocab_id, "model_id": model_id, "descriptions_per_tag": int(vocab_width),
                                  "at": now}

    def save(self) -> None:
        """Best effort: a cache that cannot be written costs the next run a recomputation."""
        from .manifest import put_bytes

        for d in (self.models, self.vocabs):
            for k in sorted(d, key=lambda k: str(d[k].get("at", "")))[:-MAX_ENTRIES]:
                del d[k]
        try:
            put_bytes(self.storage, cache_uri(self.output),
                      json.dumps({"models": self.models, "vocabs": self.vocabs}, indent=1).encode("utf-8"))
        except Exception:  # noqa: BLE001
            pass

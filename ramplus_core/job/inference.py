"""The inference actor: one model per actor, the run's shared vocabulary, never recomputed.

The driver projects the vocabulary once and `ray.put`s it; the ObjectRef reaches each actor
through `fn_constructor_kwargs`. Ray Data does not resolve references nested in constructor
arguments, so the actor `ray.get`s it: numpy arrays come back as read-only views of the
node's shared-memory object store, so every actor on a node reads the same physical copy
(for the released vocabulary that is ~1 GB of fp32 the actors do not each hold). The actor
reports where its arrays live (shared-memory file and offset) so tests and the manifest can
show that, and it counts any call to `prepare_vocabulary` (there must be none).
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import pyarrow as pa

from .reader import PIXEL_BYTES

SCORE_TYPE = pa.struct([("tag", pa.string()), ("score", pa.float32())])
INFERRED_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("tags", pa.list_(pa.string())),
    ("scores", pa.list_(SCORE_TYPE)),
    ("error", pa.string()),
    ("stage", pa.string()),
])


def shared_memory_location(arr: np.ndarray) -> dict:
    """Which mapping backs an array: equal (file, inode, offset) across processes = one copy."""
    addr = arr.__array_interface__["data"][0]
    info = {"writeable": bool(arr.flags.writeable), "file": None, "inode": None, "offset": None}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi:
                    info.update(file=parts[5] if len(parts) > 5 else None, inode=int(parts[4]),
                                device=parts[3], offset=addr - lo + int(parts[2], 16))
                    break
    except OSError:  # not Linux: the location is informative only
        pass
    return info


def materialize_checkpoint(uri: str, storage) -> str:
    """A local path for the checkpoint; remote files are downloaded once per node and cached.

    Loading a 3 GB remote .pth through a Python bytes object per actor would hold it in RAM
    per replica; a node-local file is memory-mapped by torch and shared by the page cache.
    """
    from .config import uri_scheme
    from .storage import local_path

    if uri_scheme(uri) == "file":
        return local_path(uri)
    import hashlib
    import tempfile

    fs, path = storage.fsspec(uri)
    info = fs.info(path)
    tag = f"{uri}|{info.get('ETag') or info.get('etag') or ''}|{info.get('size')}"
    name = hashlib.sha256(tag.encode()).hexdigest()[:24] + os.path.splitext(path)[1]
    cache = os.path.join(os.environ.get("RAMPLUS_CACHE", os.path.join(tempfile.gettempdir(), "ramplus-cache")))
    os.makedirs(cache, exist_ok=True)
    dest = os.path.join(cache, name)
    if not os.path.exists(dest):
        tmp = f"{dest}.{os.getpid()}.part"
        fs.get_file(path, tmp)
        os.replace(tmp, dest)  # atomic: concurrent actors on a node never read a partial file
    return dest


class Tagger:
    """Ray Data callable class: DECODED rows in, INFERRED rows out (one per row, in order)."""

    def __init__(self, *, checkpoint: str, storage, vocab_ref, names: list[str], thresholds: np.ndarray,
                 model_id: str, vocab_id: str, device: str, dtype: str, torch_threads: Optional[int],
                 chunk_size: int, score_floor: float, counter=None):
        t0 = time.perf_counter()
        import ray
        import torch

        from ..head import PreparedVocabulary
        from ..model import RamPlus
        from ..vocabulary import Vocabulary

        if torch_threads:
            torch.set_num_threads(torch_threads)
        arrays = ray.get(vocab_ref) if isinstance(vocab_ref, ray.ObjectRef) else vocab_ref
        t_vocab = time.perf_counter()
        prepared = PreparedVocabulary.from_numpy(arrays)
        path = materialize_checkpoint(checkpoint, storage)
        model = RamPlus.from_checkpoint(path, device=device, dtype=dtype, chunk_size=chunk_size, prepared=prepared)
        if model.model_id != model_id:
            raise RuntimeError(f"the checkpoint this worker loaded ({checkpoint}) has model_id {model.model_id}, "
                               f"the driver's has {model_id}: the file differs between nodes")
        vocab = Vocabulary(names=list(names), thresholds=np.asarray(thresholds, dtype=np.float32),
                           zh=[None] * len(names), embeds=prepared.embeds, mask=prepared.mask)
        model.set_vocabulary(vocab, prepared)
        model.label_embed = None  # the checkpoint's copy; the shared one above is what we use
        self.prepare_calls = 0
        original_prepare = model.prepare_vocabulary

        def counted_prepare(*a, **k):
            self.prepare_calls += 1
            return original_prepare(*a, **k)

        model.prepare_vocabulary = counted_prepare
        self.model = model
        self.names = np.asarray(names, dtype=object)
        self.score_floor = score_floor
        self.counter = counter
        self.infer_s = 0.0  # time inside the model since the last report (busy time)
        self.info = {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", ""),
            "torch_threads": torch.get_num_threads(),
            "vocab_get_s": round(t_vocab - t0, 4),
            "load_s": round(time.perf_counter() - t0, 4),
            "vocab_ref": vocab_ref.hex() if isinstance(vocab_ref, ray.ObjectRef) else None,
            "vocab_memory": {k: shared_memory_location(v) for k, v in arrays.items()},
            "rss_bytes": _rss(),
        }
        if counter is not None:
            counter.actor_ready.remote(self.info)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from ..preprocess import normalize

        n = batch.num_rows
        cols = batch.drop_columns(["pixels"]).to_pydict()
        tags: list = [None] * n
        scores: list = [None] * n
        error = list(cols["error"])
        stage = list(cols["stage"])
        ok = [i for i in range(n) if error[i] is None]
        if ok:
            pixels = _pixels(batch.column("pixels"), len(ok))
            t0 = time.perf_counter()
            results = self._infer(pixels, ok, error, stage, torch, normalize)
            self.infer_s += time.perf_counter() - t0
            for i, (t, s) in results.items():
                tags[i], scores[i] = t, s
        out = {k: cols[k] for k in ("uri", "size", "etag", "mtime", "width", "height")}
        out.update(tags=tags, scores=scores, error=error, stage=stage)
        if self.counter is not None:
            n_err = sum(e is not None for e in error)
            by_stage: dict = {}
            for s, e in zip(stage, error):
                if e is not None:
                    by_stage[s] = by_stage.get(s, 0) + 1
            self.counter.add.remote(n - n_err, n_err, by_stage, self.prepare_calls, self.infer_s)
            self.infer_s = 0.0
        return pa.table(out, schema=INFERRED_SCHEMA)

    def _infer(self, pixels, ok, error, stage, torch, normalize) -> dict:
        """Whole batch first; if it fails, one image at a time so one bad input costs one row."""
        try:
            return dict(zip(ok, self._rows(self._probs(pixels, normalize))))
        except Exception:  # noqa: BLE001
            pass
        results = {}
        for j, i in enumerate(ok):
            try:
                results[i] = self._rows(self._probs(pixels[j:j + 1], normalize))[0]
            except Exception as e:  # noqa: BLE001 - recorded as this image's error row
                error[i], stage[i] = f"inference failed: {type(e).__name__}: {str(e)[:300]}", "infer"
        return results

    def _probs(self, pixels: np.ndarray, normalize) -> np.ndarray:
        import warnings

        with warnings.catch_warnings():  # a read-only view of the batch: normalize copies, never writes it
            warnings.simplefilter("ignore", UserWarning)
            x = normalize(pixels)
        logits = self.model.logits(x)
        probs, _ = self.model.decide(logits)
        if not np.isfinite(probs).all():
            raise FloatingPointError("non-finite scores")
        return probs

    def _rows(self, probs: np.ndarray) -> list:
        thr = self.model.vocabulary.thresholds
        out = []
        for p in probs:
            on = p > thr
            # scores: every tag at or over the floor, plus any tag that is on (so `tags` is
            # always a subset of `scores`, even with a floor above some thresholds)
            keep = np.flatnonzero((p >= self.score_floor) | on)
            keep = keep[np.argsort(-p[keep], kind="stable")]
            out.append(([str(self.names[k]) for k in keep if on[k]],
                        [{"tag": str(self.names[k]), "score": float(p[k])} for k in keep]))
        return out


def _pixels(column: pa.ChunkedArray, n_ok: int) -> np.ndarray:
    """The ok rows' pixels as one [n, 384, 384, 3] view of the Arrow buffer (no per-row copies).

    Error rows hold empty values, so the values buffer is exactly the ok rows' pixels, in order.
    """
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    lengths = np.diff(offsets)
    if not np.all((lengths == 0) | (lengths == PIXEL_BYTES)) or int((lengths > 0).sum()) != n_ok:
        raise RuntimeError(f"decoded pixels have unexpected sizes {sorted(set(lengths.tolist()))}, "
                           f"expected {PIXEL_BYTES} per image")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.reshape(n_ok, 384, 384, 3)


def _rss() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None

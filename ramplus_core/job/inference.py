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
        # model_id hashes the weights as held in memory; verify only where that is the driver's fp32
        if model.dtype == torch.float32 and model.model_id != model_id:
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
        self.names = list(names)
        self.names_arrow = pa.array(self.names, pa.string())
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
            "process_started_at": _process_start(),
            "init_started_at": time.time() - (time.perf_counter() - t0),
            "ready_at": time.time(),
        }
        if counter is not None:
            counter.actor_ready.remote(self.info)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        error = batch.column("error").to_pylist()
        stage = batch.column("stage").to_pylist()
        ok = np.asarray([i for i in range(n) if error[i] is None], dtype=np.int64)
        probs = np.full((n, len(self.names)), np.nan, dtype=np.float32)
        if len(ok):
            t0 = time.perf_counter()
            got, failures = self._infer(_pixels(batch.column("pixels"), len(ok)))
            self.infer_s += time.perf_counter() - t0
            probs[ok] = got
            for j, reason in failures:
                error[ok[j]], stage[ok[j]] = reason, "infer"
        is_err = np.asarray([e is not None for e in error], dtype=bool)
        tags, scores = self._lists(probs, is_err)
        cols = [batch.column(k) for k in ("uri", "size", "etag", "mtime", "width", "height")]
        out = pa.Table.from_arrays(cols + [tags, scores, pa.array(error, pa.string()), pa.array(stage, pa.string())],
                                   schema=INFERRED_SCHEMA)
        if self.counter is not None:
            by_stage: dict = {}
            for st, e in zip(stage, error):
                if e is not None:
                    by_stage[st] = by_stage.get(st, 0) + 1
            n_err = int(is_err.sum())
            self.counter.add.remote(n - n_err, n_err, by_stage, self.prepare_calls, self.infer_s)
            self.infer_s = 0.0
        return out

    def _infer(self, pixels: np.ndarray) -> tuple[np.ndarray, list]:
        """Whole batch first; if it fails, one image at a time so one bad input costs one row."""
        try:
            return self._probs(pixels), []
        except Exception:  # noqa: BLE001
            pass
        out = np.full((len(pixels), len(self.names)), np.nan, dtype=np.float32)
        failures = []
        for j in range(len(pixels)):
            try:
                out[j] = self._probs(pixels[j:j + 1])[0]
            except Exception as e:  # noqa: BLE001 - recorded as this image's error row
                failures.append((j, f"inference failed: {type(e).__name__}: {str(e)[:300]}"))
        return out, failures

    def _probs(self, pixels: np.ndarray) -> np.ndarray:
        probs, _ = self.model.decide(self.model.logits(to_model_input(pixels, self.model.device)))
        if not np.isfinite(probs).all():
            raise FloatingPointError("non-finite scores")
        return probs.astype(np.float32, copy=False)

    def _lists(self, probs: np.ndarray, is_err: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """`tags` and `scores` list columns for a batch, built as arrays (no Python object per score).

        Scores keep every tag at or over the floor plus every tag that is on, so `tags` is
        always a subset of `scores`; both are sorted by score, highest first.
        """
        thr = self.model.vocabulary.thresholds
        p = np.where(is_err[:, None], 0.0, probs)
        on = (p > thr[None, :]) & ~is_err[:, None]
        keep = ((p >= self.score_floor) | on) & ~is_err[:, None]
        order = np.argsort(-p, axis=1, kind="stable")
        keep_s = np.take_along_axis(keep, order, 1)
        on_s = np.take_along_axis(on, order, 1)
        p_s = np.take_along_axis(p, order, 1)
        mask = pa.array(is_err)
        score_values = pa.StructArray.from_arrays(
            [self.names_arrow.take(pa.array(order[keep_s])), pa.array(p_s[keep_s], pa.float32())],
            fields=list(SCORE_TYPE))
        scores = pa.ListArray.from_arrays(_offsets(keep_s.sum(1)), score_values, mask=mask)
        tags = pa.ListArray.from_arrays(_offsets(on_s.sum(1)), self.names_arrow.take(pa.array(order[on_s])), mask=mask)
        return tags, scores


def _offsets(counts: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())


def to_model_input(pixels: np.ndarray, device) -> "torch.Tensor":  # noqa: F821
    """uint8 NHWC -> normalised float NCHW on `device`, as `preprocess.normalize` computes it.

    On a GPU the uint8 batch is moved first (a quarter of the bytes of float32) and
    normalised there; on the CPU this is bit for bit `preprocess.normalize` (same ops, same
    order, tested), without its warning about the read-only view of the Arrow buffer.
    """
    import torch

    from ..preprocess import MEAN, STD

    x = torch.from_numpy(np.ascontiguousarray(pixels)) if pixels.flags.writeable else _readonly(pixels, torch)
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _readonly(pixels: np.ndarray, torch):
    import warnings

    with warnings.catch_warnings():  # torch warns about read-only arrays; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels)


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


def _process_start() -> Optional[float]:
    """Wall time this worker process started (Linux), to split start-up into process, imports, load."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def _rss() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None

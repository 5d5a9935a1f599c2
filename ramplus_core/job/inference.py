"""The inference actor: one model per actor, the run's shared vocabulary, never recomputed.

A row reaches the actor with pixels (the backbone runs), with cached image tokens (the
backbone is skipped), or with neither when all its scores are copied. Rows of a grown
vocabulary (`base_key` set) carry the image's committed scores: the actor runs the head
only on the tags that the copy rule cannot supply (`keys[base_key]`, a slice of the shared
prepared vocabulary), copies the rest bit for bit, and applies this run's thresholds and
score floor to the whole set. What the model did is counted per batch (backbone images,
token reads, tag scores computed by the head, scores copied) and reported to the counter.

The driver projects the vocabulary once and `ray.put`s it; the ObjectRef reaches each actor
through `fn_constructor_kwargs`. Ray Data does not resolve references nested in constructor
arguments, so the actor `ray.get`s it: numpy arrays come back as read-only views of the
node's shared-memory object store, so every actor on a node reads the same physical copy
(for the released vocabulary that is ~1 GB of fp32 the actors do not each hold). The actor
reports where its arrays live (shared-memory file and offset) so tests and the manifest can
show that, and it counts any call to `prepare_vocabulary` (there must be none).

With `decode_limits` set (decode.device gpu, or auto on GPU actors), rows may arrive with
JPEG bytes in `encoded` instead of pixels: the actor decodes them all in one batched call
on its device (`gpu_decode.decode_batch`: nvJPEG on a GPU, torchvision's CPU decoder
elsewhere), falls back to the CPU decode for any image that fails there, and writes the
decoded size into `width`/`height`. A file that fails both ways is an error row of stage
`decode`, as if the decode task had refused it.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import pyarrow as pa

from .reader import PIXEL_BYTES
from .schemas import INFERRED_SCHEMA, SCORE_TYPE  # noqa: F401 - SCORE_TYPE is imported from here too


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
    """Ray Data callable class: DECODED (or work.LOADED) rows in, INFERRED rows out, one per row, in order."""

    def __init__(self, *, checkpoint: str, storage, vocab_ref, names: list[str], thresholds: np.ndarray,
                 model_id: str, vocab_id: str, device: str, dtype: str, torch_threads: Optional[int],
                 chunk_size: int, score_floor: float, counter=None, keys: Optional[dict] = None,
                 output_uri: Optional[str] = None, run_id: Optional[str] = None, cache_tokens: bool = False,
                 token_dtype: str = "fp16", decode_limits=None, model_needed: bool = True):
        t0 = time.perf_counter()
        import ray
        import torch

        from ..head import PreparedVocabulary
        from ..model import RamPlus
        from ..vocabulary import Vocabulary

        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        if not model_needed:
            self._copy_only(names, score_floor, counter, keys, model_id, t0)
            return
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
        # names and thresholds only: the scores come from the shared prepared blocks, so the raw
        # description embeddings are never rebuilt here
        vocab = Vocabulary.without_embeddings(names, thresholds)
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
        self.storage, self.output_uri, self.run_id, self.model_id = storage, output_uri, run_id, model_id
        self.cache_tokens = bool(cache_tokens and output_uri)
        self.token_dtype = np.float16 if token_dtype == "fp16" else np.float32
        self.keys = {}
        full = model.prepared
        for key, spec in (keys or {}).items():
            idx = np.asarray(spec["compute"], dtype=np.int64)
            copy = np.ones(len(self.names), dtype=bool)
            copy[idx] = False
            self.keys[key] = {"compute": idx, "copy": copy, "prepared": full.select(idx) if len(idx) else None}
        self.work = _zero_work()
        self.decode_limits = decode_limits  # None: pixels arrive decoded; else JPEG bytes may, in `encoded`
        self.info = {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
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
        import torch

        n, c = batch.num_rows, len(self.names)
        names = batch.column_names

        def col(name, typ):
            return batch.column(name) if name in names else pa.chunked_array([pa.nulls(n, typ)])

        error = batch.column("error").to_pylist()
        stage = batch.column("stage").to_pylist()
        base_key = col("base_key", pa.string()).to_pylist()
        tok_file = col("tokens_file", pa.string()).to_pylist()
        tok_row = col("tokens_row", pa.int32()).to_pylist()
        has_px = _lengths(batch.column("pixels")) > 0
        has_tok = _lengths(batch.column("tokens")) > 0 if "tokens" in names else np.zeros(n, dtype=bool)
        has_enc = _lengths(batch.column("encoded")) > 0 if "encoded" in names else np.zeros(n, dtype=bool)
        ok = np.asarray([e is None for e in error], dtype=bool)
        widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
        for i in np.flatnonzero(ok & has_enc & ~has_px):
            if self.decode_limits is None:
                error[i], stage[i] = "internal: JPEG bytes reached an actor that does not decode", "infer"
                ok[i] = False
        for i in np.flatnonzero(ok & ~has_px & ~has_tok & ~has_enc):
            if base_key[i] is None or self.keys.get(base_key[i], {}).get("prepared") is not None:
                error[i], stage[i] = "internal: a row reached the model with neither pixels nor tokens", "infer"
                ok[i] = False
        probs = np.full((n, c), -1.0, dtype=np.float32)  # -1: not scored (under every floor and threshold)
        t0 = time.perf_counter()

        # image tokens: from pixels (the backbone) or from the cache
        tokens: dict[int, "torch.Tensor"] = {}
        px, pixels = self._inputs(batch, ok & has_px, ok & has_enc & ~has_px, error, stage, widths, heights)
        ok &= np.asarray([e is None for e in error], dtype=bool)
        if len(px):
            got, failures = self._each(self._tokens, pixels)
            for j, reason in failures:
                error[px[j]], stage[px[j]] = reason, "infer"
            for j, i in enumerate(px):
                if got[j] is not None:
                    tokens[i] = got[j]
            self.work["backbone_images"] += len(px) - len(failures)
        tk = np.flatnonzero(ok & has_tok & ~has_px)
        if len(tk):
            dtypes = col("tokens_dtype", pa.string()).to_pylist()
            raw = batch.column("tokens")
            from .work import TOKENS_SHAPE

            # one array and one transfer to the device for the batch, not one per row
            arr = np.stack([np.frombuffer(raw[int(i)].as_buffer(), dtype=dtypes[i] or "float16") for i in tk])
            cached = torch.from_numpy(arr.reshape(len(tk), *TOKENS_SHAPE)).to(self.model.device, self.model.dtype)
            for j, i in enumerate(tk):
                tokens[i] = cached[j]
            self.work["token_reads"] += len(tk)

        # the head: every tag for full rows, the tags the copy rule cannot give for grown rows
        groups: dict = {}
        for i in tokens:
            k = base_key[i]
            if k is not None and self.keys.get(k, {}).get("prepared") is None:
                continue  # nothing to compute for this row
            groups.setdefault(k, []).append(i)
        for k, rows in groups.items():
            spec = self.keys.get(k) if k is not None else None
            if k is not None and spec is None:
                for i in rows:
                    error[i], stage[i] = f"internal: unknown base_key {k}", "infer"
                continue
            prepared = spec["prepared"] if spec else None
            got, failures = self._each(lambda x, p=prepared: self._head(x, p), torch.stack([tokens[i] for i in rows]))
            for j, reason in failures:
                error[rows[j]], stage[rows[j]] = reason, "infer"
            for j, i in enumerate(rows):
                if got[j] is None:
                    continue
                if spec is None:
                    probs[i] = got[j]
                else:
                    probs[i, spec["compute"]] = got[j]
            width = c if spec is None else len(spec["compute"])
            self.work["head_tag_scores"] += (len(rows) - len(failures)) * width

        # copied scores of grown rows
        grown = np.asarray([ok[i] and error[i] is None and base_key[i] is not None for i in range(n)], dtype=bool)
        if grown.any():
            self.work["copied_scores"] += self._copy(batch, col, base_key, grown, probs)

        # new tokens into the cache (only those the backbone computed here)
        fresh = [i for i in px if i in tokens and error[i] is None]
        if self.cache_tokens and fresh:
            from .work import token_file_name, write_tokens

            rel = token_file_name(self.model_id, self.run_id or "run")
            arr = torch.stack([tokens[i] for i in fresh]).to("cpu", torch.float32).numpy().astype(self.token_dtype)
            try:
                write_tokens(self.storage, self.output_uri, rel, arr)
                for j, i in enumerate(fresh):
                    tok_file[i], tok_row[i] = rel, j
                self.work["tokens_written"] += len(fresh)
            except Exception:  # noqa: BLE001 - a cache write failure loses only the cache entry
                pass
        self.infer_s += time.perf_counter() - t0

        is_err = np.asarray([e is not None for e in error], dtype=bool)
        tags, scores = self._lists(probs, is_err)
        cols = [batch.column(k) for k in ("uri", "size", "etag", "mtime")]
        cols += [pa.array(widths, pa.int32()), pa.array(heights, pa.int32())]
        out = pa.Table.from_arrays(cols + [tags, scores, pa.array(error, pa.string()), pa.array(stage, pa.string()),
                                          col("version", pa.string()), pa.array(tok_file, pa.string()),
                                          pa.array(tok_row, pa.int32())],
                                   schema=INFERRED_SCHEMA)
        if self.counter is not None:
            by_stage: dict = {}
            for st, e in zip(stage, error):
                if e is not None:
                    by_stage[st] = by_stage.get(st, 0) + 1
            n_err = int(is_err.sum())
            self.counter.add.remote(n - n_err, n_err, by_stage, self.prepare_calls, self.infer_s, self.work)
            self.infer_s = 0.0
            self.work = _zero_work()
        return out

    def _copy_only(self, names, score_floor, counter, keys, model_id, t0) -> None:
        """A Tagger without a model, for a plan whose every row copies its scores (`need` none).

        Removing tags or changing thresholds re-decides committed scores; loading the model
        (minutes for the release) for that would be waste. A row that needs the model here
        becomes an internal error row (the plan never sends one).
        """
        if any(len(spec["compute"]) for spec in (keys or {}).values()):
            raise ValueError("internal: a copy-only Tagger was given tags to compute")
        self.model, self.prepare_calls, self.infer_s = None, 0, 0.0
        self.names = list(names)
        self.names_arrow = pa.array(self.names, pa.string())
        self.score_floor, self.counter, self.model_id = score_floor, counter, model_id
        self.storage = self.output_uri = self.run_id = None
        self.cache_tokens, self.decode_limits = False, None
        self.keys = {}
        for key, spec in (keys or {}).items():
            self.keys[key] = {"compute": np.zeros(0, dtype=np.int64), "copy": np.ones(len(self.names), dtype=bool),
                              "prepared": None}
        self.work = _zero_work()
        self.info = {"pid": os.getpid(), "device": None, "model": False, "load_s": round(time.perf_counter() - t0, 4)}

    def _each(self, fn, x) -> tuple[list, list]:
        """fn over the whole batch; if it fails, one row at a time so one bad input costs one row."""
        try:
            out = fn(x)
            return [out[j] for j in range(len(x))], []
        except Exception:  # noqa: BLE001
            pass
        got: list = [None] * len(x)
        failures = []
        for j in range(len(x)):
            try:
                got[j] = fn(x[j:j + 1])[0]
            except Exception as e:  # noqa: BLE001 - recorded as this image's error row
                failures.append((j, f"inference failed: {type(e).__name__}: {str(e)[:300]}"))
        return got, failures

    def _inputs(self, batch: pa.Table, decoded: np.ndarray, encoded: np.ndarray, error: list, stage: list,
                width: list, height: list):
        """Rows for the backbone and their uint8 NHWC pixels, in row order: decoded rows (a view of
        the Arrow buffer) and JPEG rows decoded here in one batch; JPEG rows that fail get error rows."""
        rows = np.flatnonzero(decoded)
        pixels = _pixels(batch.column("pixels"), len(rows)) if len(rows) else np.empty((0, 384, 384, 3), np.uint8)
        enc = np.flatnonzero(encoded)
        if not len(enc):
            return rows, pixels
        import torch

        from ..gpu_decode import decode_batch

        column = batch.column("encoded")
        got = decode_batch([memoryview(column[int(i)].as_buffer()) for i in enc], self.decode_limits, self.model.device)
        for j, i in enumerate(enc):
            if got.ok[j]:
                width[i], height[i] = got.width[j], got.height[j]
            else:
                error[i], stage[i] = got.error[j], "decode"
        self.work["actor_decoded_jpegs"] += got.on_device
        both = np.concatenate([rows, enc[got.ok]])
        order = np.argsort(both, kind="stable")
        x = torch.cat([_as_tensor(pixels).to(self.model.device), got.pixels.to(self.model.device)])
        return both[order], x[torch.from_numpy(order).to(x.device)]

    def _tokens(self, pixels):
        """uint8 NHWC (numpy or a tensor) -> projected image tokens [N, 145, 512] (the backbone)."""
        return self.model.image_tokens(to_model_input(pixels, self.model.device))

    def _head(self, tokens, prepared=None) -> np.ndarray:
        """Probabilities of the full vocabulary (prepared None) or of a slice of it, as `decide` computes them."""
        import torch

        probs = torch.sigmoid(self.model.logits_from_tokens(tokens, prepared).float()).cpu().numpy()
        if not np.isfinite(probs).all():
            raise FloatingPointError("non-finite scores")
        return probs.astype(np.float32, copy=False)

    def _copy(self, batch: pa.Table, col, base_key: list, grown: np.ndarray, probs: np.ndarray) -> int:
        """Scatter the committed scores that the copy rule allows into `probs`; returns how many."""
        import pyarrow.compute as pc

        keys = [k for k in dict.fromkeys(base_key[i] for i in np.flatnonzero(grown)) if k in self.keys]
        kidx = {k: j for j, k in enumerate(keys)}
        copy = np.stack([self.keys[k]["copy"] for k in keys]) if keys else np.zeros((0, len(self.names)), bool)
        row_key = np.asarray([kidx.get(base_key[i], -1) if grown[i] else -1 for i in range(len(base_key))])
        lists = col("base_scores", pa.list_(SCORE_TYPE))
        n = 0
        offset = 0
        for chunk in lists.chunks:
            if len(chunk):
                parents = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False) + offset
                flat = pc.list_flatten(chunk)
                pos = pc.index_in(flat.field("tag"), value_set=self.names_arrow)
                valid = pos.is_valid().to_numpy(zero_copy_only=False)
                j = np.asarray(pc.fill_null(pos, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
                k = row_key[parents]
                take = valid & (k >= 0)
                take[take] = copy[k[take], j[take]]
                vals = flat.field("score").to_numpy(zero_copy_only=False)
                probs[parents[take], j[take]] = vals[take]
                n += int(take.sum())
            offset += len(chunk)
        return n

    def _lists(self, probs: np.ndarray, is_err: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """`tags` and `scores` list columns for a batch, built as arrays (no Python object per score).

        Scores keep every tag at or over the floor plus every tag that is on, so `tags` is
        always a subset of `scores`; both are sorted by score, highest first.
        """
        thr = self.thresholds
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


def _as_tensor(pixels):
    import torch

    if isinstance(pixels, torch.Tensor):
        return pixels
    return torch.from_numpy(np.ascontiguousarray(pixels)) if pixels.flags.writeable else _readonly(pixels, torch)


def to_model_input(pixels, device) -> "torch.Tensor":  # noqa: F821
    """uint8 NHWC -> normalised float NCHW on `device`, as `preprocess.normalize` computes it.

    On a GPU the uint8 batch is moved first (a quarter of the bytes of float32) and
    normalised there; on the CPU this is bit for bit `preprocess.normalize` (same ops, same
    order, tested), without its warning about the read-only view of the Arrow buffer.
    """
    import torch

    from ..preprocess import MEAN, STD

    x = _as_tensor(pixels).to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _readonly(pixels: np.ndarray, torch):
    import warnings

    with warnings.catch_warnings():  # torch warns about read-only arrays; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels)


def _lengths(column: pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _pixels(column: pa.ChunkedArray, n_ok: int) -> np.ndarray:
    """The pixel rows' pixels as one [n, 384, 384, 3] view of the Arrow buffer (no per-row copies).

    Every other row (errors, rows fed from cached tokens or copied scores) holds an empty
    value, so the values buffer is exactly the pixel rows' pixels, in order.
    """
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    lengths = np.diff(offsets)
    if not np.all((lengths == 0) | (lengths == PIXEL_BYTES)) or int((lengths > 0).sum()) != n_ok:
        raise RuntimeError(f"decoded pixels have unexpected sizes {sorted(set(lengths.tolist()))}, "
                           f"expected {PIXEL_BYTES} per image")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.reshape(n_ok, 384, 384, 3)


def _zero_work() -> dict:
    return {"backbone_images": 0, "token_reads": 0, "head_tag_scores": 0, "copied_scores": 0, "tokens_written": 0,
            "actor_decoded_jpegs": 0}  # the last: JPEGs decoded by the actor's device decoder (gpu_decode)


def _process_start() -> Optional[float]:
    """Wall time this worker process started (Linux), to split start-up into process, imports, load."""
    from .state import _process_start_ticks

    ticks = _process_start_ticks(os.getpid())
    if ticks is None:
        return None
    try:
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

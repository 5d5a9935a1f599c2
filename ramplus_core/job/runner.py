"""The tagging job end to end: checks, checkpoint, listing, Ray Data pipeline, verify, commit.

The order is chosen so that the cheap failures come first: config and paths (no I/O beyond
a probe), then the checkpoint and the vocabulary (a wrong file fails in seconds, before a
listing of millions of keys and before any Ray worker starts), then listing, then the plan
(the listing joined with the index of committed results: what is new, changed, deleted or
already done), then the long pipeline over the work only. Nothing is committed unless every
listed image is provably either already done or in exactly one row this run wrote.

Every step leaves its result in the run's staging folder before it counts (state.py), so a
driver killed anywhere is resumed by starting the job again with the same settings.

Pipeline (Ray Data, streaming; each stage's resources are sized so that on a 2-CPU machine
the actor pool cannot starve the decode and write tasks it depends on):

    read_parquet(plan shards) -> repartition(decode.batch_size rows per block)
      -> map_batches(load_inputs, CPU tasks, decode.num_cpus each)   # fetch+decode, or cached tokens
      -> map_batches(Tagger, ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor)
      -> write_datasink(TagsDatasink)   # tags/ and errors/ in one pass, a receipt per task
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CheckpointError, ConfigError, RamPlusError
from ..preprocess import DecodeLimits
from . import index as ix
from . import manifest as mf
from . import plan as pl
from .config import JobConfig, redact_uri, redacted, uri_scheme
from .inference import Tagger, materialize_checkpoint
from .listing import Fingerprint, ListingFailed, ListingResult, list_inputs
from .progress import ProgressCounter, ProgressReporter, progress_line, steady_rate, summary_table
from .scrub import Scrubber
from .state import RunState, open_run, resume_key
from .storage import Storage, ensure_dir, join, last_line, local_path, preflight, to_uri
from .vocab import _read_thresholds, build_vocabulary, descriptor, load_descriptor, save_descriptor  # noqa: F401
from .vocab import select_vocabulary  # noqa: F401 - imported from here by older callers
from .work import load_inputs
from .writer import ERRORS_SCHEMA, TAGS_SCHEMA, TagsDatasink, file_prefix

EXACT_DIFF_LIMIT = 1_000_000


class JobFailed(RamPlusError):
    """The run did not commit (invariant violated or the pipeline failed); see the manifest."""

    def __init__(self, message: str, manifest_uri: Optional[str] = None):
        super().__init__(message)
        self.manifest_uri = manifest_uri


@dataclass
class RunResult:
    run_id: str
    manifest: dict
    manifest_uri: str
    summary: str


@dataclass
class Plan:
    """How the cluster's resources are split between decoding and inference."""

    cluster_cpus: float
    cluster_gpus: float
    nodes: int
    actors: int
    gpus_per_actor: float
    actor_cpus: float
    device: str
    dtype: str
    torch_threads: Optional[int]
    decode_cpus: float
    decode_tasks: Optional[int]


# -- steps -------------------------------------------------------------------------------

def load_model_once(cfg: JobConfig, storage: Storage):
    """Load the checkpoint in the driver: fail fast, hash it, project the vocabulary once."""
    from ..model import RamPlus

    try:
        path = materialize_checkpoint(cfg.checkpoint, storage)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {redact_uri(cfg.checkpoint)} does not exist") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - download errors of any client
        raise CheckpointError(f"checkpoint: cannot download {redact_uri(cfg.checkpoint)}: {type(e).__name__}: {e}") from None
    model = RamPlus.from_checkpoint(path, device="cpu", chunk_size=cfg.inference.chunk_size)
    vocab = build_vocabulary(cfg.vocabulary, model.vocabulary)
    prepared = model.prepare_vocabulary(vocab)
    vocab_id = vocab.content_id()
    return {
        "model_id": model.model_id,
        "vocab_id": vocab_id,
        "names": list(vocab.names),
        "thresholds": np.asarray(vocab.thresholds, dtype=np.float32),
        "arrays": prepared.to_numpy(),
        "descriptions_per_tag": int(vocab.embeds.shape[1]),
        "descriptor": descriptor(vocab, vocab_id),
    }


def ensure_ray(cfg: JobConfig) -> bool:
    """Use a running Ray (tests, `ray job submit`), else connect or start one; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = {"log_to_driver": True}
    address = cfg.ray.address
    if address == "local" or cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if address:
        kwargs["address"] = address
    ray.init(**kwargs)
    return True


def plan_resources(cfg: JobConfig) -> Plan:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    ic = cfg.inference
    gpa = ic.gpus_per_actor if ic.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if gpa > 0 and gpus < gpa:
        raise ConfigError(f"inference.gpus_per_actor: {gpa} GPU(s) per actor, but the cluster has {gpus:g}")
    actors = ic.actors or (max(1, int(gpus // gpa)) if gpa > 0 else nodes)
    device = ic.device or ("cuda" if gpa > 0 else "cpu")
    if device.startswith("cuda") and gpa == 0:
        raise ConfigError("inference.device: cuda needs inference.gpus_per_actor > 0 (the cluster has "
                          f"{gpus:g} GPUs)")
    spare = cpus - actors * ic.num_cpus
    # Ray Data's streaming repartition runs as tasks of one whole CPU: with less left beside
    # the actors they never start and the run waits forever
    if spare < max(1.0, cfg.decode.num_cpus):
        raise ConfigError(f"inference.actors x inference.num_cpus = {actors} x {ic.num_cpus:g} leaves {spare:g} of the "
                          f"cluster's {cpus:g} CPUs for reading, decoding and writing (at least 1 and "
                          f"decode.num_cpus = {cfg.decode.num_cpus:g} are needed); lower one of them")
    threads = ic.torch_threads
    if threads is None:
        # CPU replicas get the machine (decoding is a few % of Swin-L's cost); a GPU replica
        # only feeds its GPU, and torch's default (all cores) would fight the decode tasks.
        threads = max(1, int(cpus // actors)) if device == "cpu" else max(1, int(ic.num_cpus))
    return Plan(cpus, gpus, nodes, actors, gpa, ic.num_cpus, device, ic.dtype, threads,
                cfg.decode.num_cpus, cfg.decode.tasks)


def run_pipeline(cfg: JobConfig, storage: Storage, staging: str, files: list[str], plan: Plan,
                 model: dict, vocab_ref, counter, sink: TagsDatasink, keys: dict, run_id: str) -> None:
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    dctx = ray.data.DataContext.get_current()
    dctx.enable_progress_bars = cfg.ray.progress_bars
    dctx.execution_options.preserve_order = False
    pa_fs, _ = storage.pyarrow(join(staging, "plan"))
    limits = DecodeLimits(max_bytes=cfg.decode.max_bytes, max_pixels=cfg.decode.max_pixels,
                          jpeg_draft=cfg.decode.jpeg_draft)
    ds = ray.data.read_parquet(files, filesystem=pa_fs, num_cpus=0.25)
    ds = ds.repartition(target_num_rows_per_block=cfg.decode.batch_size)
    ds = ds.map_batches(
        load_inputs,
        batch_size=cfg.decode.batch_size,
        batch_format="pyarrow",
        fn_kwargs={"storage": storage, "fetch": cfg.fetch, "limits": limits, "output_uri": cfg.output},
        num_cpus=plan.decode_cpus,
        compute=TaskPoolStrategy(size=plan.decode_tasks) if plan.decode_tasks else None,
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        Tagger,
        batch_size=cfg.inference.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.gpus_per_actor or None,
        # bounded, not Ray Data's default of forever: a batch that kills every replica fails the run
        max_restarts=cfg.inference.max_restarts,
        max_task_retries=cfg.inference.max_task_retries,
        fn_constructor_kwargs={
            "checkpoint": cfg.checkpoint, "storage": storage, "vocab_ref": vocab_ref,
            "names": model["names"], "thresholds": model["thresholds"],
            "model_id": model["model_id"], "vocab_id": model["vocab_id"],
            "device": plan.device, "dtype": plan.dtype, "torch_threads": plan.torch_threads,
            "chunk_size": cfg.inference.chunk_size, "score_floor": cfg.inference.score_floor,
            "counter": counter, "keys": keys, "output_uri": cfg.output, "run_id": run_id,
            "cache_tokens": cfg.cache.image_tokens, "token_dtype": cfg.cache.token_dtype,
        },
        udf_modifying_row_count=False,
    )
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})


def runs_on_this_cpu(cfg: JobConfig) -> bool:
    """True when the job would start its own local Ray on a machine without a GPU.

    Then a small work set is cheaper in the driver, which has the model loaded already, than
    through Ray Data (executor start, actor processes importing torch, a model per actor):
    the same CPUs either way. With a cluster (an address, a running Ray) or a GPU, the
    pipeline's replicas are where the work belongs.
    """
    import ray

    if cfg.ray.address not in (None, "local") or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return False
    import torch

    return not torch.cuda.is_available()


class _Ctx:
    def __init__(self, task_idx: int):
        self.task_idx = task_idx


def run_in_driver(cfg: JobConfig, storage: Storage, staging: str, files: list[str], model: dict, arrays: dict,
                  sink: TagsDatasink, keys: dict, run_id: str, total: int, emit) -> dict:
    """The pipeline's steps in this process: load_inputs -> Tagger -> the datasink's write.

    Same code as the Ray path, so the rows, receipts, token cache and verify are the same.
    """
    fs, _ = storage.pyarrow(join(staging, "plan"))
    limits = DecodeLimits(max_bytes=cfg.decode.max_bytes, max_pixels=cfg.decode.max_pixels,
                          jpeg_draft=cfg.decode.jpeg_draft)
    tagger = Tagger(checkpoint=cfg.checkpoint, storage=storage, vocab_ref=arrays, names=model["names"],
                    thresholds=model["thresholds"], model_id=model["model_id"], vocab_id=model["vocab_id"],
                    device="cpu", dtype=cfg.inference.dtype, torch_threads=cfg.inference.torch_threads,
                    chunk_size=cfg.inference.chunk_size, score_floor=cfg.inference.score_floor, counter=None,
                    keys=keys, output_uri=cfg.output, run_id=run_id, cache_tokens=cfg.cache.image_tokens,
                    token_dtype=cfg.cache.token_dtype)
    snap = {"tagged": 0, "errors": 0, "by_stage": {}, "actors": [tagger.info], "prepare_calls": 0, "infer_s": 0.0,
            "first": None, "first_n": 0, "last": None}
    buf: list = []
    task = 0
    last = time.monotonic()
    t0 = time.monotonic()

    def flush():
        nonlocal buf, task
        if buf:
            sink.write(buf, _Ctx(task))
            task += 1
            buf = []

    for path in files:
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=cfg.inference.batch_size):
            out = tagger(load_inputs(pa.Table.from_batches([batch]), storage=storage, fetch=cfg.fetch,
                                     limits=limits, output_uri=cfg.output))
            n_ok = out.column("error").null_count
            snap["tagged"] += n_ok
            snap["errors"] += out.num_rows - n_ok
            now = time.time()
            if snap["first"] is None:
                snap["first"], snap["first_n"] = now, out.num_rows
            snap["last"] = now
            buf.append(out)
            if sum(b.num_rows for b in buf) >= cfg.layout.rows_per_file:
                flush()
            if time.monotonic() - last > cfg.ray.progress_interval_s:
                emit(progress_line(snap, total, time.monotonic() - t0))
                last = time.monotonic()
    flush()
    snap["prepare_calls"] = tagger.prepare_calls
    snap["infer_s"] = tagger.infer_s
    snap["work"] = dict(tagger.work)
    return snap


def run_files(rs: RunState) -> tuple[list[dict], Fingerprint, dict]:
    """The data files the receipts of every attempt vouch for, with their rows; receipt fingerprint."""
    files: dict[str, dict] = {}
    fp = Fingerprint()
    status: dict = {}
    for t in rs.iter_receipts(["uri", "file", "status", "stage"]):
        fp.update(t.column("uri"))
        for f, st, stage in zip(t.column("file").to_pylist(), t.column("status").to_pylist(),
                                t.column("stage").to_pylist()):
            e = files.setdefault(f, {"kind": "tags" if st == ix.TAGGED else "errors", "path": f, "rows": 0})
            e["rows"] += 1
            k = st if st == ix.TAGGED else f"error:{stage}"
            status[k] = status.get(k, 0) + 1
    return sorted(files.values(), key=lambda f: f["path"]), fp, status


def verify(storage: Storage, output_uri: str, rs: RunState, listing: ListingResult, plan: pl.Plan) -> dict:
    """Re-read the uri column of every file the receipts name and check the run's invariant.

    listed = skipped (done earlier) + work, and the rows written (over every attempt) are the
    work, each image once: order-free fingerprints of URIs on every side.
    """
    written, receipt_fp, status = run_files(rs)
    fp = Fingerprint()
    counts = {"tags": 0, "errors": 0}
    by_stage: dict = {}
    problems = []
    for f in written:
        fs, path = storage.pyarrow(join(output_uri, f["path"]))
        cols = ["uri", "stage"] if f["kind"] == "errors" else ["uri"]
        try:
            with fs.open_input_file(path) as fh:
                t = pq.ParquetFile(fh).read(columns=cols)
        except (FileNotFoundError, OSError) as e:
            problems.append(f"{f['path']} cannot be read: {e}")
            continue
        if t.num_rows != f["rows"]:
            problems.append(f"{f['path']} holds {t.num_rows} rows, its receipts name {f['rows']}")
        counts[f["kind"]] += t.num_rows
        fp.update(t.column("uri"))
        if f["kind"] == "errors":
            for s_ in t.column("stage").to_pylist():
                by_stage[s_] = by_stage.get(s_, 0) + 1
    work_fp, skipped_fp = Fingerprint(*plan.work_fp), Fingerprint(*plan.skipped_fp)
    if work_fp + skipped_fp != listing.fingerprint:
        problems.append(f"the plan does not add up to the listing ({work_fp.count} to do + {skipped_fp.count} done "
                        f"!= {listing.listed} listed)")
    ok = fp == work_fp and receipt_fp == work_fp and not problems
    detail = "; ".join(problems)
    if fp != work_fp or receipt_fp != work_fp:
        head = (f"{work_fp.count} images to do, wrote {counts['tags']} tag rows + {counts['errors']} error rows "
                f"= {fp.count}")
        if work_fp.count <= EXACT_DIFF_LIMIT:
            head += "; " + _exact_diff(storage, output_uri, rs, plan, written)
        detail = head + (f"; {detail}" if detail else "")
    return {"ok": ok, "detail": detail, "tagged": counts["tags"], "errors": counts["errors"],
            "errors_by_stage": by_stage, "listing_fingerprint": listing.fingerprint.as_dict(),
            "output_fingerprint": fp.as_dict(), "work_fingerprint": work_fp.as_dict(),
            "skipped_fingerprint": skipped_fp.as_dict(), "files": written}


def _exact_diff(storage, output_uri, rs: RunState, plan: pl.Plan, written) -> str:
    import collections

    fs, _ = storage.pyarrow(join(rs.staging, "plan"))
    todo = set()
    for path in plan.files:
        todo.update(pq.read_table(path, columns=["uri"], filesystem=fs).column("uri").to_pylist())
    seen: collections.Counter = collections.Counter()
    for f in written:
        ffs, path = storage.pyarrow(join(output_uri, f["path"]))
        try:
            with ffs.open_input_file(path) as fh:
                seen.update(pq.ParquetFile(fh).read(columns=["uri"]).column("uri").to_pylist())
        except (FileNotFoundError, OSError):
            pass
    missing = sorted(todo - set(seen))
    dup = sorted(u for u, c in seen.items() if c > 1)
    extra = sorted(set(seen) - todo)
    return (f"{len(missing)} missing (e.g. {missing[:3]}), {len(dup)} written more than once (e.g. {dup[:3]}), "
            f"{len(extra)} not to do (e.g. {extra[:3]})")


def remaining_work(storage: Storage, rs: RunState, plan: pl.Plan) -> tuple[list[str], int]:
    """Plan shards less the images earlier attempts' receipts vouch for; (shards, rows kept)."""
    done = [t.column("uri") for t in rs.iter_receipts(["uri"])]
    if not done:
        return list(plan.files), 0
    st = ix.IndexState.of_keys(*ix.uri_hashes(pa.chunked_array(done)))
    fs, root = storage.pyarrow(join(rs.staging, f"todo-{rs.attempt:02d}"))
    ensure_dir(fs, root)
    out = []
    for path in plan.files:
        t = pq.read_table(path, filesystem=fs)
        q1, q2 = ix.uri_hashes(t.column("uri"))
        left = st.lookup(q1, q2) < 0
        if left.any():
            dest = f"{root}/part-{len(out):05d}.parquet"
            pq.write_table(t.filter(pa.array(left)), dest, filesystem=fs, compression="zstd")
            out.append(dest)
    return out, len(st.h1)


def delete_orphans(storage: Storage, output_uri: str, rs: RunState, cfg: JobConfig, keep: set) -> list[str]:
    """Data files of this run that no receipt vouches for (a task killed mid-way): deleted before the commit."""
    import pyarrow.fs as pafs

    gone = []
    prefix = file_prefix(rs.run_id)
    for kind in ("tags", "errors"):
        sub = [f"run_date={rs.run_date}"] if cfg.layout.partition_by[:1] == ("run_date",) else []
        fs, root = storage.pyarrow(join(output_uri, kind, *sub))
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
        except FileNotFoundError:
            continue
        base = storage.pyarrow(output_uri)[1].rstrip("/") + "/"
        for i in infos:
            if i.type != pafs.FileType.File:
                continue
            name = i.base_name
            ours = name.startswith(prefix) or (name.startswith(".") and f".{prefix}" in name)
            rel = i.path[len(base):] if i.path.startswith(base) else i.path
            if ours and rel not in keep:
                fs.delete_file(i.path)
                gone.append(rel)
    return gone


def write_index_delta(storage: Storage, output_uri: str, rs: RunState, plan: pl.Plan) -> int:
    """The run's index rows: every receipt row, then a row per tombstone."""
    def tables():
        yield from rs.iter_receipts()
        if plan.tombstones:
            fs, path = storage.pyarrow(join(output_uri, plan.tombstones["path"]))
            t = pq.read_table(path, filesystem=fs)
            n = t.num_rows
            yield pa.table({
                "uri": t.column("uri"), "version": t.column("version"), "etag": t.column("etag"),
                "size": pa.nulls(n, pa.int64()), "mtime": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                "status": pa.array([ix.DELETED] * n, pa.string()), "stage": pa.nulls(n, pa.string()),
                "model_id": pa.nulls(n, pa.string()), "vocab_id": pa.nulls(n, pa.string()),
                "score_floor": pa.nulls(n, pa.float32()), "run_id": t.column("run_id"),
                "file": pa.array([plan.tombstones["path"]] * n, pa.string()),
                "tokens_file": pa.nulls(n, pa.string()), "tokens_row": pa.nulls(n, pa.int32()),
            })

    return ix.write_rows(storage, ix.delta_uri(output_uri, rs.run_id), tables())


def input_prefixes(inputs) -> list[str]:
    """The URI prefix of each input as listed URIs spell it (for the tombstone scope)."""
    out = []
    for u in inputs:
        scheme = uri_scheme(u)
        out.append(to_uri("file", local_path(u)) if scheme == "file" else f"{scheme}://{u.split('://', 1)[1]}")
    return [p.rstrip("/") for p in out]


def _listing_dict(listing: ListingResult) -> dict:
    return {"files": listing.files, "listed": listing.listed, "skipped": listing.skipped,
            "list_errors": listing.list_errors, "skipped_examples": listing.skipped_examples,
            "per_input": listing.per_input, "fingerprint": list(listing.fingerprint.as_tuple()), "seconds": listing.seconds}


def _listing_from(d: dict) -> ListingResult:
    return ListingResult(files=d["files"], listed=d["listed"], skipped=d["skipped"], list_errors=d["list_errors"],
                         skipped_examples=d["skipped_examples"], per_input=d["per_input"],
                         fingerprint=Fingerprint(*d["fingerprint"]), seconds=d.get("seconds", 0.0))


def _cleanup_staging(storage: Storage, staging: str) -> None:
    import pyarrow.fs as pafs

    try:
        fs, path = storage.pyarrow(staging)
        fs.delete_dir(path)
        parent = path.rsplit("/", 1)[0]
        if not isinstance(fs, pafs.S3FileSystem) and not fs.get_file_info(pafs.FileSelector(parent)):
            fs.delete_dir(parent)  # the empty `_staging` folder itself
    except Exception:  # noqa: BLE001 - leftover staging files are harmless
        pass


def _events(snap: dict, t0: float) -> dict:
    """When, after the pipeline started, the actors came up and the first and last batch ended."""
    def rel(x):
        return round(x - t0, 3) if x else None

    actors = snap.get("actors", [])
    return {
        "actor_process_started": [rel(a.get("process_started_at")) for a in actors],
        "actor_init_started": [rel(a.get("init_started_at")) for a in actors],
        "actor_ready": [rel(a.get("ready_at")) for a in actors],
        "first_batch_done": rel(snap.get("first")),
        "last_batch_done": rel(snap.get("last")),
    }


def versions() -> dict:
    import PIL
    import pyarrow
    import ray
    import torch

    from .. import __version__

    return {"ramplus": __version__, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "pyarrow": pyarrow.__version__, "pillow": PIL.__version__,
            "platform": platform.platform()}


# -- the whole run -------------------------------------------------------------------------

def run(cfg: JobConfig, emit: Callable[[str], None] = print) -> RunResult:
    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    timings: dict = {}
    storage = Storage.from_config(cfg.storage)
    scrubber = Scrubber.for_run(cfg, storage)
    emit = scrubber.emit(emit)
    preflight(cfg, storage)

    t = time.perf_counter()
    model = load_model_once(cfg, storage)
    timings["checkpoint"] = time.perf_counter() - t
    emit(f"checkpoint ok: model_id {model['model_id']}, {len(model['names'])} tags, vocab_id {model['vocab_id']} "
         f"({timings['checkpoint']:.1f}s)")

    rs = open_run(storage, cfg, resume_key(cfg, model["model_id"], model["vocab_id"]), started_at, emit)
    rs.start_heartbeat()
    try:
        return _run(cfg, emit, storage, model, rs, timings, t_start, scrubber)
    finally:
        rs.stop_heartbeat()


def _run(cfg: JobConfig, emit, storage: Storage, model: dict, rs: RunState, timings: dict, t_start: float,
         scrubber: Scrubber) -> RunResult:
    run_id, staging = rs.run_id, rs.staging
    emit(f"run {run_id}: {len(cfg.input)} input(s) -> {redact_uri(cfg.output)} (storage: {storage.describe()}, "
         f"mode {cfg.mode})")

    t = time.perf_counter()
    if rs.listing:
        listing = _listing_from(rs.listing)
    else:
        try:
            listing = list_inputs(cfg.input, storage, cfg.listing.extensions, staging, cfg.listing.rows_per_file,
                                  emit)
        except ListingFailed as e:
            raise JobFailed(scrubber.text(
                f"{e}; nothing was written to {redact_uri(cfg.output)}. Start the job again with the same "
                f"settings once the store answers: it resumes this run ({run_id})")) from None
        rs.put_json("listing.json", _listing_dict(listing))
    timings["listing"] = time.perf_counter() - t
    emit(f"listed {listing.listed} images ({listing.skipped} other objects skipped) in {timings['listing']:.1f}s")

    t = time.perf_counter()
    index_info: dict = {}
    if rs.plan:
        plan = pl.Plan.from_dict(rs.plan["plan"])
        index_info = rs.plan.get("index", {})
    else:
        committed = mf.committed_runs(cfg.output, storage)
        state = ix.load_state(storage, cfg.output, committed)
        save_descriptor(storage, cfg.output, model["descriptor"])
        descriptors: dict = {}

        def get_descriptor(vid):
            if vid not in descriptors:
                descriptors[vid] = load_descriptor(storage, cfg.output, vid)
            return descriptors[vid]

        plan = pl.make_plan(storage=storage, output_uri=cfg.output, staging=staging, listing_files=listing.files,
                            state=state, mode=cfg.mode, model_id=model["model_id"], vocab_id=model["vocab_id"],
                            desc=model["descriptor"], score_floor=cfg.inference.score_floor,
                            retry_stages=cfg.incremental.retry_stages, prefixes=input_prefixes(cfg.input),
                            run_id=run_id, run_date=rs.run_date, token_cache=cfg.cache.image_tokens,
                            rows_per_file=cfg.listing.rows_per_file, descriptors=get_descriptor)
        deltas = sum(1 for f in state.sources if f.kind == "delta")
        index_info = {"entries": len(state), "rows_read": state.rows_read, "files_read": len(state.sources),
                      "deltas_since_base": deltas, "memory_bytes": state.nbytes, "load_s": round(state.seconds, 3)}
        rs.put_json("plan.json", {"plan": plan.as_dict(), "index": index_info})
    timings["plan"] = time.perf_counter() - t
    c = plan.counts
    emit(f"plan: {plan.work} to do ({c['new']} new, {c['changed']} changed, {c['retried']} retried, {c['grown']} "
         f"grown, {c['retagged']} retagged), {c['skipped']} already done, {c['deleted']} deleted "
         f"({timings['plan']:.1f}s)")

    todo, kept_rows = remaining_work(storage, rs, plan)
    todo_rows = plan.work - kept_rows
    if kept_rows:
        emit(f"resume: {kept_rows} images done by earlier attempts, {todo_rows} left")

    import ray

    arrays = model.pop("arrays")
    vocab_bytes = int(sum(a.nbytes for a in arrays.values()))
    snap: dict = {"actors": [], "prepare_calls": 0}
    pipeline_error = None
    started_ray = False
    res_plan = None
    pipeline_started_at = time.time()
    t = time.perf_counter()
    sink = TagsDatasink(cfg.output, storage, run_id=run_id, run_date=rs.run_date,
                        model_id=model["model_id"], vocab_id=model["vocab_id"],
                        partition_by=cfg.layout.partition_by, shards=cfg.layout.shards,
                        rows_per_file=cfg.layout.rows_per_file, compression=cfg.layout.compression,
                        staging=staging, attempt=rs.attempt, score_floor=cfg.inference.score_floor)
    in_driver = 0 < todo_rows <= cfg.inference.driver_max_images and runs_on_this_cpu(cfg)
    if in_driver:
        emit(f"{todo_rows} images to tag: in the driver (at most inference.driver_max_images = "
             f"{cfg.inference.driver_max_images} on a machine without a cluster or GPU), no Ray pipeline")
        pipeline_started_at = time.time()
        t = time.perf_counter()
        try:
            snap = run_in_driver(cfg, storage, staging, todo, model, arrays, sink, plan.keys, run_id, todo_rows, emit)
        except Exception as e:  # noqa: BLE001 - recorded in the FAILED manifest, then re-raised
            pipeline_error = scrubber.text(f"{type(e).__name__}: {last_line(e)}")
        timings["pipeline"] = time.perf_counter() - t
    elif todo_rows > 0:
        started_ray = ensure_ray(cfg)
        res_plan = plan_resources(cfg)
        timings["ray_start"] = time.perf_counter() - t
        t = time.perf_counter()
        vocab_ref = ray.put(arrays)
        timings["vocab_put"] = time.perf_counter() - t
        emit(f"ray: {res_plan.cluster_cpus:g} CPUs, {res_plan.cluster_gpus:g} GPUs on {res_plan.nodes} node(s); "
             f"{res_plan.actors} {res_plan.device} actor(s); vocabulary {vocab_bytes / 2**20:.1f} MiB put once")
        counter = ProgressCounter.remote()
        t = time.perf_counter()
        pipeline_started_at = time.time()
        reporter = ProgressReporter(counter, todo_rows, cfg.ray.progress_interval_s, emit).start()
        try:
            run_pipeline(cfg, storage, staging, todo, res_plan, model, vocab_ref, counter, sink, plan.keys, run_id)
        except Exception as e:  # noqa: BLE001 - recorded in the FAILED manifest, then re-raised
            pipeline_error = scrubber.text(f"{type(e).__name__}: {last_line(e)}")
        finally:
            reporter.stop()
        timings["pipeline"] = time.perf_counter() - t
        try:
            snap = ray.get(counter.snapshot.remote(), timeout=60)
            emit(progress_line(snap, todo_rows, timings["pipeline"]))
        except Exception:  # noqa: BLE001
            pass
        ray.kill(counter)
    else:
        timings["pipeline"] = 0.0
    del arrays

    t = time.perf_counter()
    if pipeline_error is None:
        check = verify(storage, cfg.output, rs, listing, plan)
    else:
        check = {"ok": False, "detail": f"pipeline failed: {pipeline_error}", "tagged": 0, "errors": 0,
                 "errors_by_stage": {}, "files": run_files(rs)[0]}
    if snap.get("prepare_calls"):
        check["ok"] = False
        check["detail"] += f"; an inference actor recomputed the vocabulary {snap['prepare_calls']} time(s)"
    orphans = []
    if check["ok"]:
        orphans = delete_orphans(storage, cfg.output, rs, cfg, {f["path"] for f in check["files"]})
    timings["verify"] = time.perf_counter() - t
    written = check.pop("files")
    done = check["tagged"] + check["errors"]
    ran = done - kept_rows if done >= kept_rows else done
    counts_inc = {"mode": cfg.mode, **{k: plan.counts.get(k, 0) for k in pl.CATEGORIES}, "deleted": plan.counts["deleted"],
                  "work": plan.work}
    manifest = {
        "manifest_version": mf.MANIFEST_VERSION,
        "run_id": run_id,
        "status": "committed" if check["ok"] else "failed",
        "started_at": rs.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "output": redact_uri(cfg.output),
        "inputs": [redact_uri(u) for u in cfg.input],
        "checkpoint": redact_uri(cfg.checkpoint),
        "mode": cfg.mode,
        "model_id": model["model_id"],
        "vocab_id": model["vocab_id"],
        "vocabulary": {"tags": len(model["names"]), "descriptions_per_tag": model["descriptions_per_tag"],
                       "object_bytes": vocab_bytes, "file": redact_uri(cfg.vocabulary.file) if cfg.vocabulary.file
                       else None,
                       "grown_from": {k: {kk: v[kk] for kk in ("vocab_id", "floor", "copied_tags")}
                                      | {"computed_tags": len(v["compute"])} for k, v in plan.keys.items()}},
        "counts": {"listed": listing.listed, "tagged": check["tagged"], "errors": check["errors"],
                   "skipped": listing.skipped, "errors_by_stage": check["errors_by_stage"],
                   "per_input": {redact_uri(k): v for k, v in listing.per_input.items()},
                   "incremental": counts_inc, "inputs_needed": plan.need},
        "invariant": {k: check.get(k) for k in ("ok", "detail", "listing_fingerprint", "output_fingerprint",
                                                 "work_fingerprint", "skipped_fingerprint")},
        "images_per_s": ran / timings["pipeline"] if timings["pipeline"] > 0 and ran else 0.0,
        "steady_images_per_s": steady_rate(snap),
        "pipeline_events_s": _events(snap, pipeline_started_at),
        # seconds the actors spent inside the model: images / inference_s is the model-only
        # rate as it ran inside this job (busy time / actors / pipeline time = actor utilisation)
        "inference_s": round(snap.get("infer_s", 0.0), 3),
        "model_work": snap.get("work", {}),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "resources": dataclasses.asdict(res_plan) if res_plan else (
            {"device": "cpu", "in_driver": True, "actors": 0} if in_driver else {}),
        "actors": snap.get("actors", []),
        "index": index_info | {"plan_s": plan.seconds},
        "resume": {"attempt": rs.attempt, "resumed": rs.resumed, "kept_rows": kept_rows,
                   "orphans_deleted": orphans},
        "files": {"tags": [f for f in written if f["kind"] == "tags"],
                  "errors": [f for f in written if f["kind"] == "errors"],
                  "tombstones": [plan.tombstones] if plan.tombstones else []},
        "layout": {"partition_by": list(cfg.layout.partition_by), "shards": cfg.layout.shards,
                   "tags_schema": TAGS_SCHEMA.to_string(show_schema_metadata=False).splitlines(),
                   "errors_schema": ERRORS_SCHEMA.to_string(show_schema_metadata=False).splitlines()},
        "skipped_examples": listing.skipped_examples,
        "config": redacted(cfg),
        "versions": versions(),
        "argv": [redact_uri(a) for a in sys.argv],
    }
    manifest = scrubber.obj(manifest)
    if not check["ok"]:
        timings["total"] = time.perf_counter() - t_start
        manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        uri = mf.write_failed(storage, cfg.output, run_id, manifest)
        emit(summary_table(manifest))
        if started_ray:
            ray.shutdown()
        raise JobFailed(f"run {run_id} not committed: {check['detail']} (details in {redact_uri(uri)}); "
                        "start it again with the same settings to resume", uri)
    t = time.perf_counter()
    manifest["index"]["delta_rows"] = write_index_delta(storage, cfg.output, rs, plan)
    if index_info.get("deltas_since_base", 0) + 1 >= cfg.incremental.compact_after:
        manifest["index"]["compaction"] = ix.compact(storage, cfg.output, run_id,
                                                     mf.committed_runs(cfg.output, storage) + [run_id])
    timings["commit"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    summary = summary_table(manifest)
    uri = mf.commit(storage, cfg.output, run_id, manifest)
    rs.stop_heartbeat()
    mf.clear_failed(storage, cfg.output, run_id)  # an earlier attempt that failed is now superseded
    if not cfg.layout.keep_listing:
        _cleanup_staging(storage, staging)
    emit(summary)
    if started_ray:
        ray.shutdown()
    return RunResult(run_id, manifest, uri, summary)

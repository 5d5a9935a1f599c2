"""Running the work: Ray Data's streaming pipeline, or the same steps in the driver.

    read_parquet(plan shards) -> repartition(decode.batch_size rows per block)
      -> map_batches(load_inputs, CPU tasks, decode.num_cpus each)   # fetch+decode, or cached tokens
      -> map_batches(Tagger, ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor)
      -> write_datasink(ResultsSink)   # one staged file per write task (writer.py)

Each stage's resources are sized so that on a 2-CPU machine the actor pool cannot starve the
decode and write tasks it depends on. A small work set on a machine without a cluster or
GPU runs the same three steps in the driver, which has the model loaded already.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from .capacity import run_watched
from .config import JobConfig
from .inference import Tagger
from .local_read import link_roots
from .progress import bars_on, progress_line, quiet_bars_off_notice
from .storage import Storage, join
from .work import load_inputs
from .writer import ResultsSink

#: The inference stage's class (Ray Data callable class). Benchmark-only seam: the job always
#: uses Tagger; benchmarks/ceiling.py puts a zero-cost stand-in model here (a Tagger subclass,
#: same rows out) to measure how fast everything around the model goes. Tests may do the same.
TAGGER_CLASS = Tagger


@dataclass
class Resources:
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
    #: JPEG bytes travel compressed to the actors and are decoded there (nvJPEG on a GPU)
    decode_in_actor: bool = False
    #: the elastic pool's bounds (`actors` is where it starts); equal to `actors` for a fixed pool
    min_actors: Optional[int] = None
    max_actors: Optional[int] = None


def ensure_ray(cfg: JobConfig, emit=print) -> bool:
    """Use a running Ray (tests, `ray job submit`), else connect or start one; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = {"log_to_driver": True}
    address = cfg.ray.address
    if not address and not os.environ.get("RAY_ADDRESS"):
        stale = stale_head_address()
        if stale:
            emit(f"ray: the head at {stale} named by {_ray_address_file()} (the last `ray start` on this "
                 "machine) is not running; starting a local Ray instead (--ray-address to choose)")
            address = "local"
    if address == "local" or cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if address:
        kwargs["address"] = address
    ray.init(**kwargs)
    return True


def _ray_address_file() -> str:
    from ray._private.utils import get_ray_address_file

    return get_ray_address_file(None)


def stale_head_address(timeout_s: float = 1.0) -> Optional[str]:
    """The address the last `ray start` on this machine recorded, when nothing listens there.

    A plain `ray.init()` connects to that address; when its head has stopped without removing
    the file (killed, machine restarted into the same /tmp), Ray waits for it and then ends the
    whole process with status 1 and no message. A closed port is known at once.
    """
    import socket

    try:
        with open(_ray_address_file()) as f:
            address = f.read().strip()
    except (OSError, ImportError):
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        return address
    return None


def plan_resources(cfg: JobConfig) -> Resources:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    ic = cfg.inference
    gpa = ic.gpus_per_actor if ic.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if gpa > 0 and gpus < gpa:
        raise ConfigError(f"inference.gpus_per_actor: {gpa} GPU(s) per actor, but the cluster has {gpus:g}")
    actors = ic.actors or (max(1, int(gpus // gpa)) if gpa > 0 else nodes)
    lo = ic.min_actors or min(actors, ic.max_actors or actors)
    hi = ic.max_actors or max(actors, lo)
    if lo > hi:
        raise ConfigError(f"inference.min_actors: {lo} is more than inference.max_actors: {hi}")
    actors = min(max(actors, lo), hi)
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
    return Resources(cpus, gpus, nodes, actors, gpa, ic.num_cpus, device, ic.dtype, threads,
                     cfg.decode.num_cpus, cfg.decode.tasks, cfg.decode.in_actor(device), lo, hi)


def actor_pool(plan: Resources):
    """A fixed pool of `actors`, or an elastic one from min_actors to max_actors starting at `actors`."""
    from ray.data import ActorPoolStrategy

    lo, hi = plan.min_actors or plan.actors, plan.max_actors or plan.actors
    if lo == hi == plan.actors:
        return ActorPoolStrategy(size=plan.actors)
    return ActorPoolStrategy(min_size=lo, max_size=hi, initial_size=plan.actors)


def run_pipeline(cfg: JobConfig, storage: Storage, staging: str, files: list[str], plan: Resources,
                 model: dict, vocab_ref, counter, sink: ResultsSink, keys: dict, run_id: str,
                 emit=None) -> list[dict]:
    """Run the pipeline to its end; returns where its time went per stage (`stage_stats`).

    It runs under the capacity watch (capacity.py): with no node left that can host a
    replica for `inference.capacity_wait_s`, it raises NoCapacity instead of waiting forever.
    """
    import ray
    from ray.data import TaskPoolStrategy

    dctx = ray.data.DataContext.get_current()
    dctx.enable_progress_bars = bars_on(cfg.ray.progress_bars)
    if not dctx.enable_progress_bars:
        quiet_bars_off_notice()
    dctx.execution_options.preserve_order = False
    pa_fs, _ = storage.pyarrow(join(staging, "plan"))
    limits = cfg.decode.limits()
    ds = ray.data.read_parquet(files, filesystem=pa_fs, num_cpus=0.25)
    ds = ds.repartition(target_num_rows_per_block=cfg.decode.batch_size)
    ds = ds.map_batches(
        load_inputs,
        batch_size=cfg.decode.batch_size,
        batch_format="pyarrow",
        fn_kwargs={"storage": storage, "fetch": cfg.fetch, "limits": limits, "output_uri": cfg.output,
                   "defer_jpeg": plan.decode_in_actor,
                   "links_inside": link_roots(cfg.input, cfg.listing.follow_links)},
        num_cpus=plan.decode_cpus,
        compute=TaskPoolStrategy(size=plan.decode_tasks) if plan.decode_tasks else None,
        udf_modifying_row_count=False,
    )
    ds = map_with_bounded_restarts(
        ds,
        TAGGER_CLASS,
        batch_size=cfg.inference.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(plan),
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
            "decode_limits": limits if plan.decode_in_actor else None,
        },
        udf_modifying_row_count=False,
    )
    t0 = time.perf_counter()
    run_watched(lambda: ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25}), cpus=plan.actor_cpus,
                gpus=plan.gpus_per_actor, wait_s=cfg.inference.capacity_wait_s, emit=emit)
    return stage_stats(ds, t0, same_clock=plan.nodes == 1)


def stage_stats(ds, t0: float, same_clock: bool) -> list[dict]:
    """Per Ray Data operator: tasks, busy seconds (summed over tasks), and when it first started
    and last ended relative to `t0`, the driver's perf_counter at the pipeline's start.

    Ray Data stamps its tasks with time.perf_counter (CLOCK_MONOTONIC, one clock per machine), so
    start/end are given only for one-node runs. For the manifest ("pipeline_stages") and
    benchmarks/ceiling.py: which stage the run waited on. Ray Data's summary is a developer API;
    if it changes shape, the run loses this record and nothing else.
    """
    try:
        summary = getattr(ds, "_write_ds", ds)._get_stats_summary()
        chain = []
        while summary is not None and len(chain) < 64:
            chain.append(summary)
            parents = getattr(summary, "parents", None) or []
            summary = parents[0] if parents else None
        out = []
        for summary in reversed(chain):
            for op in summary.operators_stats:
                wall = op.wall_time.sum if op.wall_time else None
                cpu = op.cpu_time.sum if op.cpu_time else None
                known = same_clock and op.earliest_start_time is not None
                out.append({"name": op.operator_name,
                            "tasks": int(op.output_num_rows.count) if op.output_num_rows else None,
                            "rows": int(op.output_num_rows.sum) if op.output_num_rows else None,
                            "wall_s": round(wall, 4) if wall is not None else None,
                            "cpu_s": round(cpu, 4) if cpu is not None else None,
                            "start_s": round(op.earliest_start_time - t0, 4) if known else None,
                            "end_s": round(op.latest_end_time - t0, 4) if known else None})
        return out
    except Exception:  # noqa: BLE001 - a record only
        return []


_REMOTE_ARGS_DEPRECATED = re.escape("`ray_remote_args` is deprecated")


def map_with_bounded_restarts(ds, fn, *, max_restarts: int, max_task_retries: int, **kwargs):
    """`Dataset.map_batches` for an actor pool whose restarts and task retries are bounded.

    Ray 2.60 deprecates extra `ray.remote` options in map_batches but names no parameter for
    max_restarts or max_task_retries; without them Ray Data restarts a crashing replica and
    retries its batch forever. So they still go through, and only that one notice is
    silenced, here, where it would otherwise print on every run.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_REMOTE_ARGS_DEPRECATED)
        return ds.map_batches(fn, max_restarts=max_restarts, max_task_retries=max_task_retries, **kwargs)


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
                  sink: ResultsSink, keys: dict, run_id: str, total: int, emit, model_needed: bool = True) -> dict:
    """The pipeline's steps in this process: load_inputs -> Tagger -> the datasink's write.

    Same code as the Ray path, so the rows, receipts, token cache and verify are the same.
    `model_needed` False: every row copies its scores, so the Tagger loads no model.
    """
    fs, _ = storage.pyarrow(join(staging, "plan"))
    limits = cfg.decode.limits()  # the driver has no GPU (runs_on_this_cpu): decoded in load_inputs
    links_inside = link_roots(cfg.input, cfg.listing.follow_links)
    tagger = Tagger(checkpoint=cfg.checkpoint, storage=storage, vocab_ref=arrays, names=model["names"],
                    thresholds=model["thresholds"], model_id=model["model_id"], vocab_id=model["vocab_id"],
                    device="cpu", dtype=cfg.inference.dtype, torch_threads=cfg.inference.torch_threads,
                    chunk_size=cfg.inference.chunk_size, score_floor=cfg.inference.score_floor, counter=None,
                    keys=keys, output_uri=cfg.output, run_id=run_id, cache_tokens=cfg.cache.image_tokens,
                    token_dtype=cfg.cache.token_dtype, model_needed=model_needed)
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
                                     limits=limits, output_uri=cfg.output, links_inside=links_inside))
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


def events(snap: dict, t0: float) -> dict:
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



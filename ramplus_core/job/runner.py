"""The tagging job end to end: checks, checkpoint, listing, Ray Data pipeline, verify, commit.

The order is chosen so that the cheap failures come first: config and paths (no I/O beyond
a probe), then the checkpoint (a wrong file fails in seconds, before a listing of millions
of keys and before any Ray worker starts), then listing, then the long pipeline. Nothing is
committed unless the output provably holds every listed image exactly once.

Pipeline (Ray Data, streaming; each stage's resources are sized so that on a 2-CPU machine
the actor pool cannot starve the decode and write tasks it depends on):

    read_parquet(listing shards) -> repartition(decode.batch_size rows per block)
      -> map_batches(fetch_decode, CPU tasks, decode.num_cpus each)
      -> map_batches(Tagger, ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor)
      -> write_datasink(TagsDatasink)   # tags/ and errors/ in one pass
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional

import numpy as np

from ..errors import CheckpointError, ConfigError, RamPlusError
from ..preprocess import DecodeLimits
from . import manifest as mf
from .config import JobConfig, VocabularyConfig, redact_uri, redacted
from .inference import Tagger, materialize_checkpoint
from .listing import Fingerprint, ListingResult, list_inputs, read_listing_uris
from .progress import ProgressCounter, ProgressReporter, progress_line, steady_rate, summary_table
from .reader import fetch_decode
from .scrub import Scrubber
from .storage import Storage, join, preflight
from .writer import ERRORS_SCHEMA, TAGS_SCHEMA, TagsDatasink

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
    vocab = select_vocabulary(model.vocabulary, cfg.vocabulary)
    prepared = model.prepare_vocabulary(vocab)
    return {
        "model_id": model.model_id,
        "vocab_id": vocab.content_id(),
        "names": list(vocab.names),
        "thresholds": np.asarray(vocab.thresholds, dtype=np.float32),
        "arrays": prepared.to_numpy(),
        "descriptions_per_tag": int(vocab.embeds.shape[1]),
    }


def _read_lines(key: str, path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if not lines:
        raise ConfigError(f"{key}: {path} has no entries")
    return lines


def _read_thresholds(path: str) -> dict[str, float]:
    """`tag<TAB>0.7`, `tag,0.7` or `tag 0.7` per line (tag names may contain spaces)."""
    key = "vocabulary.thresholds_file"
    out = {}
    for n, line in enumerate(_read_lines(key, path), 1):
        sep = "\t" if "\t" in line else ("," if "," in line else None)
        parts = line.rsplit(sep, 1) if sep else line.rsplit(None, 1)
        try:
            name, value = parts[0].strip(), float(parts[1])
        except (IndexError, ValueError):
            raise ConfigError(f"{key}: {path} line {n}: expected 'tag<TAB>threshold', got {line!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: {path} line {n}: threshold {value} is not between 0 and 1")
        out[name] = value
    return out


def select_vocabulary(vocab, vc: VocabularyConfig):
    """Optionally keep only some tags and/or change thresholds.

    Scores of the kept tags do not change: RAM++ tags never attend to each other.
    """
    from ..vocabulary import Vocabulary

    names = None
    key = "vocabulary.tags"
    if vc.tags_file:
        key = "vocabulary.tags_file"
        names = _read_lines(key, vc.tags_file)
    elif vc.tags:
        names = list(vc.tags)
    if names is None and vc.threshold is None and vc.thresholds_file is None:
        return vocab
    index = {n: i for i, n in enumerate(vocab.names)}
    if names is None:
        idx = list(range(len(vocab.names)))
    else:
        missing = [n for n in names if n not in index]
        if missing:
            raise ConfigError(f"{key}: {len(missing)} tag(s) not in the checkpoint's vocabulary, e.g. {missing[:3]}")
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}: a tag is listed twice")
        idx = [index[n] for n in names]
    thresholds = np.asarray(vocab.thresholds, dtype=np.float32)[idx]
    if vc.threshold is not None:
        thresholds = np.full(len(idx), vc.threshold, dtype=np.float32)
    if vc.thresholds_file is not None:
        given = _read_thresholds(vc.thresholds_file)
        unknown = [n for n in given if n not in index]
        if unknown:
            raise ConfigError(f"vocabulary.thresholds_file: {len(unknown)} tag(s) not in the checkpoint's "
                              f"vocabulary, e.g. {unknown[:3]}")
        pos = {vocab.names[i]: j for j, i in enumerate(idx)}
        for name, value in given.items():
            if name in pos:
                thresholds[pos[name]] = value
    t = np.asarray(idx)
    return Vocabulary(names=[vocab.names[i] for i in idx], thresholds=thresholds, zh=[vocab.zh[i] for i in idx],
                      embeds=vocab.embeds[t], mask=vocab.mask[t])


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
    if spare < min(cfg.decode.num_cpus, 0.5):
        raise ConfigError(f"inference.actors x inference.num_cpus = {actors} x {ic.num_cpus:g} leaves {spare:g} of the "
                          f"cluster's {cpus:g} CPUs for decoding and writing; lower one of them")
    threads = ic.torch_threads
    if threads is None:
        # CPU replicas get the machine (decoding is a few % of Swin-L's cost); a GPU replica
        # only feeds its GPU, and torch's default (all cores) would fight the decode tasks.
        threads = max(1, int(cpus // actors)) if device == "cpu" else max(1, int(ic.num_cpus))
    return Plan(cpus, gpus, nodes, actors, gpa, ic.num_cpus, device, ic.dtype, threads,
                cfg.decode.num_cpus, cfg.decode.tasks)


def run_pipeline(cfg: JobConfig, storage: Storage, staging: str, listing: ListingResult, plan: Plan,
                 model: dict, vocab_ref, counter, sink: TagsDatasink) -> None:
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    dctx = ray.data.DataContext.get_current()
    dctx.enable_progress_bars = cfg.ray.progress_bars
    dctx.execution_options.preserve_order = False
    pa_fs, _ = storage.pyarrow(join(staging, "listing"))
    limits = DecodeLimits(max_bytes=cfg.decode.max_bytes, max_pixels=cfg.decode.max_pixels,
                          jpeg_draft=cfg.decode.jpeg_draft)
    ds = ray.data.read_parquet(listing.files, filesystem=pa_fs, num_cpus=0.25)
    ds = ds.repartition(target_num_rows_per_block=cfg.decode.batch_size)
    ds = ds.map_batches(
        fetch_decode,
        batch_size=cfg.decode.batch_size,
        batch_format="pyarrow",
        fn_kwargs={"storage": storage, "fetch": cfg.fetch, "limits": limits},
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
            "counter": counter,
        },
        udf_modifying_row_count=False,
    )
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})


def verify(storage: Storage, output_uri: str, staging: str, listing: ListingResult, written: list[dict]) -> dict:
    """Re-read the uri column of every file written and compare with the listing."""
    import pyarrow.parquet as pq

    fp = Fingerprint()
    counts = {"tags": 0, "errors": 0}
    by_stage: dict = {}
    problems = []
    for f in written:
        fs, path = storage.pyarrow(join(output_uri, f["path"]))
        cols = ["uri", "stage"] if f["kind"] == "errors" else ["uri"]
        with fs.open_input_file(path) as fh:
            t = pq.ParquetFile(fh).read(columns=cols)
        if t.num_rows != f["rows"]:
            problems.append(f"{f['path']} holds {t.num_rows} rows, the writer reported {f['rows']}")
        counts[f["kind"]] += t.num_rows
        fp.update(t.column("uri"))
        if f["kind"] == "errors":
            for s in t.column("stage").to_pylist():
                by_stage[s] = by_stage.get(s, 0) + 1
    ok = fp == listing.fingerprint and not problems
    detail = "; ".join(problems)
    if fp != listing.fingerprint:
        detail = (f"listed {listing.listed} images, wrote {counts['tags']} tag rows + {counts['errors']} error rows "
                  f"= {fp.count}") + (f"; {detail}" if detail else "")
        if listing.listed <= EXACT_DIFF_LIMIT:
            detail += "; " + _exact_diff(storage, output_uri, staging, listing, written)
    return {"ok": ok, "detail": detail or "", "tagged": counts["tags"], "errors": counts["errors"],
            "errors_by_stage": by_stage, "listing_fingerprint": listing.fingerprint.as_dict(),
            "output_fingerprint": fp.as_dict()}


def _exact_diff(storage, output_uri, staging, listing, written) -> str:
    import collections

    import pyarrow.parquet as pq

    listed = set()
    for col in read_listing_uris(storage, staging, listing.files):
        listed.update(col.to_pylist())
    seen: collections.Counter = collections.Counter()
    for f in written:
        fs, path = storage.pyarrow(join(output_uri, f["path"]))
        with fs.open_input_file(path) as fh:
            seen.update(pq.ParquetFile(fh).read(columns=["uri"]).column("uri").to_pylist())
    missing = sorted(listed - set(seen))
    dup = sorted(u for u, c in seen.items() if c > 1)
    extra = sorted(set(seen) - listed)
    return (f"{len(missing)} missing (e.g. {missing[:3]}), {len(dup)} written more than once (e.g. {dup[:3]}), "
            f"{len(extra)} not listed (e.g. {extra[:3]})")


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


def _check_run_id_free(storage: Storage, output_uri: str, run_id: str, staging: str) -> None:
    import pyarrow.fs as pafs

    for uri in (join(output_uri, mf.RUNS_DIR, f"{run_id}.json"), join(output_uri, mf.RUNS_DIR, f"{run_id}.FAILED.json"),
                staging):
        fs, path = storage.pyarrow(uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise ConfigError(f"run_id: {run_id} was already used in {redact_uri(output_uri)}; "
                              "leave run_id unset for a fresh one")


# -- the whole run -------------------------------------------------------------------------

def run(cfg: JobConfig, emit: Callable[[str], None] = print) -> RunResult:
    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    timings: dict = {}
    storage = Storage.from_config(cfg.storage)
    scrubber = Scrubber.for_run(cfg, storage)
    emit = scrubber.emit(emit)
    preflight(cfg, storage)
    run_id = cfg.run_id or mf.new_run_id(started_at, uuid.uuid4().hex)
    staging = join(cfg.output, "_staging", run_id)
    _check_run_id_free(storage, cfg.output, run_id, staging)
    emit(f"run {run_id}: {len(cfg.input)} input(s) -> {redact_uri(cfg.output)} (storage: {storage.describe()})")

    t = time.perf_counter()
    model = load_model_once(cfg, storage)
    timings["checkpoint"] = time.perf_counter() - t
    emit(f"checkpoint ok: model_id {model['model_id']}, {len(model['names'])} tags, vocab_id {model['vocab_id']} "
         f"({timings['checkpoint']:.1f}s)")

    import ray

    t = time.perf_counter()
    started_ray = ensure_ray(cfg)
    plan = plan_resources(cfg)
    timings["ray_start"] = time.perf_counter() - t
    arrays = model.pop("arrays")
    vocab_bytes = int(sum(a.nbytes for a in arrays.values()))
    t = time.perf_counter()
    vocab_ref = ray.put(arrays)
    timings["vocab_put"] = time.perf_counter() - t
    del arrays
    emit(f"ray: {plan.cluster_cpus:g} CPUs, {plan.cluster_gpus:g} GPUs on {plan.nodes} node(s); {plan.actors} "
         f"{plan.device} actor(s); vocabulary {vocab_bytes / 2**20:.1f} MiB put once")

    t = time.perf_counter()
    listing = list_inputs(cfg.input, storage, cfg.listing.extensions, staging, cfg.listing.rows_per_file, emit)
    timings["listing"] = time.perf_counter() - t
    emit(f"listed {listing.listed} images ({listing.skipped} other objects skipped) in {timings['listing']:.1f}s")

    sink = TagsDatasink(cfg.output, storage, run_id=run_id, run_date=started_at.date().isoformat(),
                        model_id=model["model_id"], vocab_id=model["vocab_id"],
                        partition_by=cfg.layout.partition_by, shards=cfg.layout.shards,
                        rows_per_file=cfg.layout.rows_per_file, compression=cfg.layout.compression)
    counter = ProgressCounter.remote()
    snap: dict = {"actors": [], "prepare_calls": 0}
    pipeline_error = None
    t = time.perf_counter()
    pipeline_started_at = time.time()
    if listing.listed:
        reporter = ProgressReporter(counter, listing.listed, cfg.ray.progress_interval_s, emit).start()
        try:
            run_pipeline(cfg, storage, staging, listing, plan, model, vocab_ref, counter, sink)
        except Exception as e:  # noqa: BLE001 - recorded in the FAILED manifest, then re-raised
            pipeline_error = scrubber.text(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        finally:
            reporter.stop()
    timings["pipeline"] = time.perf_counter() - t
    try:
        snap = ray.get(counter.snapshot.remote(), timeout=60)
        emit(progress_line(snap, listing.listed, timings["pipeline"]))
    except Exception:  # noqa: BLE001
        pass
    ray.kill(counter)

    t = time.perf_counter()
    if pipeline_error is None:
        check = verify(storage, cfg.output, staging, listing, sink.written)
    else:
        check = {"ok": False, "detail": f"pipeline failed: {pipeline_error}", "tagged": 0, "errors": 0,
                 "errors_by_stage": {}}
    if snap.get("prepare_calls"):
        check["ok"] = False
        check["detail"] += f"; an inference actor recomputed the vocabulary {snap['prepare_calls']} time(s)"
    timings["verify"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    done = check["tagged"] + check["errors"]
    manifest = {
        "manifest_version": mf.MANIFEST_VERSION,
        "run_id": run_id,
        "status": "committed" if check["ok"] else "failed",
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "output": redact_uri(cfg.output),
        "inputs": [redact_uri(u) for u in cfg.input],
        "checkpoint": redact_uri(cfg.checkpoint),
        "model_id": model["model_id"],
        "vocab_id": model["vocab_id"],
        "vocabulary": {"tags": len(model["names"]), "descriptions_per_tag": model["descriptions_per_tag"],
                       "object_bytes": vocab_bytes},
        "counts": {"listed": listing.listed, "tagged": check["tagged"], "errors": check["errors"],
                   "skipped": listing.skipped, "errors_by_stage": check["errors_by_stage"],
                   "per_input": {redact_uri(k): v for k, v in listing.per_input.items()}},
        "invariant": {k: check.get(k) for k in ("ok", "detail", "listing_fingerprint", "output_fingerprint")},
        "images_per_s": done / timings["pipeline"] if timings["pipeline"] > 0 and done else 0.0,
        "steady_images_per_s": steady_rate(snap),
        "pipeline_events_s": _events(snap, pipeline_started_at),
        # seconds the actors spent inside the model: images / inference_s is the model-only
        # rate as it ran inside this job (busy time / actors / pipeline time = actor utilisation)
        "inference_s": round(snap.get("infer_s", 0.0), 3),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "resources": dataclasses.asdict(plan),
        "actors": snap.get("actors", []),
        "files": {"tags": [f for f in sink.written if f["kind"] == "tags"],
                  "errors": [f for f in sink.written if f["kind"] == "errors"]},
        "layout": {"partition_by": list(cfg.layout.partition_by), "shards": cfg.layout.shards,
                   "tags_schema": TAGS_SCHEMA.to_string(show_schema_metadata=False).splitlines(),
                   "errors_schema": ERRORS_SCHEMA.to_string(show_schema_metadata=False).splitlines()},
        "skipped_examples": listing.skipped_examples,
        "config": redacted(cfg),
        "versions": versions(),
        "argv": [redact_uri(a) for a in sys.argv],
    }
    manifest = scrubber.obj(manifest)
    summary = summary_table(manifest)
    if not check["ok"]:
        uri = mf.write_failed(storage, cfg.output, run_id, manifest)
        emit(summary)
        if started_ray:
            ray.shutdown()
        raise JobFailed(f"run {run_id} not committed: {check['detail']} (details in {redact_uri(uri)})", uri)
    uri = mf.commit(storage, cfg.output, run_id, manifest)
    if not cfg.layout.keep_listing:
        _cleanup_staging(storage, staging)
    emit(summary)
    if started_ray:
        ray.shutdown()
    return RunResult(run_id, manifest, uri, summary)

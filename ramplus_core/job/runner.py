"""The tagging job as a chain of steps: checks, model, listing, plan, work, proof, commit.

The order puts cheap failures first: config and paths, then the checkpoint and the
vocabulary (a wrong file fails in seconds, before anything is written, before a listing of
millions of keys and before any Ray worker starts), then the tables (created if missing),
then listing, then the plan (the listing joined with the tables: what is
new, changed, deleted or already done), then the long pipeline over the work only.
Nothing is committed unless every listed image is provably either already done or in
exactly one staged row; then one merge per table makes the run visible at once.

Every step leaves its result in the run's staging folder before it counts (state.py), so a
driver killed anywhere is resumed by starting the job again with the same settings.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

from ..errors import ConfigError, RamPlusError
from . import commit as cm
from . import index as ix
from . import manifest as mf
from . import model_step as ms
from . import pipeline as pp
from . import plan as pl
from . import table as tb
from .capacity import object_nodes
from .config import JobConfig, redact_uri, redacted, uri_scheme
from .listing import Fingerprint, ListingFailed, ListingResult, list_inputs
from .progress import ProgressReporter, counter_on_driver_node, progress_line, steady_rate, summary_table
from .schemas import ERRORS_SCHEMA, TAGS_SCHEMA
from .scrub import Scrubber
from .state import RunState, open_run, resume_key
from .storage import Storage, join, last_line, local_path, preflight, probe_write, to_uri
from .vocab import check_vocabulary, load_descriptor, save_descriptor
from .writer import ResultsSink

# exit codes of jobs/tag_bucket.py for what a caller may want to tell apart
EXIT_CONFLICT = 4


class JobFailed(RamPlusError):
    """The run did not commit (invariant violated or the pipeline failed); see the manifest."""

    def __init__(self, message: str, manifest_uri: Optional[str] = None):
        super().__init__(message)
        self.manifest_uri = manifest_uri


class CommitConflict(JobFailed):
    """Another run kept committing to the same tables; nothing of this run is lost (resume)."""


class OutputFull(JobFailed):
    """A write failed for want of space (or quota): said with the step that wrote, and that a re-run resumes."""


_FULL = ("no space left on device", "disk quota exceeded", "file too large", "os error 28", "errno 28",
         "os error 122", "errno 122", "os error 27", "errno 27")


def out_of_space(e: BaseException) -> bool:
    """ENOSPC, EDQUOT or EFBIG, raised by Python, pyarrow (errno in the text) or delta-rs (`os error 28`)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return any(k in str(e).lower() for k in _FULL)


class _Step:
    """The step that is writing now, so a full disk is reported with what failed first."""

    def __init__(self, cfg: JobConfig, scrubber: Scrubber):
        self.cfg, self.scrubber, self.name, self.run_id = cfg, scrubber, "preflight", None

    def full(self, e: BaseException) -> OutputFull:
        where = f"run {self.run_id}" if self.run_id else "the run"
        if self.name == "manifest":
            return OutputFull(self.scrubber.text(
                f"step manifest: {where} is committed but its manifest could not be written because the disk or "
                f"quota is full ({type(e).__name__}: {last_line(e)[:200]}); free space before the next run"))
        state = (f"{where} did not finish its commit to" if self.name == "commit" else
                 f"nothing of {where} was committed to")
        return OutputFull(self.scrubber.text(
            f"step {self.name}: a write failed because the disk or quota is full ({type(e).__name__}: "
            f"{last_line(e)[:200]}); {state} {redact_uri(self.cfg.output)}: free "
            "space and start the job again with the same settings, and it resumes where it stopped"))


@dataclass
class RunResult:
    run_id: str
    manifest: dict
    manifest_uri: str
    summary: str


# -- steps -------------------------------------------------------------------------------

def open_tables(cfg: JobConfig, storage: Storage) -> dict:
    """Refuse an old layout or a store without conditional PUTs; create missing tables."""
    try:
        tb.check_conditional_writes(storage, cfg.output)
        return tb.ensure_tables(storage, cfg.output, cfg.layout.shards)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any store or delta-rs error, said in one line
        raise ConfigError(storage.scrub(f"output: cannot open or create the tables under {redact_uri(cfg.output)}: "
                                        f"{type(e).__name__}: {last_line(e)[:300]}")) from None


def list_step(cfg: JobConfig, storage: Storage, rs: RunState, scrubber: Scrubber, emit) -> ListingResult:
    if rs.listing:
        return _listing_from(rs.listing)
    try:
        listing = list_inputs(cfg.input, storage, cfg.listing.extensions, rs.staging, cfg.listing.rows_per_file, emit,
                              cfg.listing.follow_links, cfg.listing.parallelism)
    except ListingFailed as e:
        raise JobFailed(scrubber.text(
            f"{e}; nothing was committed to {redact_uri(cfg.output)}. Start the job again with the same "
            f"settings once the store answers: it resumes this run ({rs.run_id})")) from None
    rs.put_json("listing.json", _listing_dict(listing))
    return listing


def plan_step(cfg: JobConfig, storage: Storage, rs: RunState, listing: ListingResult, model: dict) -> pl.Plan:
    if rs.plan:
        return pl.Plan.from_dict(rs.plan["plan"])
    state = ix.load_state(storage, cfg.output)
    save_descriptor(storage, cfg.output, model["descriptor"])
    descriptors: dict = {}

    def get_descriptor(vid):
        if vid not in descriptors:
            descriptors[vid] = load_descriptor(storage, cfg.output, vid)
        return descriptors[vid]

    plan = pl.make_plan(storage=storage, output_uri=cfg.output, staging=rs.staging, listing_files=listing.files,
                        state=state, mode=cfg.mode, model_id=model["model_id"], vocab_id=model["vocab_id"],
                        desc=model["descriptor"], score_floor=cfg.inference.score_floor,
                        retry_stages=cfg.incremental.retry_stages, prefixes=input_prefixes(cfg.input),
                        token_cache=cfg.cache.image_tokens, rows_per_file=cfg.listing.rows_per_file,
                        descriptors=get_descriptor)
    plan.seconds["state_load"] = round(state.seconds, 3)
    plan.seconds["state_rows"] = state.rows_read
    plan.seconds["state_bytes"] = state.nbytes
    rs.put_json("plan.json", {"plan": plan.as_dict()})
    return plan


def work_step(cfg: JobConfig, storage: Storage, rs: RunState, plan: pl.Plan, model: dict, shards: int,
              scrubber: Scrubber, emit, timings: dict) -> dict:
    """Tag what the plan left to do, in the driver or through Ray; the run's snapshot."""
    import ray

    todo, kept_rows = cm.remaining_work(storage, rs, plan)
    todo_rows = plan.work - kept_rows
    if kept_rows:
        emit(f"resume: {kept_rows} images done by earlier attempts, {todo_rows} left")
    out: dict = {"snap": {"actors": [], "prepare_calls": 0}, "error": None, "started_ray": False, "resources": None,
                 "in_driver": False, "kept_rows": kept_rows, "vocab_bytes": 0, "started_at": time.time()}
    if todo_rows <= 0:  # nothing to tag: no model, no Ray (the commit still applies the deletions)
        model.pop("arrays", None)
        timings["pipeline"] = 0.0
        return out
    copy_only = bool(plan.need) and set(plan.need) == {"none"}
    if not copy_only:
        t = time.perf_counter()
        ms.ensure_model(cfg, storage, model, emit)
        timings["model_load"] = time.perf_counter() - t
    arrays = model.pop("arrays", None)
    out["vocab_bytes"] = int(sum(a.nbytes for a in arrays.values())) if arrays else 0
    sink = ResultsSink(storage, rs.staging, run_id=rs.run_id, attempt=rs.attempt, model_id=model["model_id"],
                       vocab_id=model["vocab_id"], score_floor=cfg.inference.score_floor, shards=shards,
                       compression=cfg.layout.compression)
    sink.rows_per_file = cfg.layout.rows_per_file
    t = time.perf_counter()
    if copy_only or (todo_rows <= cfg.inference.driver_max_images and pp.runs_on_this_cpu(cfg)):
        out["in_driver"] = True
        if copy_only:
            emit(f"{todo_rows} images keep their scores (tags removed or thresholds changed): re-decided in the "
                 "driver, no model, no Ray")
        else:
            emit(f"{todo_rows} images to tag: in the driver (at most inference.driver_max_images = "
                 f"{cfg.inference.driver_max_images} on a machine without a cluster or GPU), no Ray pipeline")
        try:
            out["snap"] = pp.run_in_driver(cfg, storage, rs.staging, todo, model, arrays, sink, plan.keys,
                                           rs.run_id, todo_rows, emit, model_needed=not copy_only)
        except Exception as e:  # noqa: BLE001 - recorded in the FAILED manifest, then re-raised
            out["error"] = scrubber.text(f"{type(e).__name__}: {last_line(e)}")
        timings["pipeline"] = time.perf_counter() - t
        return out
    out["started_ray"] = pp.ensure_ray(cfg, emit)
    res = out["resources"] = pp.plan_resources(cfg)
    timings["ray_start"] = time.perf_counter() - t
    t = time.perf_counter()
    vocab_ref = ray.put(arrays)
    timings["vocab_put"] = time.perf_counter() - t
    emit(f"ray: {res.cluster_cpus:g} CPUs, {res.cluster_gpus:g} GPUs on {res.nodes} node(s); {res.actors} "
         f"{res.device} actor(s); vocabulary {out['vocab_bytes'] / 2**20:.1f} MiB put once")
    counter = counter_on_driver_node()
    t = time.perf_counter()
    out["started_at"] = time.time()
    reporter = ProgressReporter(counter, todo_rows, cfg.ray.progress_interval_s, emit, res.actors).start()
    try:
        out["stages"] = pp.run_pipeline(cfg, storage, rs.staging, todo, res, model, vocab_ref, counter, sink,
                                        plan.keys, rs.run_id, emit)
    except Exception as e:  # noqa: BLE001 - recorded in the FAILED manifest, then re-raised
        out["error"] = scrubber.text(f"{type(e).__name__}: {last_line(e)}")
    finally:
        reporter.stop()
    timings["pipeline"] = time.perf_counter() - t
    out["vocab_nodes"] = object_nodes(vocab_ref)
    try:
        out["snap"] = ray.get(counter.snapshot.remote(), timeout=60)
        emit(progress_line(out["snap"], todo_rows, timings["pipeline"], res.actors))
    except Exception:  # noqa: BLE001
        pass
    ray.kill(counter)
    return out


def commit_step(cfg: JobConfig, storage: Storage, rs: RunState, plan: pl.Plan, model: dict, check: dict,
                scrubber: Scrubber) -> dict:
    from deltalake.exceptions import CommitFailedError

    meta = {"run_id": rs.run_id, "model_id": model["model_id"], "vocab_id": model["vocab_id"], "mode": cfg.mode,
            "counts": {"tagged": check["tagged"], "errors": check["errors"], **plan.counts}}
    try:
        return cm.commit(storage, cfg.output, rs, plan, meta, cfg.table.commit_retries)
    except CommitFailedError as e:
        raise CommitConflict(scrubber.text(
            f"run {rs.run_id}: other runs kept committing to {redact_uri(cfg.output)} "
            f"({cfg.table.commit_retries + 1} tries: {last_line(e)[:200]}); nothing of this run is lost: start the "
            "job again with the same settings and it commits on top of theirs")) from None


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
            "not_regular": listing.not_regular, "not_regular_examples": listing.not_regular_examples,
            "per_input": listing.per_input, "fingerprint": list(listing.fingerprint.as_tuple()), "seconds": listing.seconds}


def _listing_from(d: dict) -> ListingResult:
    return ListingResult(files=d["files"], listed=d["listed"], skipped=d["skipped"], list_errors=d["list_errors"],
                         skipped_examples=d["skipped_examples"], per_input=d["per_input"],
                         not_regular=d.get("not_regular", 0), not_regular_examples=d.get("not_regular_examples", []),
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


def versions() -> dict:
    """From the installed distributions: importing torch (1.5 s) only to read its version would
    be most of a night that has nothing to do."""
    from importlib.metadata import version

    from .. import __version__

    return {"ramplus": __version__, "python": platform.python_version(),
            **{k: version(k) for k in ("ray", "torch", "pyarrow", "pillow")}, "platform": platform.platform()}


# -- the whole run -------------------------------------------------------------------------

def run(cfg: JobConfig, emit: Callable[[str], None] = print) -> RunResult:
    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    timings: dict = {}
    storage = Storage.from_config(cfg.storage)
    scrubber = Scrubber.for_run(cfg, storage)
    emit = scrubber.emit(emit)
    step = _Step(cfg, scrubber)
    try:
        # everything that needs no checkpoint byte first: paths, vocabulary files, one real write
        preflight(cfg, storage, checkpoint=False)  # checked by model_ids, after the write probe
        tb.refuse_legacy(storage, cfg.output)
        check_vocabulary(cfg.vocabulary)
        step.name = "write probe"
        probe_write(storage, cfg.output)

        step.name = "checkpoint"
        t = time.perf_counter()
        model = ms.model_ids(cfg, storage, emit)
        timings["checkpoint"] = time.perf_counter() - t
        how = "loaded" if model["model_loaded"] else f"not loaded, ids from the {model['ids_from']}"
        emit(f"checkpoint ok ({how}): model_id {model['model_id']}, {len(model['names'])} tags, "
             f"vocab_id {model['vocab_id']} ({timings['checkpoint']:.1f}s)")
        step.name = "open tables"
        tables = open_tables(cfg, storage)

        step.name = "open run"
        rs = open_run(storage, cfg, resume_key(cfg, model["model_id"], model["vocab_id"]), started_at, emit)
        step.run_id = rs.run_id
        rs.start_heartbeat()
        try:
            return _run(cfg, emit, storage, model, rs, timings, t_start, scrubber, tables["shards"], step)
        finally:
            rs.stop_heartbeat()
    except OutputFull:
        raise
    except Exception as e:
        if out_of_space(e):
            raise step.full(e) from None
        raise


def _run(cfg: JobConfig, emit, storage: Storage, model: dict, rs: RunState, timings: dict, t_start: float,
         scrubber: Scrubber, shards: int, step: _Step) -> RunResult:
    emit(f"run {rs.run_id}: {len(cfg.input)} input(s) -> {redact_uri(cfg.output)} (storage: {storage.describe()}, "
         f"mode {cfg.mode})")
    step.name = "listing"
    t = time.perf_counter()
    listing = list_step(cfg, storage, rs, scrubber, emit)
    timings["listing"] = time.perf_counter() - t
    not_regular = f", {listing.not_regular} not regular files left out" if listing.not_regular else ""
    emit(f"listed {listing.listed} images ({listing.skipped} other objects are not images{not_regular}) "
         f"in {timings['listing']:.1f}s")

    step.name = "plan"
    t = time.perf_counter()
    plan = plan_step(cfg, storage, rs, listing, model)
    timings["plan"] = time.perf_counter() - t
    c = plan.counts
    emit(f"plan: {plan.work} to do ({c['new']} new, {c['changed']} changed, {c['retried']} retried, "
         f"{c['vocab_changed']} vocabulary changed, {c['retagged']} retagged), {c['already_done']} already done, "
         f"{c['deleted']} deleted "
         f"({timings['plan']:.1f}s)")

    step.name = "work"
    work = work_step(cfg, storage, rs, plan, model, shards, scrubber, emit, timings)
    snap = work["snap"]
    if work["error"] is not None and out_of_space(RuntimeError(work["error"])):
        raise step.full(RuntimeError(work["error"]))

    step.name = "verify"
    t = time.perf_counter()
    if work["error"] is None:
        check = cm.verify(rs, listing, plan)
    else:
        check = {"ok": False, "detail": f"pipeline failed: {work['error']}", "tagged": 0, "errors": 0,
                 "errors_by_stage": {}, "files": []}
    if snap.get("prepare_calls"):
        check["ok"] = False
        check["detail"] += f"; an inference actor recomputed the vocabulary {snap['prepare_calls']} time(s)"
    timings["verify"] = time.perf_counter() - t
    manifest = _manifest(cfg, rs, model, listing, plan, check, work, timings)
    if not check["ok"]:
        timings["total"] = time.perf_counter() - t_start
        manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        uri = mf.write_failed(storage, cfg.output, rs.run_id, scrubber.obj(manifest))
        emit(summary_table(manifest))
        _stop_ray(work)
        raise JobFailed(f"run {rs.run_id} not committed: {check['detail']} (details in {redact_uri(uri)}); "
                        "start it again with the same settings to resume", uri)

    step.name = "commit"
    t = time.perf_counter()
    try:
        manifest["tables"] = commit_step(cfg, storage, rs, plan, model, check, scrubber)
    finally:
        _stop_ray(work)
    timings["commit"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        manifest["upkeep"] = cm.upkeep(storage, cfg.output, cfg)
    except Exception as e:  # noqa: BLE001 - the run is committed; compaction can wait for the next
        manifest["upkeep"] = {"error": scrubber.text(f"{type(e).__name__}: {last_line(e)[:300]}")}
    timings["upkeep"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    manifest = scrubber.obj(manifest)
    summary = summary_table(manifest)
    step.name = "manifest"
    uri = mf.commit(storage, cfg.output, rs.run_id, manifest)
    rs.stop_heartbeat()
    mf.clear_failed(storage, cfg.output, rs.run_id)  # an earlier attempt that failed is now superseded
    if not cfg.layout.keep_listing:
        _cleanup_staging(storage, rs.staging)
    emit(summary)
    return RunResult(rs.run_id, manifest, uri, summary)


def _stop_ray(work: dict) -> None:
    if work.get("started_ray"):
        import ray

        ray.shutdown()
        work["started_ray"] = False


def _manifest(cfg: JobConfig, rs: RunState, model: dict, listing: ListingResult, plan: pl.Plan, check: dict,
              work: dict, timings: dict) -> dict:
    snap, res = work["snap"], work["resources"]
    done = check["tagged"] + check["errors"]
    kept = work["kept_rows"]
    ran = done - kept if done >= kept else done
    pipeline_s = timings.get("pipeline", 0.0)
    return {
        "manifest_version": mf.MANIFEST_VERSION,
        "run_id": rs.run_id,
        "status": "committed" if check["ok"] else "failed",
        "started_at": rs.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "output": redact_uri(cfg.output),
        "inputs": [redact_uri(u) for u in cfg.input],
        "checkpoint": redact_uri(cfg.checkpoint),
        "mode": cfg.mode,
        "model_id": model["model_id"],
        "vocab_id": model["vocab_id"],
        # False when the plan left nothing to tag: the ids came from the id cache (model_ids.py)
        "model_loaded": bool(model.get("model_loaded")),
        "ids_from": model.get("ids_from"),
        "vocabulary": {"tags": len(model["names"]), "descriptions_per_tag": model["descriptions_per_tag"],
                       "object_bytes": work["vocab_bytes"], "object_nodes": work.get("vocab_nodes", []),
                       "file": redact_uri(cfg.vocabulary.file) if cfg.vocabulary.file else None,
                       # per earlier vocabulary whose rows this run re-decided: tags added and removed
                       # since (by name and descriptions), scores copied, tags the model scored
                       "changed_from": {k: {kk: v.get(kk) for kk in ("vocab_id", "floor", "added_tags",
                                                                     "removed_tags", "copied_tags")}
                                        | {"computed_tags": len(v["compute"])} for k, v in plan.keys.items()}},
        "counts": {"listed": listing.listed, "tagged": check["tagged"], "errors": check["errors"],
                   "not_images": listing.skipped, "not_regular": listing.not_regular,
                   "errors_by_stage": check["errors_by_stage"],
                   "per_input": {redact_uri(k): v for k, v in listing.per_input.items()},
                   "incremental": {"mode": cfg.mode, **{k: plan.counts.get(k, 0) for k in pl.CATEGORIES},
                                   "deleted": plan.counts["deleted"], "work": plan.work},
                   "inputs_needed": plan.need},
        "invariant": {k: check.get(k) for k in ("ok", "detail", "listing_fingerprint", "output_fingerprint",
                                                 "work_fingerprint", "skipped_fingerprint")},
        "images_per_s": ran / pipeline_s if pipeline_s > 0 and ran else 0.0,
        "steady_images_per_s": steady_rate(snap),
        "pipeline_events_s": pp.events(snap, work["started_at"]),
        # per Ray Data operator: tasks, busy seconds, first start and last end after the pipeline's start
        "pipeline_stages": work.get("stages", []),
        # seconds the actors spent inside the model: images / inference_s is the model-only
        # rate as it ran inside this job (busy time / actors / pipeline time = actor utilisation)
        "inference_s": round(snap.get("infer_s", 0.0), 3),
        "model_work": snap.get("work", {}),
        "resources": dataclasses.asdict(res) if res else (
            {"device": "cpu", "in_driver": True, "actors": 0} if work["in_driver"] else {}),
        "actors": snap.get("actors", []),
        "plan": {"seconds": plan.seconds, "read_versions": plan.versions},
        "resume": {"attempt": rs.attempt, "resumed": rs.resumed, "kept_rows": kept},
        "staged_files": check.get("files", []),
        "layout": {"tables": {k: join(redact_uri(cfg.output), k) for k in tb.KINDS}, "partition_by": tb.PARTITION,
                   "shards": cfg.layout.shards,
                   "tags_schema": TAGS_SCHEMA.to_string(show_schema_metadata=False).splitlines(),
                   "errors_schema": ERRORS_SCHEMA.to_string(show_schema_metadata=False).splitlines()},
        "not_images_examples": listing.skipped_examples,
        "not_regular_examples": listing.not_regular_examples,
        "config": redacted(cfg),
        "versions": versions(),
        "argv": [redact_uri(a) for a in sys.argv],
    }

"""The pipeline ceiling: how close the whole job gets to decode-only speed when the model costs nothing.

    .venv/bin/python benchmarks/ceiling.py                      # local folders + S3, ~5 minutes on 2 cores
    .venv/bin/python benchmarks/ceiling.py --no-s3 --repeats 1  # quicker
    .venv/bin/python benchmarks/ceiling.py --small 64 --large 4 --repeats 1   # smoke (tests)

On a GPU node the model is fast and the job is decode-bound, so the question is how much of
the CPUs' decode speed the job keeps around the model. This runs the whole job (`run()`:
listing, plan, Ray Data read -> repartition -> `load_inputs` fetch + decode tasks -> actor
pool -> `ResultsSink` staged files, verify, Delta commit) with a **zero-cost stand-in model**:
a Tagger subclass whose backbone and head return constants, so every row is a valid INFERRED
row (one fixed tag) and the writer, verify and commit run for real. It is plugged in through
`pipeline.TAGGER_CLASS`, a seam only benchmarks use; the job's own code path is unchanged.

The ceiling it is compared with is **decode-only on the same cores**: the same `load_inputs`
function over the same listed rows, in batches of `decode.batch_size`, in a process pool of
as many processes as the machine has cores (workers started and warmed before the clock
starts, results dropped in the worker). That is the fastest those CPUs can fetch and decode
these files with this code: with a free model, every core of the node is available to the
decode tasks, so a perfect pipeline would match it. A second reference, Ray Data decode-only
(the job's read -> repartition -> load_inputs stages, pixels dropped inside the decode task),
separates Ray Data's own per-task costs from what the actor stage and the writer add.

Rates (images/s):
- **stream**: images / (last inference batch finished - first decode task started), from
  Ray Data's per-operator stats (the pipeline_stages of the manifest): decode running at full
  width, the actor and the writer behind it. This is the steady-state figure the 0.9 goal is
  about (the runs here last seconds, so fixed costs would otherwise dominate).
- **pipeline**: images / the manifest's `pipeline` time (Ray Data executor start, actor start,
  everything up to the last staged file).
- **run**: images / the whole `run()` (checkpoint ids, listing, plan, pipeline, verify, commit).

Variants run interleaved (pool, Ray Data decode-only, job; repeated), medians are printed.
The machine is shared: the table states the load average before and after.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY = REPO / "tests" / "golden" / "tiny" / "ram_plus_checkpoint.pth"
SAMPLES = REPO / "ramplus_core" / "samples"
SIZES = {"0.3 MP": (640, 480), "12 MP": (4000, 3000)}


# -- images --------------------------------------------------------------------------------------

def make_images(folder: Path, size: tuple[int, int], n: int, seed: int = 0) -> list[Path]:
    """n photo-like JPEGs (q90): the sample photos resized, shifted and mirrored, plus +-6 levels of
    noise (JPEG keeps it, so the files decode like camera photos, not like smooth upscales).

    Kept in `folder` and reused when it already holds n files of this size (12 MP ones take ~0.3 s each).
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.jpg" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    w, h = size
    bases = [np.asarray(Image.open(p).convert("RGB").resize(size, Image.BILINEAR), dtype=np.int16)
             for p in sorted(SAMPLES.glob("*.jpg"))]
    noise = rng.integers(-6, 7, (h, w, 3)).astype(np.int16)
    for i, p in enumerate(paths):
        arr = bases[i % len(bases)]
        arr = np.roll(arr, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
        if i % 2:
            arr = arr[:, ::-1]
        arr = np.clip(arr + np.roll(noise, int(rng.integers(0, w)), axis=1), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        p.write_bytes(buf.getvalue())
    return paths


def _ship_by_value() -> None:
    """Imported as a module (tests), this file's functions and classes would be pickled by name,
    which Ray's workers cannot import: ship them by value, as when it runs as a script."""
    from ray import cloudpickle

    if __name__ != "__main__":
        cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- the zero-cost stand-in model ------------------------------------------------------------------

def stand_in_class():
    """A Tagger whose model costs nothing: the same rows out, one fixed tag (the first) at 1.0.

    Built on Tagger's copy-only construction (no checkpoint read, no vocabulary fetched), then
    given a model whose backbone and head return constants, so Tagger.__call__ runs whole:
    the pixels are taken as a view of the Arrow batch, rows are checked, lists are built,
    the progress counter is told. The model's own input step (uint8 -> normalised float, which
    a GPU does on the device) is skipped with the model.
    """
    from ramplus_core.job.inference import Tagger, _process_start

    _ship_by_value()
    class StandInTagger(Tagger):
        def __init__(self, **kw):
            t0 = time.perf_counter()
            super().__init__(**{**kw, "model_needed": False})
            self.model = _ZeroModel()
            self.info.update(device="cpu", model="zero-cost stand-in", process_started_at=_process_start(),
                             init_started_at=time.time() - (time.perf_counter() - t0), ready_at=time.time())
            if self.counter is not None:
                self.counter.actor_ready.remote(self.info)

        def _tokens(self, pixels):
            import torch

            return torch.zeros(len(pixels), 1, 1)

        def _head(self, tokens, prepared=None) -> np.ndarray:
            probs = np.zeros((len(tokens), len(self.names)), dtype=np.float32)
            probs[:, 0] = 1.0
            return probs

    return StandInTagger


class _ZeroModel:
    device = "cpu"

    @property
    def dtype(self):
        import torch

        return torch.float32


# -- the three ways of running the same decode -------------------------------------------------------

def listed_rows(uri: str, storage, batch: int) -> list:
    """The rows the job's listing produces for `uri`, as plan-like Arrow batches of `batch` rows."""
    import pyarrow as pa

    from ramplus_core.job.listing import iter_entries

    es = [e for e in iter_entries(uri, storage) if e.unlisted is None]
    t = pa.table({"uri": [e.uri for e in es], "size": pa.array([e.size for e in es], pa.int64()),
                  "etag": pa.array([e.etag for e in es], pa.string()),
                  "mtime": pa.array([e.mtime for e in es], pa.timestamp("us", tz="UTC")),
                  "list_error": pa.array([e.error for e in es], pa.string())})
    return [t.slice(s, batch) for s in range(0, t.num_rows, batch)]


def _pool_init() -> None:
    import importlib

    importlib.import_module("ramplus_core.job.work")  # imports (torch, pyarrow) before the clock starts


def _pool_task(batch, kwargs) -> int:
    from ramplus_core.job.work import load_inputs

    out = load_inputs(batch, **kwargs)
    return out.num_rows - out.column("error").null_count  # failures: must be 0


def _wait(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


class DecodePool:
    """`load_inputs` over batches in `cpus` spawned processes; started and warmed once, reused."""

    def __init__(self, cpus: int):
        import multiprocessing as mp

        self.cpus = cpus
        self.ex = ProcessPoolExecutor(cpus, mp_context=mp.get_context("spawn"), initializer=_pool_init)
        pids = set()
        while len(pids) < cpus:  # every worker up (imports done) before any timing
            pids |= set(self.ex.map(_wait, [0.3] * cpus))

    def rate(self, batches: list, kwargs: dict) -> float:
        list(self.ex.map(_pool_task, batches[:self.cpus], [kwargs] * self.cpus))  # warm caches and decoders
        t = time.perf_counter()
        failed = sum(self.ex.map(_pool_task, batches, [kwargs] * len(batches)))
        dt = time.perf_counter() - t
        if failed:
            raise RuntimeError(f"decode-only: {failed} images failed")
        return sum(b.num_rows for b in batches) / dt

    def close(self) -> None:
        self.ex.shutdown()


def _drop_pixels(t):
    return t.select(["uri", "error"])


def raydata_rate(batches: list, kwargs: dict, cfg) -> float:
    """The job's read -> repartition -> load_inputs stages alone; pixels dropped in the decode task."""
    import pyarrow as pa
    import ray

    from ramplus_core.job.work import load_inputs

    _ship_by_value()
    ds = ray.data.from_arrow(pa.concat_tables(batches))
    ds = ds.repartition(target_num_rows_per_block=cfg.decode.batch_size)
    ds = ds.map_batches(load_inputs, batch_size=cfg.decode.batch_size, batch_format="pyarrow", fn_kwargs=kwargs,
                        num_cpus=cfg.decode.num_cpus, udf_modifying_row_count=False)
    ds = ds.map_batches(_drop_pixels, batch_format="pyarrow", num_cpus=cfg.decode.num_cpus)  # fused into the task
    t = time.perf_counter()
    n = sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return n / (time.perf_counter() - t)


def job_run(inputs: str, output: str, storage_cfg: dict, batch: int, emit=lambda s: None) -> dict:
    """One whole `run()` with the stand-in model; returns the manifest."""
    import yaml

    from ramplus_core.job import load_config, run

    data = {"decode": {"batch_size": batch}, "inference": {"batch_size": batch, "driver_max_images": 0},
            "ray": {"progress_bars": False, "progress_interval_s": 60.0}}
    if storage_cfg:
        data["storage"] = storage_cfg
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    try:
        cfg = load_config(f.name, inputs=[inputs], output=output, checkpoint=str(TINY))
    finally:
        os.unlink(f.name)
    return run(cfg, emit=emit).manifest


def config_for(inputs: str, output: str, storage_cfg: dict, batch: int):
    from ramplus_core.job import load_config

    cfg = load_config(None, inputs=[inputs], output=output, checkpoint=str(TINY),
                      overrides=[("decode.batch_size", batch)] + [(f"storage.{k}", v) for k, v in storage_cfg.items()])
    return cfg


def stages(m: dict) -> dict:
    """Seconds per step of a run, and the decode and inference stages' spans from Ray Data's stats."""
    t = m["timings_s"]
    ps = {s["name"]: s for s in m.get("pipeline_stages", [])}
    dec = next((s for k, s in ps.items() if "load_inputs" in k), None)
    inf = next((s for k, s in ps.items() if "Tagger" in k), None)
    ev = m["pipeline_events_s"]
    out = {k: t.get(k, 0.0) for k in ("checkpoint", "listing", "plan", "vocab_put", "pipeline", "verify", "commit",
                                      "upkeep", "total")}
    out["actor_ready"] = max(ev["actor_ready"]) if ev.get("actor_ready") else None
    out["first_decode"] = dec["start_s"] if dec else None
    out["decode_span"] = (dec["end_s"] - dec["start_s"]) if dec else None
    out["decode_busy"] = dec["wall_s"] if dec else None
    out["decode_tasks"] = dec["tasks"] if dec else None
    out["infer_busy"] = inf["wall_s"] if inf else None
    # CPU-seconds per stage: on a busy node every stage's task time is taken from the decode
    out["other_busy"] = sum(s["wall_s"] or 0.0 for k, s in ps.items() if s is not dec)
    out["busy_by_stage"] = {k: s["wall_s"] for k, s in ps.items()}
    out["cpu_by_stage"] = {k: s["cpu_s"] for k, s in ps.items()}
    out["last_batch"] = inf["end_s"] if inf else ev.get("last_batch_done")
    n = m["counts"]["tagged"] + m["counts"]["errors"]
    out["images"] = n
    out["errors"] = m["counts"]["errors"]
    stream_s = (out["last_batch"] - out["first_decode"]) if dec and out["last_batch"] else None
    out["stream_rate"] = n / stream_s if stream_s else 0.0
    out["decode_rate"] = n / out["decode_span"] if dec and out["decode_span"] else 0.0
    out["tail"] = (out["last_batch"] - dec["end_s"]) if dec and out["last_batch"] else None
    out["pipeline_rate"] = n / t["pipeline"]
    out["run_rate"] = n / t["total"]
    out["steady_rate"] = m["steady_images_per_s"]
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=2000, help="0.3 MP JPEGs (default 2000: ~2-3 s of decode on 2 cores)")
    ap.add_argument("--large", type=int, default=120, help="12 MP JPEGs (default 120: ~2-3 s of decode on 2 cores)")
    ap.add_argument("--s3-large", type=int, default=None, help="12 MP JPEGs on S3 (default: --large)")
    ap.add_argument("--batch", type=int, default=16, help="decode.batch_size = inference.batch_size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true", help="local folders only")
    ap.add_argument("--no-raydata", action="store_true", help="skip the Ray Data decode-only reference")
    ap.add_argument("--images-dir", default=os.path.join(tempfile.gettempdir(), "ramplus-ceiling-images"),
                    help="where the generated JPEGs are kept between runs")
    args = ap.parse_args(argv)

    import ray

    from ramplus_core.job import pipeline as pp
    from ramplus_core.job.storage import Storage

    cpus = os.cpu_count() or 1
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="ramplus-ceiling-"))
    t_all = time.perf_counter()
    cases = []  # (label, inputs uri, storage config)
    folders = {}
    for name, size in SIZES.items():
        n = args.small if name == "0.3 MP" else args.large
        d = Path(args.images_dir) / f"{size[0]}x{size[1]}-{n}"
        make_images(d, size, n)
        folders[name] = d
        cases.append((f"{name} local", str(d), {}, str(tmp / "out")))
    weed = None
    if not args.no_s3:
        sys.path.insert(0, str(REPO / "tests" / "job"))
        from tests.job.conftest import ACCESS_KEY, BUCKET, SECRET_KEY, WeedProcess

        weed = WeedProcess(tmp / "weed", [(ACCESS_KEY, SECRET_KEY)]).start()
        weed.wait_writable(ACCESS_KEY, SECRET_KEY)
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=weed.endpoint, key=ACCESS_KEY, secret=SECRET_KEY,
                               skip_instance_cache=True, use_listings_cache=False)
        s3cfg = {"endpoint_url": weed.endpoint, "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY,
                 "region": "us-east-1"}
        for name, d in folders.items():
            files = sorted(d.glob("*.jpg"))
            if name == "12 MP" and args.s3_large is not None:
                files = files[:args.s3_large]
            key = name.replace(" ", "").replace(".", "")
            fs.pipe({f"{BUCKET}/ceiling/{key}/{p.name}": p.read_bytes() for p in files})
            cases.append((f"{name} S3", f"s3://{BUCKET}/ceiling/{key}/", s3cfg, f"s3://{BUCKET}/ceiling/out"))

    t = time.perf_counter()
    started = not ray.is_initialized()  # a test's Ray is used as it is, and left running
    if started:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    ray_start = time.perf_counter() - t
    cpus = int(ray.cluster_resources().get("CPU", cpus))
    saved, pp.TAGGER_CLASS = pp.TAGGER_CLASS, stand_in_class()
    pool = DecodePool(cpus)
    results = {label: {"pool": [], "raydata": [], "job": []} for label, *_ in cases}
    try:
        runs = 0
        for label, inputs, scfg, out_root in cases:  # warm-up: Ray's workers import torch and pyarrow once
            job_run(inputs, f"{out_root}/warm-{runs}", scfg, args.batch)
            runs += 1
            break
        for rep in range(args.repeats):
            for label, inputs, scfg, out_root in cases:
                cfg = config_for(inputs, f"{out_root}/x", scfg, args.batch)
                storage = Storage.from_config(cfg.storage)
                batches = listed_rows(inputs, storage, args.batch)
                kwargs = {"storage": storage, "fetch": cfg.fetch, "limits": cfg.decode.limits(),
                          "output_uri": cfg.output}
                results[label]["pool"].append(pool.rate(batches, kwargs))
                if not args.no_raydata:
                    results[label]["raydata"].append(raydata_rate(batches, kwargs, cfg))
                m = job_run(inputs, f"{out_root}/run-{runs}", scfg, args.batch)
                runs += 1
                if m["counts"]["errors"]:
                    raise RuntimeError(f"{label}: {m['counts']['errors']} error rows: {m['counts']['errors_by_stage']}")
                results[label]["job"].append(stages(m))
    finally:
        pp.TAGGER_CLASS = saved
        pool.close()
        if started:
            ray.shutdown()
        if weed is not None:
            weed.stop()

    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpus} CPU cores; load average before "
             f"{load0[0]:.2f}, after {os.getloadavg()[0]:.2f}; ray {ray.__version__}; medians of {args.repeats} "
             f"interleaved repeats; zero-cost stand-in model; decode.batch_size = inference.batch_size = {args.batch}.",
             "",
             "| case | images | decode-only, pool | decode-only, Ray Data | job: decode stage | **decode stage / pool** "
             "| job: stream | stream / pool | job: first to last batch | job: pipeline | pipeline / pool | "
             "job: whole run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, *_ in cases:
        r = results[label]
        j = r["job"]
        pool_r, rd = med(r["pool"]), med(r["raydata"])
        dr, st = med([x["decode_rate"] for x in j]), med([x["stream_rate"] for x in j])
        sd, pl, rn = (med([x[k] for x in j]) for k in ("steady_rate", "pipeline_rate", "run_rate"))
        lines.append(f"| {label} | {j[0]['images']} | {pool_r:.0f} | {rd:.0f} | {dr:.0f} | **{dr / pool_r:.2f}** | "
                     f"{st:.0f} | {st / pool_r:.2f} | {sd:.0f} | {pl:.0f} | {pl / pool_r:.2f} | {rn:.1f} |")
    lines += ["", "(images/s; decode stage: images / (last - first decode task); stream: images / (last inference "
              "batch - first decode task); first to last batch: the manifest's steady_images_per_s; pipeline: "
              "images / the pipeline step incl. Ray Data and actor start; whole run: images / run())"]
    lines += ["", "Where a run's time goes (seconds, medians; stages of the pipeline from Ray Data's stats, "
              "relative to the pipeline's start):", "",
              "| case | checkpoint ids | listing | plan | pipeline | of which: first decode starts | actor ready | "
              "decode span | last decode to last batch | decode busy (task-s) | other stages busy (task-s) | verify | "
              "commit + upkeep | total |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, *_ in cases:
        j = results[label]["job"]

        def f(k, fmt=".2f"):
            return format(med([x[k] for x in j]), fmt)

        lines.append(f"| {label} | {f('checkpoint')} | {f('listing')} | {f('plan')} | {f('pipeline')} | "
                     f"{f('first_decode')} | {f('actor_ready')} | {f('decode_span')} | {f('tail')} | "
                     f"{f('decode_busy')} | {f('other_busy')} | {f('verify')} | "
                     f"{med([x['commit'] + x['upkeep'] for x in j]):.2f} | {f('total')} |")
    lines += ["", "Busy task-seconds per stage (medians):", ""]
    for label, *_ in cases:
        j = results[label]["job"]
        names = list(j[0]["busy_by_stage"])
        lines.append(f"- {label}: " + ", ".join(f"{k} {med([x['busy_by_stage'].get(k) for x in j]):.2f}" for k in names))
    lines += ["", f"Ray start (local, {cpus} CPUs, once): {ray_start:.1f} s. Benchmark wall time "
              f"{time.perf_counter() - t_all:.0f} s."]
    if max(load0[0], os.getloadavg()[0]) > cpus * 0.75:
        lines.append(f"NOTE: load average above {cpus * 0.75:.1f} around this run: other work shared the cores, "
                     "so rates are low and ratios noisy.")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()

"""How much of the model's speed the tagging job keeps, what decoding costs, what a run costs to start.

    .venv/bin/python benchmarks/pipeline.py            # golden tiny model, ~2-3 minutes on 2 cores
    .venv/bin/python benchmarks/pipeline.py --full     # adds Swin-L / 4585 tags with random weights

Everything is measured in this one process on this machine, in this order:

1. decode: 12-megapixel JPEGs (sample photos upscaled to 4000x3000) decoded and resized to
   384x384 in exact mode (the paper's full decode) and in fast mode (the default, DecodeLimits()),
   one thread, timed in CPU seconds (= images/s per core, even when other work shares the
   machine); plus the pixel and logit differences fast mode causes (benchmarks/decode.py has the
   per-size table).
2. model only: `RamPlus.logits` over already-decoded images, same batch size and torch
   threads as the job's actor.
3. the job: `run()` over the same images as JPEG files in a folder, on a local Ray with all
   cores; efficiency = job images/s (first to last finished batch) / model-only images/s.
4. fixed cost of a small run: Ray start, checkpoint load + vocabulary projection in the
   driver, vocabulary put, model load per actor, and the wall time of an 8-image run.

The machine is shared and small, so numbers move by ~10-20% between runs; the table
states the CPU count and load average it ran under.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY = REPO / "tests" / "golden" / "tiny" / "ram_plus_checkpoint.pth"
SAMPLES = REPO / "ramplus_core" / "samples"


def photos() -> list:
    from PIL import Image

    paths = sorted(p for p in SAMPLES.glob("*.jpg")) or sorted((REPO / "tests/golden/tiny/images").glob("*.jpg"))
    return [Image.open(p).convert("RGB") for p in paths]


def synth_jpegs(folder: Path, n: int, size=(640, 480), seed=0) -> list[Path]:
    """Photo-like JPEGs: random crops of the sample photos, resized, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = photos()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = base[i % len(base)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        p = folder / f"img_{i:05d}.jpg"
        crop.save(p, quality=90)
        out.append(p)
    return out


def big_jpegs(n: int) -> list[bytes]:
    from PIL import Image

    out = []
    for img in photos()[:n]:
        big = img.resize((4000, 3000), Image.LANCZOS)
        arr = np.asarray(big, dtype=np.int16) + np.random.default_rng(0).integers(-6, 7, (3000, 4000, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_decode(model, n_images: int, repeats: int, full_model=None) -> dict:
    import torch

    from ramplus_core.preprocess import DecodeLimits, decode, normalize

    data = big_jpegs(n_images)
    res = {"bytes": statistics.mean(len(d) for d in data)}
    arrays = {}
    for name, limits in (("exact", DecodeLimits(mode="exact")), ("fast", DecodeLimits())):
        decode(data[0], limits)  # warm-up
        times = []
        for _ in range(repeats):
            for d in data:
                t = time.process_time()  # CPU time of this one thread: a per-core rate even on a busy machine
                decode(d, limits)
                times.append(time.process_time() - t)
        res[name] = 1.0 / statistics.mean(times)
        arrays[name] = np.stack([decode(d, limits).array for d in data])
    diff = np.abs(arrays["exact"].astype(np.int16) - arrays["fast"].astype(np.int16))
    res["pixel_max"], res["pixel_mean"] = int(diff.max()), float(diff.mean())
    for tag, m in (("tiny", model), ("full", full_model)):
        if m is None:
            continue
        a = m.logits(normalize(arrays["exact"]))
        b = m.logits(normalize(arrays["fast"]))
        res[f"logit_max_{tag}"] = float((a - b).abs().max())
        res[f"prob_max_{tag}"] = float((torch.sigmoid(a) - torch.sigmoid(b)).abs().max())
        on_a = torch.sigmoid(a).numpy() > m.vocabulary.thresholds[None]
        on_b = torch.sigmoid(b).numpy() > m.vocabulary.thresholds[None]
        res[f"flips_{tag}"] = int((on_a != on_b).sum())
        res[f"decisions_{tag}"] = int(on_a.size)
    return res


def decode_rate(files: list[Path]) -> float:
    import torch

    from ramplus_core.preprocess import DecodeLimits, decode

    torch.set_num_threads(1)
    data = [p.read_bytes() for p in files]
    limits = DecodeLimits()  # the default (fast) mode
    decode(data[0], limits)
    t = time.process_time()
    for d in data:
        decode(d, limits)
    return len(data) / (time.process_time() - t)


def model_only(model, files: list[Path], batch: int, threads: int) -> float:
    """Images/s of RamPlus.logits alone over pre-decoded images (first batch is a warm-up)."""
    import torch

    from ramplus_core.job.config import DecodeConfig
    from ramplus_core.preprocess import decode, normalize

    torch.set_num_threads(threads)
    limits = DecodeConfig().limits()  # decode as the job does by default, so the ratio compares like with like
    arrays = np.stack([decode(p.read_bytes(), limits).array for p in files])
    model.logits(normalize(arrays[:batch]))
    t = time.perf_counter()
    for s in range(0, len(arrays), batch):
        model.decide(model.logits(normalize(arrays[s:s + batch])))
    return len(arrays) / (time.perf_counter() - t)


def run_job(inputs: Path, output: Path, checkpoint: str, batch: int, **sections) -> dict:
    from ramplus_core.job import load_config, run

    data = {"decode": {"batch_size": batch}, "inference": {"batch_size": batch},
            "ray": {"progress_bars": False, "progress_interval_s": 30.0}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    import yaml

    cfg_path = output.parent / f"{output.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_config(str(cfg_path), inputs=[str(inputs)], output=str(output), checkpoint=checkpoint)
    return run(cfg, emit=lambda s: None).manifest


def full_checkpoint(folder: Path) -> str:
    """Swin-L + 4585 tags x 51 descriptions with random weights, as a safetensors export."""
    import torch
    import torch.nn.functional as F

    from ramplus_core.checkpoint import ModelConfig, export_safetensors
    from ramplus_core.model import RamPlus, RamPlusNet
    from ramplus_core.vocabulary import Vocabulary

    torch.manual_seed(0)
    cfg = ModelConfig()
    net = RamPlusNet(cfg).eval()
    label_embed = F.normalize(torch.randn(4585 * cfg.descriptions_per_tag, 512), dim=-1)
    model = RamPlus(net, label_embed, Vocabulary.from_label_embed(label_embed, cfg.descriptions_per_tag), device="cpu")
    path = folder / "ram_plus_random_full.safetensors"
    export_safetensors(model, str(path))
    return str(path)


def row(name, value, note=""):
    return f"| {name} | {value} | {note} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=160, help="synthetic 640x480 JPEGs for the efficiency runs")
    ap.add_argument("--batch", type=int, default=16, help="inference (and decode) batch size")
    ap.add_argument("--decode-images", type=int, default=3, help="12-megapixel JPEGs for the decode rows")
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also the full-size model (random weights, ~1.3 GB temp file)")
    ap.add_argument("--full-images", type=int, default=24)
    ap.add_argument("--full-batch", type=int, default=8)
    args = ap.parse_args()

    import ray
    import torch

    from ramplus_core import RamPlus

    cpus = os.cpu_count() or 1
    load0 = os.getloadavg()[0]
    threads = cpus  # what the job gives its single CPU actor (cluster CPUs / actors)
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {cpus} CPU cores ({torch.backends.cpu.get_cpu_capability()}), "
             f"load average before start {os.getloadavg()[0]:.1f}; torch {torch.__version__}, ray {ray.__version__}.", "",
             "| measure | value | how |", "| --- | --- | --- |"]
    tmp = Path(tempfile.mkdtemp(prefix="ramplus-bench-"))
    t_all = time.perf_counter()

    tiny = RamPlus.from_checkpoint(str(TINY), device="cpu")
    full = RamPlus.from_checkpoint(full_checkpoint(tmp), device="cpu") if args.full else None
    full_path = str(tmp / "ram_plus_random_full.safetensors") if args.full else None

    torch.set_num_threads(1)
    dec = bench_decode(tiny, args.decode_images, args.decode_repeats, full)
    lines.append(row("decode 12 MP JPEG, exact", f"{dec['exact']:.2f} images/s per core",
                     f"{args.decode_images} photos upscaled to 4000x3000, q90, {dec['bytes'] / 1e6:.1f} MB avg, decode + resize to 384"))
    lines.append(row("decode 12 MP JPEG, fast", f"{dec['fast']:.2f} images/s per core",
                     f"decode.mode fast (the default): {dec['fast'] / dec['exact']:.1f}x faster"))
    lines.append(row("fast vs exact: pixels", f"max {dec['pixel_max']}, mean {dec['pixel_mean']:.2f} (of 255)",
                     "384x384x3 uint8 after resize"))
    for tag in ("tiny", "full"):
        if f"logit_max_{tag}" in dec:
            lines.append(row(f"fast vs exact: scores ({tag} model)",
                             f"max dlogit {dec[f'logit_max_{tag}']:.4f}, max dprob {dec[f'prob_max_{tag}']:.4f}",
                             f"{dec[f'flips_{tag}']} of {dec[f'decisions_{tag}']} tag decisions change"))

    files = synth_jpegs(tmp / "images", args.images)
    small = tmp / "small"
    small.mkdir()
    for p in files[:8]:
        (small / p.name).write_bytes(p.read_bytes())
    lines.append(row("decode 640x480 JPEG", f"{decode_rate(files[:48]):.0f} images/s per core",
                     "the synthetic job images, fast mode (the default)"))
    mo = model_only(tiny, files, args.batch, threads)
    lines.append(row("model only, tiny", f"{mo:.2f} images/s", f"RamPlus.logits, batch {args.batch}, {threads} threads"))

    t = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - t
    m = run_job(tmp / "images", tmp / "out", str(TINY), args.batch)
    eff = m["steady_images_per_s"] / mo
    lines.append(row("job, tiny", f"{m['steady_images_per_s']:.2f} images/s",
                     f"{args.images} JPEGs 640x480 from a local folder, first to last finished batch; "
                     f"{m['images_per_s']:.2f} images/s over the whole pipeline incl. actor start"))
    lines.append(row("**pipeline efficiency, tiny**", f"**{eff:.2f}**", "job images/s / model-only images/s"))

    small_m = run_job(small, tmp / "out_small", str(TINY), args.batch)
    a = small_m["actors"][0]
    t_ = small_m["timings_s"]
    lines.append(row("fixed cost: Ray start (local)", f"{ray_start:.1f} s", "ray.init, 2 CPUs, no dashboard"))
    lines.append(row("fixed cost: checkpoint in the driver", f"{t_['checkpoint']:.2f} s",
                     "load + model_id hash + vocabulary projection (tiny)"))
    lines.append(row("fixed cost: vocabulary put", f"{t_['vocab_put'] * 1000:.1f} ms",
                     f"{small_m['vocabulary']['object_bytes'] / 2**20:.1f} MiB (tiny)"))
    lines.append(row("fixed cost: model load per actor", f"{a['load_s']:.2f} s",
                     f"tiny; after the worker started; actor RSS {a['rss_bytes'] / 2**20:.0f} MiB"))
    lines.append(row("small run wall time", f"{t_['total']:.1f} s",
                     f"8 images, Ray already up; pipeline {t_['pipeline']:.1f} s of which inference ~{8 / mo:.1f} s"))

    if args.full:
        ffiles = files[: args.full_images]
        fmo = model_only(full, ffiles, args.full_batch, threads)
        del full
        fdir = tmp / "full_images"
        fdir.mkdir()
        for p in ffiles:
            (fdir / p.name).write_bytes(p.read_bytes())
        fm = run_job(fdir, tmp / "out_full", full_path, args.full_batch)
        fa = fm["actors"][0]
        lines.append(row("model only, full size", f"{fmo:.3f} images/s",
                         f"Swin-L, 4585 tags, random weights, batch {args.full_batch}, {threads} threads"))
        lines.append(row("job, full size", f"{fm['steady_images_per_s']:.3f} images/s",
                         f"{len(ffiles)} JPEGs, first to last finished batch; {fm['images_per_s']:.3f} images/s incl. start"))
        lines.append(row("**pipeline efficiency, full size**", f"**{fm['steady_images_per_s'] / fmo:.2f}**",
                         "target >= 0.85 on CPU"))
        ft = fm["timings_s"]
        lines.append(row("full: checkpoint in the driver", f"{ft['checkpoint']:.1f} s",
                         "safetensors fp32 load + model_id hash + projection of 233,835 descriptions"))
        lines.append(row("full: vocabulary object", f"{fm['vocabulary']['object_bytes'] / 2**30:.2f} GiB",
                         f"put in {ft['vocab_put']:.2f} s; one copy per node, read zero-copy by every actor"))
        lines.append(row("full: model load per actor", f"{fa['load_s']:.1f} s", f"actor RSS {fa['rss_bytes'] / 2**30:.2f} GiB"))
    ray.shutdown()
    lines.append("")
    lines.append(f"Benchmark wall time {time.perf_counter() - t_all:.0f} s; load average at the end "
                 f"{os.getloadavg()[0]:.1f}.")
    if max(load0, os.getloadavg()[0]) > cpus + 1:
        lines.append(f"WARNING: other work kept more than {cpus} cores busy during this run; the rates above "
                     "(and their ratios) are not reliable. Rerun on an idle machine.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

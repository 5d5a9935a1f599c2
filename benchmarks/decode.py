"""Decode speed per core and distance from the paper's pixels, per decode mode and image size.

    .venv/bin/python benchmarks/decode.py                 # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/decode.py --repeats 3 --images 2   # quicker, noisier

Prints one table (issue 12's): for 12 MP, 2 MP and 0.3 MP photo-like JPEGs (the bundled
sample photos resized, plus +-6 levels of pixel noise that JPEG keeps: harder for a scaled
decode than a clean upscale), and for each decode path:

- paper: the paper's code (`Image.open(...).convert("RGB").resize((384, 384), BILINEAR)`)
- exact: `decode(data, DecodeLimits(mode="exact"))`, which must equal paper bit for bit
- draft: exact mode with the former `jpeg_draft` switch (for comparison with earlier figures)
- fast: `decode(data)`, the default
- device-cpu: `gpu_decode.decode_batch([data], device="cpu")`, the GPU actor's code on the CPU
  (torchvision's full libjpeg decode + float antialiased resize): its pixels are what nvJPEG
  gives within a level; its speed on a CPU says nothing of a GPU's (benchmarks/gpu.py)

images/s per core (one thread, CPU time of this process, median over repeats; the variants
run interleaved so load from other work hits them alike), the ratio to paper, the mean and
max absolute difference from exact in uint8 levels and in normalised units (/255/std, the
model's input), and the cores one GPU needs at 1,000 images/s. Then the golden tiny model's
tag decisions on the golden images, fast against exact.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"12 MP": (4000, 3000), "2 MP": (1920, 1080), "0.3 MP": (640, 480)}


def photo_jpegs(size: tuple[int, int], n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    paths = sorted((REPO / "ramplus_core" / "samples").glob("*.jpg"))
    rng = np.random.default_rng(seed)
    out = []
    for p in paths[:n]:
        img = Image.open(p).convert("RGB").resize(size, Image.LANCZOS)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def paths():
    from PIL import Image

    from ramplus_core.gpu_decode import decode_batch
    from ramplus_core.preprocess import DecodeLimits, decode

    exact, draft, fast = DecodeLimits(mode="exact"), DecodeLimits(mode="exact", jpeg_draft=True), DecodeLimits()

    def paper(d: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(d)).convert("RGB").resize((384, 384), Image.BILINEAR))

    return {
        "paper": paper,
        "exact": lambda d: decode(d, exact).array,
        "draft": lambda d: decode(d, draft).array,
        "fast": lambda d: decode(d, fast).array,
        "device-cpu": lambda d: decode_batch([d], fast, "cpu").pixels[0].numpy(),
    }


def measure(data: list[bytes], repeats: int) -> dict:
    fns = paths()
    for f in fns.values():
        f(data[0])  # warm-up: imports, library set-up
    rates: dict = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each repeat
            t = time.process_time()
            for d in data:
                fns[k](d)
            rates[k].append(len(data) / (time.process_time() - t))
    ref = np.stack([fns["exact"](d) for d in data]).astype(np.int16)
    std = np.asarray((0.229, 0.224, 0.225)) * 255.0
    out = {}
    for k, f in fns.items():
        diff = np.abs(np.stack([f(d) for d in data]).astype(np.int16) - ref)
        norm = diff / std
        out[k] = {"rate": statistics.median(rates[k]), "mean": float(diff.mean()), "max": int(diff.max()),
                  "nmean": float(norm.mean()), "nmax": float(norm.max())}
    return out


def golden_agreement() -> str:
    import torch

    from ramplus_core import RamPlus
    from ramplus_core.preprocess import DecodeLimits, decode, normalize

    gdir = REPO / "tests" / "golden" / "tiny"
    exp = json.loads((gdir / "expected.json").read_text())
    model = RamPlus.from_checkpoint(str(gdir / "ram_plus_checkpoint.pth"), device="cpu")
    thr = np.asarray(exp["thresholds"], dtype=np.float32)
    files = [(gdir / "images" / n).read_bytes() for n in exp["images"]]
    probs = {}
    for name, limits in (("exact", DecodeLimits(mode="exact")), ("fast", DecodeLimits())):
        px = normalize(np.stack([decode(d, limits).array for d in files]))
        probs[name] = torch.sigmoid(model.logits(px)).numpy()
    on = {k: v > thr[None, :] for k, v in probs.items()}
    differ = int((on["fast"] != on["exact"]).sum())
    dp = float(np.abs(probs["fast"] - probs["exact"]).max())
    return (f"golden images (tiny model, {len(files)} images x {len(thr)} tags): {differ} of {on['fast'].size} tag "
            f"decisions differ fast vs exact; max |probability difference| {dp:.2e}")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, so a run's output goes into docs/job.md as printed."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--images", type=int, default=4, help="images per size (sample photos, up to 7)")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, from: " + ", ".join(SIZES))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # per core: the decode tasks run one decode per CPU
    from tables import machine_line

    rows = []
    for label in args.sizes.split(","):
        label = label.strip()
        data = photo_jpegs(SIZES[label], args.images)
        kb = statistics.mean(len(d) for d in data) / 1000
        res = measure(data, args.repeats)
        base = res["paper"]["rate"]
        for k, r in res.items():
            rows.append([label, f"{kb:.0f} KB", k, f"{r['rate']:.1f}", f"{r['rate'] / base:.2f}",
                         f"{r['mean']:.3f} / {r['max']}", f"{r['nmean']:.4f} / {r['nmax']:.3f}",
                         f"{1000 / r['rate']:.0f}"])
        print(f"# {label} done", file=sys.stderr, flush=True)
    print(f"# {machine_line()}; one thread; median of {args.repeats} interleaved repeats over {args.images} "
          f"images per size; differences against exact mode")
    print(markdown(["size", "JPEG", "path", "images/s per core", "vs paper", "abs diff uint8 mean / max",
                    "abs diff normalised mean / max", "cores per GPU at 1,000 img/s"], rows))
    print()
    print(golden_agreement())


if __name__ == "__main__":
    main()

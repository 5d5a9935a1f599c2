"""What one GPU does for the job: the model in bf16, nvJPEG decoding, and how close both stay to the CPU path.

    bash benchmarks/gpu.sh                       # on a CUDA machine, under 8 minutes on one H100/H200
    .venv/bin/python benchmarks/gpu.py --cpu-smoke   # the same code, tiny and on the CPU (CI runs it)

Prints one table:

1. model only: full-size RAM++ (Swin-L, 4585 tags x 51 descriptions, random weights) in bf16,
   eager and torch.compile, batch sizes 32-256: images/s, first-call seconds, peak memory,
   and the GPU utilisation sampled (nvidia-smi, every 0.2 s) while it ran;
2. decode: `gpu_decode.decode_batch` (nvJPEG through torchvision.io.decode_jpeg on a list,
   antialiased resize on the device) on photo-like JPEGs of 0.3, 2 and 12 MP: images/s,
   and on EVERY run the difference between the GPU-decoded input and the CPU path's (exact
   and fast), because the hardware JPEG engine of some GPUs has been reported to corrupt
   memory (torchvision PR #9606, torchcodec PR #1634): a max difference over 2 uint8 levels
   is flagged;
3. bf16 against fp32 on the same inputs: max |logit difference| and the share of equal tag
   decisions.

The job end to end (local S3 server, GPU decode on and off) is benchmarks/pipeline.py's part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ramplus_core.checkpoint import ModelConfig  # noqa: E402
from ramplus_core.model import RamPlusNet  # noqa: E402

GOLDEN_CKPT = REPO / "tests" / "golden" / "tiny" / "ram_plus_checkpoint.pth"
DECODE_SIZES = {"0.3 MP": (640, 480), "2 MP": (1920, 1080), "12 MP": (4000, 3000)}


class Utilisation:
    """GPU utilisation (%) sampled by nvidia-smi in a thread while a `with` block runs."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []

    def __enter__(self):
        self.stop = threading.Event()
        if self.enabled:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self):
        idx = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "-i", idx, "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except Exception:  # noqa: BLE001 - utilisation is informative only
                pass
            self.stop.wait(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join(timeout=10)

    def text(self) -> str:
        if not self.samples:
            return "n/a"
        return f"{np.mean(self.samples):.0f}% (max {max(self.samples):.0f})"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, x, iters: int, dev: torch.device) -> float:
    fn(x)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    sync(dev)
    return x.shape[0] * iters / (time.perf_counter() - t0)


def build(smoke: bool, dev: torch.device):
    """fp32 and bf16 copies of one random-weight model and their prepared vocabularies."""
    torch.manual_seed(0)
    if smoke:
        from ramplus_core.checkpoint import load

        ck = load(str(GOLDEN_CKPT))
        cfg, tags = ck.config, 24
    else:
        cfg, tags = ModelConfig(), 4585
    net32 = RamPlusNet(cfg).eval().to(dev)
    label_embed = F.normalize(torch.randn(tags, cfg.descriptions_per_tag, cfg.head.encoder_width, device=dev), dim=-1)
    with torch.inference_mode():
        vocab32 = net32.head.prepare(label_embed)
    net = RamPlusNet(cfg).eval().to(dev)
    net.load_state_dict(net32.state_dict())
    net = net.to(torch.bfloat16)
    with torch.inference_mode():
        vocab = net.head.prepare(label_embed.bfloat16())
    return net32, vocab32, net, vocab


def model_rows(net, vocab, args, dev) -> list[list[str]]:
    eager = lambda t: net(t, vocab, args.chunk)  # noqa: E731
    modes = [("eager", eager)]
    if not args.no_compile:
        modes.append(("compile", torch.compile(eager, dynamic=False)))
    rows = []
    for name, fn in modes:
        for b in (int(s) for s in args.batches.split(",")):
            x = torch.randn(b, 3, 384, 384, device=dev, dtype=torch.bfloat16)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode(), Utilisation(dev.type == "cuda") as util:
                t0 = time.perf_counter()
                fn(x)
                sync(dev)
                first = time.perf_counter() - t0
                ips = bench(fn, x, args.iters, dev)
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            peak = f"peak {mem:.1f} GiB; " if dev.type == "cuda" else ""
            rows.append([f"model bf16 {name}", f"batch {b}", f"{ips:.1f}", f"first call {first:.1f} s; {peak}"
                         f"GPU busy {util.text()}"])
            print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def decode_rows(args, dev) -> list[list[str]]:
    from decode import photo_jpegs

    from ramplus_core.gpu_decode import decode_batch
    from ramplus_core.preprocess import DecodeLimits, decode

    limits = DecodeLimits()
    rows = []
    for label in args.decode_sizes.split(","):
        label = label.strip()
        size = DECODE_SIZES[label]
        n = args.decode_images
        base = photo_jpegs(size, min(n, 7))
        data = [base[i % len(base)] for i in range(n)]
        decode_batch(data[:2], limits, dev)  # warm-up: library and decoder set-up
        sync(dev)
        with Utilisation(dev.type == "cuda") as util:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                got = decode_batch(data, limits, dev)
            sync(dev)
            ips = n * args.iters / (time.perf_counter() - t0)
        px = got.pixels.cpu().numpy().astype(np.int16)
        exact = np.stack([decode(d, DecodeLimits(mode="exact")).array for d in data]).astype(np.int16)
        fast = np.stack([decode(d, limits).array for d in data]).astype(np.int16)
        de, df = np.abs(px - exact), np.abs(px - fast)
        flag = "  << OVER 2 LEVELS: check the device decoder" if de.max() > 2 else ""
        rows.append([f"decode on {dev.type}", f"{label}, {n} per call", f"{ips:.1f}",
                     f"{got.on_device}/{n} on the device; vs CPU exact mean {de.mean():.3f} max {de.max()}, vs CPU "
                     f"fast mean {df.mean():.3f} max {df.max()}; GPU busy {util.text()}{flag}"])
        print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def precision_rows(net32, vocab32, net, vocab, args, dev) -> list[list[str]]:
    with torch.inference_mode():
        x = torch.randn(2 if args.cpu_smoke else 8, 3, 384, 384, device=dev)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        ref = net32(x, vocab32, args.chunk)
        got = net(x.bfloat16(), vocab, args.chunk).float()
    agree = ((ref > 0) == (got > 0)).float().mean().item()
    return [["bf16 vs fp32", f"{len(x)} images", "", f"max abs logit difference {(got - ref).abs().max():.4f}; "
             f"tag decisions equal "
             f"at p>0.5: {agree:.4%} of {ref.numel()}"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="32,64,128,256")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024, help="tags per head chunk")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--decode-sizes", default=",".join(DECODE_SIZES))
    ap.add_argument("--decode-images", type=int, default=64, help="JPEGs per decode_batch call")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny model, small batches, CPU decode: checks the script without a GPU")
    args = ap.parse_args()
    if args.cpu_smoke:
        dev = torch.device("cpu")
        args.batches, args.iters, args.no_compile = "2", 1, True
        args.decode_sizes, args.decode_images = "0.3 MP", 3
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --cpu-smoke)")
        dev = torch.device("cuda")
    net32, vocab32, net, vocab = build(args.cpu_smoke, dev)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU smoke run (tiny model)"
    rows = model_rows(net, vocab, args, dev) + decode_rows(args, dev) + precision_rows(net32, vocab32, net, vocab,
                                                                                         args, dev)
    print(f"# {name}, torch {torch.__version__}")
    print("| what | setting | images/s | notes |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()

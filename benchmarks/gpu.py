"""Model-only images/s of full-size RAM++ on one GPU, bf16, with and without torch.compile.

Random weights (nothing to download); the vocabulary is the full 4585 x 51 descriptions.
Also reports how far bf16 logits and decisions are from fp32 on the same inputs.
Run through benchmarks/gpu.sh; it needs a CUDA device and takes under 5 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ramplus_core.checkpoint import ModelConfig  # noqa: E402
from ramplus_core.model import RamPlusNet  # noqa: E402


def bench(fn, x, iters: int) -> float:
    fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    torch.cuda.synchronize()
    return x.shape[0] * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024, help="tags per head chunk")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cfg = ModelConfig()
    net32 = RamPlusNet(cfg).eval().to(dev)
    label_embed = F.normalize(torch.randn(4585, cfg.descriptions_per_tag, 512, device=dev), dim=-1)
    with torch.inference_mode():
        vocab32 = net32.head.prepare(label_embed)
    net = RamPlusNet(cfg).eval().to(dev)
    net.load_state_dict(net32.state_dict())
    net = net.to(torch.bfloat16)
    with torch.inference_mode():
        vocab = net.head.prepare(label_embed.bfloat16())
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")

    with torch.inference_mode():
        x = torch.randn(8, 3, 384, 384, device=dev)
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = net32(x, vocab32, args.chunk)
        got = net(x.bfloat16(), vocab, args.chunk).float()
        agree = ((ref > 0) == (got > 0)).float().mean().item()
        print(f"# bf16 vs fp32 (8 images): max |dlogit| {(got - ref).abs().max():.4f}, decisions equal at p>0.5: {agree:.4%}")

    eager = lambda t: net(t, vocab, args.chunk)  # noqa: E731
    rows = []
    modes = [("eager", eager)]
    if not args.no_compile:
        compiled = torch.compile(eager, dynamic=False)
        modes.append(("compile", compiled))
    for name, fn in modes:
        for b in (int(s) for s in args.batches.split(",")):
            x = torch.randn(b, 3, 384, 384, device=dev, dtype=torch.bfloat16)
            with torch.inference_mode():
                t0 = time.perf_counter()
                fn(x)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ips = bench(fn, x, args.iters)
            mem = torch.cuda.max_memory_allocated() / 2**30
            rows.append((name, b, ips, first, mem))
            print(f"{name:<8} batch {b:>4}: {ips:8.1f} images/s (first call {first:.1f}s, peak mem {mem:.1f} GiB)", flush=True)
    print()
    print(f"{'mode':<9}{'batch':>6}{'images/s':>10}{'first call s':>14}{'peak GiB':>10}")
    for name, b, ips, first, mem in rows:
        print(f"{name:<9}{b:>6}{ips:>10.1f}{first:>14.1f}{mem:>10.1f}")


if __name__ == "__main__":
    main()

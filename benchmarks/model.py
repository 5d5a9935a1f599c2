"""Model-only throughput of RAM++ at full size (Swin-L, 4585 tags) with random weights.

Prints one table, every number measured in this run: images/s per batch and precision,
GFLOP per image (torch.utils.flop_counter), the share of this machine's measured matmul
peak, and the ratio to the paper-style head (benchmarks/paper_style.py) timed
alternately with ours so machine noise hits both. Nothing is downloaded.

    python benchmarks/model.py                 # fp32, batch 1/4/8, ~5 min on 2 cores
    python benchmarks/model.py --batches 4 --bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paper_style import paper_style_logits  # noqa: E402
from ramplus_core.checkpoint import ModelConfig  # noqa: E402
from ramplus_core.model import RamPlusNet  # noqa: E402


def matmul_peak(dtype: torch.dtype, size: int, seconds: float = 2.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e9


def count_gflop(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes (default 1,4,8)")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per row after one warm-up")
    ap.add_argument("--bf16", action="store_true",
                    help="also time bf16 (skipped by default when this CPU has no bf16 matmul units)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]

    peak32 = matmul_peak(torch.float32, 1024)
    peak16 = matmul_peak(torch.bfloat16, 256, 1.0)
    print(f"# {torch.backends.cpu.get_cpu_capability()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# matmul peak: fp32 {peak32:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s")

    cfg = ModelConfig()
    net = RamPlusNet(cfg).eval()
    label_embed = F.normalize(torch.randn(4585 * cfg.descriptions_per_tag, 512), dim=-1)
    with torch.inference_mode():
        vocab32 = net.head.prepare(label_embed.view(4585, cfg.descriptions_per_tag, 512))
    x1 = torch.randn(1, 3, 384, 384)

    with torch.inference_mode():
        gf_backbone = count_gflop(lambda: net.image_tokens(x1))
        tokens = net.image_tokens(x1)
        gf_head = count_gflop(lambda: net.head(tokens, vocab32, 1024))
        gf_paper = count_gflop(lambda: paper_style_logits(net, x1, label_embed))
    gf = gf_backbone + gf_head
    print(f"# GFLOP per image: ours {gf:.1f} (backbone {gf_backbone:.1f}, head {gf_head:.1f}); paper-style {gf_paper:.1f}")

    rows = []
    check_done = False
    for b in batches:
        x = torch.randn(b, 3, 384, 384)
        with torch.inference_mode():
            ours = lambda: net(x, vocab32, 1024)  # noqa: E731
            paper = lambda: paper_style_logits(net, x, label_embed)  # noqa: E731
            if not check_done:
                diff = (ours() - paper()).abs().max().item()
                print(f"# max |logit difference| ours vs paper-style, fp32: {diff:.2e}")
                check_done = True
            t_ours = timed(ours, args.repeats)
            t_paper = timed(paper, args.repeats)
        ips, ips_p = b / t_ours, b / t_paper
        rows.append(("fp32", b, ips, ips_p, gf * ips / peak32))
    if args.bf16 or peak16 >= peak32:
        net16 = RamPlusNet(cfg).eval()
        net16.load_state_dict(net.state_dict())
        net16 = net16.to(torch.bfloat16)
        with torch.inference_mode():
            vocab16 = net16.head.prepare(label_embed.view(4585, cfg.descriptions_per_tag, 512).bfloat16())
        for b in batches:
            x = torch.randn(b, 3, 384, 384)
            with torch.inference_mode():
                ref = net(x, vocab32, 1024)
                t16 = timed(lambda: net16(x.bfloat16(), vocab16, 1024), args.repeats)
                got = net16(x.bfloat16(), vocab16, 1024).float()
            agree = ((torch.sigmoid(got) > 0.5) == (torch.sigmoid(ref) > 0.5)).float().mean().item()
            rows.append(("bf16", b, b / t16, float("nan"), gf * (b / t16) / peak16))
            print(f"# bf16 batch {b}: decisions equal to fp32 at p>0.5: {agree:.4%}, max |dlogit| {(got - ref).abs().max():.3f}")
    else:
        print(f"# bf16 rows skipped: this CPU's bf16 matmul runs at {peak16:.1f} GFLOP/s, "
              f"{peak32 / max(peak16, 1e-9):.0f}x slower than fp32 (no native bf16 units); pass --bf16 to time it anyway")

    print()
    print(f"{'dtype':<6}{'batch':>6}{'images/s':>10}{'paper-style img/s':>19}{'ours/paper':>11}{'GFLOP/s':>9}{'% of peak':>10}")
    for dtype, b, ips, ips_p, share in rows:
        ratio = f"{ips / ips_p:.2f}" if ips_p == ips_p else "-"
        paper_txt = f"{ips_p:.3f}" if ips_p == ips_p else "-"
        print(f"{dtype:<6}{b:>6}{ips:>10.3f}{paper_txt:>19}{ratio:>11}{gf * ips:>9.1f}{share:>10.0%}")


if __name__ == "__main__":
    main()

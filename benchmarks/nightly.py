"""What a nightly run costs next to a full run; the index join per million keys; vocabulary growth.

    .venv/bin/python benchmarks/nightly.py              # N=2000, tiny model, ~4-5 minutes on 2 cores
    .venv/bin/python benchmarks/nightly.py --n 500 --vocab-n 100   # a quick look

Measured in this process on this machine; each run starts and stops its own local Ray when
its work needs the pipeline, as a nightly job on one machine does (a work set of at most
`inference.driver_max_images` images is tagged in the driver instead):

1. nightly: a full run over N tiny JPEGs in a folder, then 1% more images and a second run
   (mode missing) over all N * 1.01: its wall time against the full run's; then once more
   with the Ray pipeline forced (inference.driver_max_images=0), for its fixed cost.
2. index join per million keys (synthetic, no Ray): an index of M committed entries and a
   listing of M keys of which 1% are new, 0.5% changed and 0.5% deleted; the driver's cost of
   writing the listing shards, loading the index and joining (plan + tombstones), and the
   memory the index arrays take.
3. vocabulary growth: over a smaller set, a full run that keeps the image tokens, then 10
   more tags (a vocabulary file with embeddings) with the token cache (head only, on the 10
   new tags), then 10 more without it (fetch, decode and backbone again, head on those 10).

The machine is shared and small, so numbers move between runs; the table states the CPU
count and load average it ran under.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from tables import machine_line, table  # noqa: E402

TINY = REPO / "tests" / "golden" / "tiny" / "ram_plus_checkpoint.pth"


def jpeg(seed: int, size=(64, 48)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None] * np.ones((size[1], 1, 3), np.float32)
    arr = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_images(folder: Path, start: int, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"{i // 1000:03d}" / f"img_{i:06d}.jpg").parent.mkdir(exist_ok=True)
        (folder / f"{i // 1000:03d}" / f"img_{i:06d}.jpg").write_bytes(jpeg(i))


def job(src: Path, out: Path, **overrides):
    from ramplus_core.job import load_config, run

    vocab = overrides.pop("vocab", None)
    checkpoint = overrides.pop("checkpoint", str(TINY))
    sets = [("ray.progress_bars", False), ("decode.batch_size", 32), ("inference.batch_size", 32)]
    sets += list(overrides.items())
    cfg = load_config(None, inputs=[str(src)], output=str(out), checkpoint=checkpoint, vocab=vocab, overrides=sets)
    t = time.perf_counter()
    m = run(cfg, emit=lambda s: None).manifest
    return time.perf_counter() - t, m


def nightly(tmp: Path, n: int) -> list[tuple]:
    src, out = tmp / "nightly" / "in", tmp / "nightly" / "out"
    make_images(src, 0, n)
    full_s, m1 = job(src, out)
    new = max(1, n // 100)
    make_images(src, n, new)
    night_s, m2 = job(src, out)
    assert m2["counts"]["tagged"] == new, m2["counts"]
    make_images(src, n + new, new)
    ray_s, m3 = job(src, out, **{"inference.driver_max_images": 0})
    assert m3["counts"]["tagged"] == new, m3["counts"]
    t1 = m1["timings_s"]

    def parts(m):
        t = m["timings_s"]
        return (f"listing {t['listing']:.2f} s, plan {t['plan']:.2f} s, pipeline {t['pipeline']:.1f} s, "
                f"checkpoint {t['checkpoint']:.1f} s")

    return [
        ("nightly", f"full run, {n} images ({path(m1)})", f"{full_s:.1f} s",
         f"{n / full_s:.2f} images/s; pipeline {t1['pipeline']:.1f} s, Ray start {t1.get('ray_start', 0):.1f} s"),
        ("nightly", f"1% new ({new}) of {n + new} ({path(m2)})", f"{night_s:.1f} s",
         f"{100 * night_s / full_s:.1f}% of the full run (target <= 5%); {parts(m2)}"),
        ("nightly", f"1% new ({new}) of {n + 2 * new} ({path(m3)})", f"{ray_s:.1f} s",
         f"{100 * ray_s / full_s:.1f}% of the full run; inference.driver_max_images=0; {parts(m3)}"),
    ]


def path(m: dict) -> str:
    if m["resources"].get("in_driver"):
        return "in the driver"
    return "Ray pipeline" if m["resources"] else "no model work"


JOIN_CODE = r"""
import json, sys, time
from datetime import datetime, timezone
import pyarrow as pa
sys.path.insert(0, sys.argv[1])
from ramplus_core.job import index as ix, manifest as mf
from ramplus_core.job.listing import Entry, _ShardWriter
from ramplus_core.job.plan import make_plan
from ramplus_core.job.storage import Storage
phase, root, m = sys.argv[2], sys.argv[3], int(sys.argv[4])
st = Storage()
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
staging = root + "/_staging/20260302T000000Z-bbbbbb"
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
if phase == "make":
    uris = [f"s3://photos-bucket/library/{i % 977:03d}/IMG_{i:09d}.jpg" for i in range(m)]
    etags = [f"{i * 2654435761 % 2**64:016x}{i:016x}" for i in range(m)]
    run1 = "20260301T000000Z-aaaaaa"  # a first committed run: every image tagged
    cols = {"uri": uris, "version": etags, "etag": etags, "size": [1000] * m, "mtime": [T0] * m,
            "status": ["tagged"] * m, "stage": [None] * m, "model_id": ["m" * 16] * m, "vocab_id": ["v" * 16] * m,
            "score_floor": [0.1] * m, "run_id": [run1] * m,
            "file": [f"tags/part-{run1}-01-{i % 64:05d}.parquet" for i in range(m)],
            "tokens_file": [None] * m, "tokens_row": [None] * m}
    ix.write_rows(st, ix.delta_uri(root, run1), [pa.table(cols).cast(ix.INDEX_SCHEMA)])
    mf.commit(st, root, run1, {"run_id": run1})
    del cols
    n_del = n_chg = m // 200  # tonight: 0.5% deleted, 0.5% changed, 1% new
    ket = etags[n_del:]
    for j in range(n_chg):
        ket[j] = "changed" + ket[j][7:]
    entries = [Entry(u, 1000, e, T0) for u, e in zip(uris[n_del:], ket)]
    entries += [Entry(f"s3://photos-bucket/library/new/IMG_{i:09d}.jpg", 1000, "n" * 32, T0) for i in range(m // 100)]
    t = time.perf_counter()
    w = _ShardWriter(st, staging, 100_000)
    for e in entries:
        w.add(e)
    w.flush()
    print(json.dumps({"listed": len(entries), "list_shards_s": time.perf_counter() - t, "files": w.files}))
else:
    files = json.loads(sys.argv[5])
    base = hwm()
    t = time.perf_counter()
    state = ix.load_state(st, root, mf.committed_runs(root, st))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    plan = make_plan(storage=st, output_uri=root, staging=staging, listing_files=files, state=state,
                     mode="missing", model_id="m" * 16, vocab_id="v" * 16, desc={}, score_floor=0.1,
                     retry_stages=("fetch",), prefixes=["s3://photos-bucket/library"],
                     run_id="20260302T000000Z-bbbbbb", run_date="2026-03-02", token_cache=False,
                     rows_per_file=100_000, descriptors=lambda v: None)
    print(json.dumps({"index_load_s": load_s, "join_s": time.perf_counter() - t, "plan_s": plan.seconds,
                      "counts": plan.counts, "state_bytes": state.nbytes, "peak_rss_growth": hwm() - base}))
"""


def join_cost(tmp: Path, m: int) -> list[tuple]:
    import json

    root = tmp / "join"
    root.mkdir()

    def phase(*args):
        res = subprocess.run([sys.executable, "-c", JOIN_CODE, str(REPO), *args], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        return json.loads(res.stdout.strip().splitlines()[-1])

    made = phase("make", str(root), str(m))
    r = phase("join", str(root), str(m), json.dumps(made["files"]))
    per = 1e6 / m
    c = r["counts"]
    assert (c["new"], c["changed"], c["deleted"]) == (m // 100, m // 200, m // 200), c
    join = r["join_s"] - r["plan_s"]["tombstones"]
    total = made["list_shards_s"] + r["index_load_s"] + r["join_s"]
    return [
        ("index join", f"listing shards ({made['listed']:,} keys)", f"{made['list_shards_s'] * per:.1f} s/M",
         "driver side only; S3 itself lists 1000 keys per request"),
        ("index join", f"load index ({m:,} entries)", f"{r['index_load_s'] * per:.1f} s/M",
         f"{r['state_bytes'] / m:.0f} bytes/entry held; peak RSS of load + join +"
         f"{r['peak_rss_growth'] * per / 2**20:.0f} MiB/M"),
        ("index join", "join + plan shards", f"{join * per:.1f} s/M", f"{c['new']:,} new, {c['changed']:,} changed"),
        ("index join", "tombstones", f"{r['plan_s']['tombstones'] * per:.1f} s/M", f"{c['deleted']:,} deleted"),
        ("index join", "total per million keys", f"{total * per:.1f} s/M", ""),
    ]


def unit(k: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(k, 512)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def growth(tmp: Path, n: int, checkpoint: str = str(TINY), label: str = "tiny, 24 tags") -> list[tuple]:
    """One full run that keeps the tokens; +10 tags with the cache; +10 more with it switched off."""
    import yaml

    base = tmp / f"growth-{len(label)}"
    src = base / "in"
    make_images(src, 10_000_000, n)
    vdir = base / "vocab"
    vdir.mkdir(parents=True)
    tags = []
    for i in range(20):
        np.save(vdir / f"t{i}.npy", unit(1 + i % 3, 1000 + i))
        tags.append({"name": f"house tag {i}", "embeddings": f"t{i}.npy"})
    for name, k in (("plus10", 10), ("plus20", 20)):
        (vdir / f"{name}.yaml").write_text(yaml.safe_dump({"builtin": "all", "tags": tags[:k]}))
    out = base / "out"
    sec = f"vocab +10 ({label})"
    full_s, m1 = job(src, out, checkpoint=checkpoint, **{"cache.image_tokens": True})
    rows = [(sec, f"full run, {n} images, keeping tokens ({path(m1)})", f"{full_s:.1f} s",
             f"model {m1['inference_s']:.2f} s; {m1['model_work'].get('tokens_written', 0)} token rows written "
             f"({m1['model_work'].get('tokens_written', 0) * 145 * 512 * 2 / 2**20:.0f} MiB)")]
    for cache, vocab in ((True, "plus10"), (False, "plus20")):
        delta_s, m2 = job(src, out, checkpoint=checkpoint, vocab=str(vdir / f"{vocab}.yaml"),
                          **{"cache.image_tokens": cache})
        w = m2["model_work"]
        assert m2["counts"]["incremental"]["grown"] == n and w["head_tag_scores"] == 10 * n, (m2["counts"], w)
        how = "with the token cache" if cache else "without the token cache"
        rows.append((sec, f"+10 tags {how} ({path(m2)})", f"{delta_s:.1f} s",
                     f"{100 * delta_s / full_s:.1f}% of the full run (model {m2['inference_s']:.2f} s, "
                     f"{100 * m2['inference_s'] / max(m1['inference_s'], 1e-9):.1f}%); backbone "
                     f"{w['backbone_images']} images, head {w['head_tag_scores']} tag scores, "
                     f"{w['copied_scores']} scores copied"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="images of the nightly comparison")
    p.add_argument("--keys", type=int, default=1_000_000, help="synthetic index and listing keys")
    p.add_argument("--vocab-n", type=int, default=200, help="images of the vocabulary-growth comparison")
    p.add_argument("--skip", action="append", default=[], choices=("nightly", "join", "growth"))
    p.add_argument("--large", type=int, default=0, metavar="N",
                   help="also grow Swin-L / 4585 tags (random weights, a ~1.3 GB temp file) by 10 over N images")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ramplus-nightly-"))
    rows = [("section", "what", "cost", "notes")]
    try:
        t0 = time.perf_counter()
        if "join" not in args.skip:
            rows += join_cost(tmp, args.keys)
        # no Ray here: each run starts (and stops) its own, as a nightly job on one machine does
        if "nightly" not in args.skip:
            rows += nightly(tmp, args.n)
        if "growth" not in args.skip:
            rows += growth(tmp, args.vocab_n)
        if args.large:
            sys.path.insert(0, str(REPO / "benchmarks"))
            from pipeline import full_checkpoint

            rows += growth(tmp, args.large, full_checkpoint(tmp), "Swin-L, 4585 tags")
        print(table(rows))
        print(f"{machine_line()}; benchmark wall time {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

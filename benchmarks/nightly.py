"""What a nightly run costs next to a full run; the catalog at a million images; vocabulary growth.

    .venv/bin/python benchmarks/nightly.py              # N=2000, M=1,000,000, tiny model, ~6 minutes on 2 cores
    .venv/bin/python benchmarks/nightly.py --n 500 --vocab-n 100 --keys 200000   # a quick look

Measured in this process on this machine; each run starts and stops its own local Ray when
its work needs the pipeline, as a nightly job on one machine does (a work set of at most
`inference.driver_max_images` images is tagged in the driver instead):

1. nightly: a full run over N tiny JPEGs in a folder, then 1% more images and a second run
   (mode missing) over all N * 1.01: its wall time against the full run's; then once more
   with the Ray pipeline forced (inference.driver_max_images=0), for its fixed cost.
2. the catalog at scale (synthetic, no Ray, no model), once per `--shards` count: a tags
   table of M images (20 scores each) committed with `commit_run`, and a listing of it
   tonight with 1% new, 0.1% changed and 0.5% deleted images, spread over the catalog as
   the store's keys would be. The driver's cost of writing the listing shards, `load_state`
   and the join (plan + deletions), and their memory; then the night committed in two parts,
   the new images alone and then the changed images with the deletions, each with the bytes
   its commits removed (rewrote) and added, read from their `_delta_log` entries, against the
   table's size.
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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

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
        rw = m.get("tables", {}).get("bytes_rewritten", {})
        removed = sum(v["removed_bytes"] for v in rw.values())
        added = sum(v["added_bytes"] for v in rw.values())
        return (f"listing {t['listing']:.2f} s, plan {t['plan']:.2f} s, pipeline {t['pipeline']:.1f} s, "
                f"checkpoint {t['checkpoint']:.1f} s, commit {t.get('commit', 0):.2f} s "
                f"(rewrote {removed / 1024:.0f} KiB, added {added / 1024:.0f} KiB)")

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


# -- the catalog at scale: synthetic tags table, listing, join, one night's commit ---------------
#
# Each phase runs in its own Python process (see `_phase`), so its peak RSS is its own and the
# memory one phase leaves behind is not charged to the next.

T0_US = 1_772_323_200_000_000  # 2026-03-01T00:00:00Z
MODEL, VOCAB = "m" * 16, "v" * 16
RUN0, RUN1, RUN2 = "20260301T000000Z-aaaaaa", "20260302T000000Z-bbbbbb", "20260302T000000Z-cccccc"
PREFIX = "s3://bucket/photos"
SCORES_PER_ROW = 20
BATCH = 50_000


def _rss(field: str = "VmHWM") -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024


def _peak_from_here() -> int:
    """Restart the peak-RSS counter (Linux clear_refs 5) so that a step's peak is its own; the RSS now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss("VmRSS")


def _hex32(i: np.ndarray, salt: int) -> pa.Array:
    """ETag-like strings (32 hex digits) as a deterministic function of the image number."""
    x = i.astype(np.uint64)
    with np.errstate(over="ignore"):
        a = (x + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
        b = (a ^ (a >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
    raw = np.stack([a, b], axis=1).astype(">u8").view(np.uint8).reshape(-1, 16)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    out = np.empty((len(x), 32), np.uint8)
    out[:, 0::2], out[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    return pa.array(out.view("S32").ravel()).cast(pa.string())


def _uris(i: np.ndarray) -> list[str]:
    return [f"{PREFIX}/2026/{k % 12 + 1:02d}/img_{k:07d}.jpg" for k in i.tolist()]


# Tonight against the catalog of images 0..m-1: which are gone, which changed, which are new.
def _gone(i: np.ndarray) -> np.ndarray:
    return i % 200 == 199          # 0.5%


def _changed(i: np.ndarray) -> np.ndarray:
    return i % 1000 == 500         # 0.1%


def _names() -> pa.Array:
    return pa.array((REPO / "ramplus_core" / "data" / "ram_tag_list.txt").read_text().splitlines())


def _scores(n: int, seed: int, names) -> tuple:
    """`scores` and `tags` columns: 20 (tag, score) pairs per image above the floor, about 8 of them >= 0.5."""
    rng = np.random.default_rng(seed)
    k = SCORES_PER_ROW
    idx = rng.integers(0, len(names), n * k)
    score = np.sort(rng.uniform(0.1, 1.0, (n, k)).astype(np.float32) ** 1.5, axis=1)[:, ::-1].ravel()
    score = np.maximum(score, np.float32(0.1))
    tag = names.take(pa.array(idx))
    scores = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                      pa.StructArray.from_arrays([tag, pa.array(score)], ["tag", "score"]))
    hit = score >= 0.5
    offsets = np.concatenate([[0], np.cumsum(hit.reshape(n, k).sum(axis=1))]).astype(np.int32)
    tags = pa.ListArray.from_arrays(pa.array(offsets), tag.filter(pa.array(hit)))
    return scores, tags


def _result_rows(uris: list[str], etag, version, size: np.ndarray, mtime_us: np.ndarray, run_id: str, shards: int,
                 seed: int, names) -> pa.Table:
    """RESULT_SCHEMA rows of tagged images, as a write task stages them."""
    from ramplus_core.job.schemas import RESULT_SCHEMA, TS
    from ramplus_core.job.writer import shard_of

    n = len(uris)
    scores, tags = _scores(n, seed, names)
    rng = np.random.default_rng(seed + 1)
    cols = {
        "uri": pa.array(uris, pa.string()), "shard": pa.array(shard_of(uris, shards), pa.int32()),
        "size": pa.array(size, pa.int64()), "etag": etag, "version": version,
        "mtime": pa.array(mtime_us, pa.int64()).cast(TS),
        "width": pa.array(rng.choice([4032, 3024, 1920, 1080], n).astype(np.int32)),
        "height": pa.array(rng.choice([3024, 4032, 1080, 1920], n).astype(np.int32)),
        "tags": tags, "scores": scores, "model_id": pa.array([MODEL] * n), "vocab_id": pa.array([VOCAB] * n),
        "score_floor": pa.array(np.full(n, 0.1, np.float32)), "run_id": pa.array([run_id] * n),
        "tagged_at": pa.array(np.full(n, T0_US + 3_600_000_000, np.int64)).cast(TS),
    }
    return pa.table({f.name: cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in RESULT_SCHEMA},
                    schema=RESULT_SCHEMA)


def _catalog_batch(lo: int, hi: int, shards: int, names) -> pa.Table:
    i = np.arange(lo, hi)
    etag = _hex32(i, 1)
    return _result_rows(_uris(i), etag, etag, 200_000 + (i * 7919) % 5_000_000,
                        T0_US - (i % 86_400) * 1_000_000, RUN0, shards, lo, names)


def _table_bytes(dt) -> tuple[int, int]:
    import pyarrow.compute as pc

    adds = pa.table(dt.get_add_actions())  # an arro3 table in deltalake 1.x
    return int(pc.sum(adds.column("size_bytes")).as_py() or 0), adds.num_rows


def phase_make(out: str, m: int, shards: int) -> dict:
    """The catalog before tonight: M tagged images, committed as one run (one merge per table)."""
    from ramplus_core.job import table as tb
    from ramplus_core.job.schemas import DELETED_SCHEMA
    from ramplus_core.job.storage import Storage

    st, names = Storage(), _names()
    tb.ensure_tables(st, out, shards)

    def results():
        for lo in range(0, m, BATCH):
            yield from _catalog_batch(lo, min(m, lo + BATCH), shards, names).to_batches()

    t = time.perf_counter()
    tb.commit_run(st, out, RUN0, results=results, deleted=lambda: iter(DELETED_SCHEMA.empty_table().to_batches()),
                  metadata={"run_id": RUN0}, errors_to_tags=False, retries=0)
    dt = tb.open_table(st, out, "tags")
    nbytes, files = _table_bytes(dt)
    return {"commit_s": time.perf_counter() - t, "rows": dt.to_pyarrow_dataset().count_rows(), "bytes": nbytes,
            "files": files, "peak_rss": _rss()}


def phase_listing(staging: str, m: int) -> dict:
    """Tonight's listing shards, written by the listing's own shard writer; only the writer is timed."""
    from ramplus_core.job.listing import Entry, _ShardWriter
    from ramplus_core.job.storage import Storage

    w = _ShardWriter(Storage(), staging, 100_000)
    spent, listed = 0.0, 0
    new = m // 100
    for lo in range(0, m + new, BATCH):
        i = np.arange(lo, min(m + new, lo + BATCH))
        old = i < m
        i = i[~(old & _gone(i))]
        etag = np.where(_changed(i) & (i < m), _hex32(i, 2).to_numpy(zero_copy_only=False),
                        _hex32(i, 1).to_numpy(zero_copy_only=False))
        size = (200_000 + (i * 7919) % 5_000_000).tolist()
        mtime = [datetime.fromtimestamp((T0_US // 1_000_000) - k % 86_400, timezone.utc) for k in i.tolist()]
        entries = [Entry(u, s, e, t) for u, s, e, t in zip(_uris(i), size, etag.tolist(), mtime)]
        t = time.perf_counter()
        w.add_page(entries)
        spent += time.perf_counter() - t
        listed += len(entries)
    t = time.perf_counter()
    w.flush()
    spent += time.perf_counter() - t
    return {"listed": listed, "seconds": spent, "files": w.files}


def phase_join(out: str, staging: str, files: list[str]) -> dict:
    """What the driver does before any model work: read the tables' state, join, find deletions."""
    from ramplus_core.job import index as ix
    from ramplus_core.job.plan import make_plan
    from ramplus_core.job.storage import Storage

    st = Storage()
    base = _peak_from_here()
    state = ix.load_state(st, out)
    load_peak = _rss() - base
    base = _peak_from_here()
    plan = make_plan(storage=st, output_uri=out, staging=staging, listing_files=files, state=state,
                     mode="missing", model_id=MODEL, vocab_id=VOCAB, desc={}, score_floor=0.1,
                     retry_stages=("fetch",), prefixes=[PREFIX], token_cache=False, rows_per_file=100_000,
                     descriptors=lambda v: None)
    return {"load_s": state.seconds, "state_bytes": state.nbytes, "state_rows": state.rows_read,
            "load_peak": load_peak, "plan_peak": _rss() - base, "plan": plan.as_dict()}


def phase_commit(out: str, shards: int, plan: dict, m: int, part: str) -> dict:
    """One night's commit, via commit_run, in two parts to show what each costs: `new` (the new
    images alone: inserts add files and rewrite none) and `rest` (changed images and deletions:
    every data file holding one of those rows is rewritten whole)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from ramplus_core.job import table as tb
    from ramplus_core.job.commit import rewritten_bytes
    from ramplus_core.job.schemas import DELETED_SCHEMA
    from ramplus_core.job.storage import Storage

    st, names = Storage(), _names()
    run_id = RUN1 if part == "new" else RUN2
    staged = []
    for j, path in enumerate(plan["files"]):
        w = pq.read_table(path)
        uris = w.column("uri").to_pylist()
        is_new = pa.array([int(u.rsplit("img_", 1)[1][:7]) >= m for u in uris])
        w = w.filter(is_new if part == "new" else pc.invert(is_new))
        mtime = w.column("mtime").cast(pa.int64()).to_numpy()
        staged.append(_result_rows(w.column("uri").to_pylist(), w.column("etag"), w.column("version"),
                                   w.column("size").to_numpy(), mtime, run_id, shards, 10_000_000 + j, names))
    gone = pq.read_table(plan["deleted"]["path"]).cast(DELETED_SCHEMA) if plan["deleted"] and part == "rest" else None
    dt = tb.open_table(st, out, "tags")
    before, files_before = _table_bytes(dt)
    base = _peak_from_here()
    t = time.perf_counter()
    steps = tb.commit_run(st, out, run_id, results=lambda: (b for s in staged for b in s.to_batches()),
                          deleted=lambda: iter(gone.to_batches() if gone is not None else []),
                          metadata={"run_id": run_id}, errors_to_tags=False, retries=0)
    seconds = time.perf_counter() - t
    steps = {k: v for k, v in steps.items() if v is not None}
    dt = tb.open_table(st, out, "tags")
    after, files_after = _table_bytes(dt)
    return {"seconds": seconds, "peak_rss_growth": _rss() - base, "staged": sum(s.num_rows for s in staged),
            "bytes_before": before, "bytes_after": after, "files_before": files_before, "files_after": files_after,
            "rows_after": dt.to_pyarrow_dataset().count_rows(),
            "rewritten": rewritten_bytes(st, out, steps),
            "merge": {k: {kk: v.get(kk) for kk in ("num_target_rows_inserted", "num_target_rows_updated",
                                                  "num_target_rows_deleted", "num_target_rows_copied",
                                                  "num_target_files_added", "num_target_files_removed",
                                                  "execution_time_ms", "scan_time_ms", "rewrite_time_ms")}
                      for k, v in steps.items()}}


PHASES = {"make": phase_make, "listing": phase_listing, "join": phase_join, "commit": phase_commit}


def _phase(name: str, *args) -> dict:
    import json

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import nightly; "
            "print(json.dumps(nightly.PHASES[sys.argv[2]](*json.loads(sys.argv[3]))))")
    res = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks"), name, json.dumps(args)],
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"phase {name}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def join_cost(tmp: Path, m: int, shard_counts: list[int], commit: bool = True) -> list[tuple]:
    per = 1e6 / m
    new, chg, gone = m // 100, m // 1000, m // 200
    rows = []
    listing = None
    for k, shards in enumerate(shard_counts):
        sec = f"catalog, {shards} shards"
        out, staging = str(tmp / f"catalog-{shards}" / "out"), str(tmp / f"catalog-{shards}" / "_staging" / RUN1)
        made = _phase("make", out, m, shards)
        assert made["rows"] == m, made
        rows.append((sec, f"tags table of {m:,} images (one commit_run)", f"{made['commit_s']:.1f} s",
                     f"{_mib(made['bytes'])} in {made['files']} files ({made['bytes'] / m:.0f} bytes/image, "
                     f"{SCORES_PER_ROW} scores each); peak RSS of the process {_mib(made['peak_rss'])}"))
        if listing is None:
            listing = _phase("listing", str(tmp / "listing"), m)
            rows.append((sec, f"listing shards ({listing['listed']:,} keys)", f"{listing['seconds'] * per:.1f} s/M",
                         "driver side only; S3 itself lists 1000 keys per request"))
        r = _phase("join", out, staging, listing["files"])
        p = r["plan"]
        c, s = p["counts"], p["seconds"]
        assert (c["new"], c["changed"], c["deleted"], c["already_done"]) == (new, chg, gone, m - gone - chg), c
        if k == 0:
            total = listing["seconds"] + r["load_s"] + s["join"] + s["grown_rows"] + s["deleted"]
            rows += [
                (sec, f"load_state ({r['state_rows']:,} rows)", f"{r['load_s'] * per:.1f} s/M",
                 f"{r['state_bytes'] / r['state_rows']:.0f} bytes/entry held ({_mib(r['state_bytes'])}); "
                 f"peak RSS +{_mib(r['load_peak'])} while loading"),
                (sec, "join + plan shards", f"{(s['join'] + s['grown_rows']) * per:.1f} s/M",
                 f"{c['new']:,} new, {c['changed']:,} changed, {c['already_done']:,} already done; peak RSS of join + "
                 f"deletions +{_mib(r['plan_peak'])}"),
                (sec, "deletions (second read of uri, shard)", f"{s['deleted'] * per:.1f} s/M",
                 f"{c['deleted']:,} deleted"),
                (sec, "driver total per million keys", f"{total * per:.1f} s/M", "listing shards + load + join"),
            ]
        else:
            rows.append((sec, "load_state + join + deletions", f"{(r['load_s'] + sum(s.values())) * per:.1f} s/M",
                         f"peak RSS +{_mib(r['load_peak'])} (load), +{_mib(r['plan_peak'])} (join)"))
        if not commit:
            continue
        for part, what in (("new", f"{new:,} new images"), ("rest", f"{chg:,} changed, {gone:,} deleted")):
            cm = _phase("commit", out, shards, p, m, part)
            removed = sum(v["removed_bytes"] for v in cm["rewritten"].values())
            added = sum(v["added_bytes"] for v in cm["rewritten"].values())
            tg = cm["merge"].get("2-tags", {})
            rows += [
                (sec, f"commit {what}", f"{cm['seconds']:.1f} s",
                 f"tags: {tg.get('num_target_rows_inserted')} inserted, {tg.get('num_target_rows_updated')} updated, "
                 f"{tg.get('num_target_rows_deleted')} deleted, {tg.get('num_target_rows_copied'):,} copied; "
                 f"peak RSS +{_mib(cm['peak_rss_growth'])}"),
                (sec, f"  bytes rewritten ({what})", _mib(removed),
                 f"{100 * removed / cm['bytes_before']:.1f}% of the table's {_mib(cm['bytes_before'])}; added "
                 f"{_mib(added)}; files removed {tg.get('num_target_files_removed')}, added "
                 f"{tg.get('num_target_files_added')} (of {cm['files_before']})"),
            ]
        assert cm["rows_after"] == m - gone + new, cm
    return rows


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
        assert m2["counts"]["incremental"]["vocab_changed"] == n and w["head_tag_scores"] == 10 * n, (m2["counts"], w)
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
    p.add_argument("--keys", type=int, default=1_000_000, metavar="M",
                   help="images in the synthetic tags table (and keys in its listing)")
    p.add_argument("--shards", default="8,64",
                   help="comma-separated shard counts of the synthetic table (the first gets every row)")
    p.add_argument("--vocab-n", type=int, default=200, help="images of the vocabulary-growth comparison")
    p.add_argument("--skip", action="append", default=[], choices=("nightly", "join", "commit", "growth"),
                   help="join: the whole synthetic catalog part; commit: only its simulated night's commit")
    p.add_argument("--large", type=int, default=0, metavar="N",
                   help="also grow Swin-L / 4585 tags (random weights, a ~1.3 GB temp file) by 10 over N images")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ramplus-nightly-"))
    rows = [("section", "what", "cost", "notes")]
    try:
        t0 = time.perf_counter()
        if "join" not in args.skip:
            rows += join_cost(tmp, args.keys, [int(x) for x in args.shards.split(",") if x.strip()],
                              commit="commit" not in args.skip)
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

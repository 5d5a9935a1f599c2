"""The fixed costs of a night, as an operator pays them: `jobs/tag_bucket.py` run from the shell.

    .venv/bin/python benchmarks/night.py                 # 100,000 listed images, 3 repeats
    .venv/bin/python benchmarks/night.py --n 5000 --repeats 1   # a quick look

Setup, not measured: a local folder of `--n` small JPEGs (100 folders; one noise image, copied)
and tables that hold every one of them, as after a first night. Tagging 100,000 images with the
tiny model on 2 cores would take two hours, so a few images (`seed/`) are tagged for real and
every other listed image gets a copy of a real row under its own uri and version (from the job's
own listing), as the tables would hold them. Then, each night a new process as from cron:
- nothing to do: the same folder again (`--repeats` times);
- 3 new images: three more files appear, the rest is committed (each time three more);
- a threshold change: every committed image is re-decided from its kept scores (each time
  another threshold).

Each row gives the command's wall time (interpreter start, imports, the run, exit), the run's
own `timings_s` from its manifest (listing, plan, model, pipeline, commit), whether a model was
loaded, and the process's peak RSS. The issue's goal: a no-op night costs listing + plan + at
most 10 s; 3 new images cost listing + one model load + their inference.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from tables import machine_line, table  # noqa: E402

CHECKPOINT = REPO / "tests" / "golden" / "tiny" / "ram_plus_checkpoint.pth"


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


SEED = 5


def _fill(folder: Path, n: int) -> None:
    data = _jpeg(0)
    for i in range(n):
        d = folder / ("seed" if i < SEED else f"p{i % 100:03d}")
        d.mkdir(exist_ok=True)
        (d / f"img_{i:07d}.jpg").write_bytes(data)


def _seed_tables(inp: Path, out: Path, staging: Path) -> int:
    """A real night over seed/, then every other listed image appended with a copy of its first row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable, write_deltalake

    from ramplus_core.job import table as tb
    from ramplus_core.job.config import IMAGE_EXTENSIONS
    from ramplus_core.job.index import version_strings
    from ramplus_core.job.listing import list_inputs
    from ramplus_core.job.schemas import TAGS_SCHEMA
    from ramplus_core.job.storage import Storage
    from ramplus_core.job.writer import shard_of

    _night(inp / "seed", out)
    storage, uri = Storage(), tb.table_uri(str(out), "tags")
    template = DeltaTable(uri).to_pyarrow_table().slice(0, 1)
    shards = tb.ensure_tables(storage, str(out))["shards"]
    own = ("uri", "size", "etag", "mtime")
    listed = list_inputs([str(inp)], storage, IMAGE_EXTENSIONS, str(staging), 100_000)

    def batches():
        for path in listed.files:
            w = pq.read_table(path, columns=list(own))
            w = w.filter(pa.compute.invert(pa.compute.match_substring(w.column("uri"), "/seed/")))
            cols = {c: w.column(c) for c in own}
            cols["version"] = version_strings(cols["etag"], cols["size"], cols["mtime"])
            cols["shard"] = pa.array(shard_of(cols["uri"].to_pylist(), shards), pa.int32())
            copy = np.zeros(w.num_rows, dtype=np.int64)
            yield from pa.table({f.name: cols[f.name] if f.name in cols else template.column(f.name).take(copy)
                                 for f in TAGS_SCHEMA}, schema=TAGS_SCHEMA).to_batches()

    write_deltalake(uri, pa.RecordBatchReader.from_batches(TAGS_SCHEMA, batches()), mode="append")
    return DeltaTable(uri).to_pyarrow_table(columns=["uri"]).num_rows


def _night(inp: Path, out: Path, *sets: str) -> dict:
    """One run from the shell; its wall time, peak RSS and manifest."""
    cmd = [sys.executable, str(REPO / "jobs" / "tag_bucket.py"), "--input", str(inp), "--output", str(out),
           "--checkpoint", str(CHECKPOINT), "--quiet"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    text = p.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS, not the largest child's so far
    wall = time.perf_counter() - t
    p.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must be told
    if code != 0:
        raise SystemExit(f"night failed (exit {code}):\n{text[-3000:]}")
    runs = sorted((out / "_runs").glob("*.json"), key=lambda q: q.stat().st_mtime)
    manifest = json.loads([q for q in runs if not q.name.endswith(".FAILED.json")][-1].read_text())
    return {"wall": wall, "rss": usage.ru_maxrss * 1024, "manifest": manifest}


def _row(what: str, nights: list[dict]) -> tuple:
    walls = sorted(n["wall"] for n in nights)
    m = nights[len(nights) // 2]["manifest"]
    t = m["timings_s"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in t.items() if k != "total" and v >= 0.01)
    counts = m["counts"]
    loaded = "model loaded" if m["model_loaded"] else "no model"
    return (what, f"{walls[len(walls) // 2]:.1f} s ({walls[0]:.1f}-{walls[-1]:.1f})", f"{t['total']:.2f} s", parts,
            f"{loaded}; tagged {counts['tagged']} of {counts['listed']:,} listed",
            f"{max(n['rss'] for n in nights) / 2**20:,.0f} MiB")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="images listed every night")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each kind of night")
    ap.add_argument("--tmp", help="a folder for the temporary data (default: the system's)")
    a = ap.parse_args(argv)
    t_all = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="ramplus-night-", dir=a.tmp))
    try:
        inp, out = root / "in", root / "out"
        inp.mkdir()
        t = time.perf_counter()
        _fill(inp, a.n)
        print(f"{a.n:,} images written in {time.perf_counter() - t:.0f} s", flush=True)
        t = time.perf_counter()
        seeded = _seed_tables(inp, out, root / "staging")
        print(f"tables hold {seeded:,} rows after {time.perf_counter() - t:.0f} s", flush=True)
        rows = [("night", "wall (median, range)", "run total", "manifest timings_s", "model; counts", "peak RSS")]
        # one kind after the other: a threshold change makes the next night with the default
        # thresholds a change back, not a night without work
        noop = [_night(inp, out) for _ in range(a.repeats)]
        new3, extra = [], _jpeg(1)
        for r in range(a.repeats):
            (inp / "new" / f"r{r}").mkdir(parents=True)
            for k in range(3):
                (inp / "new" / f"r{r}" / f"img_{k}.jpg").write_bytes(extra)
            new3.append(_night(inp, out))
        thr = [_night(inp, out, f"vocabulary.threshold={0.5 + 0.05 * (r + 1):.2f}") for r in range(a.repeats)]
        rows += [_row(f"nothing to do, {a.n:,} listed", noop), _row("3 new images", new3),
                 _row("threshold change (all re-decided)", thr)]
        print(table(rows))
        print(f"{machine_line()}; tiny golden checkpoint; benchmark wall time {time.perf_counter() - t_all:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

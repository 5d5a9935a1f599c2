"""Listing at catalog scale: S3 keys/s one stream against fanned out, and ten million keys planned.

    .venv/bin/python benchmarks/listing.py                          # 100,000 S3 keys, 10,000,000 synthetic
    .venv/bin/python benchmarks/listing.py --s3-keys 20000 --keys 1000000 --parallelism 1,8   # a quick look

1. S3: a local SeaweedFS server (the tests' `weed mini`) holding `--s3-keys` empty objects laid
   out like a catalog (100 folders of 1000, `cat/pNNN/img_NNNN.jpg`), listed by the job's own
   `list_inputs` once per `--parallelism` value, each in a fresh process: keys/s and the
   process's peak RSS (the listing shards go to a local staging folder). The server runs on
   the same cores, so the rate here is bounded by its CPU and ours, not by a network: fanning
   out gains most where each request waits on a store tens of milliseconds away.
2. Ten million keys (`--keys`), no store, no images: a synthetic listing source (the job's
   `Entry` objects, as the S3 walker makes them) through the job's `write_listing`, then
   `load_state` and `make_plan`, all in one process as in the job's driver:
   - first night: no tables yet, every key is new work;
   - the state of that night: its plan's rows appended to the tags table as tagged (a setup
     step, not timed as part of a night: committing is measured in benchmarks/nightly.py);
   - second night: the same keys plus 1% new ones: listing, state of N rows, the join.
   Seconds per million keys per step and the process's peak RSS, per night.

Each measured step runs in its own Python process, so each peak RSS is its own. The machine
is shared and small; the table says the CPU count and the load it ran under.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tables import machine_line, table  # noqa: E402

PREFIX = "s3://bucket/photos"
MODEL, VOCAB = "m" * 16, "v" * 16
BATCH = 20_000


def _rss(field: str = "VmHWM") -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


# -- 1. S3 -------------------------------------------------------------------------------------

def _storage(endpoint: str):
    from ramplus_core.job.config import StorageConfig
    from ramplus_core.job.storage import Storage

    sys.path.insert(0, str(REPO))
    from tests.job.conftest import ACCESS_KEY, SECRET_KEY

    return Storage.from_config(StorageConfig(endpoint_url=endpoint, access_key_id=ACCESS_KEY,
                                             secret_access_key=SECRET_KEY, region="us-east-1"), environ={})


def phase_s3_list(endpoint: str, uri: str, staging: str, parallelism: int) -> dict:
    from ramplus_core.job.config import IMAGE_EXTENSIONS
    from ramplus_core.job.listing import list_inputs

    storage = _storage(endpoint)
    base = _rss("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    res = list_inputs([uri], storage, IMAGE_EXTENSIONS, staging, 100_000, parallelism=parallelism)
    return {"listed": res.listed, "seconds": time.perf_counter() - t, "cpu": time.process_time() - c,
            "base_rss": base, "peak_rss": _rss(),
            "fp": list(res.fingerprint.as_tuple())}


def _put_empty(port: int, paths: list[str], threads: int = 16) -> None:
    """Empty objects written through the SeaweedFS filer's HTTP API, which the S3 API then lists:
    15x the PUT rate of signed S3 requests from s3fs on this machine (the client's signing was
    the bottleneck), so that a 100,000-key bucket takes minutes to fill, not most of an hour."""
    import http.client
    import threading

    it = iter(paths)
    lock = threading.Lock()
    failed: list = []

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not failed:
            with lock:
                path = next(it, None)
            if path is None:
                return
            conn.request("PUT", path, body=b"")
            r = conn.getresponse()
            r.read()
            if r.status >= 300:
                failed.append(f"PUT {path}: HTTP {r.status}")

    ths = [threading.Thread(target=worker) for _ in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if failed:
        raise RuntimeError(failed[0])


def s3_part(tmp: Path, n: int, parallelisms: list[int]) -> list[tuple]:
    from tests.job.conftest import ACCESS_KEY, BUCKET, SECRET_KEY, WeedProcess

    weed = WeedProcess(tmp / "weed", [(ACCESS_KEY, SECRET_KEY)]).start()
    try:
        weed.wait_writable(ACCESS_KEY, SECRET_KEY)
        t = time.perf_counter()
        _put_empty(weed.ports[2], [f"/buckets/{BUCKET}/cat/p{i // 1000:03d}/img_{i % 1000:04d}.jpg" for i in range(n)])
        up = time.perf_counter() - t
        rows = [("S3 listing", f"upload {n:,} empty objects ({(n + 999) // 1000} folders)", f"{up:.0f} s",
                 f"{n / up:,.0f} PUT/s through the filer's HTTP API; load {_load()}")]
        fps = set()
        for p in parallelisms:
            r = _phase("s3_list", weed.endpoint, f"s3://{BUCKET}/cat", str(tmp / f"staging-p{p}"), p)
            assert r["listed"] == n, r
            fps.add(tuple(r["fp"]))
            rows.append(("S3 listing", f"list_inputs, listing.parallelism={p}", f"{n / r['seconds']:,.0f} keys/s",
                         f"{r['seconds']:.1f} s, driver CPU {r['cpu']:.1f} s ({n / r['cpu']:,.0f} keys per CPU s); "
                         f"peak RSS {_mib(r['peak_rss'])} (after imports "
                         f"{_mib(r['base_rss'])}); load {_load()}"))
        assert len(fps) == 1, "every parallelism lists the same keys"
        return rows
    finally:
        weed.stop()


# -- 2. ten million synthetic keys ----------------------------------------------------------

def _hex32(i: np.ndarray, salt: int) -> list[str]:
    x = i.astype(np.uint64)
    with np.errstate(over="ignore"):
        a = (x + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
        b = (a ^ (a >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
    return [f"{p:016x}{q:016x}" for p, q in zip(a.tolist(), b.tolist())]


def synthetic_entries(lo: int, hi: int, spent: list):
    """Keys lo..hi-1 in 100 x 100 folders, as the S3 walker yields them (ETag, size, datetime),
    made a batch at a time so that their making (s3fs's share in a real listing) is timed apart:
    `spent[0]` collects the wall and `spent[1]` the CPU seconds."""
    from ramplus_core.job.listing import Entry

    hours = [datetime(2026, 3, 1, tzinfo=timezone.utc).replace(hour=h) for h in range(24)]
    for s in range(lo, hi, BATCH):
        t, c = time.perf_counter(), time.process_time()
        i = np.arange(s, min(hi, s + BATCH))
        page = [Entry(f"{PREFIX}/{k % 100:02d}/{k // 100 % 100:02d}/img_{k:08d}.jpg", 200_000 + k % 5_000_000, e,
                      hours[k % 24]) for k, e in zip(i.tolist(), _hex32(i, 1))]
        spent[0] += time.perf_counter() - t
        spent[1] += time.process_time() - c
        yield from page


def phase_night(out: str, staging: str, n: int) -> dict:
    """One night in the driver: listing shards of n keys, the state, the join."""
    from ramplus_core.job import index as ix
    from ramplus_core.job.config import IMAGE_EXTENSIONS
    from ramplus_core.job.listing import write_listing
    from ramplus_core.job.plan import make_plan
    from ramplus_core.job.storage import Storage

    st = Storage()
    base = _rss("VmRSS")
    source = [0.0, 0.0]
    c0 = time.process_time()
    lst = write_listing([(PREFIX, synthetic_entries(0, n, source))], st, IMAGE_EXTENSIONS, staging, 100_000)
    c1 = time.process_time()
    after_listing = _rss()
    state = ix.load_state(st, out)
    c2 = time.process_time()
    after_state = _rss()
    t = time.perf_counter()
    plan = make_plan(storage=st, output_uri=out, staging=staging, listing_files=lst.files, state=state,
                     mode="missing", model_id=MODEL, vocab_id=VOCAB, desc={}, score_floor=0.1, retry_stages=("fetch",),
                     prefixes=[PREFIX], token_cache=False, rows_per_file=100_000, descriptors=lambda v: None)
    plan_s = time.perf_counter() - t
    cpu = {"listing": c1 - c0 - source[1], "load": c2 - c1, "plan": time.process_time() - c2, "source": source[1]}
    return {"listed": lst.listed, "listing_files": len(lst.files), "listing_s": lst.seconds - source[0],
            "source_s": source[0], "cpu": cpu, "load_s": state.seconds, "state_rows": state.rows_read,
            "state_bytes": state.nbytes, "plan_s": plan_s, "plan": plan.as_dict(), "base_rss": base,
            "rss_listing": after_listing, "rss_state": after_state, "peak_rss": _rss()}


def phase_state(out: str, plan_files: list[str]) -> dict:
    """The tables after night one: its work rows appended to `tags` as tagged (setup, not a night)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    from ramplus_core.job import table as tb
    from ramplus_core.job.schemas import TAGS_SCHEMA
    from ramplus_core.job.storage import Storage
    from ramplus_core.job.writer import shard_of

    st = Storage()
    shards = tb.ensure_tables(st, out, 8)["shards"]
    t = time.perf_counter()

    def batches():
        for path in plan_files:
            w = pq.read_table(path, columns=["uri", "size", "etag", "mtime", "version"])
            n = w.num_rows
            uris = w.column("uri").to_pylist()
            cols = {**{c: w.column(c) for c in w.column_names},
                    "shard": pa.array(shard_of(uris, shards), pa.int32()),
                    "width": pa.array(np.full(n, 4032, np.int32)), "height": pa.array(np.full(n, 3024, np.int32)),
                    "tags": pa.array([[]] * n, pa.list_(pa.string())),
                    "model_id": pa.array([MODEL] * n), "vocab_id": pa.array([VOCAB] * n),
                    "score_floor": pa.array(np.full(n, 0.1, np.float32)), "run_id": pa.array(["r1"] * n)}
            yield from pa.table({f.name: cols[f.name] if f.name in cols else pa.nulls(n, f.type)
                                 for f in TAGS_SCHEMA}, schema=TAGS_SCHEMA).to_batches()

    reader = pa.RecordBatchReader.from_batches(TAGS_SCHEMA, batches())
    write_deltalake(tb.table_uri(out, "tags"), reader, mode="append")
    return {"seconds": time.perf_counter() - t}


PHASES = {"s3_list": phase_s3_list, "night": phase_night, "state": phase_state}


def _phase(name: str, *args) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import listing; "
            "print(json.dumps(listing.PHASES[sys.argv[2]](*json.loads(sys.argv[3]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks"), name, json.dumps(args)],
                         capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"phase {name}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def night_rows(label: str, r: dict, keys: int) -> list[tuple]:
    """Wall seconds per million keys, with the process's CPU seconds beside them: on a loaded
    machine the wall time is mostly waiting, and the CPU time is what an idle one would take."""
    per = 1e6 / keys
    s, c, cpu = r["plan"]["seconds"], r["plan"]["counts"], r["cpu"]
    total = r["listing_s"] + r["load_s"] + r["plan_s"]
    total_cpu = cpu["listing"] + cpu["load"] + cpu["plan"]
    sec = f"{keys / 1e6:g}M keys, {label}"

    def rate(wall, cpu_s):
        return f"{wall * per:.1f} s/M (CPU {cpu_s * per:.1f})"

    return [
        (sec, "synthetic source (Entry objects: s3fs's share)", rate(r["source_s"], cpu["source"]),
         "not the driver's own work; in a real listing s3fs parses the pages"),
        (sec, "listing shards (write_listing)", rate(r["listing_s"], cpu["listing"]),
         f"{r['listed']:,} keys in {r['listing_files']} shards; peak RSS "
         f"{_mib(r['rss_listing'])} (after imports {_mib(r['base_rss'])})"),
        (sec, f"load_state ({r['state_rows']:,} rows)", rate(r["load_s"], cpu["load"]),
         f"{_mib(r['state_bytes'])} of arrays; peak RSS so far {_mib(r['rss_state'])}"),
        (sec, "make_plan (join, plan shards, deletions)", rate(r["plan_s"], cpu["plan"]),
         f"join {s['join']:.1f} s, deletions {s['deleted']:.1f} s; {c['new']:,} new, {c['already_done']:,} already done, "
         f"{c['deleted']:,} deleted; {r['plan']['work']:,} work rows"),
        (sec, "driver total (listing shards + load + plan)", f"{total:.0f} s, CPU {total_cpu:.0f} s",
         f"{total * per:.1f} s/M (CPU {total_cpu * per:.1f} s/M); peak RSS {_mib(r['peak_rss'])}; load {_load()}"),
    ]


def synthetic_part(tmp: Path, n: int) -> list[tuple]:
    out = str(tmp / "out")
    first = _phase("night", out, str(tmp / "night1"), n)
    c = first["plan"]["counts"]
    assert c["new"] == n and first["plan"]["work"] == n, c
    rows = night_rows("first night (no state)", first, n)
    made = _phase("state", out, first["plan"]["files"])
    shutil.rmtree(tmp / "night1", ignore_errors=True)
    rows.append((f"{n / 1e6:g}M keys, setup", f"tags table of {n:,} rows (append)", f"{made['seconds']:.0f} s",
                 "not part of a night"))
    new = n // 100
    second = _phase("night", out, str(tmp / "night2"), n + new)
    c = second["plan"]["counts"]
    assert (c["new"], c["already_done"], c["deleted"]) == (new, n, 0), c
    rows += night_rows("second night (+1% new)", second, n + new)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--s3-keys", type=int, default=100_000)
    p.add_argument("--parallelism", default="1,8,32", help="comma-separated listing.parallelism values")
    p.add_argument("--keys", type=int, default=10_000_000, help="keys of the synthetic nights")
    p.add_argument("--skip", action="append", default=[], choices=("s3", "synthetic"))
    p.add_argument("--tmp", default=None, help="a folder for the temporary data (default: the system's)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ramplus-listing-", dir=args.tmp))
    rows = [("section", "what", "rate", "notes")]
    t0 = time.perf_counter()
    try:
        if "s3" not in args.skip:
            rows += s3_part(tmp, args.s3_keys, [int(x) for x in args.parallelism.split(",")])
        if "synthetic" not in args.skip:
            rows += synthetic_part(tmp, args.keys)
        print(table(rows))
        print(f"{machine_line()}; benchmark wall time {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Listing into Parquet shards (local and S3), the fingerprint, and the invariant check."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq

from ramplus_core.job.config import IMAGE_EXTENSIONS, StorageConfig
from ramplus_core.job.listing import Fingerprint, has_extension, iter_entries, list_inputs
from ramplus_core.job.commit import verify
from ramplus_core.job.schemas import RESULT_SCHEMA
from ramplus_core.job.storage import Storage

from .conftest import mixed_files


def read_shards(storage, files, staging):
    fs, _ = storage.pyarrow(staging)
    return [pq.read_table(f, filesystem=fs) for f in files]


def test_local_listing(mixed_dir, tmp_path):
    storage = Storage()
    res = list_inputs([str(mixed_dir)], storage, IMAGE_EXTENSIONS, str(tmp_path / "staging"), rows_per_file=5)
    expected = {rel for rel, (_, stage) in mixed_files().items() if stage != "skip"} | {"bad/loop.jpg"}
    assert res.listed == len(expected) and res.skipped == 2
    tables = read_shards(storage, res.files, str(tmp_path / "staging"))
    assert [t.num_rows for t in tables] == [5] * (len(expected) // 5) + ([len(expected) % 5] if len(expected) % 5 else [])
    rows = [r for t in tables for r in t.to_pylist()]
    assert {r["uri"] for r in rows} == {f"file://{mixed_dir}/{rel}" for rel in expected}
    assert "odd/UPPER_CASE.JPG" in {r["uri"].split(f"{mixed_dir}/")[1] for r in rows}, "extensions are case-insensitive"
    loop = [r for r in rows if r["uri"].endswith("bad/loop.jpg")]
    assert len(loop) == 1 and "symbolic links" in loop[0]["list_error"]
    for r in rows:
        if r is loop[0]:
            continue
        path = r["uri"][len("file://"):]
        assert r["size"] == os.path.getsize(path)
        assert r["etag"] is None, "local content hashes are computed by the reader, which reads the bytes anyway"
        assert abs(r["mtime"].timestamp() - os.path.getmtime(path)) < 1e-3
        assert r["list_error"] is None
    fp = Fingerprint()
    fp.update([r["uri"] for r in rows])
    assert fp == res.fingerprint


def test_unlistable_entries_become_list_errors(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "ok.jpg").write_bytes(b"x")
    os.symlink("loop.jpg", d / "loop.jpg")  # stat fails with ELOOP, even for root
    os.symlink("loop.txt", d / "loop.txt")  # not an image name: skipped, not an error
    res = list_inputs([str(d)], Storage(), IMAGE_EXTENSIONS, str(tmp_path / "staging"), rows_per_file=10)
    assert (res.listed, res.skipped, res.list_errors) == (2, 1, 1)
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in pq.read_table(res.files[0]).to_pylist()}
    assert "symbolic links" in rows["loop.jpg"]["list_error"]
    assert rows["ok.jpg"]["list_error"] is None


def test_s3_listing_streams_pages_into_shards(s3_server, tmp_path):
    storage = Storage.from_config(StorageConfig(**s3_server.storage_config()), environ={})
    fs = s3_server.fs()
    n = 2100  # more than two S3 list pages of 1000
    objs = {f"{s3_server.bucket}/many/d{i % 7}/img_{i:05d}.JPG": f"{i}".encode() for i in range(n)}
    objs[f"{s3_server.bucket}/many/readme.md"] = b"skip me"
    objs[f"{s3_server.bucket}/many_other/not_me.jpg"] = b"a sibling prefix, not under many/"
    fs.pipe(objs)
    staging = f"s3://{s3_server.bucket}/staging-test/run1"
    res = list_inputs([f"s3://{s3_server.bucket}/many"], storage, IMAGE_EXTENSIONS, staging, rows_per_file=500)
    assert res.listed == n and res.skipped == 1
    tables = read_shards(storage, res.files, staging)
    assert [t.num_rows for t in tables] == [500] * 4 + [100], "the driver never holds more than one shard"
    rows = [r for t in tables for r in t.to_pylist()]
    assert len({r["uri"] for r in rows}) == n
    by_uri = {r["uri"]: r for r in rows}
    r = by_uri[f"s3://{s3_server.bucket}/many/d3/img_00010.JPG"]
    assert r["size"] == 2 and r["etag"] == hashlib.md5(b"10").hexdigest() and r["mtime"] is not None
    # a single object named directly
    one = list(iter_entries(f"s3://{s3_server.bucket}/many/d0/img_00000.JPG", storage))
    assert [e.uri for e in one] == [f"s3://{s3_server.bucket}/many/d0/img_00000.JPG"]


def test_fingerprint_sees_missing_and_duplicate():
    uris = [f"s3://b/{i}.jpg" for i in range(1000)]
    a, b, c = Fingerprint(), Fingerprint(), Fingerprint()
    a.update(uris)
    b.update(list(reversed(uris)))
    assert a == b, "order does not matter"
    c.update(uris[:-1] + [uris[0]])  # same count: one missing, one twice
    assert c.count == a.count and c != a


def test_verify_reports_missing_and_duplicated_rows(mixed_dir, tmp_path):
    from ramplus_core.job import index as ix
    from ramplus_core.job.plan import make_plan
    from ramplus_core.job.state import RunState

    storage = Storage()
    out = tmp_path / "out"
    rs = RunState(storage, str(out), "r", "key", 1, "2026-03-01", "2026-03-01T00:00:00", False)
    listing = list_inputs([str(mixed_dir)], storage, IMAGE_EXTENSIONS, rs.staging, rows_per_file=100)
    plan = make_plan(storage=storage, output_uri=str(out), staging=rs.staging, listing_files=listing.files,
                     state=ix.IndexState.empty(), mode="missing", model_id="m", vocab_id="v", desc={},
                     score_floor=0.1, retry_stages=(), prefixes=[str(mixed_dir)], token_cache=False, rows_per_file=1000, descriptors=lambda v: None)
    uris = [u for t in read_shards(storage, listing.files, rs.staging) for u in t.column("uri").to_pylist()]
    (out / "_staging" / "r" / "done").mkdir(parents=True)

    def write(name, rows):
        """A staged file of error rows, as a write task leaves it."""
        t = pa.table({"uri": rows, "error": ["x"] * len(rows), "stage": ["decode"] * len(rows)})
        cols = [t.column(f.name) if f.name in t.column_names else pa.nulls(len(rows), f.type) for f in RESULT_SCHEMA]
        pq.write_table(pa.Table.from_arrays(cols, schema=RESULT_SCHEMA), out / "_staging" / "r" / "done" / name)

    def clear():
        for p in list((out / "_staging" / "r" / "done").iterdir()):
            p.unlink()

    write("01-00000.parquet", uris[:5])
    write("01-00001.parquet", uris[5:])
    assert verify(rs, listing, plan)["ok"]
    clear()
    write("01-00002.parquet", uris[:5])
    write("01-00003.parquet", uris[4:-1])  # uris[4] twice, the last one missing
    check = verify(rs, listing, plan)
    assert not check["ok"]
    assert "1 missing" in check["detail"] and "1 staged more than once" in check["detail"]
    assert uris[-1] in check["detail"] and uris[4] in check["detail"]


def test_extensions_match_any_case_and_dot_names():
    """An object store has no hidden files: ".jpg" and "..JPG" are images like "a.jpg"."""
    exts = tuple(e.lower() for e in IMAGE_EXTENSIONS)
    for name in ("s3://b/a.jpg", "s3://b/A.JPEG", "s3://b/x/.jpg", "s3://b/..JPG", "/p/photo.final.WebP"):
        assert has_extension(name, exts), name
    for name in ("s3://b/jpg", "s3://b/a.jpg.txt", "s3://b/notes", "s3://b/a.jpgx"):
        assert not has_extension(name, exts), name

"""The parallel listing: the same keys as one stream on a real S3 server, a bounded queue, errors per
folder, and a plan that does not depend on the order the keys arrive in."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ramplus_core.job.config import IMAGE_EXTENSIONS, StorageConfig
from ramplus_core.job.fanout import Lister, walk
from ramplus_core.job.listing import Entry, Fingerprint, list_inputs
from ramplus_core.job.s3_listing import _lister, _raw_timestamps
from ramplus_core.job.storage import Storage

from .test_plan import T0, Out, plan_rows, u


def _tree_keys() -> dict[str, bytes]:
    """A catalog-like tree: keys at every depth, uneven folders, folder markers, odd characters."""
    keys = {}
    for y in range(3):
        keys[f"{y}.jpg"] = b"top"                                    # directly under the prefix
        for m in range(1 + 2 * y):
            keys[f"y{y}/m{m}/readme.txt"] = b"skipped"
            keys[f"y{y}/m{m}/"] = b""                                # a folder marker object
            for d in range(3):
                for i in range(1 + (y * 7 + m * 3 + d) % 5):
                    keys[f"y{y}/m{m}/d{d}/img_{i}.jpg"] = f"{y}{m}{d}{i}".encode()
            keys[f"y{y}/m{m}/cover.png"] = b"in an opened folder"
    keys["y1/a b/ü +%.jpg"] = b"a folder and a name to quote"
    keys["deep/a/b/c/d/e/f/img.jpg"] = b"deeper than the fan-out opens"
    return keys


def _rows(storage, res, staging) -> Counter:
    fs, _ = storage.pyarrow(staging)
    out = Counter()
    for f in res.files:
        for r in pq.read_table(f, filesystem=fs).to_pylist():
            out[(r["uri"], r["size"], r["etag"], r["mtime"], r["list_error"])] += 1
    return out


def test_parallel_s3_listing_equals_the_single_stream(s3_server, tmp_path):
    storage = Storage.from_config(StorageConfig(**s3_server.storage_config()), environ={})
    fs = s3_server.fs()
    keys = _tree_keys()
    fs.pipe({f"{s3_server.bucket}/tree/{k}": v for k, v in keys.items()})
    fs.pipe({f"{s3_server.bucket}/tree_sibling/x.jpg": b"not under tree/"})
    root = f"s3://{s3_server.bucket}/tree"
    images = {k for k in keys if k.endswith((".jpg", ".png"))}
    results = {}
    staging = f"s3://{s3_server.bucket}/staging-fanout"
    for p in (1, 2, 8):
        results[p] = list_inputs([root], storage, IMAGE_EXTENSIONS, f"{staging}/p{p}", rows_per_file=7, parallelism=p)
    seq = _rows(storage, results[1], staging)
    assert {k[0] for k in seq} == {f"{root}/{k}" for k in images} and max(seq.values()) == 1
    r = next(k for k in seq if k[0].endswith("y2/m4/d1/img_0.jpg"))
    assert r[1] == 4 and r[2] == hashlib.md5(b"2410").hexdigest()
    assert r[3] == fs.info(f"{s3_server.bucket}/tree/y2/m4/d1/img_0.jpg")["LastModified"], \
        "the listing's own timestamp parsing (not botocore's) gives the same instant"
    for p in (2, 8):
        assert _rows(storage, results[p], staging) == seq, f"parallelism {p}: the same entries, each once"
        assert results[p].fingerprint == results[1].fingerprint
        assert (results[p].listed, results[p].skipped) == (results[1].listed, results[1].skipped)
    # every depth at which the walker may stop opening folders and list them whole
    fsx, _ = storage.list_fs(root, _raw_timestamps)
    lister = _lister(fsx, s3_server.bucket, "s3")
    for max_depth, target in ((1, None), (2, 1), (3, 1000), (9, 1000)):
        got = Counter(e.uri for page in walk("tree/", lister, 3, max_depth=max_depth, target=target) for e in page)
        assert got == Counter(f"{root}/{k}" for k in keys if not k.endswith("/")), (max_depth, target)
    # a single object named as the input is still found
    one = list_inputs([f"{root}/y0/m0/d0/img_0.jpg"], storage, IMAGE_EXTENSIONS,
                      f"s3://{s3_server.bucket}/staging-fanout/one", rows_per_file=7, parallelism=4)
    assert one.listed == 1


class Synthetic:
    """A store of `folders` folders of `pages` pages each, counting pages made but not yet taken."""

    def __init__(self, folders: int, pages: int, per_page: int = 100, deny=(), fail=()):
        self.folders, self.pages, self.per_page = folders, pages, per_page
        self.deny, self.fail = set(deny), set(fail)
        self.lock = threading.Lock()
        self.out = 0
        self.max_out = 0

    def _made(self, n: int) -> None:
        with self.lock:
            self.out += n
            self.max_out = max(self.max_out, self.out)

    def taken(self) -> None:
        with self.lock:
            self.out -= 1

    def level(self, prefix):
        if prefix in self.deny:
            raise PermissionError(f"AccessDenied: {prefix}")
        if prefix == "":
            self._made(1)
            yield [Entry("s3://b/top.jpg", 1, "e", T0)], [f"f{i:03d}/" for i in range(self.folders)]
        else:
            yield from ((p, []) for p in self.full(prefix))

    def full(self, prefix):
        for j in range(self.pages):
            if prefix in self.fail and j == 2:
                raise ConnectionError("the store went away")
            self._made(1)
            yield [Entry(f"s3://b/{prefix}{j:04d}-{i:04d}.jpg", 1, "e", T0) for i in range(self.per_page)]

    def lister(self) -> Lister:
        def denied(prefix, err):
            if isinstance(err, PermissionError):
                return Entry(f"s3://b/{prefix.rstrip('/')}", None, None, None, f"folder could not be listed: {err}",
                             True)
            return None

        return Lister(self.level, self.full, denied)


def test_the_queue_bounds_what_the_walker_holds_whatever_the_size():
    """A slow reader: the threads wait instead of piling pages up in memory."""
    p = 4
    for folders, pages in ((20, 10), (40, 20)):
        src = Synthetic(folders, pages)
        n = 0
        for page in walk("", src.lister(), p, max_depth=1):
            src.taken()
            n += len(page)
            if n < 20_000:
                time.sleep(0.0005)
        assert n == 1 + folders * pages * 100
        assert src.max_out <= 3 * p + 1, (src.max_out, "at most the queue plus one page per thread")


def test_a_refused_folder_is_an_error_row_and_a_broken_one_stops_the_listing():
    src = Synthetic(6, 3, deny={"f002/"})
    pages = list(walk("", src.lister(), 3, max_depth=4))
    uris = [e.uri for page in pages for e in page]
    err = [e for page in pages for e in page if e.error]
    assert len(err) == 1 and err[0].folder and err[0].uri == "s3://b/f002" and "AccessDenied" in err[0].error
    assert len(uris) == len(set(uris)) == 1 + 5 * 3 * 100 + 1
    with pytest.raises(PermissionError):
        list(walk("", Synthetic(3, 3, deny={""}).lister(), 3))  # the input itself: nothing is known
    with pytest.raises(ConnectionError):
        list(walk("", Synthetic(8, 50, fail={"f005/"}).lister(), 3))


def test_the_plan_does_not_depend_on_the_listing_order(tmp_path):
    out = Out(tmp_path / "out")
    tagged = dict(status="tagged", vocab_id="v1")
    out.commit("20260101T000000Z-aaaaaa", [{"uri": u(f"i{j:03d}"), "version": "e1", **tagged} for j in range(60)]
               + [{"uri": u(f"hidden/h{j}"), "version": "e1", **tagged} for j in range(3)]
               + [{"uri": u("err"), "version": "e1", "status": "error", "stage": "fetch"}])
    entries = ([(u(f"i{j:03d}"), "e2" if j % 7 == 0 else "e1", 1, T0, None) for j in range(60) if j % 11]
               + [(u(f"n{j}"), "e1", 1, T0, None) for j in range(9)] + [(u("err"), "e1", 1, T0, None)]
               + [("s3://b/in/hidden", None, None, None, "folder could not be listed: x")])
    plans = []
    for k, order in enumerate((entries, entries[::-1], entries[1::2] + entries[::2])):
        d = tmp_path / f"o{k}"
        files = []
        for s in range(0, len(order), 13):  # several shards, cut at other places in each order
            files += out.listing(d / f"s{s}", order[s:s + 13])
        plans.append(out.plan(d, files)[1])
    first = plans[0]
    assert (first.counts["deleted"], first.counts["new"], first.counts["retried"]) == (6, 10, 1)
    for plan in plans[1:]:
        assert (plan.counts, plan.work_fp, plan.skipped_fp, plan.need) == \
            (first.counts, first.work_fp, first.skipped_fp, first.need)
        assert plan_rows(plan) == plan_rows(first)
        assert pq.read_table(plan.deleted["path"]) == pq.read_table(first.deleted["path"]), "sorted by uri"
    assert Fingerprint(*first.work_fp) + Fingerprint(*first.skipped_fp) == \
        Fingerprint().update(pa.array([e[0] for e in entries]))

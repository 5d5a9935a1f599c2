"""Listing the inputs into a URI table: Parquet shards that Ray Data reads block by block.

Handing Ray Data millions of paths makes it stat and plan every one in the driver before
the first image moves (a known Ray Data slowness), and holding them in a Python list costs
gigabytes. Instead the driver streams the listing page by page (S3 pages of 1000 keys,
one directory at a time elsewhere) into Parquet files of `listing.rows_per_file` rows under
the run's staging folder, and Ray Data reads those few files. The driver never holds more
than one file's rows. An S3 prefix with folders is listed on `listing.parallelism` threads
(s3_listing.py, fanout.py), its pages streamed through a bounded queue into the same writer.

Local files get no ETag here: their content hash is computed by the reader from the bytes
it reads anyway (MD5, which is what S3 reports as the ETag of a single-part upload), so
each file is read once, in parallel, instead of twice with the second read in the driver.

A folder that cannot be listed (permission denied) becomes a row with `list_error` set, so
it ends as an error row of stage `list` instead of silently missing images.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import RamPlusError
from .config import redact_uri, uri_scheme
from .index import uri_hashes
from .schemas import LISTING_SCHEMA
from .storage import Storage, encoded_name_taken, ensure_dir, join, last_line, local_path, to_uri

log = logging.getLogger(__name__)

_PAGE = 5000


@dataclass
class Entry:
    uri: str
    size: Optional[int]
    etag: Optional[str]
    mtime: Optional[datetime]
    error: Optional[str] = None
    folder: bool = False  # an error about a whole folder (always kept: it may hide images)
    unlisted: Optional[str] = None  # why an object with an image name is not listed (not a regular file)


class Fingerprint:
    """An order-free fingerprint of a set of URIs: count plus two 64-bit hash sums.

    Comparing the listing's fingerprint with the one of the rows written proves (up to a
    2^-128 chance) that every listed URI was written exactly once, without holding either
    side in memory: a missing row and a duplicated row each change the sums.
    """

    def __init__(self, count: int = 0, s1: int = 0, s2: int = 0):
        self.count, self.s1, self.s2 = int(count), int(s1) % 2**64, int(s2) % 2**64

    def update(self, uris) -> "Fingerprint":
        return self.add_hashes(*uri_hashes(uris))

    def add_hashes(self, h1: np.ndarray, h2: np.ndarray) -> "Fingerprint":
        """Add URIs already hashed by `index.uri_hashes` (the sums wrap modulo 2^64 on purpose)."""
        self.count += len(h1)
        self.s1 = (self.s1 + int(h1.sum(dtype=np.uint64))) % 2**64
        self.s2 = (self.s2 + int(h2.sum(dtype=np.uint64))) % 2**64
        return self

    def __add__(self, other: "Fingerprint") -> "Fingerprint":
        return Fingerprint(self.count + other.count, self.s1 + other.s1, self.s2 + other.s2)

    def as_tuple(self) -> tuple[int, int, int]:
        return self.count, self.s1, self.s2

    def __eq__(self, other) -> bool:
        return isinstance(other, Fingerprint) and (self.count, self.s1, self.s2) == (other.count, other.s1, other.s2)

    def as_dict(self) -> dict:
        return {"count": self.count, "sum1": f"{self.s1:016x}", "sum2": f"{self.s2:016x}"}


@dataclass
class ListingResult:
    files: list[str] = field(default_factory=list)  # listing shard paths on the staging filesystem
    listed: int = 0
    skipped: int = 0
    list_errors: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    not_regular: int = 0  # objects with image names left out: links not followed, FIFOs, devices
    not_regular_examples: list[str] = field(default_factory=list)
    per_input: dict = field(default_factory=dict)
    fingerprint: Fingerprint = field(default_factory=Fingerprint)
    seconds: float = 0.0


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    # not os.path.splitext: it calls ".jpg" and "..jpg" extension-less (hidden-file rule), and
    # an object store has no hidden files
    return name.lower().endswith(extensions)


class ListingFailed(RamPlusError):
    """A prefix could not be listed to the end: what exists is unknown, so nothing may be planned."""


# -- per-filesystem streaming walkers ------------------------------------------------------

def iter_entries(uri: str, storage: Storage, follow_links: bool = False, parallelism: int = 1) -> Iterator[Entry]:
    """Every object under a prefix (or the object itself), streamed; S3 on `parallelism` threads."""
    scheme = uri_scheme(uri)
    if scheme == "file":
        yield from _iter_local(local_path(uri), follow_links)
    elif scheme in ("s3", "s3a"):
        from .s3_listing import iter_s3

        yield from iter_s3(uri, storage, scheme, parallelism)
    else:
        yield from _iter_fsspec(uri, storage, scheme)


def _iter_local(root: str, follow_links: bool = False) -> Iterator[Entry]:
    if os.path.isfile(root):
        st = os.stat(root)
        yield Entry(to_uri("file", root), st.st_size, None, _ts(st.st_mtime))
        return
    real_root = os.path.realpath(root)
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Entry(to_uri("file", d), None, None, None, f"folder could not be listed: {e.strerror or e}", True)
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
                else:
                    yield _local_entry(e, real_root, follow_links)
            except OSError as err:
                yield Entry(to_uri("file", e.path), None, None, None, f"cannot stat: {err.strerror or err}")
        stack.extend(reversed(subdirs))


def _local_entry(e: os.DirEntry, real_root: str, follow_links: bool) -> Entry:
    """One non-folder entry: a regular file to list, or what it is when it is not one."""
    uri = to_uri("file", e.path)
    if encoded_name_taken(e.path):
        return Entry(uri, None, None, None, unlisted="its name is not UTF-8 and its percent-encoded "
                     "spelling is the name of another file; rename one of them")
    if e.is_symlink():
        st, why = _link_target(e.path, real_root, follow_links)
    else:
        st = e.stat(follow_symlinks=False)
        why = None if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)
    if why:
        return Entry(uri, None, None, None, unlisted=why)
    return Entry(uri, st.st_size, None, _ts(st.st_mtime))


def _link_target(path: str, real_root: str, follow_links: bool):
    """(stat of the target, None) for a link the listing may follow, else (None, why not).

    A link is followed when it ends at a regular file inside the input folder (its real
    path), or anywhere when `listing.follow_links` is on; otherwise a link to any file would
    make the job read it and publish its size and MD5. Links to folders are never walked (no
    cycles, no second copy of a subtree). A link that loops raises OSError: a list error.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "dangling link"
    if stat.S_ISDIR(st.st_mode):
        return None, "link to a folder (not walked)"
    if not stat.S_ISREG(st.st_mode):
        return None, f"link to a {_kind(st.st_mode)}"
    if not follow_links and os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        return None, "link to a file outside the input folder (listing.follow_links is off)"
    return st, None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "non-regular file"


def _iter_fsspec(uri: str, storage: Storage, scheme: str) -> Iterator[Entry]:
    fs, path = storage.fsspec(uri)
    if fs.isfile(path):
        info = fs.info(path)
        yield Entry(to_uri(scheme, fs._strip_protocol(path)), info.get("size"), _etag(info), _dt(info.get("mtime")))
        return
    errors: list = []
    for root, _dirs, files in fs.walk(path, detail=True, on_error=errors.append):
        for name in sorted(files):
            info = files[name]
            yield Entry(to_uri(scheme, info["name"]), info.get("size"), _etag(info),
                        _dt(info.get("mtime") or info.get("LastModified") or info.get("updated")))
        while errors:
            e = errors.pop()
            yield Entry(to_uri(scheme, root), None, None, None, f"folder could not be listed: {e}", True)


def _etag(info: dict) -> Optional[str]:
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return str(tag).strip('"') if tag else None


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _dt(value) -> Optional[datetime]:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return _ts(float(value))
    try:
        return _dt(datetime.fromisoformat(str(value).replace("Z", "+00:00")))
    except ValueError:
        return None


# -- the URI table ---------------------------------------------------------------------------

class _ShardWriter:
    """Pages of entries into Parquet shards of exactly `rows_per_file` rows (the last one fewer).

    Each page becomes Arrow columns at once (about 100 bytes a key instead of the entries'
    Python objects), and is written out as soon as a shard's worth is there.
    """

    def __init__(self, storage: Storage, staging_uri: str, rows_per_file: int):
        self.fs, self.root = storage.pyarrow(join(staging_uri, "listing"))
        ensure_dir(self.fs, self.root)
        self.rows_per_file = rows_per_file
        self.parts: list[pa.Table] = []
        self.n = 0
        self.files: list[str] = []

    def add_page(self, page: list[Entry]) -> list[str]:
        """Buffer (and write when full) a page; its URIs, for the caller's fingerprint."""
        uris = [e.uri for e in page]
        if not page:
            return uris
        self.parts.append(pa.table({
            "uri": uris, "size": [e.size for e in page], "etag": [e.etag for e in page],
            "mtime": [e.mtime for e in page], "list_error": [e.error for e in page]}, schema=LISTING_SCHEMA))
        self.n += len(page)
        while self.n >= self.rows_per_file:
            self.flush()
        return uris

    def flush(self) -> None:
        """Write one shard: the first `rows_per_file` buffered rows, or all when fewer."""
        if not self.n:
            return
        table = pa.concat_tables(self.parts)
        rows = min(self.n, self.rows_per_file)
        path = f"{self.root}/part-{len(self.files):05d}.parquet"
        pq.write_table(table.slice(0, rows), path, filesystem=self.fs, compression="zstd")
        self.files.append(path)
        rest = table.slice(rows)
        self.parts, self.n = ([rest] if rest.num_rows else []), rest.num_rows


def list_inputs(inputs, storage: Storage, extensions: tuple[str, ...], staging_uri: str,
                rows_per_file: int, progress=None, follow_links: bool = False, parallelism: int = 1) -> ListingResult:
    """Stream every input prefix into listing shards; count what is not an image as skipped
    and what has an image name but is not a regular file as not_regular."""
    sources = ((uri, iter_entries(uri, storage, follow_links, parallelism)) for uri in inputs)
    return write_listing(sources, storage, extensions, staging_uri, rows_per_file, progress)


def write_listing(sources, storage: Storage, extensions: tuple[str, ...], staging_uri: str,
                  rows_per_file: int, progress=None) -> ListingResult:
    """The driver's side of a listing: (input, its entries) pairs into shards and counts;
    separate from the walkers so that a benchmark can feed it a synthetic catalog."""
    t0 = time.perf_counter()
    exts = tuple(e.lower() for e in extensions)
    res = ListingResult()
    writer = _ShardWriter(storage, staging_uri, rows_per_file)
    last_report = time.monotonic()
    for uri, entries in sources:
        n_in = 0
        page: list[Entry] = []
        try:
            # per key only the common case (an image, listed fine); the rest goes to _sort_out,
            # the columns and the hashes are made a page at a time
            for e in entries:
                if (e.folder or e.unlisted or e.error is not None or not e.uri.lower().endswith(exts)) \
                        and not _sort_out(e, res, exts, storage):
                    continue
                page.append(e)
                if len(page) >= _PAGE:
                    res.fingerprint.update(writer.add_page(page))
                    n_in, page = n_in + len(page), []
                    if progress and time.monotonic() - last_report > 10:
                        progress(f"listing: {res.fingerprint.count} images so far, {res.skipped} skipped")
                        last_report = time.monotonic()
            res.fingerprint.update(writer.add_page(page))
            n_in += len(page)
        except RamPlusError:
            raise
        except Exception as err:  # noqa: BLE001 - s3fs, botocore, pyarrow and OS errors alike
            raise ListingFailed(f"listing {redact_uri(uri)} failed after {n_in + len(page)} images: "
                                f"{type(err).__name__}: {last_line(err)}") from err
        res.per_input[uri] = n_in
    while writer.n:
        writer.flush()
    res.files = writer.files
    res.listed = res.fingerprint.count
    res.seconds = time.perf_counter() - t0
    return res


def _sort_out(e: Entry, res: ListingResult, exts: tuple[str, ...], storage: Storage) -> bool:
    """Count an entry that is not a plain image; True when it still goes to the shards (a list error)."""
    if not e.folder and not has_extension(e.uri, exts):
        res.skipped += 1
        _example(res.skipped_examples, e.uri)
        return False
    if e.unlisted:
        res.not_regular += 1
        _example(res.not_regular_examples, f"{e.uri} ({e.unlisted})")
        return False
    if e.error is not None:  # scrubbed here: the listing shards stay on disk too
        res.list_errors += 1
        e.error = storage.scrub(e.error)
    return True


def _example(examples: list[str], text: str, keep: int = 5) -> None:
    if len(examples) < keep:
        examples.append(text)


def read_listing_uris(storage: Storage, staging_uri: str, files: list[str]) -> Iterator[pa.Array]:
    fs, _ = storage.pyarrow(join(staging_uri, "listing"))
    for path in files:
        yield pq.read_table(path, columns=["uri"], filesystem=fs).column("uri")

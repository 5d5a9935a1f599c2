"""The S3 side of the listing: ListObjectsV2 pages through s3fs, as one stream or fanned out.

`listing.parallelism: 1` is the single stream (one request after the other, 1000 keys each);
above 1, `fanout.walk` opens the prefix's folders with delimiter listings and lists them on
that many threads. Both share s3fs's event loop: the threads only wait on it, so the
requests overlap while the XML of each page is still parsed on one core (about 30 us a key
once botocore leaves the timestamps alone: `_raw_timestamps`).
"""

from __future__ import annotations

from typing import Iterator

from .fanout import Lister, walk
from .listing import Entry, _dt, _etag
from .storage import Storage, to_uri

_BATCH = 1000  # items taken from s3fs's async iterator per hop onto its loop (one S3 page)


def _raw_timestamps():
    """A botocore session whose responses keep LastModified as text (`_dt` reads it).

    botocore parses every timestamp with dateutil: 130 of the 160 us per key of a
    ListObjectsV2 page, which made the driver's CPU the bound of a listing (4,000 keys/s).
    """
    from aiobotocore.session import AioSession

    session = AioSession()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return session


def iter_s3(uri: str, storage: Storage, scheme: str, parallelism: int = 1) -> Iterator[Entry]:
    fs, path = storage.list_fs(uri, _raw_timestamps)
    bucket, _, key = path.partition("/")
    key = key.strip("/")
    prefix = key + "/" if key else ""
    lister = _lister(fs, bucket, scheme)
    pages = lister.full(prefix) if parallelism <= 1 else walk(prefix, lister, parallelism)
    found = False
    for page in pages:
        found = found or bool(page)
        yield from page
    if not found and key:
        # The input may name a single object rather than a prefix.
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return
        if info.get("type") == "file":
            yield Entry(to_uri(scheme, path), int(info.get("size") or 0), _etag(info), _dt(info.get("LastModified")))


def _lister(fs, bucket: str, scheme: str) -> Lister:
    def entry(info: dict) -> Entry:
        return Entry(to_uri(scheme, info["name"]), int(info.get("size") or 0), _etag(info),
                     _dt(info.get("LastModified")))

    def level(prefix: str):
        for items in _items(fs, bucket, prefix, "/"):
            files = [entry(i) for i in items if i.get("type") != "directory" and not i["name"].endswith("/")]
            # s3fs turns a common prefix into "bucket/prefix" without the delimiter: undo exactly that
            subs = [i["Key"][len(bucket) + 1:] + "/" for i in items if i.get("type") == "directory"]
            yield files, subs

    def full(prefix: str):
        for items in _items(fs, bucket, prefix, ""):
            yield [entry(i) for i in items if not i["name"].endswith("/")]  # folder marker objects

    def denied(prefix: str, err: Exception):
        if not isinstance(err, PermissionError):
            return None
        return Entry(to_uri(scheme, f"{bucket}/{prefix.rstrip('/')}"), None, None, None,
                     f"folder could not be listed: {err}", True)

    return Lister(level, full, denied)


def _items(fs, bucket: str, prefix: str, delimiter: str) -> Iterator[list[dict]]:
    """s3fs's listing infos, in batches taken on its event loop (the caller's thread waits)."""
    from fsspec.asyn import sync

    agen = fs._iterdir(bucket, delimiter=delimiter, prefix=prefix)

    async def take(n):
        out = []
        try:
            while len(out) < n:
                out.append(await agen.__anext__())
        except StopAsyncIteration:
            return out, True
        return out, False

    while True:
        items, done = sync(fs.loop, take, _BATCH)
        if items:
            yield items
        if done:
            return

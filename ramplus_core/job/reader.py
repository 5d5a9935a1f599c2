"""Fetch and decode, in Ray tasks: listing rows in, model-ready pixels or error rows out.

Fetching is I/O-bound and decoding CPU-bound, so each task fetches with a few threads and
decodes in its own thread: parallelism across the cluster is (decode tasks x fetch
threads) for the network and (decode tasks) for the CPU. At most `fetch.threads` fetched
objects wait for decoding in a task, which bounds memory at threads x decode.max_bytes.

With `defer_jpeg` (decode.device gpu, or auto on GPU actors) a JPEG that the GPU decoder
can take (`gpu_decode.wants`: header read, 8-bit, 1 or 3 components, under the limits) is
not decoded here: its bytes go on in `encoded` and the actor decodes them in batches with
nvJPEG. Every other file is decoded here as before.

Nothing raised here escapes: every row comes out either with pixels or with `error` and
`stage` set, because one bad object must never fail a night's run.

A store that is down for a while (a restart, a network blip) must not turn a night's images
into error rows, and one that stays down must not hold the run forever: each GET is one
request (`Storage.fetch_fs`), retried `fetch.retries` times after waits that double from
`fetch.backoff_s` up to `fetch.max_backoff_s`, each scaled by a random 0.5-1.5 so that
thousands of readers do not come back in step. Only then does the image become an error row
of stage `fetch` that says how many attempts over how long. Not found and access denied are
not retried: waiting does not change them.
"""

from __future__ import annotations

import errno
import hashlib
import random
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Optional

import pyarrow as pa

from ..errors import ImageError
from ..gpu_decode import wants
from ..preprocess import IMAGE_SIZE, DecodeLimits, decode
from .config import FetchConfig, uri_scheme
from .local_read import RefusedFile, read_local
from .storage import Storage, local_path

#: What flows from the decode tasks to the inference actors. `pixels` is HWC uint8 of
#: 384x384x3 bytes, empty for error rows and for JPEGs passed on undecoded in `encoded`
#: (their width and height are then the header's); large_binary because a batch passes
#: 2 GiB of pixels at ~4900 images.
DECODED_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("pixels", pa.large_binary()),
    ("error", pa.string()),
    ("stage", pa.string()),
    ("encoded", pa.large_binary()),
])
PIXEL_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3


class FetchError(Exception):
    def __init__(self, reason: str, permanent: bool):
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


def _classify(e: BaseException) -> FetchError:
    if isinstance(e, RefusedFile):
        return FetchError(e.strerror, True)
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return FetchError("symbolic link loop", True)
    if isinstance(e, FileNotFoundError):
        return FetchError("object not found (deleted after listing?)", True)
    if isinstance(e, PermissionError):
        return FetchError(f"access denied: {_short(e)}", True)
    if isinstance(e, IsADirectoryError):
        return FetchError("is a folder, not an object", True)
    return FetchError(f"{type(e).__name__}: {_short(e)}", False)


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def backoff_s(attempt: int, cfg: FetchConfig, rng=random.random) -> float:
    """Wait before retry number `attempt` (1, 2, ...)."""
    return min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1)) * (0.5 + rng())


def fetch_bytes(storage: Storage, uri: str, max_bytes: int, cfg: FetchConfig, listed_size: Optional[int],
                links_inside=None) -> bytes:
    """Read at most max_bytes + 1 bytes (enough to know it is too big) with bounded retries.

    links_inside: for local files, `local_read.read_local`'s `inside` (None follows links).
    """
    if listed_size is not None and listed_size > max_bytes:
        raise ImageError(f"object is {listed_size} bytes, over the limit of {max_bytes} (decode.max_bytes); not fetched",
                         stage="fetch")
    if listed_size == 0:
        return b""  # a ranged GET of an empty object is an error on S3; decode names it "empty"
    attempt = 0
    t0 = time.monotonic()
    while True:
        try:
            if uri_scheme(uri) == "file":
                data = read_local(local_path(uri), max_bytes + 1, links_inside)
                break
            fs, path = storage.fetch_fs(uri)
            # One ranged GET, no HEAD: an object that grew since it was listed (or a server that
            # ignores Range) still yields at most max_bytes + 1 bytes.
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
            break
        except Exception as e:  # noqa: BLE001 - any client error is classified below
            err = _classify(e)
            if err.permanent or attempt >= cfg.retries:
                tries = f" after {attempt + 1} attempts over {time.monotonic() - t0:.1f}s" if attempt else ""
                raise ImageError(storage.scrub(f"fetch failed{tries}: {err.reason}"), stage="fetch") from None
            attempt += 1
            time.sleep(backoff_s(attempt, cfg))
    if len(data) > max_bytes:
        raise ImageError(f"object is over the limit of {max_bytes} bytes (decode.max_bytes); read stopped at "
                         f"{max_bytes + 1}", stage="fetch")
    return data


def _decode_row(data: bytes, limits: DecodeLimits):
    d = decode(data, limits)
    return d.array.tobytes(), d.width, d.height


def fetch_decode(batch: pa.Table, *, storage: Storage, fetch: FetchConfig, limits: DecodeLimits,
                 defer_jpeg: bool = False, links_inside=None) -> pa.Table:
    """The Ray Data UDF: a listing batch -> DECODED_SCHEMA rows, one per input row.

    defer_jpeg: JPEGs the GPU decoder takes pass through undecoded in `encoded`.
    links_inside: as in `fetch_bytes` (`local_read.link_roots` of the run).
    """
    rows = batch.to_pylist()
    n = len(rows)
    out = {k: [None] * n for k in DECODED_SCHEMA.names}
    for i, r in enumerate(rows):
        for k in ("uri", "size", "etag", "mtime"):
            out[k][i] = r.get(k)
        out["pixels"][i] = b""
        out["encoded"][i] = b""

    def fail(i: int, reason: str, stage: str) -> None:
        out["error"][i], out["stage"][i] = reason, stage

    todo = []
    for i, r in enumerate(rows):
        if r.get("list_error"):
            fail(i, r["list_error"], "list")  # scrubbed by the listing that wrote it
        else:
            todo.append(i)

    def job(i):
        try:
            return i, fetch_bytes(storage, rows[i]["uri"], limits.max_bytes, fetch, rows[i].get("size"),
                                  links_inside), None
        except ImageError as e:
            return i, None, e

    with ThreadPoolExecutor(max_workers=max(1, fetch.threads)) as pool:
        queue = iter(todo)
        pending = {pool.submit(job, i) for _, i in zip(range(fetch.threads), queue)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                nxt = next(queue, None)
                if nxt is not None:
                    pending.add(pool.submit(job, nxt))
                i, data, err = fut.result()
                if err is not None:
                    fail(i, err.reason, err.stage)
                    continue
                if not out["etag"][i]:
                    out["etag"][i] = hashlib.md5(data, usedforsecurity=False).hexdigest()
                out["size"][i] = len(data)
                info = wants(data, limits) if defer_jpeg else None
                if info is not None:
                    out["encoded"][i] = data
                    out["width"][i], out["height"][i] = info.oriented_size
                    continue
                try:
                    out["pixels"][i], out["width"][i], out["height"][i] = _decode_row(data, limits)
                except ImageError as e:
                    fail(i, e.reason, e.stage)
                except Exception as e:  # noqa: BLE001 - a decoder bug must not stop the run
                    fail(i, storage.scrub(f"unexpected decoder failure: {type(e).__name__}: {_short(e)}"), "decode")
                del data
    return pa.table(out, schema=DECODED_SCHEMA)

"""Listing a prefix tree on several threads, with the keys streamed back through a bounded queue.

One listing stream of an object store returns a page of keys per request, one request after
the other, so its rate is the page size over the store's latency, whatever the machine. A
catalog is nearly always laid out in folders (dates, users, cameras), and a store lists the
folders directly under a prefix in one request (delimiter '/'). The walker opens folders
level by level, all of a level at once, until it holds enough of them (`4 x parallelism`)
or reaches `max_depth`, then lists each remaining folder to the end on the same threads.
Keys sitting directly in an opened folder come with its folder listing, so every key is
listed exactly once; a prefix without folders is a single stream, as before.

Memory: the threads hand their pages to the caller through a queue of `2 x parallelism`
pages, and a thread that finds it full waits, so the caller (which writes the pages to
listing shards) holds a bounded number of keys whatever the catalog size. The folder names
of the opened levels are kept (small: folders, not keys).

Order: pages arrive as the threads produce them, so the stream has no fixed order; nothing
downstream depends on it (the plan joins by hash, the fingerprint is a sum).

Errors: a sub-folder whose listing is refused becomes what `denied` makes of it (a folder
error row: its committed rows are kept, the rest is planned), as an unreadable local folder
does. Any other error, or a refused root, stops the walk and is raised to the caller.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

MAX_DEPTH = 4


@dataclass
class Lister:
    """How to list one store: pages of (entries, sub-prefixes), or of entries only."""

    level: Callable[[str], Iterator[tuple[list, list[str]]]]  # one folder listing (delimiter '/')
    full: Callable[[str], Iterator[list]]                     # everything under a prefix
    denied: Callable[[str, Exception], Optional[object]]      # an error entry, or None to raise


class _Stopped(Exception):
    pass


def walk(root: str, lister: Lister, parallelism: int, max_depth: int = MAX_DEPTH,
         target: Optional[int] = None) -> Iterator[list]:
    """Pages of entries under `root`, listed on `parallelism` threads (see the module docstring)."""
    target = target or 4 * parallelism
    q: queue.Queue = queue.Queue(maxsize=2 * parallelism)
    stop = threading.Event()
    failed: list[BaseException] = []

    def put(page: list) -> None:
        while True:
            if stop.is_set():
                raise _Stopped
            try:
                q.put(page, timeout=0.1)
                return
            except queue.Full:
                continue

    def guarded(fn, prefix: str):
        try:
            return fn(prefix)
        except _Stopped:
            return []
        except Exception as e:  # noqa: BLE001 - decided per prefix below
            err = None if prefix == root else lister.denied(prefix, e)
            if err is None:
                failed.append(e)
                stop.set()
            else:
                put([err])
            return []

    def open_one(prefix: str) -> list[str]:
        subs: list[str] = []
        for entries, more in lister.level(prefix):
            if entries:
                put(entries)
            subs += more
        return subs

    def full_one(prefix: str) -> list:
        for entries in lister.full(prefix):
            if entries:
                put(entries)
        return []

    pool = ThreadPoolExecutor(parallelism, thread_name_prefix="ramplus-list")
    try:
        level, depth = [root], 0
        while level:
            opening = depth < max_depth and (depth == 0 or len(level) < target)
            futs = [pool.submit(guarded, open_one if opening else full_one, p) for p in level]
            results = yield from _drain(q, futs, failed)
            if not opening:
                break
            level, depth = sorted(s for r in results for s in r), depth + 1
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _drain(q: queue.Queue, futs: list, failed: list):
    """Yield pages until every future is done and the queue is empty; their results."""
    while True:
        if failed:
            raise failed[0]
        try:
            yield q.get(timeout=0.05)
            continue
        except queue.Empty:
            pass
        if all(f.done() for f in futs):
            while True:
                try:
                    yield q.get_nowait()
                except queue.Empty:
                    break
            if failed:
                raise failed[0]
            return [f.result() for f in futs]

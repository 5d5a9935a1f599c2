"""Reading a listed local image file without following a link the listing would have refused.

The listing checks links (`listing._link_target`): with `listing.follow_links` off, a link is
listed only when it ends at a regular file inside the input folder. The read comes later, in
another process, and by then a listed file may have been swapped for a link to any file the
job can read (`/etc/shadow` as `cat.jpg`): a plain open would follow it and publish the
file's size and MD5 (and its bytes to the decoder). So the file is opened with O_NOFOLLOW;
a link that is refused that way is opened again only if it is listed, and what was opened in
the end is checked by the kernel's own name for it (`/proc/self/fd`), which also catches a
folder on the path swapped for a link. O_NONBLOCK: a file swapped for a FIFO would otherwise
block the reader forever; a FIFO or a device is refused after a non-blocking open.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Optional, Sequence

from .config import uri_scheme
from .storage import local_path

_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
OUTSIDE = "is a symbolic link (or under one) to a file outside the input folder (listing.follow_links is off); not read"


class RefusedFile(OSError):
    """A local path the listing's link rule does not allow, found at read time."""


def read_local(path: str, limit: int, inside: Optional[Sequence[str]]) -> bytes:
    """At most `limit` bytes of a regular file.

    `inside`: None follows links anywhere (`listing.follow_links` on); otherwise the real
    paths (links resolved: `link_roots`) of the input folders the file must really be in.
    """
    if inside is None:
        fd = os.open(path, _FLAGS)
    else:
        try:
            fd = os.open(path, _FLAGS | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            fd = os.open(path, _FLAGS)  # a link (a loop raises ELOOP again): allowed only if it stays inside
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a folder", path)
            raise RefusedFile(errno.EINVAL, "is not a regular file (a FIFO, socket or device); not read")
        if inside is not None and not _within(_opened_path(fd, path), inside):
            raise RefusedFile(errno.ELOOP, OUTSIDE)
        chunks, left = [], limit
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _opened_path(fd: int, path: str) -> str:
    """The real path of an open file: the kernel's name for it where there is one (Linux)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _within(real: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([r, real]) == r for r in roots)


def link_roots(inputs: Sequence[str], follow_links: bool) -> Optional[tuple[str, ...]]:
    """`read_local`'s `inside` for a run: the local input folders' real paths, resolved once per
    run rather than once per file read, or None to follow links."""
    if follow_links:
        return None
    return tuple(os.path.realpath(local_path(u)) for u in inputs if uri_scheme(u) == "file")

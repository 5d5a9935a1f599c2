"""A listed local file swapped for a link (or a FIFO) before it is read.

The listing refuses links out of the input folder, but the read happens later in another
process: these tests list a real folder, then swap what was listed, then run the reader
on the listing's own rows, as the job's decode tasks do.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from ramplus_core.job.config import IMAGE_EXTENSIONS, FetchConfig
from ramplus_core.job.listing import list_inputs
from ramplus_core.job.local_read import OUTSIDE, link_roots
from ramplus_core.job.reader import fetch_decode
from ramplus_core.job.storage import Storage
from ramplus_core.preprocess import DecodeLimits

from .conftest import GOLDEN

IMAGE = (GOLDEN / "images" / "rgb_640x480.jpg").read_bytes()
OTHER = (GOLDEN / "images" / "cmyk_400.jpg").read_bytes()  # "private": outside the input folder


def _listed(tmp_path):
    """An input folder with an image, an in-folder link, an image in a subfolder; listed."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (src / name).write_bytes(IMAGE)
    (src / "sub" / "x.jpg").write_bytes(IMAGE)
    os.symlink("a.jpg", src / "link_in.jpg")
    private = tmp_path / "private"
    private.mkdir()
    (private / "x.jpg").write_bytes(OTHER)
    res = list_inputs([str(src)], Storage(), IMAGE_EXTENSIONS, str(tmp_path / "staging"), rows_per_file=100)
    rows = pa.concat_tables([pq.read_table(f) for f in res.files])
    assert rows.num_rows == 6
    return src, private, rows


def _read(rows, inputs, follow_links: bool) -> dict:
    fetch = FetchConfig(retries=3, backoff_s=5.0)  # a retried refusal would take 10 s and more
    t0 = time.monotonic()
    out = fetch_decode(rows, storage=Storage(), fetch=fetch, limits=DecodeLimits(),
                       links_inside=link_roots(inputs, follow_links))
    assert time.monotonic() - t0 < 5, "refusals are final: not retried"
    return {r["uri"].rsplit("/in/", 1)[1]: r for r in out.drop_columns(["pixels", "encoded"]).to_pylist()}


def _swap(src, private):
    (src / "b.jpg").unlink()
    os.symlink(private / "x.jpg", src / "b.jpg")  # a file swapped for a link out
    os.rename(src / "sub", src / "sub.old")
    os.symlink(private, src / "sub")  # a folder on the path swapped for a link out
    (src / "c.jpg").unlink()
    os.mkfifo(src / "c.jpg")  # would block a plain open() forever
    (src / "d.jpg").unlink()
    os.symlink("d.jpg", src / "d.jpg")  # a loop


def test_a_file_swapped_for_a_link_after_listing_is_an_error_row(tmp_path):
    src, private, rows = _listed(tmp_path)
    _swap(src, private)
    got = _read(rows, [str(src)], follow_links=False)
    assert got["a.jpg"]["error"] is None and got["link_in.jpg"]["error"] is None, "links inside are still read"
    assert got["b.jpg"]["stage"] == "fetch" and OUTSIDE in got["b.jpg"]["error"]
    assert "is a symbolic link" in got["b.jpg"]["error"]
    assert got["sub/x.jpg"]["stage"] == "fetch" and OUTSIDE in got["sub/x.jpg"]["error"]
    assert "not a regular file" in got["c.jpg"]["error"]
    assert "symbolic link loop" in got["d.jpg"]["error"]
    # nothing of the private file reached the row: not its size, not its MD5
    for name in ("b.jpg", "sub/x.jpg"):
        assert got[name]["size"] == len(IMAGE) and got[name]["width"] is None


def test_with_follow_links_on_the_link_is_read(tmp_path):
    src, private, rows = _listed(tmp_path)
    _swap(src, private)
    got = _read(rows, [str(src)], follow_links=True)
    assert got["b.jpg"]["error"] is None and got["b.jpg"]["size"] == len(OTHER)
    assert got["sub/x.jpg"]["error"] is None
    assert "not a regular file" in got["c.jpg"]["error"], "a FIFO is never read"


def test_an_input_folder_reached_through_a_link_is_inside(tmp_path):
    """The input folder itself may be a link (a mount point alias); its files are inside."""
    src, _, _ = _listed(tmp_path)
    alias = tmp_path / "alias"
    os.symlink(src, alias)
    res = list_inputs([str(alias)], Storage(), IMAGE_EXTENSIONS, str(tmp_path / "staging2"), rows_per_file=100)
    rows = pa.concat_tables([pq.read_table(f) for f in res.files])
    out = fetch_decode(rows, storage=Storage(), fetch=FetchConfig(), limits=DecodeLimits(),
                       links_inside=link_roots([str(alias)], False))
    assert out.num_rows == 6 and out.column("error").null_count == 6

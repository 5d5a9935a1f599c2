"""The actor-side JPEG decoder (gpu_decode), run on the CPU: the code path a GPU actor runs with nvJPEG.

What must hold on any device: every input gets pixels or one error; what the device decoder
cannot take or fails on goes to the CPU path for that image alone; pixels stay within one
uint8 level of the CPU decode; EXIF orientation and sizes are those of the CPU path.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ramplus_core import gpu_decode
from ramplus_core.gpu_decode import decode_batch, wants
from ramplus_core.job.config import FetchConfig
from ramplus_core.job.reader import fetch_decode
from ramplus_core.job.storage import Storage
from ramplus_core.preprocess import EXACT, DecodeLimits, decode

from test_preprocess import EXIF_ORIENTATION, ODD, big_photo, encode


def _jpeg(w, h, orientation=1, **kw) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(big_photo(w, h), "JPEG", quality=90, exif=exif.tobytes(), **kw)


def test_mixed_batch_on_the_device_path():
    good = _jpeg(1000, 700)
    datas = [good, _jpeg(700, 500, orientation=6), ODD["CMYK"], ODD["RGBA"], good[: len(good) // 2], b"junk",
             ODD["L"], _jpeg(640, 480, progressive=True)]
    r = decode_batch(datas, DecodeLimits(), "cpu")
    assert r.ok.tolist() == [True, True, True, True, False, False, True, True]
    assert "truncated" in r.error[4] and "not an image" in r.error[5]
    assert (r.width[1], r.height[1]) == (500, 700)  # turned as EXIF says
    assert r.on_device == 4 and r.pixels.shape == (6, 384, 384, 3) and r.pixels.dtype == torch.uint8
    k = 0
    for i, d in enumerate(datas):
        if not r.ok[i]:
            continue
        cpu = decode(d, EXACT)
        assert (cpu.width, cpu.height) == (r.width[i], r.height[i])
        assert np.abs(r.pixels[k].numpy().astype(int) - cpu.array.astype(int)).max() <= 1, i
        k += 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientations(orientation):
    data = _jpeg(600, 400, orientation)
    r = decode_batch([data], DecodeLimits(), "cpu")
    assert r.on_device == 1
    assert np.abs(r.pixels[0].numpy().astype(int) - decode(data, EXACT).array.astype(int)).max() <= 1


def test_a_failing_batch_call_retries_each_image_and_falls_back(monkeypatch):
    from torchvision import io as tvio

    real = tvio.decode_jpeg
    calls = []

    def flaky(x, **kw):
        calls.append(type(x).__name__)
        if isinstance(x, list):
            raise RuntimeError("one bad image fails the batched call")
        if len(calls) == 2:  # the first image alone fails too: it goes to the CPU path
            raise RuntimeError("device decoder refused it")
        return real(x, **kw)

    monkeypatch.setattr(tvio, "decode_jpeg", flaky)
    datas = [_jpeg(500, 400), _jpeg(400, 300), _jpeg(300, 200)]
    r = decode_batch(datas, DecodeLimits(), "cpu")
    assert r.ok.all() and r.on_device == 2 and calls[0] == "list"
    assert [(w, h) for w, h in zip(r.width, r.height)] == [(500, 400), (400, 300), (300, 200)]


def test_chunks_bound_device_memory(monkeypatch):
    monkeypatch.setattr(gpu_decode, "CHUNK_PIXELS", 300_000)
    seen = []
    real = gpu_decode._decode_chunk
    monkeypatch.setattr(gpu_decode, "_decode_chunk", lambda d, dev: seen.append(len(d)) or real(d, dev))
    r = decode_batch([_jpeg(500, 400)] * 4, DecodeLimits(), "cpu")
    assert r.ok.all() and seen == [1, 1, 1, 1]


def test_what_the_device_decoder_is_given():
    limits = DecodeLimits(max_pixels=1_000_000)
    assert wants(_jpeg(800, 600), limits) is not None
    assert wants(_jpeg(1200, 900), limits) is None  # over max_pixels: the CPU path words the refusal
    assert wants(ODD["CMYK"], limits) is None and wants(ODD["webp"], limits) is None
    cut = _jpeg(800, 600)
    assert wants(cut[: len(cut) - 4000], limits) is None  # no end marker: Pillow decides (truncated)


def test_reader_passes_jpegs_through_undecoded(tmp_path):
    files = {"a.jpg": _jpeg(900, 600, orientation=6), "b.png": ODD["RGBA"], "c.jpg": ODD["CMYK"], "d.jpg": b"junk"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    batch = pa.table({"uri": [f"file://{tmp_path / n}" for n in files], "size": [len(d) for d in files.values()],
                      "etag": [None] * 4, "mtime": pa.array([None] * 4, pa.timestamp("us", tz="UTC")),
                      "list_error": pa.array([None] * 4, pa.string())})
    rows = fetch_decode(batch, storage=Storage(), fetch=FetchConfig(), limits=DecodeLimits(), defer_jpeg=True)
    got = rows.to_pylist()
    assert [len(r["encoded"]) > 0 for r in got] == [True, False, False, False]
    assert [len(r["pixels"]) > 0 for r in got] == [False, True, True, False]
    assert got[0]["encoded"] == files["a.jpg"] and (got[0]["width"], got[0]["height"]) == (600, 900)
    assert got[3]["stage"] == "decode" and all(r["etag"] for r in got[:3])
    plain = fetch_decode(batch, storage=Storage(), fetch=FetchConfig(), limits=DecodeLimits()).to_pylist()
    assert not any(r["encoded"] for r in plain) and len(plain[0]["pixels"]) == 384 * 384 * 3

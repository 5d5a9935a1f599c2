"""Peak memory of one decode, per format and bit depth, against the budget the docs state.

Each decode runs in a fresh process (freed memory kept by the allocator would hide the next
decode's peak): it imports and warms up the decoder on a small image of the same mode,
resets the kernel's peak-RSS mark (/proc/self/clear_refs), decodes, and reports VmHWM minus
the RSS before the decode. Each peak must be under `preprocess.decode_cost(format, pixels)`,
the cost model that decides what is refused, so that no accepted image goes over
`memory_budget(max_pixels)`. The 16-bit PNG is the case that used to cost 2.5 GB and 22 s
(whole-image float64 arithmetic).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ramplus_core.preprocess import DEFAULT_MAX_PIXELS, decode_cost, memory_budget

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

CHILD = r"""
import json, re, sys, time
from ramplus_core.preprocess import DecodeLimits, decode

def status():
    t = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", t).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}

path, warm, mode = sys.argv[1:4]
limits = DecodeLimits(mode=mode)
decode(open(warm, "rb").read(), limits)  # imports, plugin and library set-up
data = open(path, "rb").read()
open("/proc/self/clear_refs", "w").write("5")
before = status()["VmRSS"]
t = time.perf_counter()
d = decode(data, limits)
s = time.perf_counter() - t
print(json.dumps({"peak": status()["VmHWM"] - before, "seconds": s, "size": [d.width, d.height]}))
"""


def _photo(w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1)
    return np.clip(base + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _corpus() -> dict[str, tuple[bytes, bytes]]:
    """name -> (image bytes, a small image of the same kind for the warm-up)."""
    big, small = Image.fromarray(_photo(4000, 3000)), Image.fromarray(_photo(300, 200))
    mid, mid_small = Image.fromarray(_photo(2400, 1600)), small
    exif = Image.Exif()
    exif[0x0112] = 6
    ramp16 = (np.arange(8000 * 6000, dtype=np.uint32).reshape(6000, 8000) % 65536).astype(np.uint16)
    grey16_small = Image.fromarray((np.arange(300 * 200).reshape(200, 300) * 7 % 65536).astype(np.uint16))
    float_img = Image.fromarray((np.asarray(mid.convert("L"), dtype=np.float32) / 255.0), "F")
    int_img = Image.fromarray(np.asarray(mid.convert("L"), dtype=np.int32) * 200, "I")
    rgba = mid.copy()
    rgba.putalpha(128)

    def pair(fn, **kw):
        return fn(mid, **kw), fn(mid_small, **kw)

    return {
        "jpeg_rgb_12mp": (_save(big, "JPEG", quality=90), _save(small, "JPEG")),
        "jpeg_progressive_12mp": (_save(big, "JPEG", quality=90, progressive=True), _save(small, "JPEG")),
        "jpeg_rotated_12mp": (_save(big, "JPEG", quality=90, exif=exif.tobytes()), _save(small, "JPEG")),
        "jpeg_grey_12mp": (_save(big.convert("L"), "JPEG"), _save(small.convert("L"), "JPEG")),
        "jpeg_cmyk_12mp": (_save(big.convert("CMYK"), "JPEG"), _save(small.convert("CMYK"), "JPEG")),
        "png_rgb": pair(lambda im: _save(im, "PNG", compress_level=1)),
        "png_rgba": (_save(rgba, "PNG", compress_level=1), _save(small.convert("RGBA"), "PNG")),
        "png_palette": pair(lambda im: _save(im.quantize(64), "PNG")),
        "png_grey16_48mp": (_save(Image.fromarray(ramp16), "PNG", compress_level=9), _save(grey16_small, "PNG")),
        "tiff_grey16": (_save(Image.fromarray(ramp16[:1600, :2400]), "TIFF"), _save(grey16_small, "TIFF")),
        "tiff_float32": (_save(float_img, "TIFF"), _save(Image.fromarray(np.ones((20, 30), np.float32), "F"), "TIFF")),
        "tiff_int32": (_save(int_img, "TIFF"), _save(Image.fromarray(np.ones((20, 30), np.int32), "I"), "TIFF")),
        "gif": pair(lambda im: _save(im.quantize(64), "GIF")),
        "webp": pair(lambda im: _save(im, "WEBP", quality=80)),
        "bmp": pair(lambda im: _save(im, "BMP")),
        "png_1bit": pair(lambda im: _save(im.convert("1"), "PNG")),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, Path, int]]:
    folder = tmp_path_factory.mktemp("memory")
    out = {}
    for name, (data, warm) in _corpus().items():
        p, w = folder / name, folder / f"{name}.warm"
        p.write_bytes(data)
        w.write_bytes(warm)
        with Image.open(io.BytesIO(data)) as im:
            out[name] = (p, w, im.size[0] * im.size[1], im.format)
    return out


def _names() -> list[str]:
    return ["jpeg_rgb_12mp", "jpeg_progressive_12mp", "jpeg_rotated_12mp", "jpeg_grey_12mp", "jpeg_cmyk_12mp",
            "png_rgb", "png_rgba", "png_palette", "png_grey16_48mp", "tiff_grey16", "tiff_float32", "tiff_int32",
            "gif", "webp", "bmp", "png_1bit"]


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("name", _names())
def test_peak_memory_of_one_decode_under_budget(corpus, name, mode):
    path, warm, pixels, fmt = corpus[name]
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(warm), mode], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    budget = decode_cost(fmt, pixels)
    print(f"{name:24s} {mode:5s} {pixels / 1e6:5.1f} MP  peak {got['peak'] / 2**20:7.1f} MiB "
          f"({got['peak'] / pixels:4.2f} B/px)  budget {budget / 2**20:7.1f} MiB  {got['seconds']:.2f} s")
    assert got["peak"] <= budget, f"{name} ({mode}): peak {got['peak'] / 2**20:.0f} MiB over {budget / 2**20:.0f}"
    assert got["seconds"] < 20


def test_cost_model_fits_the_budget_at_the_pixel_limit():
    """Every format but WebP fits the budget up to max_pixels; WebP is refused past ~53% of it."""
    assert decode_cost("PNG", DEFAULT_MAX_PIXELS) <= memory_budget(DEFAULT_MAX_PIXELS) < 1.0e9
    assert decode_cost("WEBP", DEFAULT_MAX_PIXELS // 2) <= memory_budget(DEFAULT_MAX_PIXELS)
    assert decode_cost("WEBP", DEFAULT_MAX_PIXELS) > memory_budget(DEFAULT_MAX_PIXELS)

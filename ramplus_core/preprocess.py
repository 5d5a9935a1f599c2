"""Bytes -> the paper's input tensor.

The paper's transform is `convert("RGB")`, a bilinear resize to 384x384 (aspect ratio
not kept), then ImageNet normalisation. Two modes (`DecodeLimits.mode`):

- `exact`: that transform bit for bit for ordinary 8-bit images, so tags equal the paper's.
  The golden tests and evaluation use it.
- `fast` (the default): JPEGs through `jpeg.decode_fast` (libjpeg-turbo DCT scaling while
  the short side stays >= 768, torch's antialiased resize; 2-5x faster per core, within
  ~0.15 uint8 levels on average of `exact`); other formats decode with Pillow as in exact
  mode, reduced by whole factors while >= 768 px and resized with torch.

Both add what a photo library needs on top: EXIF orientation, the first frame of
animations, 16-bit and float images scaled rather than clipped, and limits. The limits
bound memory: bytes and pixels are checked from the header before decoding, only the
formats listed in `FORMATS` are opened (no EPS through Ghostscript, no PSD, no ICO sizes
that differ from the header), high-bit images are converted to 8 bits in strips, and
grey images are resized before their RGB copy, and no image is copied just to be turned,
so one decode's peak memory stays under `memory_budget(max_pixels)`; a format that would
need more and cannot be decoded at reduced size (WebP) is refused for that image
(docs/job.md, "Decode"; tests/test_decode_memory.py).
"""

from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import jpeg
from .errors import ImageError

IMAGE_SIZE = 384
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 100_000_000
MODES = ("fast", "exact")
#: Pillow formats we open; the rest are refused (unbounded or external decoders, sizes that lie)
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF")  # JPEG includes MPO
#: what one decode may add to its process: BUDGET_BYTES_PER_PIXEL x max_pixels + BUDGET_BASE_BYTES
BUDGET_BYTES_PER_PIXEL = 9
BUDGET_BASE_BYTES = 64 * 2**20
#: measured peak bytes per pixel of a decode, with a margin (tests/test_decode_memory.py); Pillow
#: formats hold the frame (4 B/px) and at most one RGB or turned copy; libwebp decodes into its
#: own buffer that Pillow then copies, and cannot decode at reduced size
COST_BYTES_PER_PIXEL = {"WEBP": 17}
_STRIP_PIXELS = 1 << 20  # high-bit conversion works on strips of about this many pixels (8 MB of float64)

ImageInput = Union[bytes, bytearray, memoryview, str, Path, Image.Image]


def memory_budget(max_pixels: int) -> int:
    """The most one decode adds to its process's memory (bytes) under a `max_pixels` limit.

    9 bytes per pixel covers Pillow's 4-byte frame plus one RGB or turned copy of it; at the
    default 100 million pixels that is 0.96 GB. Fast-mode JPEGs need far less: they decode
    at reduced scale (~0.5 byte per pixel of the file's size).
    """
    return BUDGET_BYTES_PER_PIXEL * max_pixels + BUDGET_BASE_BYTES


def decode_cost(fmt: str, pixels: int) -> int:
    """Upper bound of one Pillow decode's peak memory for an image of this format and size."""
    return COST_BYTES_PER_PIXEL.get(fmt, BUDGET_BYTES_PER_PIXEL) * pixels + BUDGET_BASE_BYTES


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: "fast" (default) or "exact" (the paper's pixels); see the module doc
    mode: str = "fast"
    #: exact mode only: let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale (never below
    #: 768 px) before Pillow's resize, as `decode.jpeg_draft` did before fast mode existed
    jpeg_draft: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"decode mode must be one of {', '.join(MODES)}, got {self.mode!r}")


EXACT = DecodeLimits(mode="exact")


@dataclass
class Decoded:
    """An image resized to the model's input, as uint8 HWC, plus its original size."""

    array: np.ndarray  # [384, 384, 3] uint8
    width: int
    height: int


def check_bytes(data, limits: DecodeLimits) -> None:
    if len(data) == 0:
        raise ImageError("empty object (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"object is {len(data)} bytes, over the limit of {limits.max_bytes} (decode.max_bytes)")


def check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{limits.max_pixels} (decode.max_pixels); refused before decoding (decompression bomb guard)")


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def pillow_pixel_limit(max_pixels: int):
    """Let Pillow's process-wide limit allow `max_pixels` for the duration, then restore it.

    Pillow checks `Image.MAX_IMAGE_PIXELS` (errors above twice it) when opening and, for
    TIFF and WebP, when loading, so a `max_pixels` above Pillow's 179 million would be
    overridden. Only for such a `max_pixels` is the setting raised, under a lock held for the
    whole decode (those decodes run one at a time per process), and put back after; a
    smaller `max_pixels` needs nothing: our check from the header refuses first, and Pillow's
    warning between its two thresholds is silenced for the call.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or 2 * limit >= max_pixels:
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    check_bytes(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our max_pixels decides
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(_unknown_format(data)) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is over the limit of {limits.max_pixels} pixels (decode.max_pixels): {e}") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad headers
        raise ImageError(f"unreadable image header: {type(e).__name__}: {e}") from None
    check_pixels(*img.size, limits)
    w, h = img.size
    need, budget = decode_cost(img.format, w * h), memory_budget(limits.max_pixels)
    if need > budget:
        raise ImageError(f"a {w}x{h} {img.format} image needs about {need // 2**20} MiB to decode (this format "
                         f"cannot be decoded at reduced size), over the budget of {budget // 2**20} MiB per decode "
                         f"({BUDGET_BYTES_PER_PIXEL} bytes x decode.max_pixels + {BUDGET_BASE_BYTES // 2**20} MiB)")
    return img


def _unknown_format(data: bytes) -> str:
    """Why we did not open it: a format Pillow knows but we refuse, or no image at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fmt = Image.open(io.BytesIO(data[:65536])).format
    except Exception:  # noqa: BLE001
        fmt = None
    if fmt and fmt not in FORMATS:
        return f"image format {fmt} is not decoded here (supported: JPEG, PNG, GIF, WebP, BMP, TIFF)"
    return "not an image Pillow can read (unknown or unsupported format)"


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float greys -> 8-bit L, scaled not clipped, in strips of rows.

    The whole image as float64 cost 8-25 bytes per pixel (2.2 GB for a 200 KB 16-bit PNG of
    90 MP); strips keep it at the L result plus one strip. Same arithmetic per pixel as before.
    """
    mode = img.mode
    w, h = img.size
    rows = max(1, _STRIP_PIXELS // max(1, w))

    def strips():
        for y in range(0, h, rows):
            yield y, np.asarray(img.crop((0, y, w, min(h, y + rows))), dtype=np.float64)

    if mode == "F":
        lo, hi = np.inf, -np.inf
        for _, a in strips():
            if not np.isnan(a).all():
                lo, hi = min(lo, float(np.nanmin(a))), max(hi, float(np.nanmax(a)))
        top = 1.0 if lo >= 0.0 and hi <= 1.0 else 255.0
    elif mode.startswith("I;16"):
        top = 65535.0
    else:
        top = 65535.0 if img.getextrema()[1] > 255 else 255.0
    out = np.empty((h, w), dtype=np.uint8)
    for y, a in strips():
        if mode == "F":
            a = np.nan_to_num(a)
        out[y:y + a.shape[0]] = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _pillow_resize_to_rgb(img: Image.Image, size: int) -> np.ndarray:
    """The paper's convert("RGB") + bilinear resize; grey is resized before its RGB copy (same pixels)."""
    if img.mode == "L":
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    img = img if img.mode == "RGB" else img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


_REDUCIBLE = ("L", "RGB", "RGBX", "CMYK", "YCbCr", "I", "F")


def _reduce(img: Image.Image, size: int) -> Image.Image:
    """Fast mode, non-JPEG: a whole-factor box reduction while the short side stays >= 768."""
    k = min(img.size) // (jpeg.MIN_SCALED_SIDE * size)
    if k < 2:
        return img
    if img.mode not in _REDUCIBLE:
        # alpha and palette images: drop alpha / expand the palette first, as convert("RGB")
        # does (Pillow's reduce would premultiply alpha and darken what is under transparency)
        img = img.convert("L" if img.mode in ("1", "LA", "La") else "RGB")
    return img.reduce(k)


def _finish(img: Image.Image, orientation: int, limits: DecodeLimits, size: int) -> np.ndarray:
    """An opened frame -> 384x384x3 uint8 in the limits' mode, turned as EXIF `orientation` says."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_to_l(img)
    if limits.mode == "fast":
        img = _orient(_reduce(img, size), orientation)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        arr = np.array(img, dtype=np.uint8)  # a writable copy, which torch can wrap
        return jpeg.resize(np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr, size)
    return _pillow_resize_to_rgb(_orient(img, orientation), size)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    """EXIF (or XMP) orientation as Pillow's exif_transpose reads it; unreadable metadata counts as upright."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - broken metadata must not cost the image
        return 1


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    """exif_transpose's turn, without its full copy of an image that needs no turn."""
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def _oriented_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode(data: bytes, limits: DecodeLimits = DecodeLimits(), size: int = IMAGE_SIZE) -> Decoded:
    """Decode encoded bytes and resize; any failure becomes an ImageError with a reason."""
    if limits.mode == "fast" and jpeg.is_jpeg(data):
        check_bytes(data, limits)
        got = jpeg.decode_fast(data, size, lambda w, h: check_pixels(w, h, limits))
        if got is not None:
            return Decoded(*got)
    with pillow_pixel_limit(limits.max_pixels):
        return _decode_pillow(bytes(data), limits, size)


def _decode_pillow(data: bytes, limits: DecodeLimits, size: int) -> Decoded:
    img = _open(data, limits)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
            check_pixels(*img.size, limits)  # a GIF frame can grow the canvas
        orientation = _orientation(img)
        width, height = _oriented_size(img, orientation)
        if img.format in ("JPEG", "MPO") and (limits.mode == "fast" or limits.jpeg_draft):
            img.draft("RGB", (size * jpeg.MIN_SCALED_SIDE, size * jpeg.MIN_SCALED_SIDE))
        arr = _finish(img, orientation, limits, size)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is over the limit of {limits.max_pixels} pixels (decode.max_pixels) "
                         f"while decoding: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image data: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if arr.shape != (size, size, 3):
        raise ImageError(f"unexpected decoded shape {arr.shape}")
    return Decoded(arr, width, height)


def normalize(batch_uint8):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] with the ImageNet mean/std, in one op."""
    import torch  # here, not at the top: exact-mode decode workers never need torch

    x = torch.as_tensor(batch_uint8)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def read_input(item: ImageInput) -> bytes | Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    path = Path(item)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}", stage="fetch") from None


def decode_any(item: ImageInput, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """Paths, bytes or PIL images to a Decoded; the public `tag` API uses this."""
    raw = read_input(item)
    if isinstance(raw, Image.Image):
        # Same orientation as for bytes: an opened photo and its file must get the same tags.
        orientation = _orientation(raw)
        w, h = _oriented_size(raw, orientation)
        return Decoded(_finish(raw, orientation, limits, IMAGE_SIZE), w, h)
    return decode(raw, limits)

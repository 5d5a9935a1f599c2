"""Bytes -> the paper's input tensor.

The paper's transform is `convert("RGB")`, a bilinear resize to 384x384 (aspect ratio
not kept), then ImageNet normalisation. We keep that exactly for ordinary 8-bit images so
tags equal the paper's, and only add what a photo library needs on top: EXIF orientation,
first frame of animations, 16-bit and float images scaled rather than clipped, and limits
that stop decompression bombs and oversized objects before they cost memory.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_SIZE = 384
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 100_000_000

ImageInput = Union[bytes, bytearray, memoryview, str, Path, Image.Image]


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: JPEG draft mode: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is
    #: still at least twice the target size. Off by default: it changes pixels slightly.
    jpeg_draft: bool = False


@dataclass
class Decoded:
    """An image resized to the model's input, as uint8 HWC, plus its original size."""

    array: np.ndarray  # [384, 384, 3] uint8
    width: int
    height: int


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    if len(data) == 0:
        raise ImageError("empty object (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"object is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our max_pixels decides
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (unknown or unsupported format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb refused: {e}") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad headers
        raise ImageError(f"unreadable image header: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > limits.max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels}")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the paper's `convert("RGB")` gives, except for high-bit-depth modes."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        top = 1.0 if lo >= 0.0 and hi <= 1.0 else 255.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes, limits: DecodeLimits = DecodeLimits(), size: int = IMAGE_SIZE) -> Decoded:
    """Decode encoded bytes and resize; any failure becomes an ImageError with a reason."""
    img = _open(bytes(data), limits)
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        if limits.jpeg_draft and img.format == "JPEG":
            img.draft("RGB", (size * 2, size * 2))
        img = ImageOps.exif_transpose(img)
        width, height = img.size
        img = _to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image data: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if arr.shape != (size, size, 3):
        raise ImageError(f"unexpected decoded shape {arr.shape}")
    return Decoded(arr, width, height)


def normalize(batch_uint8):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] with the ImageNet mean/std, in one op."""
    import torch  # here, not at the top: decode workers never need torch

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
        raw = ImageOps.exif_transpose(raw)
        w, h = raw.size
        img = _to_rgb(raw)
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return Decoded(np.asarray(img, dtype=np.uint8), w, h)
    return decode(raw, limits)

"""The fast JPEG path: a header read of our own, libjpeg-turbo's DCT-scaled decode, torch's resize.

Measured on this kind of machine (benchmarks/decode.py, one thread), most of the paper's
decode time at 12 MP goes to Pillow's full decode, its RGB->RGBX copy and its resize; at
0.3-2 MP to the resize. So the fast path (1) asks libjpeg-turbo (through simplejpeg) to
decode at 1/2, 1/4 or 1/8 scale, but only while the short side stays >= 2 x 384: below
that, the reduced IDCTs differ from full decode + bilinear by up to ~7 uint8 levels and
~0.3 on average, above it by ~2 and ~0.15; non-power-of-two scales (3/8, 7/8, ...) were
slower and differed by up to 24 levels; (2) resizes the uint8 array with torch's
antialiased bilinear, which follows Pillow's filter to within one level and runs its
vectorised uint8 kernel. Anything unusual (CMYK, 12-bit, lossless, a header we cannot
read, a decoder complaint) returns None and Pillow decides, so odd and broken files keep
exactly the error rows and pixels of the Pillow path.

The header reader finds the size, the components and the EXIF orientation (first Exif
APP1, IFD0 tag 0x0112; else XMP's tiff:Orientation, as Pillow's getexif does) without
decoding, which is also what lets the job send JPEG bytes to a GPU actor undecoded.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

#: start-of-frame markers libjpeg-turbo and nvJPEG both decode: baseline, extended, progressive (Huffman)
_SOF_OK = {0xC0: False, 0xC1: False, 0xC2: True}
#: other start-of-frame markers: lossless, hierarchical, arithmetic; Pillow decides those
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
#: the short side a scaled decode keeps, as a multiple of the output size (see the module doc)
MIN_SCALED_SIDE = 2


@dataclass(frozen=True)
class JpegInfo:
    width: int  # as stored, before orientation
    height: int
    components: int
    progressive: bool
    orientation: int  # 1-8, 1 when absent or unreadable

    @property
    def oriented_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def is_jpeg(data) -> bool:
    return bytes(data[:3]) == b"\xff\xd8\xff"


def jpeg_info(data) -> Optional[JpegInfo]:
    """Size, components and orientation of a baseline or progressive 8-bit JPEG; None otherwise."""
    if not is_jpeg(data):
        return None
    data = memoryview(data)
    if data.format != "B":  # e.g. a pyarrow buffer's signed bytes
        data = data.cast("B")
    n = len(data)
    i = 2
    sof = None
    exif = xmp = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: the header is over
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        seg = data[i + 4:i + 2 + length]
        if marker in _SOF_OK:
            if len(seg) < 6 or sof is not None:
                return None
            precision, height, width, comps = seg[0], (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4], seg[5]
            if precision != 8 or width == 0 or height == 0:
                return None
            sof = (width, height, comps, _SOF_OK[marker])
        elif marker in _SOF_OTHER:
            return None
        elif marker == 0xE1:
            if exif is None and bytes(seg[:6]) == b"Exif\x00\x00":
                exif = seg[6:]
            elif xmp is None and bytes(seg[:len(_XMP_PREFIX)]) == _XMP_PREFIX:
                xmp = seg[len(_XMP_PREFIX):]
        i += 2 + length
    if sof is None:
        return None
    orientation = _exif_orientation(exif) if exif is not None else None
    if orientation is None and xmp is not None:
        m = _XMP_ORIENTATION.search(bytes(xmp))
        orientation = int(m[2]) if m else None
    if orientation is None or not 1 <= orientation <= 8:
        orientation = 1  # as Pillow's exif_transpose: anything else leaves the image as stored
    width, height, comps, progressive = sof
    return JpegInfo(width, height, comps, progressive, orientation)


def _exif_orientation(tiff) -> Optional[int]:
    """Tag 0x0112 of IFD0 of the TIFF structure inside an Exif APP1; None when absent or unreadable."""
    tiff = bytes(tiff)
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    e = "<" if tiff[:2] == b"II" else ">"
    try:
        if struct.unpack_from(e + "H", tiff, 2)[0] != 42:
            return None
        ifd = struct.unpack_from(e + "I", tiff, 4)[0]
        count = struct.unpack_from(e + "H", tiff, ifd)[0]
        for k in range(count):
            tag, typ, cnt = struct.unpack_from(e + "HHI", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                if typ == 3 and cnt >= 1:
                    return struct.unpack_from(e + "H", tiff, ifd + 2 + 12 * k + 8)[0]
                return None
    except struct.error:
        return None
    return None


def scale_for(width: int, height: int, size: int) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) that keeps the short side >= MIN_SCALED_SIDE x size."""
    short = min(width, height)
    d = 1
    while d < 8 and short // (d * 2) >= MIN_SCALED_SIDE * size:
        d *= 2
    return d


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """HWC array as stored -> as displayed, as Pillow's exif_transpose turns it (views, no copy)."""
    if orientation in (5, 6, 7, 8):
        arr = arr.transpose(1, 0, 2)
    if orientation in (2, 3, 6, 7):
        arr = arr[:, ::-1]
    if orientation in (3, 4, 7, 8):
        arr = arr[::-1]
    return arr


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC -> uint8 size x size x 3 with torch's antialiased bilinear (Pillow's filter, vectorised)."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return np.ascontiguousarray(arr)
    import torch
    import torch.nn.functional as F

    if not arr.flags.writeable or arr.strides[1] < 0 or arr.strides[0] < 0:
        arr = np.array(arr)  # torch takes neither read-only nor negative-stride arrays
    # NCHW view of HWC memory, built so torch sees channels-last: then its vectorised uint8
    # kernel runs and the result is HWC-contiguous (the other order measured 2-3x slower)
    x = torch.from_numpy(arr).unsqueeze(0).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


def decode_fast(data, size: int, check_pixels) -> Optional[tuple[np.ndarray, int, int]]:
    """(pixels, width, height) as displayed, or None when Pillow should decode this file.

    `check_pixels(width, height)` raises the caller's error for an image over its pixel
    limit, from the header, before anything is decoded.
    """
    info = jpeg_info(data)
    if info is None or info.components not in (1, 3):
        return None
    check_pixels(info.width, info.height)
    d = scale_for(info.width, info.height, size)
    import simplejpeg

    try:
        arr = simplejpeg.decode_jpeg(bytes(data) if not isinstance(data, bytes) else data, colorspace="RGB",
                                     min_height=-(-info.height // d), min_width=-(-info.width // d), min_factor=d)
    except Exception:  # noqa: BLE001 - truncated or odd: Pillow's path decides and words the error
        return None
    if arr.ndim != 3 or arr.shape[2] != 3:
        return None
    width, height = info.oriented_size
    return resize(orient(arr, info.orientation), size), width, height

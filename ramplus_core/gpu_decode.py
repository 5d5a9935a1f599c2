"""JPEG bytes -> model input on the actor's device: nvJPEG in batches on a GPU, one image's fallback on the CPU.

On a GPU node the CPUs, not the GPU, cap the job (benchmarks/decode.py: ~31 CPU cores per
GPU at 1,000 images/s of 12 MP photos even with the fast CPU path). So the decode tasks can pass JPEG bytes
through compressed (`reader.fetch_decode(defer_jpeg=True)`) and the actor decodes a whole
batch with one `torchvision.io.decode_jpeg(list, device="cuda")` call, turns each image as
its EXIF says and resizes it on the device with the antialiased bilinear filter (the full
decode + this filter is within one uint8 level of the paper's transform).

A file is only sent here if our header reader understood it (8-bit baseline or progressive,
1 or 3 components, under max_pixels). Anything that still fails, in the batch call or
alone, or comes back with an unexpected shape, is decoded by `preprocess.decode` on the CPU
for that image alone, so a bad file costs one error row with the CPU path's reason and the
rest of the batch stays on the GPU. The same code runs on device="cpu" (torchvision's
libjpeg decoder), which is how CI tests it.

Images are decoded in chunks of at most `CHUNK_PIXELS` pixels, so device memory for decoding
is bounded (~3 bytes per pixel, plus one float copy of the largest image while it is resized).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import jpeg
from .errors import ImageError
from .preprocess import IMAGE_SIZE, DecodeLimits, decode

CHUNK_PIXELS = 64 * 1024 * 1024
_EOI_WINDOW = 4096  # bytes at the end searched for the end-of-image marker


@dataclass
class DeviceDecoded:
    """One entry per input, in order; `pixels` holds the images that decoded, in input order."""

    pixels: "torch.Tensor"  # noqa: F821 - uint8 [n_ok, size, size, 3] on the device
    ok: np.ndarray  # bool [n]
    width: list
    height: list
    error: list  # reason or None
    on_device: int  # how many were decoded on the device (the rest fell back to the CPU)


def wants(data, limits: DecodeLimits) -> Optional[jpeg.JpegInfo]:
    """The header of a JPEG worth sending to the device decoder, else None (decode it on the CPU).

    A JPEG without its end marker near the end is left to the CPU: Pillow refuses truncated
    files, while a GPU decoder may fill the missing rows with grey and call it a success.
    """
    info = jpeg.jpeg_info(data)
    if info is None or info.components not in (1, 3) or info.width * info.height > limits.max_pixels:
        return None
    if len(data) > limits.max_bytes or b"\xff\xd9" not in bytes(data[-_EOI_WINDOW:]):
        return None
    return info


def decode_batch(datas: list, limits: DecodeLimits, device, size: int = IMAGE_SIZE) -> DeviceDecoded:
    import torch

    device = torch.device(device)
    n = len(datas)
    out: list = [None] * n
    width, height, error = [None] * n, [None] * n, [None] * n
    infos = [wants(d, limits) for d in datas]
    todo = [i for i in range(n) if infos[i] is not None]
    fallback = [i for i in range(n) if infos[i] is None]
    on_device = 0
    for chunk in _chunks(todo, [infos[i].width * infos[i].height for i in todo]):
        got = _decode_chunk([datas[i] for i in chunk], device)
        for i, img in zip(chunk, got):
            info = infos[i]
            if img is None or tuple(img.shape) != (3, info.height, info.width):
                fallback.append(i)
                continue
            out[i] = _resize(_orient(img, info.orientation), size)
            width[i], height[i] = info.oriented_size
            on_device += 1
    for i in sorted(fallback):
        try:
            d = decode(datas[i], limits, size)
        except ImageError as e:
            error[i] = e.reason
            continue
        except Exception as e:  # noqa: BLE001 - a decoder bug must not stop the batch
            error[i] = f"unexpected decoder failure: {type(e).__name__}: {str(e)[:300]}"
            continue
        out[i] = torch.from_numpy(d.array).to(device)
        width[i], height[i] = d.width, d.height
    ok = np.asarray([o is not None for o in out], dtype=bool)
    kept = [o for o in out if o is not None]
    pixels = torch.stack(kept) if kept else torch.empty((0, size, size, 3), dtype=torch.uint8, device=device)
    return DeviceDecoded(pixels, ok, width, height, error, on_device)


def _chunks(idx: list[int], pixels: list[int]):
    chunk, total = [], 0
    for i, p in zip(idx, pixels):
        if chunk and total + p > CHUNK_PIXELS:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += p
    if chunk:
        yield chunk


def _decode_chunk(datas: list, device) -> list:
    """CHW uint8 tensors (None where the device decoder failed); one batched call, then one by one."""
    import warnings

    import torch
    from torchvision import io as tvio

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec on every call; this is what we measured
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            got = tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=device)
            if len(got) == len(tensors):
                return list(got)
        except Exception:  # noqa: BLE001 - one bad file fails the batched call: retry each alone
            pass
        out = []
        for t in tensors:
            try:
                out.append(tvio.decode_jpeg(t, mode=tvio.ImageReadMode.RGB, device=device))
            except Exception:  # noqa: BLE001 - this image goes to the CPU path
                out.append(None)
    return out


def _orient(img, orientation: int):
    """CHW as stored -> as displayed (the same turns as jpeg.orient, on the device)."""
    if orientation in (5, 6, 7, 8):
        img = img.transpose(1, 2)
    dims = []
    if orientation in (2, 3, 6, 7):
        dims.append(2)
    if orientation in (3, 4, 7, 8):
        dims.append(1)
    return img.flip(dims) if dims else img


def _resize(img, size: int):
    """CHW uint8 -> HWC uint8 size x size, antialiased bilinear (float on the device: CUDA has no uint8 kernel)."""
    import torch
    import torch.nn.functional as F

    if img.shape[1] == size and img.shape[2] == size:
        return img.permute(1, 2, 0).contiguous()
    x = img.unsqueeze(0).to(torch.float32)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()

"""What each work row needs before the model: pixels (fetch + decode), cached tokens, or nothing.

A plan row says what the actor needs for it (`need`): `pixels` for new and changed images
(fetch and decode, as before), `tokens` when the projected image tokens of this exact
content are in the token cache (the backbone is skipped), `none` when every tag of the new
vocabulary is copied from the image's committed row (re-thresholding, removing tags). This
Ray Data UDF runs in CPU tasks in front of the actors and produces `LOADED_SCHEMA` rows,
one per plan row, in order. A token file that cannot be read is not an error: the row
falls back to pixels.

The token cache: `_cache/image_tokens/model_id=<id>/<run_id>/<uuid>.npy`, one .npy of
[n, 145, 512] (fp16 by default) per inference batch, written by the actor. The index row of
an image points at (file, row); rows are read with ranged reads of exactly their bytes.
"""

from __future__ import annotations

import io
import uuid
import numpy as np
import pyarrow as pa

from ..preprocess import DecodeLimits
from .config import FetchConfig
from .inference import SCORE_TYPE
from .reader import DECODED_SCHEMA, fetch_decode
from .storage import Storage, join

TOKENS_SHAPE = (145, 512)
CACHE_DIR = "_cache/image_tokens"

LOADED_SCHEMA = pa.schema(list(DECODED_SCHEMA) + [
    ("version", pa.string()),
    ("base_key", pa.string()),
    ("base_scores", pa.list_(SCORE_TYPE)),
    ("tokens", pa.large_binary()),       # [145, 512] in the cache's dtype, empty when not loaded
    ("tokens_dtype", pa.string()),
    ("tokens_file", pa.string()),
    ("tokens_row", pa.int32()),
])
_LISTING_COLUMNS = ["uri", "size", "etag", "mtime", "list_error"]


# -- token files -----------------------------------------------------------------------------------

def token_file_name(model_id: str, run_id: str) -> str:
    return f"{CACHE_DIR}/model_id={model_id}/{run_id}/{uuid.uuid4().hex}.npy"


def write_tokens(storage: Storage, output_uri: str, rel: str, tokens: np.ndarray) -> None:
    from .manifest import put_bytes

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    put_bytes(storage, join(output_uri, rel), buf.getvalue())


def read_token_rows(storage: Storage, output_uri: str, rel: str, rows: list[int]) -> tuple[list[bytes], str]:
    """The raw bytes of some rows of a token file (ranged reads), and the file's dtype name."""
    fs, path = storage.pyarrow(join(output_uri, rel))
    with fs.open_input_file(path) as f:
        head = f.read_at(min(f.size(), 4096), 0)
        bio = io.BytesIO(head)
        version = np.lib.format.read_magic(bio)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(bio)
        if fortran or tuple(shape[1:]) != TOKENS_SHAPE:
            raise ValueError(f"{rel}: unexpected token array {shape}")
        offset = bio.tell()
        per_row = int(np.prod(TOKENS_SHAPE)) * dtype.itemsize
        if len(rows) * 2 >= shape[0]:  # most of the file: one read
            data = f.read_at(per_row * shape[0], offset)
            out = [bytes(data[r * per_row:(r + 1) * per_row]) for r in rows]
        else:
            out = [bytes(f.read_at(per_row, offset + r * per_row)) for r in rows]
    if any(len(x) != per_row for x in out):
        raise ValueError(f"{rel}: truncated token file")
    return out, dtype.name


# -- the UDF ------------------------------------------------------------------------------------------

def load_inputs(batch: pa.Table, *, storage: Storage, fetch: FetchConfig, limits: DecodeLimits,
                output_uri: str, defer_jpeg: bool = False, links_inside=None) -> pa.Table:
    """The Ray Data UDF: plan rows -> LOADED_SCHEMA rows; `defer_jpeg` and `links_inside` as in
    `reader.fetch_decode`."""
    n = batch.num_rows
    names = batch.column_names
    need = batch.column("need").to_pylist() if "need" in names else ["pixels"] * n

    def col(name, typ):
        return batch.column(name) if name in names else pa.nulls(n, typ)

    tokens: list = [b""] * n
    tok_dtype: list = [None] * n
    tok_file = col("tokens_file", pa.string()).to_pylist()
    tok_row = col("tokens_row", pa.int32()).to_pylist()
    by_file: dict[str, list[int]] = {}
    for i, x in enumerate(need):
        if x == "tokens":
            by_file.setdefault(tok_file[i], []).append(i)
    for rel, idx in by_file.items():
        try:
            got, dt = read_token_rows(storage, output_uri, rel, [tok_row[i] for i in idx])
        except Exception:  # noqa: BLE001 - a lost cache file costs a fetch, not a row
            for i in idx:
                need[i] = "pixels"
            continue
        for i, b in zip(idx, got):
            tokens[i], tok_dtype[i] = b, dt

    px = [i for i, x in enumerate(need) if x == "pixels"]
    out = {k: [None] * n for k in ("width", "height", "error", "stage")}
    pixels = encoded = pa.array([b""] * n, pa.large_binary())
    uri, size, etag, mtime = (col(k, t) for k, t in (("uri", pa.string()), ("size", pa.int64()),
                                                      ("etag", pa.string()), ("mtime", pa.timestamp("us", tz="UTC"))))
    size, etag = size.to_pylist(), etag.to_pylist()
    out["width"] = col("width", pa.int32()).to_pylist()
    out["height"] = col("height", pa.int32()).to_pylist()
    if px:
        listing = batch.select([c for c in _LISTING_COLUMNS if c in names]).take(pa.array(px))
        if "list_error" not in listing.column_names:
            listing = listing.append_column("list_error", pa.nulls(len(px), pa.string()))
        decoded = fetch_decode(listing, storage=storage, fetch=fetch, limits=limits, defer_jpeg=defer_jpeg,
                               links_inside=links_inside)
        # the pixels (442 KB a row) and JPEG bytes stay in Arrow: one gather, no Python bytes per image
        src = np.full(n, len(px), dtype=np.int64)
        src[px] = np.arange(len(px))
        src = pa.array(src)
        empty = pa.array([b""], pa.large_binary())
        pixels = pa.concat_arrays([decoded.column("pixels").combine_chunks(), empty]).take(src)
        encoded = pa.concat_arrays([decoded.column("encoded").combine_chunks(), empty]).take(src)
        dec = decoded.drop_columns(["pixels", "encoded"]).to_pydict()
        for j, i in enumerate(px):
            size[i], etag[i] = dec["size"][j], dec["etag"][j]
            for k in ("width", "height", "error", "stage"):
                out[k][i] = dec[k][j]
            tok_file[i], tok_row[i] = None, None  # new tokens, if any, come from this run
    return pa.table({
        "uri": uri, "size": pa.array(size, pa.int64()), "etag": pa.array(etag, pa.string()), "mtime": mtime,
        "width": pa.array(out["width"], pa.int32()), "height": pa.array(out["height"], pa.int32()),
        "pixels": pixels,
        "error": pa.array(out["error"], pa.string()), "stage": pa.array(out["stage"], pa.string()),
        "encoded": encoded,
        "version": col("version", pa.string()), "base_key": col("base_key", pa.string()),
        "base_scores": col("base_scores", pa.list_(SCORE_TYPE)),
        "tokens": pa.array(tokens, pa.large_binary()), "tokens_dtype": pa.array(tok_dtype, pa.string()),
        "tokens_file": pa.array(tok_file, pa.string()), "tokens_row": pa.array(tok_row, pa.int32()),
    }, schema=LOADED_SCHEMA)

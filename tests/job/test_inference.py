"""The inference actor's logic, constructed directly (Ray is covered by the end-to-end tests)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from ramplus_core import RamPlus
from ramplus_core.job.inference import INFERRED_SCHEMA, Tagger, to_model_input
from ramplus_core.job.reader import DECODED_SCHEMA
from ramplus_core.preprocess import DecodeLimits, decode, normalize

from .conftest import CHECKPOINT, GOLDEN


@pytest.fixture(scope="module")
def tagger():
    model = RamPlus.from_checkpoint(str(CHECKPOINT), device="cpu")
    prepared = model.prepare_vocabulary()
    v = model.vocabulary
    t = Tagger(checkpoint=str(CHECKPOINT), storage=None, vocab_ref=prepared.to_numpy(), names=v.names,
               thresholds=np.linspace(0.3, 0.7, len(v.names)).astype(np.float32), model_id=model.model_id,
               vocab_id="v", device="cpu", dtype="fp32", torch_threads=None, chunk_size=7, score_floor=0.45)
    return t, model


def test_model_input_is_normalize_bit_for_bit():
    px = np.random.default_rng(0).integers(0, 256, (3, 384, 384, 3), dtype=np.uint8)
    ro = px.copy()
    ro.flags.writeable = False
    assert torch.equal(to_model_input(px, torch.device("cpu")), normalize(px))
    assert torch.equal(to_model_input(ro, torch.device("cpu")), normalize(px))


def test_batch_rows(tagger):
    t, model = tagger
    images = sorted((GOLDEN / "images").iterdir())[:3]
    decoded = [decode(p.read_bytes()) for p in images]
    rows = {
        "uri": ["a", "b", "c", "d"], "size": [1, 2, 3, 4], "etag": ["e"] * 4, "mtime": [None] * 4,
        "width": [decoded[0].width, None, decoded[1].width, decoded[2].width],
        "height": [decoded[0].height, None, decoded[1].height, decoded[2].height],
        "pixels": [decoded[0].array.tobytes(), b"", decoded[1].array.tobytes(), decoded[2].array.tobytes()],
        "error": [None, "empty object (0 bytes)", None, None], "stage": [None, "decode", None, None],
        "encoded": [b""] * 4,
    }
    out = t(pa.table(rows, schema=DECODED_SCHEMA))
    assert out.schema == INFERRED_SCHEMA
    got = out.to_pylist()
    assert got[1]["tags"] is None and got[1]["scores"] is None and got[1]["stage"] == "decode"
    probs = torch.sigmoid(model.logits(normalize(np.stack([d.array for d in decoded])))).numpy()
    thr = t.model.vocabulary.thresholds
    for row, p in zip([got[0], got[2], got[3]], probs):
        want = [i for i in np.argsort(-p, kind="stable") if p[i] >= 0.45 or p[i] > thr[i]]
        assert [s["tag"] for s in row["scores"]] == [t.names[i] for i in want]
        assert np.allclose([s["score"] for s in row["scores"]], p[want], atol=1e-6)
        assert row["tags"] == [t.names[i] for i in want if p[i] > thr[i]]
    assert t.prepare_calls == 0


def test_a_failing_image_costs_one_row(tagger, monkeypatch):
    t, _ = tagger
    real = t._tokens

    def flaky(pixels):  # the backbone fails on any batch holding an all-black image
        if (pixels.reshape(len(pixels), -1).max(axis=1) == 0).any():
            raise RuntimeError("synthetic model failure")
        return real(pixels)

    monkeypatch.setattr(t, "_tokens", flaky)
    good = decode((GOLDEN / "images" / "rgb_640x480.jpg").read_bytes()).array
    rows = {"uri": ["ok", "black"], "size": [1, 1], "etag": [None, None], "mtime": [None, None],
            "width": [640, 10], "height": [480, 10],
            "pixels": [good.tobytes(), np.zeros_like(good).tobytes()], "error": [None, None], "stage": [None, None],
            "encoded": [b"", b""]}
    got = t(pa.table(rows, schema=DECODED_SCHEMA)).to_pylist()
    assert got[0]["error"] is None and got[0]["scores"]
    assert got[1]["stage"] == "infer" and "synthetic model failure" in got[1]["error"] and got[1]["tags"] is None


def _tagger(decode_limits=None):
    model = RamPlus.from_checkpoint(str(CHECKPOINT), device="cpu")
    v = model.vocabulary
    t = Tagger(checkpoint=str(CHECKPOINT), storage=None, vocab_ref=model.prepare_vocabulary().to_numpy(),
               names=v.names, thresholds=np.full(len(v.names), 0.5, np.float32), model_id=model.model_id,
               vocab_id="v", device="cpu", dtype="fp32", torch_threads=None, chunk_size=7, score_floor=0.0,
               decode_limits=decode_limits)
    return t, model


def test_jpeg_bytes_decoded_in_the_actor():
    """Rows with JPEG bytes (decode.device gpu/auto) next to decoded rows, errors and a bad JPEG, in one batch.

    The device decoder runs here on the CPU (torchvision's libjpeg), the code path a GPU
    actor runs with nvJPEG. A PNG sent as `encoded` falls back to the CPU decode; a JPEG
    that fails everywhere is one error row of stage decode.
    """
    t, model = _tagger(DecodeLimits())
    images = {p.name: p.read_bytes() for p in sorted((GOLDEN / "images").iterdir())}
    jpg, gray, png = images["rgb_640x480.jpg"], images["gray_500x300.jpg"], images["rgba_256.png"]
    pre = decode(images["cmyk_400.jpg"])
    rows = {
        "uri": list("abcdef"), "size": [1] * 6, "etag": ["e"] * 6, "mtime": [None] * 6,
        "width": [None, pre.width, None, None, None, None], "height": [None, pre.height, None, None, None, None],
        "pixels": [b"", pre.array.tobytes(), b"", b"", b"", b""],
        "error": [None, None, "empty object (0 bytes)", None, None, None],
        "stage": [None, None, "decode", None, None, None],
        "encoded": [jpg, b"", b"", jpg[:2000], png, gray],
    }
    got = t(pa.table(rows, schema=DECODED_SCHEMA)).to_pylist()
    assert [r["error"] is None for r in got] == [True, True, False, False, True, True]
    assert got[3]["stage"] == "decode" and "truncated" in got[3]["error"]
    assert [(r["width"], r["height"]) for r in got] == [(640, 480), (400, 400), (None, None), (None, None),
                                                        (256, 256), (500, 300)]
    assert t.work["actor_decoded_jpegs"] == 2  # the two whole JPEGs; the PNG and the cut JPEG went to the CPU path
    # scores as the model gives them for the CPU fast decode of the same bytes (within one uint8 level)
    px = np.stack([decode(b).array for b in (jpg, images["cmyk_400.jpg"], png, gray)])
    probs = torch.sigmoid(model.logits(normalize(px))).numpy()
    for row, p in zip([got[0], got[1], got[4], got[5]], probs):
        score = {s["tag"]: s["score"] for s in row["scores"]}
        assert np.allclose([score[n] for n in t.names], p, atol=2e-3)


def test_a_batch_of_jpeg_bytes_only():
    t, model = _tagger(DecodeLimits())
    jpg = (GOLDEN / "images" / "rgb_640x480.jpg").read_bytes()
    rows = {"uri": ["a", "b"], "size": [1, 1], "etag": ["e", "e"], "mtime": [None, None], "width": [None, None],
            "height": [None, None], "pixels": [b"", b""], "error": [None, None], "stage": [None, None],
            "encoded": [jpg, jpg]}
    got = t(pa.table(rows, schema=DECODED_SCHEMA)).to_pylist()
    assert [r["error"] for r in got] == [None, None] and got[0]["tags"] == got[1]["tags"]
    assert [s["score"] for s in got[0]["scores"]] == pytest.approx([s["score"] for s in got[1]["scores"]], abs=1e-6)
    assert (got[0]["width"], got[0]["height"]) == (640, 480)


def test_jpeg_bytes_without_decode_limits_are_an_internal_error():
    t, _ = _tagger(None)
    jpg = (GOLDEN / "images" / "rgb_640x480.jpg").read_bytes()
    rows = {"uri": ["a"], "size": [1], "etag": ["e"], "mtime": [None], "width": [None], "height": [None],
            "pixels": [b""], "error": [None], "stage": [None], "encoded": [jpg]}
    got = t(pa.table(rows, schema=DECODED_SCHEMA)).to_pylist()
    assert got[0]["stage"] == "infer" and "does not decode" in got[0]["error"]


def test_load_inputs_then_actor_with_jpegs_deferred(tmp_path):
    """The decode task's UDF and the actor chained as the job chains them, JPEGs deferred or not.

    Deferred, a JPEG crosses as its bytes and the actor decodes it; the tags equal those of
    the CPU path and the scores stay within what one uint8 level moves.
    """
    from ramplus_core.job.config import DecodeConfig, FetchConfig
    from ramplus_core.job.storage import Storage
    from ramplus_core.job.work import LOADED_SCHEMA, load_inputs

    names = sorted(p.name for p in (GOLDEN / "images").iterdir()) + ["broken.jpg"]
    for n in names[:-1]:
        (tmp_path / n).write_bytes((GOLDEN / "images" / n).read_bytes())
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    plan = pa.table({"uri": [f"file://{tmp_path / n}" for n in names], "size": [None] * len(names),
                     "etag": [None] * len(names), "mtime": pa.array([None] * len(names), pa.timestamp("us", tz="UTC")),
                     "list_error": pa.array([None] * len(names), pa.string())})
    limits = DecodeConfig(device="gpu").limits()
    out = {}
    for defer in (False, True):
        loaded = load_inputs(plan, storage=Storage(), fetch=FetchConfig(), limits=limits, output_uri=str(tmp_path),
                             defer_jpeg=defer)
        assert loaded.schema == LOADED_SCHEMA
        encoded = [len(x) > 0 for x in loaded.column("encoded").to_pylist()]
        assert sum(encoded) == (2 if defer else 0)  # the RGB and grey JPEGs; CMYK, PNG, GIF, junk: CPU
        t, _ = _tagger(limits if defer else None)
        out[defer] = t(loaded).to_pylist()
    for a, b in zip(out[False], out[True]):
        assert (a["uri"], a["width"], a["height"], a["error"], a["stage"]) == \
               (b["uri"], b["width"], b["height"], b["error"], b["stage"])
        if a["error"] is None:
            assert a["tags"] == b["tags"]
            sa, sb = ({s["tag"]: s["score"] for s in r["scores"]} for r in (a, b))
            assert max(abs(sa[k] - sb[k]) for k in sa) < 2e-3
    assert out[True][-1]["stage"] == "decode" and out[True][-1]["error"] == out[False][-1]["error"]

"""The inference actor's logic, constructed directly (Ray is covered by the end-to-end tests)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from ramplus_core import RamPlus
from ramplus_core.job.inference import INFERRED_SCHEMA, Tagger, to_model_input
from ramplus_core.job.reader import DECODED_SCHEMA
from ramplus_core.preprocess import decode, normalize

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
            "pixels": [good.tobytes(), np.zeros_like(good).tobytes()], "error": [None, None], "stage": [None, None]}
    got = t(pa.table(rows, schema=DECODED_SCHEMA)).to_pylist()
    assert got[0]["error"] is None and got[0]["scores"]
    assert got[1]["stage"] == "infer" and "synthetic model failure" in got[1]["error"] and got[1]["tags"] is None

"""Vocabulary memory follows the total number of descriptions, and past a stated limit it is refused.

A vocabulary used to be padded to (tags x the longest description list) before anything
else: one tag with 50,000 descriptions next to 20,000 one-description tags asked for 2 TB.
It is now one flat matrix of description rows with per-tag offsets, and the head computes
each tag's softmax over its own rows; these tests hold that to the padded computation of the
paper (masked softmax over padded slots, then wordvec_proj of the weighted mean).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from ramplus_core import vocabulary as limits
from ramplus_core.errors import VocabularyError
from ramplus_core.head import CHUNK_ROWS_PER_TAG, HeadConfig, PreparedVocabulary, TaggingHead
from ramplus_core.vocab_file import check_file, load_vocabulary
from ramplus_core.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def unit(n: int, seed: int, dim: int = 512) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def ragged(counts, seed=0) -> Vocabulary:
    counts = torch.as_tensor(counts, dtype=torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    c = len(counts)
    return Vocabulary([f"t{i}" for i in range(c)], np.full(c, 0.5, np.float32), [None] * c,
                      unit(int(offsets[-1]), seed), offsets)


def padded_reference(head: TaggingHead, tokens: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    """The paper's computation on a padded [C, D_max] layout with a mask, written out here."""
    c, d = len(vocab), vocab.max_descriptions
    emb = torch.zeros(c, d, vocab.embeds.shape[1])
    mask = torch.zeros(c, d, dtype=torch.bool)
    for i in range(c):
        k = int(vocab.counts[i])
        emb[i, :k], mask[i, :k] = vocab.descriptions(i), True
    g = F.normalize(tokens[:, 0], dim=-1)
    sim = torch.einsum("nw,cdw->ncd", head.reweight_scale.exp() * g, emb).masked_fill(~mask, float("-inf"))
    q = torch.einsum("ncd,cdw->ncw", sim.softmax(-1), emb)  # the weighted mean description
    h = F.relu(head.wordvec_proj(q))
    kvs = [layer.image_kv(tokens) for layer in head.layers]
    for layer, kv in zip(head.layers, kvs):
        h = layer(h, kv)
    return head.fc(h).squeeze(-1)


@pytest.fixture(scope="module")
def head() -> TaggingHead:
    torch.manual_seed(0)
    return TaggingHead(HeadConfig(hidden_size=64, num_heads=4, intermediate_size=128)).eval()


@pytest.mark.parametrize("chunk_size", [0, 1, 3, 7, 1000])
def test_flat_layout_equals_the_padded_computation(head, chunk_size):
    gen = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 10, (40,), generator=gen)
    counts[5], counts[17] = 300, 1  # one long list among short ones, tags not sorted by count
    vocab = ragged(counts, seed=2)
    tokens = torch.randn(3, 145, 512, generator=gen)
    with torch.no_grad():
        want = padded_reference(head, tokens, vocab)
        prepared = head.prepare(vocab.embeds, vocab.offsets)
        got = head(tokens, prepared, chunk_size)
        shared = head(tokens, PreparedVocabulary.from_numpy(prepared.to_numpy()), chunk_size)
        picked = head(tokens, prepared.select([17, 5, 0, 39]), chunk_size)
    assert (got - want).abs().max().item() <= TOL
    assert torch.equal(shared, got)
    assert (picked - want[:, [17, 5, 0, 39]]).abs().max().item() <= TOL
    # no padding: one block per distinct count, every description stored once
    assert sorted(b.shape[1] for b in prepared.blocks) == sorted(set(counts.tolist()))
    assert prepared.embeds.shape[0] == prepared.projected.shape[0] == int(counts.sum())


def test_chunks_hold_their_tag_and_description_bounds():
    vocab = ragged([1] * 100 + [1000] + [70] * 5, seed=3)
    prepared = PreparedVocabulary.from_numpy({"embeds": vocab.embeds.numpy(), "projected": vocab.embeds.numpy(),
                                              "index": np.arange(len(vocab)), "shapes": np.array([[100, 1], [5, 70], [1, 1000]])})
    seen = []
    for index, pieces in prepared.chunks(4):
        tags, rows = sum(p.shape[0] for p in pieces), sum(p.shape[0] * p.shape[1] for p in pieces)
        assert tags == len(index) <= 4
        assert rows <= 4 * CHUNK_ROWS_PER_TAG or tags == 1  # only a tag alone may be longer
        seen.extend(index.tolist())
    assert sorted(seen) == list(range(len(vocab)))


def test_content_id_is_the_padded_layouts_hash():
    """Ids of the padded layout (names, thresholds, [C, D] mask, [C, D, 512] zero-padded rows)
    carry over, so tables written before this layout keep their vocab_id."""
    vocab = ragged([3, 1, 5, 5, 2], seed=4)
    c, d = len(vocab), vocab.max_descriptions
    emb, mask = torch.zeros(c, d, 512), torch.zeros(c, d, dtype=torch.bool)
    for i in range(c):
        k = int(vocab.counts[i])
        emb[i, :k], mask[i, :k] = vocab.descriptions(i), True
    h = hashlib.sha256()
    for name in vocab.names:
        h.update(name.encode() + b"\0")
    h.update(vocab.thresholds.tobytes())
    h.update(mask.numpy().tobytes())
    h.update(emb.numpy().tobytes())
    assert vocab.content_id() == h.hexdigest()[:16]


def test_content_id_of_a_vocabulary_too_large_to_pad(monkeypatch):
    vocab = ragged([3, 1, 5], seed=5)
    legacy = vocab.content_id()
    monkeypatch.setattr(limits, "LEGACY_ID_BYTES", 0)
    flat = vocab.content_id()
    assert flat != legacy and flat == ragged([3, 1, 5], seed=5).content_id()
    assert flat != ragged([3, 1, 5], seed=6).content_id()
    assert flat != ragged([3, 2, 4], seed=5).content_id()  # same rows, cut into tags differently


def test_subset_and_from_padded():
    vocab = ragged([2, 4, 1], seed=7)
    sub = vocab.subset([2, 0])
    assert sub.names == ["t2", "t0"] and sub.counts.tolist() == [1, 2]
    assert torch.equal(sub.descriptions(0), vocab.descriptions(2)) and torch.equal(sub.descriptions(1), vocab.descriptions(0))
    emb = torch.randn(2, 3, 512)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    v = Vocabulary.from_padded(["a", "b"], [0.5, 0.5], [None, None], emb, mask)
    assert v.counts.tolist() == [2, 1] and torch.equal(v.embeds, emb[mask])


# -- the limit -------------------------------------------------------------------------------------

def builtin_stub(n: int = 2) -> Vocabulary:
    return Vocabulary.from_label_embed(unit(n, 8), 1)


def test_an_npy_over_the_limit_is_refused_from_its_header(tmp_path):
    """A header that claims 2,000,000 rows with no body behind it: refused before any read
    or allocation of the rows, with the tag, the file and the limit in one sentence."""
    path = tmp_path / "huge.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2_000_000, 512)})
    doc = tmp_path / "vocab.yaml"
    doc.write_text(yaml.safe_dump({"builtin": "none", "tags": [{"name": "huge", "embeddings": "huge.npy"}]}))
    for call in (lambda: check_file(str(doc)), lambda: load_vocabulary(str(doc), builtin_stub())):
        with pytest.raises(VocabularyError) as e:
            call()
        msg = str(e.value)
        assert "tag 'huge'" in msg and "huge.npy" in msg and "2,000,000" in msg and "1,000,000" in msg, msg
        assert "\n" not in msg and len(msg) < 400


def test_a_vocabulary_over_the_limit_is_refused_before_encoding(tmp_path, monkeypatch):
    """Three tags of 50 sentences against a limit of 100: refused naming the file and the
    largest tag, before any text tower is needed (none is given)."""
    monkeypatch.setattr(limits, "MAX_DESCRIPTIONS", 100)
    tags = [{"name": f"tag {i}", "descriptions": [f"sentence {j}." for j in range(40 + 5 * i)]} for i in range(3)]
    doc = tmp_path / "vocab.yaml"
    doc.write_text(yaml.safe_dump({"builtin": "none", "tags": tags}))
    with pytest.raises(VocabularyError, match=r"vocab.yaml has 135 descriptions in all; its largest tag, 'tag 2', "
                                              r"has 50; the limit is 100 descriptions per vocabulary"):
        load_vocabulary(str(doc), builtin_stub())
    # the built-in tags kept count too
    doc.write_text(yaml.safe_dump({"builtin": "all", "tags": tags[:1]}))
    with pytest.raises(VocabularyError, match="the limit is 100"):
        load_vocabulary(str(doc), Vocabulary.from_label_embed(unit(45 * 2, 9), 2))
    with pytest.raises(VocabularyError, match="the vocabulary has 101 descriptions"):
        ragged([1] * 101)


# -- peak memory -------------------------------------------------------------------------------------

CHILD = r"""
import json, re, sys
import numpy as np, torch
from ramplus_core.head import HeadConfig, TaggingHead
from ramplus_core.vocab_file import load_vocabulary
from ramplus_core.vocabulary import Vocabulary

def status():
    t = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", t).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}

uri, singles = sys.argv[1], int(sys.argv[2])
builtin = Vocabulary.from_label_embed(torch.nn.functional.normalize(torch.randn(singles, 512), dim=-1), 1)
head = TaggingHead(HeadConfig(hidden_size=64, num_heads=4, intermediate_size=128)).eval()
open("/proc/self/clear_refs", "w").write("5")
before = status()["VmRSS"]
vocab = load_vocabulary(uri, builtin).vocabulary
prepared = head.prepare(vocab.embeds, vocab.offsets)
arrays = prepared.to_numpy()
ident = vocab.content_id()
tokens = torch.randn(2, 145, 512)
with torch.no_grad():
    logits = head(tokens, prepared, 256)
print(json.dumps({"peak": status()["VmHWM"] - before, "tags": len(vocab), "rows": int(vocab.embeds.shape[0]),
                  "max": vocab.max_descriptions, "finite": bool(torch.isfinite(logits).all()),
                  "array_bytes": int(sum(a.nbytes for a in arrays.values()))}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_one_very_long_description_list_costs_its_own_rows(tmp_path):
    """20,000 built-in one-description tags and a file tag with 50,000 descriptions: padded,
    20,001 x 50,000 x 512 floats (2 TB); flat, 70,000 rows (143 MB), and the peak of loading,
    projecting, sharing, hashing and scoring it stays a small multiple of that."""
    singles, long = 20_000, 50_000
    rows = np.random.default_rng(0).standard_normal((long, 512)).astype(np.float32)
    np.save(tmp_path / "long.npy", rows / np.linalg.norm(rows, axis=1, keepdims=True))
    del rows
    doc = tmp_path / "vocab.yaml"
    doc.write_text(yaml.safe_dump({"builtin": "all", "tags": [{"name": "long", "embeddings": "long.npy"}]}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", CHILD, str(doc), str(singles)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    flat = (singles + long) * 512 * 4
    assert out["tags"] == singles + 1 and out["rows"] == singles + long and out["max"] == long and out["finite"]
    # measured 1.8x flat (the file read once, the merged rows, the 64-wide projection)
    assert out["peak"] <= 3 * flat, f"peak {out['peak'] / 2**20:.0f} MiB for {flat / 2**20:.0f} MiB of rows"

"""Open-set vocabularies: file parsing, the text tower, the embedding cache, mixed counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from clip_tower import build_clip_folder
from ramplus_core.embedding_cache import EmbeddingCache
from ramplus_core.errors import VocabularyError
from ramplus_core.text_tower import TextTower
from ramplus_core.vocab_file import TEMPLATES, load_vocabulary
from ramplus_core.vocabulary import Vocabulary

RARE = __import__("pathlib").Path(__file__).parents[1] / "ramplus_core" / "data" / "openimages_rare_200_llm_tag_descriptions.json"
TOL = 2e-5


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def tower(clip_dir):
    return TextTower(clip_dir, device="cpu")


@pytest.fixture(scope="module")
def tokens(tiny_model, golden):
    return tiny_model.image_tokens(golden.pixels())


def write_vocab(tmp_path, doc, name="vocab.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return str(p)


def logits_for(model, tokens, vocab: Vocabulary) -> torch.Tensor:
    return model.logits_from_tokens(tokens, model.prepare_vocabulary(vocab))


def single(vocab: Vocabulary, i: int) -> Vocabulary:
    return vocab.subset([i])


def test_openimages_rare_200_load_and_each_tag_equals_alone(tmp_path, tiny_model, tokens, tower):
    uri = write_vocab(tmp_path, {"builtin": "none", "import": [str(RARE)]})
    build = load_vocabulary(uri, tiny_model.vocabulary, tower=tower)
    v = build.vocabulary
    assert len(v) == 200 and build.num_new == 200 and build.texts_encoded == 200 * 51
    assert v.embeds.shape == (200 * 51, 512) and v.counts.tolist() == [51] * 200
    assert np.allclose(v.thresholds, 0.5)
    together = logits_for(tiny_model, tokens, v)
    assert together.shape == (6, 200) and torch.isfinite(together).all()
    for i in (0, 57, 199):
        alone = logits_for(tiny_model, tokens, single(v, i))
        assert (together[:, i] - alone[:, 0]).abs().max().item() <= TOL, v.names[i]


def test_mixed_description_counts_each_equal_alone(tmp_path, tiny_model, tokens, tower):
    rng = np.random.default_rng(0)
    emb200 = rng.standard_normal((200, 512)).astype(np.float32)
    emb200 /= np.linalg.norm(emb200, axis=1, keepdims=True)
    np.save(tmp_path / "many.npy", emb200)
    doc = {"builtin": ["tag_003", "tag_010"], "tags": [
        {"name": "one sentence", "descriptions": ["a photo of a red kite."]},
        {"name": "many", "embeddings": "many.npy", "threshold": 0.7},
        {"name": "name only"},
    ]}
    v = load_vocabulary(write_vocab(tmp_path, doc), tiny_model.vocabulary, tower=tower).vocabulary
    assert v.names == ["tag_003", "tag_010", "one sentence", "many", "name only"]
    assert v.counts.tolist() == [51, 51, 1, 200, 1]
    assert v.embeds.shape == (51 + 51 + 1 + 200 + 1, 512)  # flat: no tag padded to 200
    assert v.thresholds[3] == pytest.approx(0.7) and v.thresholds[2] == pytest.approx(0.5)
    together = logits_for(tiny_model, tokens, v)
    for i in range(len(v)):
        alone = logits_for(tiny_model, tokens, single(v, i))
        assert (together[:, i] - alone[:, 0]).abs().max().item() <= TOL, v.names[i]
    builtin = tiny_model.logits_from_tokens(tokens)
    assert (together[:, 0] - builtin[:, 3]).abs().max().item() <= TOL
    # name only: the mean of the template embeddings, normalised
    t = tower.encode([s.format("name only") for s in TEMPLATES]).mean(0)
    assert np.allclose(v.descriptions(4)[0].numpy(), t / np.linalg.norm(t), atol=1e-6)


def test_batching_by_length_changes_no_embedding(clip_dir):
    """Texts are batched in order of token count; each still gets what it gets alone."""
    tower = TextTower(clip_dir, device="cpu", batch_size=3)
    texts = ["a photo of a cat.", "the quick brown fox jumps over the lazy dog by the river", "x", "",
             "photo " * 60, "an image of the", "a"]
    by_length = tower.encode(texts)
    alone = np.stack([tower.encode([t])[0] for t in texts])
    assert np.abs(by_length - alone).max() < 1e-6
    assert np.abs(by_length - tower.encode(texts, by_length=False)).max() < 1e-6
    assert np.allclose(np.linalg.norm(by_length, axis=1), 1.0, atol=1e-6)
    assert tower.encode([]).shape == (0, tower.dim)


def test_cache_encodes_only_new_sentences(tmp_path, tiny_model, tower):
    doc = {"builtin": "all", "tags": [{"name": f"new {i}", "descriptions": [f"a photo of thing {i}.", f"thing {i} up close."]}
                                      for i in range(3)], "cache": str(tmp_path / "cache")}
    uri = write_vocab(tmp_path, doc)
    first = load_vocabulary(uri, tiny_model.vocabulary, tower=tower)
    assert first.texts_encoded == 6 and first.cache_hit_rate == 0.0
    again = load_vocabulary(uri, tiny_model.vocabulary, tower=tower)
    assert again.texts_encoded == 0 and again.cache_hit_rate == 1.0
    assert torch.equal(again.vocabulary.embeds, first.vocabulary.embeds)
    assert again.vocabulary.content_id() == first.vocabulary.content_id()
    doc["tags"].append({"name": "new 3", "descriptions": ["a photo of thing 3."]})
    grown = load_vocabulary(write_vocab(tmp_path, doc), tiny_model.vocabulary, tower=tower)
    assert grown.texts_encoded == 1 and len(grown.vocabulary) == 24 + 4
    assert grown.vocabulary.content_id() != first.vocabulary.content_id()


def test_cache_is_keyed_by_tower(tmp_path, tower):
    a = EmbeddingCache(str(tmp_path), "tower-a")
    a.get_or_encode(["x"], lambda t: np.ones((len(t), 4), np.float32))
    b = EmbeddingCache(str(tmp_path), "tower-b")
    out = b.get_or_encode(["x"], lambda t: np.zeros((len(t), 4), np.float32))
    assert b.misses == 1 and out.sum() == 0


def test_text_encoder_from_the_file_and_thresholds_change_the_id(tmp_path, tiny_model, clip_dir):
    doc = {"builtin": "none", "text_encoder": clip_dir, "tags": [{"name": "kite", "zh": "风筝"}]}
    one = load_vocabulary(write_vocab(tmp_path, doc), tiny_model.vocabulary)
    assert one.vocabulary.zh == ["风筝"] and one.tower_id
    doc["tags"][0]["threshold"] = 0.8
    two = load_vocabulary(write_vocab(tmp_path, doc), tiny_model.vocabulary)
    assert one.vocabulary.content_id() != two.vocabulary.content_id()


@pytest.mark.parametrize("doc,needle", [
    ({"builtin": "all", "tags": [{"name": "tag_001"}]}, "'tag_001' is defined twice"),
    ({"builtin": "none", "tags": [{"name": "a"}, {"name": "a"}]}, "'a' is defined twice"),
    ({"builtin": "none", "tags": [{"name": "  "}]}, "empty name"),
    ({"builtin": "none", "tags": [{"name": "x", "colour": 1}]}, "tag 'x': unknown key 'tags[0].colour'"),
    ({"builtin": "none", "bogus": 1}, "unknown key 'bogus'"),
    ({"builtin": ["tag_001", "nope"]}, "not built in: ['nope']"),
    ({"builtin": "none", "tags": [{"name": "x", "threshold": 1.5}]}, "threshold"),
    ({"builtin": "none", "tags": [{"name": "needs text"}]}, "'needs text' needs text encoding"),
])
def test_bad_vocabulary_files_name_the_problem(tmp_path, tiny_model, doc, needle):
    with pytest.raises(VocabularyError) as e:
        load_vocabulary(write_vocab(tmp_path, doc), tiny_model.vocabulary)
    assert needle in str(e.value)


@pytest.mark.parametrize("array,needle", [
    (np.full((2, 512), np.nan, np.float32), "NaN"),
    (np.ones((2, 512), np.float32), "unit vectors"),
    (np.eye(3, 256, dtype=np.float32), "[k, 512]"),
])
def test_bad_embeddings_name_the_tag(tmp_path, tiny_model, array, needle):
    np.save(tmp_path / "e.npy", array)
    doc = {"builtin": "none", "tags": [{"name": "broken tag", "embeddings": "e.npy"}]}
    with pytest.raises(VocabularyError) as e:
        load_vocabulary(write_vocab(tmp_path, doc), tiny_model.vocabulary)
    assert "'broken tag'" in str(e.value) and needle in str(e.value)


def test_bad_llm_json_is_reported(tmp_path, tiny_model):
    (tmp_path / "d.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(VocabularyError, match="list of"):
        load_vocabulary(write_vocab(tmp_path, {"builtin": "none", "import": ["d.json"]}), tiny_model.vocabulary)


def test_not_a_clip_folder(tmp_path):
    with pytest.raises(VocabularyError, match="Hugging Face layout"):
        TextTower(str(tmp_path))

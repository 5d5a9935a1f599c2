"""Growing the vocabulary over an already tagged set: only the delta is computed, old scores copied."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from ramplus_core import RamPlus
from ramplus_core.job import load_config, run
from ramplus_core.job.vocab import build_vocabulary
from ramplus_core.job.config import DecodeConfig
from ramplus_core.preprocess import decode, normalize

from .conftest import CHECKPOINT, GOLDEN, job_config, run_tag_bucket, table_rows
from .test_incremental import tiny_jpeg


def unit_rows(k: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(k, 512)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def vocab_file(tmp_path, name: str, builtin, tags: list[dict]) -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"builtin": builtin, "tags": tags}))
    return str(p)


def rows_of(out, m: dict) -> dict:
    """The tags rows a run wrote, read at the table version it committed (time travel)."""
    t = table_rows(out, "tags", version=m["tables"]["versions"]["tags"])
    return {r["uri"]: r for r in t.to_pylist() if r["run_id"] == m["run_id"]}


def scores(row) -> dict:
    return {s["tag"]: s["score"] for s in row["scores"]}


@pytest.mark.slow
def test_added_tags_cost_only_the_delta_and_old_scores_are_copied(ray_local, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(GOLDEN / "images", src)
    for i in range(6):
        (src / f"extra_{i}.jpg").write_bytes(tiny_jpeg(i))
    n = 12
    out = tmp_path / "out"
    for k, seed in (("one", 1), ("two", 2), ("five", 5)):
        np.save(tmp_path / f"{k}.npy", unit_rows(seed, 100 + seed))
    new_tags = [{"name": "house style", "embeddings": "one.npy", "threshold": 0.4},
                {"name": "brand logo", "embeddings": "two.npy"},
                {"name": "team event", "embeddings": "five.npy", "threshold": 0.6}]
    grown = vocab_file(tmp_path, "grown.yaml", "all", new_tags)
    conf = job_config(tmp_path, cache={"image_tokens": True, "token_dtype": "fp32"},
                      inference={"score_floor": 0.1, "batch_size": 4}, layout={"shards": 2})

    def go(vocab=None, **sections):
        cfg = load_config(str(conf), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT), vocab=vocab,
                          overrides=[(k, v) for k, v in sections.items()])
        return run(cfg, emit=lambda s: None).manifest

    m1 = go()
    assert m1["counts"]["tagged"] == n and m1["model_work"]["tokens_written"] == n
    m2 = go(grown)
    assert m2["vocab_id"] != m1["vocab_id"] and m2["counts"]["tagged"] == n
    assert m2["counts"]["incremental"]["vocab_changed"] == n
    (chg,) = m2["vocabulary"]["changed_from"].values()
    assert (chg["vocab_id"], chg["added_tags"], chg["removed_tags"]) == (m1["vocab_id"], 3, 0)
    w = m2["model_work"]
    assert (w["backbone_images"], w["token_reads"], w["head_tag_scores"]) == (0, n, 3 * n), \
        "only the 3 new tags ran, on cached tokens: no fetch, no decode, no backbone"
    old, new = rows_of(out, m1), rows_of(out, m2)
    assert set(old) == set(new)
    assert w["copied_scores"] == sum(len(r["scores"]) for r in old.values())

    # old scores bit for bit; the new tags' scores as the model computes them with the whole vocabulary
    model = RamPlus.from_checkpoint(str(CHECKPOINT), device="cpu")
    cfg2 = load_config(str(conf), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT), vocab=grown)
    vocab = build_vocabulary(cfg2.vocabulary, model.vocabulary)
    prepared = model.prepare_vocabulary(vocab)
    limits = DecodeConfig().limits()  # as the job decodes by default (decode.mode: fast)
    for uri, row in new.items():
        got, before = scores(row), scores(old[uri])
        assert {t: got[t] for t in before} == before, "copied, not recomputed"
        assert not (set(got) - set(before)) - {t["name"] for t in new_tags}
        px = decode((src / uri.rsplit("/", 1)[1]).read_bytes(), limits).array
        probs = torch.sigmoid(model.logits_from_tokens(model.image_tokens(normalize(px[None].copy())), prepared))[0]
        for j in range(24, 27):
            name = vocab.names[j]
            if probs[j] >= 0.1:
                assert abs(got[name] - float(probs[j])) < 1e-5, name
            else:
                assert name not in got
        thr = dict(zip(vocab.names, vocab.thresholds))
        assert row["tags"] == [t for t, s in got.items() if s > thr[t]]
        assert row["vocab_id"] == m2["vocab_id"]

    # removing tags, re-thresholding one, changing one tag's embeddings: only that tag is computed
    np.save(tmp_path / "two_b.npy", unit_rows(2, 999))
    changed = [dict(new_tags[0], threshold=0.2), dict(new_tags[1], embeddings="two_b.npy"), new_tags[2]]
    keep = [f"tag_{i:03d}" for i in range(20)]
    m3 = go(vocab_file(tmp_path, "changed.yaml", keep, changed))
    w = m3["model_work"]
    assert (w["backbone_images"], w["token_reads"], w["head_tag_scores"]) == (0, n, n)
    latest = rows_of(out, m3)
    for uri, row in latest.items():
        got, before = scores(row), scores(new[uri])
        assert set(got) <= set(keep) | {"house style", "brand logo", "team event"}
        for t in set(got) - {"brand logo"}:
            assert got[t] == before[t]
        if "house style" in got:
            assert ("house style" in row["tags"]) == (got["house style"] > 0.2)

    # thresholds only: no model work at all
    m4 = go(vocab_file(tmp_path, "changed.yaml", keep, changed), **{"vocabulary.threshold": 0.55})
    w = m4["model_work"]
    assert (w["backbone_images"], w["token_reads"], w["head_tag_scores"]) == (0, 0, 0)
    assert m4["counts"]["inputs_needed"] == {"none": n}
    for uri, row in rows_of(out, m4).items():
        got = scores(row)
        assert got == scores(latest[uri])
        assert row["tags"] == [t for t, s in got.items() if s > np.float32(0.55)]


def test_a_bad_vocabulary_file_fails_before_listing(tmp_path):
    from ramplus_core.errors import VocabularyError

    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(GOLDEN / "images", src)
    np.save(tmp_path / "bad.npy", np.ones((2, 3), np.float32))
    bad = vocab_file(tmp_path, "bad.yaml", "all", [{"name": "team event", "embeddings": "bad.npy"}])
    cfg = load_config(str(job_config(tmp_path)), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT),
                      vocab=bad)
    with pytest.raises(VocabularyError, match=r"vocabulary.file .*bad.yaml: tag 'team event': embeddings must be"):
        run(cfg, emit=lambda s: None)
    assert not (out / "_staging").exists() and not (out / "_runs").exists()


def test_a_vocabulary_over_the_description_limit_is_exit_2_before_listing(tmp_path):
    """An embeddings file whose header claims 2,000,000 rows (no body: refused from the header)."""
    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(GOLDEN / "images", src)
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2_000_000, 512)})
    big = vocab_file(tmp_path, "big.yaml", "all", [{"name": "huge", "embeddings": "huge.npy"}])
    r = run_tag_bucket("--config", str(job_config(tmp_path)), "--input", str(src), "--output", str(out),
                       "--checkpoint", str(CHECKPOINT), "--vocab", big, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("tag_bucket: error: vocabulary.file "), line
    assert "tag 'huge'" in line and "2,000,000 descriptions" in line and "limit of 1,000,000" in line, line
    assert not out.exists() or not any(out.iterdir())

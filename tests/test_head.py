"""The tagging head's structural promises: tags are independent of each other and of the batch.

RAM++ has no attention between tags, so chunking, padding, reordering or extending a
vocabulary must not move any tag's score, and an image's scores must not depend on what
else is in its batch. Differences of a few 1e-6 are float summation order in BLAS
(different matrix shapes), not a change in the computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ramplus_core.vocabulary import Vocabulary

from conftest import load_tiny

REORDER_TOL = 1e-5  # measured up to 1.8e-6 (chunk size 1 vs one pass)

# bf16 vs fp32 on all six golden images, measured: max |delta logit| 0.089 (0.077 of it
# from the head: the tiny random model's fc weights are large, |w|_1 = 30 over 64 dims,
# so bf16 rounding of its LayerNorm outputs shows; the backbone alone gives 0.009), mean
# 0.025, max |delta p| ~0.02. The golden thresholds sit within 0.001 of some
# probabilities, so 4 of 144 decisions flip (97.2% equal), each within max |delta p| of its
# threshold. Per image: rgb_640x480 0.089 / 2 flips, rgb_768x1024 0.051 / 1, gray 0.048 / 0,
# rgba 0.051 / 1, palette 0.064 / 0, cmyk 0.074 / 0. The test runs three of them (bf16 on
# CPU costs ~2 s per image for this tiny Swin): the worst one, rgba and cmyk.
BF16_IMAGES = [0, 1, 2, 3, 4, 5]
BF16_MAX_ABS_LOGIT = 0.12
BF16_MIN_DECISIONS_EQUAL = 0.95


def head_logits(model, tokens, prepared, chunk_size: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.net.head(tokens, prepared, chunk_size)


def decisions(logits: torch.Tensor, thresholds: np.ndarray) -> np.ndarray:
    return torch.sigmoid(logits.float()).numpy() > thresholds[None, :]


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 24, 0])
def test_chunked_equals_unchunked(tiny_model, golden_tokens, golden, chunk_size):
    one_pass = head_logits(tiny_model, golden_tokens, tiny_model.prepared, 0)
    chunked = head_logits(tiny_model, golden_tokens, tiny_model.prepared, chunk_size)
    assert chunked.shape == (6, 24)
    assert (chunked - one_pass).abs().max().item() <= REORDER_TOL
    assert (decisions(chunked, golden.thresholds) == decisions(one_pass, golden.thresholds)).all()


def test_model_chunk_size_setting_gives_the_same_tags(golden, golden_tokens, golden_logits_ours):
    model = load_tiny(golden, chunk_size=5)  # the public knob, 24 tags in chunks of 5
    logits = model.logits_from_tokens(golden_tokens)
    assert (logits - golden_logits_ours).abs().max().item() <= REORDER_TOL
    assert (decisions(logits, golden.thresholds) == decisions(golden_logits_ours, golden.thresholds)).all()


def _vocab(names, embeds, mask=None) -> Vocabulary:
    """From padded [C, D, 512] embeddings and a mask of the real slots."""
    c = len(names)
    return Vocabulary.from_padded(list(names), np.full(c, 0.5, dtype=np.float32), [None] * c, embeds, mask)


def _builtin(model) -> torch.Tensor:
    """The golden vocabulary as [24, 51, 512] (it is stored flat)."""
    return model.vocabulary.embeds.view(len(model.vocabulary), 51, -1)


def test_masked_softmax_padded_tags_equal_each_alone(tiny_model, golden_tokens, golden_logits_ours):
    """Tags with 51, 20, 7 and 1 descriptions in one padded vocabulary, vs each on its own."""
    builtin = _builtin(tiny_model)  # [24, 51, 512]
    picks, counts = [3, 8, 15, 22], [51, 20, 7, 1]
    d_max = max(counts)
    # Padding slots hold garbage on purpose: the mask alone must keep them out.
    embeds = torch.randn(len(picks), d_max, builtin.shape[-1], generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(len(picks), d_max, dtype=torch.bool)
    for i, (t, n) in enumerate(zip(picks, counts)):
        embeds[i, :n] = builtin[t, :n]
        mask[i, :n] = True
    names = [f"t{t}_{n}" for t, n in zip(picks, counts)]
    together = tiny_model.logits_from_tokens(golden_tokens, tiny_model.prepare_vocabulary(_vocab(names, embeds, mask)))
    assert torch.isfinite(together).all()
    for i, (t, n) in enumerate(zip(picks, counts)):
        alone_vocab = _vocab([names[i]], builtin[t:t + 1, :n].clone())
        alone = tiny_model.logits_from_tokens(golden_tokens, tiny_model.prepare_vocabulary(alone_vocab))
        assert (together[:, i] - alone[:, 0]).abs().max().item() <= REORDER_TOL, names[i]
    # a tag with all its descriptions is the built-in tag, padded or not
    assert (together[:, 0] - golden_logits_ours[:, 3]).abs().max().item() <= REORDER_TOL
    # fewer descriptions is a different tag: guards against the mask being ignored
    assert (together[:, 1] - golden_logits_ours[:, 8]).abs().max().item() > 1e-3


def test_reordering_and_extending_the_vocabulary_keeps_scores(tiny_model, golden_tokens, golden_logits_ours):
    builtin = _builtin(tiny_model)
    order = list(range(23, -1, -1))
    extra = F.normalize(torch.randn(3, builtin.shape[1], builtin.shape[2], generator=torch.Generator().manual_seed(1)), dim=-1)
    embeds = torch.cat([builtin[order], extra])
    names = [f"tag_{i:03d}" for i in order] + ["new_a", "new_b", "new_c"]
    logits = tiny_model.logits_from_tokens(golden_tokens, tiny_model.prepare_vocabulary(_vocab(names, embeds)))
    assert logits.shape == (6, 27)
    assert (logits[:, :24] - golden_logits_ours[:, order]).abs().max().item() <= REORDER_TOL


def test_batch_independence(tiny_model, golden, golden_logits_ours, golden_tokens):
    pixels = golden.pixels()
    alone = tiny_model.logits(pixels[2:3])  # full path, backbone included
    assert (alone[0] - golden_logits_ours[2]).abs().max().item() <= REORDER_TOL
    for i in (0, 5):  # head alone, first and last rows of the batch
        alone_head = tiny_model.logits_from_tokens(golden_tokens[i:i + 1])
        assert (alone_head[0] - golden_logits_ours[i]).abs().max().item() <= REORDER_TOL


def test_bf16_path_close_to_fp32(golden, golden_logits_ours):
    model = load_tiny(golden, dtype="bf16")
    assert next(model.net.parameters()).dtype == torch.bfloat16
    logits = model.logits(golden.pixels()[BF16_IMAGES])
    fp32 = golden_logits_ours[BF16_IMAGES]
    assert logits.dtype == torch.float32 and logits.shape == fp32.shape

    delta = (logits - fp32).abs()
    assert delta.max().item() <= BF16_MAX_ABS_LOGIT, f"max |delta logit| {delta.max().item():.4f}"

    th = golden.thresholds
    p32, p16 = torch.sigmoid(fp32).numpy(), torch.sigmoid(logits).numpy()
    same = (p32 > th) == (p16 > th)
    assert same.mean() >= BF16_MIN_DECISIONS_EQUAL, f"{same.mean():.3f} of decisions equal"
    # every flip is a near-threshold call, not a wrong answer
    max_dp = np.abs(p32 - p16).max()
    margins = np.abs(p32 - th[None, :])
    assert (margins[~same] <= max_dp).all()


def test_description_counts_are_never_padded(tiny_model, golden_tokens, golden_logits_ours):
    """24 tags x 51 descriptions plus one with 200 and one with 3: the shared object holds
    24 x 51 + 200 + 3 rows (not 26 x 200), and every score is what the tag gives alone."""
    from ramplus_core.head import PreparedVocabulary

    builtin = _builtin(tiny_model)  # [24, 51, 512]
    gen = torch.Generator().manual_seed(2)
    long = F.normalize(torch.randn(200, builtin.shape[-1], generator=gen), dim=-1)
    three = builtin[5, [0, 7, 9]]
    embeds = torch.zeros(26, 200, builtin.shape[-1])
    mask = torch.zeros(26, 200, dtype=torch.bool)
    embeds[:24, :51], mask[:24, :51] = builtin, True
    embeds[24], mask[24] = long, True
    # the 3-description tag's descriptions sit in scattered slots: the mask alone says which
    for slot, e in zip((4, 60, 150), three):
        embeds[25, slot], mask[25, slot] = e, True
    names = [f"tag_{i:03d}" for i in range(24)] + ["long", "three"]
    prepared = tiny_model.prepare_vocabulary(_vocab(names, embeds, mask))
    assert sorted(b.shape for b in prepared.blocks) == [(1, 3), (1, 200), (24, 51)]
    arrays = prepared.to_numpy()
    assert arrays["embeds"].shape[0] == 24 * 51 + 200 + 3

    together = tiny_model.logits_from_tokens(golden_tokens, PreparedVocabulary.from_numpy(arrays))
    assert (together[:, :24] - golden_logits_ours).abs().max().item() <= REORDER_TOL
    for j, alone in ((24, long[None]), (25, three[None])):
        ref = tiny_model.logits_from_tokens(golden_tokens, tiny_model.prepare_vocabulary(_vocab(["x"], alone)))
        assert (together[:, j] - ref[:, 0]).abs().max().item() <= REORDER_TOL, names[j]

    # a selection (a grown vocabulary's new tags) scores as the full vocabulary does, in its own order
    picked = prepared.select([25, 3, 24])
    sub = tiny_model.logits_from_tokens(golden_tokens, picked)
    assert (sub - together[:, [25, 3, 24]]).abs().max().item() <= REORDER_TOL
    # and chunking within blocks changes nothing
    chunked = head_logits(tiny_model, golden_tokens, prepared, 5)
    assert (chunked - together).abs().max().item() <= REORDER_TOL

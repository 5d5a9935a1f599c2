"""RAM++'s tagging head: description reweighting, then a cross-attention-only decoder.

Every tag is a query that attends to the 145 image tokens; tags never attend to each
other, so each tag's logit depends only on its own descriptions and the image. That is
what lets us process the vocabulary in chunks (bounded memory), extend it, or reorder it
without changing any existing score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int = 768
    num_heads: int = 4
    num_layers: int = 2
    intermediate_size: int = 3072
    encoder_width: int = 512  # image tokens after image_proj; also the text-embedding width
    layer_norm_eps: float = 1e-12


class CrossAttentionLayer(nn.Module):
    """One decoder layer without self-attention: tags read the image, never each other."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(h, h)
        self.k = nn.Linear(cfg.encoder_width, h)
        self.v = nn.Linear(cfg.encoder_width, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        return x.view(n, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def image_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens: once per batch, shared by every tag chunk."""
        return self._split(self.k(tokens)), self._split(self.v(tokens))

    def forward(self, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        n, c, width = h.shape
        q = self._split(self.q(h))
        ctx = F.scaled_dot_product_attention(q, kv[0], kv[1])
        ctx = ctx.transpose(1, 2).reshape(n, c, width)
        a = self.attn_norm(h + self.attn_out(ctx))
        return self.ffn_norm(a + self.ffn_out(F.gelu(self.ffn_in(a))))


@dataclass
class PreparedVocabulary:
    """A vocabulary in the form the head consumes, built once per run.

    `embeds` [C, D, 512] unit description embeddings (zero rows where padded),
    `projected` [C, D, hidden] = wordvec_proj(embeds): since the reweighting weights of a
    tag sum to one and wordvec_proj is affine, projecting each description once here equals
    projecting the weighted mean per image, at a tenth of the cost.
    `mask` [C, D] True for real descriptions (tags may have different counts).
    """

    embeds: torch.Tensor
    projected: torch.Tensor
    mask: torch.Tensor

    @property
    def num_tags(self) -> int:
        return self.embeds.shape[0]

    def chunk(self, start: int, stop: int) -> "PreparedVocabulary":
        return PreparedVocabulary(self.embeds[start:stop], self.projected[start:stop], self.mask[start:stop])

    def to_numpy(self) -> dict:
        """Plain arrays, so Ray's object store shares one read-only copy per node (zero-copy)."""
        return {
            "embeds": self.embeds.detach().cpu().float().numpy(),
            "projected": self.projected.detach().cpu().float().numpy(),
            "mask": self.mask.detach().cpu().numpy(),
        }

    @classmethod
    def from_numpy(cls, arrays: dict) -> "PreparedVocabulary":
        import warnings

        with warnings.catch_warnings():  # the store's buffers are read-only; we never write them
            warnings.simplefilter("ignore", UserWarning)
            return cls(*(torch.from_numpy(arrays[k]) for k in ("embeds", "projected", "mask")))

    def to(self, device=None, dtype=None) -> "PreparedVocabulary":
        return PreparedVocabulary(
            self.embeds.to(device=device, dtype=dtype),
            self.projected.to(device=device, dtype=dtype),
            self.mask.to(device=device),
        )


class TaggingHead(nn.Module):
    """Maps projected image tokens and a prepared vocabulary to one logit per tag."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.wordvec_proj = nn.Linear(cfg.encoder_width, cfg.hidden_size)
        self.layers = nn.ModuleList(CrossAttentionLayer(cfg) for _ in range(cfg.num_layers))
        self.fc = nn.Linear(cfg.hidden_size, 1)
        self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @torch.no_grad()
    def prepare(self, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> PreparedVocabulary:
        """[C, D, 512] description embeddings -> PreparedVocabulary (once per vocabulary)."""
        w = self.wordvec_proj.weight
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        embeds = embeds.to(device=w.device, dtype=w.dtype) * mask.to(w.device).unsqueeze(-1)
        projected = self.wordvec_proj(embeds)
        return PreparedVocabulary(embeds, projected, mask.to(w.device))

    def forward(self, tokens: torch.Tensor, vocab: PreparedVocabulary, chunk_size: int = 0) -> torch.Tensor:
        """tokens [N, T, 512] (token 0 is the mean token) -> logits [N, C]."""
        g = F.normalize(tokens[:, 0], dim=-1)
        scale = self.reweight_scale.exp()
        kvs = [layer.image_kv(tokens) for layer in self.layers]
        c = vocab.num_tags
        step = chunk_size if chunk_size and chunk_size > 0 else c
        out = [self._chunk_logits(g, scale, kvs, vocab.chunk(s, min(s + step, c))) for s in range(0, c, step)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _chunk_logits(self, g, scale, kvs, vocab: PreparedVocabulary) -> torch.Tensor:
        c, d, _ = vocab.embeds.shape
        sim = (scale * g) @ vocab.embeds.reshape(c * d, -1).T  # [N, c*D]
        sim = sim.view(-1, c, d).masked_fill(~vocab.mask, float("-inf"))
        weights = sim.softmax(dim=-1)  # [N, c, D]
        # batched over tags: [c, N, D] @ [c, D, hidden] -> [c, N, hidden]
        h = torch.bmm(weights.transpose(0, 1), vocab.projected).transpose(0, 1)
        h = F.relu(h)
        for layer, kv in zip(self.layers, kvs):
            h = layer(h, kv)
        return self.fc(h).squeeze(-1)

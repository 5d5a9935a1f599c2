"""RAM++'s tagging head: description reweighting, then a cross-attention-only decoder.

Every tag is a query that attends to the 145 image tokens; tags never attend to each
other, so each tag's logit depends only on its own descriptions and the image. That is
what lets us process the vocabulary in chunks (bounded memory), extend it, or reorder it
without changing any existing score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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
class DescriptionBlock:
    """Tags whose description counts share a size class, padded only to the largest among them.

    `index` [c] the tags' positions in the vocabulary; `embeds` [c, d, 512] unit description
    embeddings (zero rows where padded); `projected` [c, d, hidden] = wordvec_proj(embeds):
    since a tag's reweighting weights sum to one and wordvec_proj is affine, projecting each
    description once equals projecting the weighted mean per image, at a tenth of the cost;
    `mask` [c, d] True for real descriptions.
    """

    index: torch.Tensor
    embeds: torch.Tensor
    projected: torch.Tensor
    mask: torch.Tensor

    def chunk(self, start: int, stop: int) -> "DescriptionBlock":
        return DescriptionBlock(self.index[start:stop], self.embeds[start:stop], self.projected[start:stop],
                                self.mask[start:stop])

    def to(self, device=None, dtype=None) -> "DescriptionBlock":
        return DescriptionBlock(self.index.to(device=device), self.embeds.to(device=device, dtype=dtype),
                                self.projected.to(device=device, dtype=dtype), self.mask.to(device=device))


@dataclass
class PreparedVocabulary:
    """A vocabulary in the form the head consumes, built once per run and shared.

    Tags are grouped by description count (1, 2, 3-4, 5-8, ... 33-64, ...), each group padded
    only to its own largest count: one tag with 200 descriptions next to the 4585 built-in
    tags with 51 costs its own 200 rows, not 4586 x 200.
    """

    blocks: list[DescriptionBlock]
    num_tags: int

    def select(self, tags) -> "PreparedVocabulary":
        """The given tags (vocabulary positions), in that order: a grown vocabulary's new tags."""
        tags = torch.as_tensor(np.asarray(tags, dtype=np.int64))
        where = torch.full((self.num_tags,), -1, dtype=torch.long)
        where[tags] = torch.arange(len(tags))
        blocks = []
        for blk in self.blocks:
            new = where[blk.index.cpu()]
            rows = (new >= 0).nonzero().squeeze(1)
            if len(rows):
                r = rows.to(blk.embeds.device)
                blocks.append(DescriptionBlock(new[rows].to(blk.index.device), blk.embeds[r], blk.projected[r],
                                               blk.mask[r]))
        return PreparedVocabulary(blocks, len(tags))

    def to_numpy(self) -> dict:
        """Flat arrays, so Ray's object store shares one read-only copy per node (zero-copy).

        `shapes` [blocks, 2] gives each block's (tags, descriptions); a block's rows follow the
        previous block's in `embeds`, `projected` and `mask`; `index` lists the tags block by block.
        """
        if not self.blocks:
            return {"embeds": np.zeros((0, 512), np.float32), "projected": np.zeros((0, 1), np.float32),
                    "mask": np.zeros(0, bool), "index": np.zeros(0, np.int64), "shapes": np.zeros((0, 2), np.int64)}

        def flat(name: str, width: int | None) -> np.ndarray:
            parts = [getattr(b, name).detach().cpu() for b in self.blocks]
            parts = [p.float() if p.is_floating_point() else p for p in parts]
            parts = [p.reshape(-1, width) if width else p.reshape(-1) for p in parts]
            return parts[0].numpy() if len(parts) == 1 else torch.cat(parts).numpy()

        return {
            "embeds": flat("embeds", self.blocks[0].embeds.shape[-1]),
            "projected": flat("projected", self.blocks[0].projected.shape[-1]),
            "mask": flat("mask", None),
            "index": torch.cat([b.index.cpu() for b in self.blocks]).numpy(),
            "shapes": np.array([tuple(b.mask.shape) for b in self.blocks], dtype=np.int64).reshape(-1, 2),
        }

    @classmethod
    def from_numpy(cls, arrays: dict) -> "PreparedVocabulary":
        """Views into `to_numpy`'s arrays (no copy: they may be the object store's memory)."""
        import warnings

        with warnings.catch_warnings():  # the store's buffers are read-only; we never write them
            warnings.simplefilter("ignore", UserWarning)
            t = {k: torch.from_numpy(arrays[k]) for k in ("embeds", "projected", "mask", "index")}
        blocks, row, tag = [], 0, 0
        for c, d in arrays["shapes"].tolist():
            rows = slice(row, row + c * d)
            blocks.append(DescriptionBlock(t["index"][tag:tag + c], t["embeds"][rows].view(c, d, -1),
                                           t["projected"][rows].view(c, d, -1), t["mask"][rows].view(c, d)))
            row, tag = row + c * d, tag + c
        return cls(blocks, tag)

    def to(self, device=None, dtype=None) -> "PreparedVocabulary":
        return PreparedVocabulary([b.to(device, dtype) for b in self.blocks], self.num_tags)


def _size_class(counts: torch.Tensor) -> torch.Tensor:
    """0 for one description, k for 2^(k-1) < count <= 2^k."""
    return torch.ceil(torch.log2(counts.clamp(min=1).double())).long()


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
        mask = mask.to(embeds.device)
        counts = mask.sum(dim=1)
        size_class = _size_class(counts)
        blocks = []
        for k in torch.unique(size_class).tolist():
            idx = (size_class == k).nonzero().squeeze(1)
            d = int(counts[idx].max())
            m = mask[idx]
            if bool(m[:, :d].sum() == counts[idx].sum()):  # descriptions first, padding after: the usual case
                e, m = embeds[idx, :d], m[:, :d]
            else:  # move each tag's descriptions to the front, in order
                first = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices[:, :d]
                e = torch.gather(embeds[idx], 1, first.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
                m = torch.gather(m, 1, first)
            e = e.to(device=w.device, dtype=w.dtype) * m.to(w.device).unsqueeze(-1)
            blocks.append(DescriptionBlock(idx.to(w.device), e, self.wordvec_proj(e), m.to(w.device)))
        return PreparedVocabulary(blocks, embeds.shape[0])

    def forward(self, tokens: torch.Tensor, vocab: PreparedVocabulary, chunk_size: int = 0) -> torch.Tensor:
        """tokens [N, T, 512] (token 0 is the mean token) -> logits [N, C]."""
        g = F.normalize(tokens[:, 0], dim=-1)
        scale = self.reweight_scale.exp()
        kvs = [layer.image_kv(tokens) for layer in self.layers]
        out = tokens.new_empty((tokens.shape[0], vocab.num_tags))
        for blk in vocab.blocks:
            c = blk.index.shape[0]
            step = chunk_size if chunk_size and chunk_size > 0 else c
            for s in range(0, c, step):
                part = blk.chunk(s, min(s + step, c))
                out[:, part.index] = self._chunk_logits(g, scale, kvs, part)
        return out

    def _chunk_logits(self, g, scale, kvs, vocab: DescriptionBlock) -> torch.Tensor:
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

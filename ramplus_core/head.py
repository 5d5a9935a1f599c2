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

from .vocabulary import run_rows

# A decoder chunk of n tags holds at most n * 64 descriptions (the built-in tags have 51), so
# the similarity matrix of a chunk with a very long description list stays bounded too.
CHUNK_ROWS_PER_TAG = 64


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
    """Tags that have the same number of descriptions d, so they stack without padding.

    `index` [c] the tags' positions in the vocabulary; `embeds` [c, d, 512] unit description
    embeddings; `projected` [c, d, hidden] = wordvec_proj(embeds): since a tag's reweighting
    weights sum to one and wordvec_proj is affine, projecting each description once equals
    projecting the weighted mean per image, at a tenth of the cost.
    """

    index: torch.Tensor
    embeds: torch.Tensor
    projected: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.embeds.shape[:2])

    def chunk(self, start: int, stop: int) -> "DescriptionBlock":
        return DescriptionBlock(self.index[start:stop], self.embeds[start:stop], self.projected[start:stop])


class PreparedVocabulary:
    """A vocabulary in the form the head consumes, built once per run and shared.

    Flat arrays, memory in proportion to the total number of descriptions: `embeds`
    [D_total, 512] and `projected` [D_total, hidden] hold every description once, tags
    grouped by their description count, one block per distinct count, so each
    block is a padding-free [c, d, .] view; `index` [C] is the vocabulary position of each
    stored tag, `shapes` [blocks, 2] each block's (tags, descriptions).
    """

    def __init__(self, index: torch.Tensor, embeds: torch.Tensor, projected: torch.Tensor, shapes):
        self.index, self.embeds, self.projected = index, embeds, projected
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        self.blocks: list[DescriptionBlock] = []
        row = tag = 0
        for c, d in self.shapes.tolist():
            rows = slice(row, row + c * d)
            self.blocks.append(DescriptionBlock(index[tag:tag + c], embeds[rows].view(c, d, -1),
                                                projected[rows].view(c, d, -1)))
            row, tag = row + c * d, tag + c
        if tag != index.shape[0] or row != embeds.shape[0] or row != projected.shape[0]:
            raise ValueError(f"prepared vocabulary: shapes cover {tag} tags and {row} rows, arrays hold "
                             f"{index.shape[0]} tags, {embeds.shape[0]} and {projected.shape[0]} rows")

    @property
    def num_tags(self) -> int:
        return int(self.index.shape[0])

    def select(self, tags) -> "PreparedVocabulary":
        """The given tags (vocabulary positions), in that order: a grown vocabulary's new tags."""
        tags = torch.as_tensor(np.asarray(tags, dtype=np.int64))
        where = torch.full((self.num_tags,), -1, dtype=torch.long)
        where[tags] = torch.arange(len(tags))
        pos = where[self.index.cpu()]  # each stored tag's place in the selection, -1 if not chosen
        kept = (pos >= 0).nonzero().squeeze(1)
        per_tag = torch.as_tensor(self.shapes[:, 1]).repeat_interleave(torch.as_tensor(self.shapes[:, 0]))
        starts = torch.zeros_like(per_tag)
        starts[1:] = torch.cumsum(per_tag, 0)[:-1]
        rows = run_rows(starts[kept], per_tag[kept]).to(self.embeds.device)
        block_of = torch.arange(len(self.shapes)).repeat_interleave(torch.as_tensor(self.shapes[:, 0]))
        c = torch.bincount(block_of[kept], minlength=len(self.shapes)).numpy()
        shapes = np.stack([c, self.shapes[:, 1]], 1)[c > 0] if len(self.shapes) else self.shapes
        return PreparedVocabulary(pos[kept].to(self.index.device), self.embeds[rows], self.projected[rows], shapes)

    def chunks(self, max_tags: int):
        """(vocabulary positions, block pieces) of at most `max_tags` tags and
        `max_tags * CHUNK_ROWS_PER_TAG` descriptions each (one tag alone may exceed the latter);
        max_tags <= 0: everything at once."""
        if not max_tags or max_tags <= 0:
            yield self.index, self.blocks
            return
        max_rows = max_tags * CHUNK_ROWS_PER_TAG
        first, pieces, tags, rows = 0, [], 0, 0
        for blk in self.blocks:
            c, d = blk.shape
            s = 0
            while s < c:
                take = min(c - s, max_tags - tags, max(0, max_rows - rows) // d)
                if take == 0 and tags == 0:
                    take = 1
                if take:
                    pieces.append(blk.chunk(s, s + take))
                    s, tags, rows = s + take, tags + take, rows + take * d
                if take == 0 or tags == max_tags:
                    yield self.index[first:first + tags], pieces
                    first, pieces, tags, rows = first + tags, [], 0, 0
        if pieces:
            yield self.index[first:first + tags], pieces

    def to_numpy(self) -> dict:
        """The flat arrays (no copy on CPU in fp32), so Ray's object store shares one read-only
        copy per node (zero-copy)."""
        def host(t: torch.Tensor) -> np.ndarray:
            t = t.detach().cpu()
            return (t.float() if t.is_floating_point() else t).numpy()

        return {"embeds": host(self.embeds), "projected": host(self.projected), "index": host(self.index),
                "shapes": self.shapes.copy()}

    @classmethod
    def from_numpy(cls, arrays: dict) -> "PreparedVocabulary":
        """Views into `to_numpy`'s arrays (no copy: they may be the object store's memory)."""
        import warnings

        with warnings.catch_warnings():  # the store's buffers are read-only; we never write them
            warnings.simplefilter("ignore", UserWarning)
            t = {k: torch.from_numpy(arrays[k]) for k in ("embeds", "projected", "index")}
        return cls(t["index"], t["embeds"], t["projected"], arrays["shapes"])

    def to(self, device=None, dtype=None) -> "PreparedVocabulary":
        return PreparedVocabulary(self.index.to(device=device), self.embeds.to(device=device, dtype=dtype),
                                  self.projected.to(device=device, dtype=dtype), self.shapes)


def _group_by_count(counts: torch.Tensor) -> torch.Tensor:
    """A stable order of the tags that puts equal counts together, counts in order of first
    appearance: a vocabulary already grouped that way (the built-in tags, then tags of one
    description) keeps its order, and its rows are used as they are, not copied."""
    uniq, inverse = torch.unique(counts, return_inverse=True)
    first = torch.full((len(uniq),), len(counts), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(counts)), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(len(uniq))
    return torch.sort(rank[inverse], stable=True).indices


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
    def prepare(self, embeds: torch.Tensor, offsets: torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None) -> PreparedVocabulary:
        """Description embeddings -> PreparedVocabulary (once per vocabulary).

        Flat [D_total, 512] rows with `offsets` [C + 1] (Vocabulary's layout), or padded
        [C, D, 512] with an optional [C, D] `mask` of the real descriptions (kept in slot order).
        """
        w = self.wordvec_proj.weight
        if embeds.ndim == 3:
            if mask is None:
                counts = torch.full((embeds.shape[0],), embeds.shape[1], dtype=torch.int64)
                embeds = embeds.reshape(-1, embeds.shape[-1])
            else:
                mask = mask.to(device=embeds.device, dtype=torch.bool)
                counts, embeds = mask.sum(dim=1).cpu(), embeds[mask]
            offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(counts, 0)
        offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu()
        counts = offsets[1:] - offsets[:-1]
        if bool((counts <= 0).any()):
            raise ValueError(f"tag {int((counts <= 0).nonzero()[0])} has no descriptions")
        order = _group_by_count(counts)
        sorted_counts = counts[order]
        distinct, tags_per = torch.unique_consecutive(sorted_counts, return_counts=True)
        if not bool((order == torch.arange(len(order))).all()):
            embeds = embeds[run_rows(offsets[:-1][order], sorted_counts).to(embeds.device)]
        e = embeds.to(device=w.device, dtype=w.dtype)
        return PreparedVocabulary(order.to(w.device), e, self.wordvec_proj(e), torch.stack([tags_per, distinct], 1).numpy())

    def forward(self, tokens: torch.Tensor, vocab: PreparedVocabulary, chunk_size: int = 0) -> torch.Tensor:
        """tokens [N, T, 512] (token 0 is the mean token) -> logits [N, C].

        Tags go through the decoder in chunks (`chunk_size` tags, see PreparedVocabulary.chunks);
        a chunk may span blocks: each block piece is reweighted on its own, unpadded, and the
        pieces are decoded together, so many distinct description counts cost few decoder calls.
        """
        g = F.normalize(tokens[:, 0], dim=-1)
        scale = self.reweight_scale.exp()
        kvs = [layer.image_kv(tokens) for layer in self.layers]
        out = tokens.new_empty((tokens.shape[0], vocab.num_tags))
        for index, pieces in vocab.chunks(chunk_size):
            if not pieces:  # an empty vocabulary
                continue
            hs = [self._reweighted(g, scale, p) for p in pieces]
            h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)
            for layer, kv in zip(self.layers, kvs):
                h = layer(h, kv)
            out[:, index] = self.fc(h).squeeze(-1)
        return out

    @staticmethod
    def _reweighted(g, scale, blk: DescriptionBlock) -> torch.Tensor:
        """relu(wordvec_proj(q_c)) [N, c, hidden] for the block's tags: the softmax over each
        tag's own descriptions (no padding, no mask), then their projections weighted by it."""
        c, d, _ = blk.embeds.shape
        sim = (scale * g) @ blk.embeds.reshape(c * d, -1).T  # [N, c*d]
        weights = sim.view(-1, c, d).softmax(dim=-1)  # [N, c, d]
        # batched over tags: [c, N, d] @ [c, d, hidden] -> [c, N, hidden]
        return F.relu(torch.bmm(weights.transpose(0, 1), blk.projected).transpose(0, 1))

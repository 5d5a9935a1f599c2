"""The paper's head computation, written the straightforward way, for speed comparison.

This follows the order of operations of the official RAM++ inference: per image, weight
the 51 descriptions of every tag, apply `wordvec_proj` to the weighted means (a 512x768
matmul per tag per image), then BERT-style cross-attention with explicit softmax. It
shares the weights of a `RamPlusNet`, so both paths can be timed and compared in one run.
The backbone is the same timm Swin in both: the official Microsoft Swin does the same
operations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ramplus_core.model import RamPlusNet


@torch.inference_mode()
def paper_style_logits(net: RamPlusNet, pixels: torch.Tensor, label_embed: torch.Tensor) -> torch.Tensor:
    head = net.head
    tokens = net.image_tokens(pixels)  # [N, 145, 512]
    n = tokens.shape[0]
    d = net.cfg.descriptions_per_tag
    c = label_embed.shape[0] // d
    g = tokens[:, 0] / tokens[:, 0].norm(dim=-1, keepdim=True)
    sims = (head.reweight_scale.exp() * g @ label_embed.t()).view(n, c, d)
    weights = F.softmax(sims, dim=2)
    reweighted = torch.empty(n, c, label_embed.shape[1], dtype=tokens.dtype)
    per_tag = label_embed.view(c, d, -1)
    for i in range(n):  # the official code loops over the batch here
        reweighted[i] = (weights[i].unsqueeze(-1) * per_tag).sum(dim=1)
    h = F.relu(head.wordvec_proj(reweighted))
    heads = head.cfg.num_heads
    for layer in head.layers:
        def split(x):
            return x.view(n, -1, heads, x.shape[-1] // heads).permute(0, 2, 1, 3)
        q, k, v = split(layer.q(h)), split(layer.k(tokens)), split(layer.v(tokens))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(n, c, -1)
        a = layer.attn_norm(layer.attn_out(ctx) + h)
        h = layer.ffn_norm(layer.ffn_out(F.gelu(layer.ffn_in(a))) + a)
    return head.fc(h).squeeze(-1)

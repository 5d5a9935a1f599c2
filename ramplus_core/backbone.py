"""The Swin image encoder (timm) and the mapping from the paper's Microsoft Swin keys.

RAM++ uses the original Microsoft Swin code, whose stages end with their patch merging
(`layers.N.downsample`); timm opens stage N+1 with it. The weights are identical, only
the names move. `relative_position_index` and `attn_mask` are derived from the geometry
and rebuilt by timm, so they are dropped rather than trusted from the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from timm.models.swin_transformer import SwinTransformer

DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


@dataclass(frozen=True)
class SwinConfig:
    img_size: int = 384
    patch_size: int = 4
    window_size: int = 12
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    mlp_ratio: float = 4.0

    @property
    def out_width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size // 2 ** (len(self.depths) - 1)


SWIN_LARGE = SwinConfig()
SWIN_BASE = SwinConfig(embed_dim=128, num_heads=(4, 8, 16, 32))


class SwinEncoder(nn.Module):
    """Swin trunk returning RAM++'s image tokens: the mean token followed by the grid."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.swin = SwinTransformer(  # timm's Swin has no absolute position embedding
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            window_size=cfg.window_size,
            embed_dim=cfg.embed_dim,
            depths=cfg.depths,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=0,
        )
        # timm keeps Swin's fused attention behind an "experimental" switch; it computes
        # the same softmax(QK^T + bias + mask)V (golden logits unchanged) and avoids
        # materialising the biased scores, so we turn it on for every window attention.
        for m in self.swin.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.swin.forward_features(x)  # [N, H, W, C], final LayerNorm applied
        grid = grid.flatten(1, 2)
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)


_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def microsoft_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Microsoft-layout Swin state dict (no prefix) to timm's names."""
    out = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        key = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out[key] = value
    return out


def infer_swin_config(state: dict[str, torch.Tensor], img_size: int | None = None) -> SwinConfig:
    """Read the Swin geometry from tensor shapes (Microsoft layout, no prefix)."""
    proj = state["patch_embed.proj.weight"]
    embed_dim, _, patch, _ = proj.shape
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.blocks\.", k))})
    depths, heads = [], []
    for s in stages:
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layers\.{s}\.blocks\.(\d+)\.", k))}
        depths.append(len(blocks))
        heads.append(state[f"layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[1])
    table_rows = state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (round(table_rows ** 0.5) + 1) // 2
    hidden = state["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    if img_size is None:
        img_size = 384
        mask = state.get("layers.0.blocks.1.attn_mask")
        if mask is not None:  # [windows, ws*ws, ws*ws] tells the stage-0 resolution
            side = round(mask.shape[0] ** 0.5) * window
            img_size = side * patch
    return SwinConfig(
        img_size=img_size,
        patch_size=int(patch),
        window_size=int(window),
        embed_dim=int(embed_dim),
        depths=tuple(depths),
        num_heads=tuple(int(h) for h in heads),
        mlp_ratio=hidden / embed_dim,
    )

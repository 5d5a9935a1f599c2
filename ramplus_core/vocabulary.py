"""Tag vocabularies: names, Chinese names, thresholds and description embeddings.

The built-in vocabulary is the paper's 4585 tags; its embeddings live in the checkpoint
(`label_embed`) and its names, Chinese names and calibrated thresholds ship as package
data (from the paper's repository, Apache-2.0, NOTICE beside them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from .errors import VocabularyError

BUILTIN_SIZE = 4585
OPEN_SET_THRESHOLD = 0.5


def _data_lines(name: str) -> list[str]:
    text = resources.files("ramplus_core").joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines()]


def builtin_names() -> tuple[list[str], list[str], np.ndarray]:
    names = _data_lines("ram_tag_list.txt")
    zh = _data_lines("ram_tag_list_chinese.txt")
    thresholds = np.array([float(x) for x in _data_lines("ram_tag_list_threshold.txt")], dtype=np.float32)
    if not (len(names) == len(zh) == len(thresholds) == BUILTIN_SIZE):
        raise VocabularyError("package data is damaged: built-in tag lists differ in length; reinstall ramplus")
    return names, zh, thresholds


@dataclass
class Vocabulary:
    """`embeds` [C, D, 512] (zero-padded), `mask` [C, D] marks real descriptions."""

    names: list[str]
    thresholds: np.ndarray
    zh: list[str | None]
    embeds: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        c = len(self.names)
        if self.embeds.ndim != 3 or self.embeds.shape[0] != c or len(self.thresholds) != c or len(self.zh) != c:
            raise VocabularyError(
                f"vocabulary parts disagree: {c} names, {len(self.thresholds)} thresholds, "
                f"{len(self.zh)} Chinese names, embeddings {tuple(self.embeds.shape)}"
            )
        seen = set()
        for n in self.names:
            if not n or not n.strip():
                raise VocabularyError("a tag has an empty name")
            if n in seen:
                raise VocabularyError(f"tag {n!r} appears twice")
            seen.add(n)

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_label_embed(cls, label_embed: torch.Tensor, descriptions_per_tag: int,
                         names: list[str] | None = None, thresholds=None, zh=None) -> "Vocabulary":
        """The checkpoint's own vocabulary; names default to the built-in list when sizes fit."""
        c = label_embed.shape[0] // descriptions_per_tag
        embeds = label_embed.reshape(c, descriptions_per_tag, -1).float()
        if names is None and c == BUILTIN_SIZE:
            names, bzh, bth = builtin_names()
            zh = zh if zh is not None else bzh
            thresholds = thresholds if thresholds is not None else bth
        if names is None:
            width = max(3, len(str(c - 1)))
            names = [f"tag_{i:0{width}d}" for i in range(c)]
        if thresholds is None:
            thresholds = np.full(c, OPEN_SET_THRESHOLD, dtype=np.float32)
        return cls(
            names=list(names),
            thresholds=np.asarray(thresholds, dtype=np.float32),
            zh=list(zh) if zh is not None else [None] * c,
            embeds=embeds,
            mask=torch.ones(embeds.shape[:2], dtype=torch.bool),
        )

    def content_id(self) -> str:
        """Hash of names, thresholds and embeddings: equal ids mean equal scores and tags."""
        h = hashlib.sha256()
        for name in self.names:
            h.update(name.encode("utf-8") + b"\0")
        h.update(np.ascontiguousarray(self.thresholds, dtype=np.float32).tobytes())
        h.update(self.mask.numpy().tobytes())
        h.update(self.embeds.detach().to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

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
# Descriptions per vocabulary, all tags together. Each costs ~5 KB in the shared prepared
# vocabulary (512 + 768 floats) and about as much again in the driver while it is built: the
# limit keeps that near 5 GiB per node; the built-in vocabulary has 233,835 (4585 x 51).
MAX_DESCRIPTIONS = 1_000_000
# content_id hashes the padded layout of earlier versions up to this many bytes (same ids as
# before for every vocabulary they could hold); a larger one gets an id from its flat rows.
LEGACY_ID_BYTES = 1 << 30


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
    """Every tag's description embeddings in one flat matrix, tag after tag (no padding).

    `embeds` [D_total, 512] unit rows; tag i's descriptions are `embeds[offsets[i]:offsets[i + 1]]`
    (`offsets` [C + 1], int64, from 0 to D_total). Memory follows the total number of
    descriptions: a tag with 100,000 descriptions costs its own rows, not every tag x 100,000.
    """

    names: list[str]
    thresholds: np.ndarray
    zh: list[str | None]
    embeds: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self):
        c = len(self.names)
        self.offsets = torch.as_tensor(self.offsets, dtype=torch.int64)
        o = self.offsets
        if (self.embeds.ndim != 2 or o.ndim != 1 or o.shape[0] != c + 1 or len(self.thresholds) != c
                or len(self.zh) != c):
            raise VocabularyError(
                f"vocabulary parts disagree: {c} names, {len(self.thresholds)} thresholds, "
                f"{len(self.zh)} Chinese names, embeddings {tuple(self.embeds.shape)}, offsets {tuple(o.shape)}")
        if int(o[0]) != 0 or int(o[-1]) != self.embeds.shape[0] or bool((o[1:] < o[:-1]).any()):
            raise VocabularyError(f"vocabulary offsets do not cut {self.embeds.shape[0]} description rows into tags")
        check_size(self.embeds.shape[0], self.counts, self.names, "the vocabulary")
        seen = set()
        for n in self.names:
            if not n or not n.strip():
                raise VocabularyError("a tag has an empty name")
            if n in seen:
                raise VocabularyError(f"tag {n!r} appears twice")
            seen.add(n)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def counts(self) -> torch.Tensor:
        """[C] descriptions per tag."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def max_descriptions(self) -> int:
        """The longest description list (what a padded layout would pad every tag to)."""
        return int(self.counts.max()) if len(self.names) else 0

    def descriptions(self, i: int) -> torch.Tensor:
        """[k, 512] tag i's description embeddings (a view)."""
        return self.embeds[int(self.offsets[i]):int(self.offsets[i + 1])]

    @classmethod
    def from_padded(cls, names, thresholds, zh, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> "Vocabulary":
        """From [C, D, 512] embeddings and a [C, D] mask of real descriptions (kept in slot order)."""
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
        mask = mask.to(torch.bool)
        offsets = torch.zeros(len(names) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(mask.sum(dim=1), 0)
        return cls(list(names), np.asarray(thresholds, dtype=np.float32), list(zh), embeds[mask], offsets)

    @classmethod
    def without_embeddings(cls, names, thresholds) -> "Vocabulary":
        """Names and thresholds only, for a process that gets its scores from a shared prepared form."""
        c = len(names)
        return cls(list(names), np.asarray(thresholds, dtype=np.float32), [None] * c, torch.zeros(0, 1),
                   torch.zeros(c + 1, dtype=torch.int64))

    @classmethod
    def from_label_embed(cls, label_embed: torch.Tensor, descriptions_per_tag: int,
                         names: list[str] | None = None, thresholds=None, zh=None) -> "Vocabulary":
        """The checkpoint's own vocabulary; names default to the built-in list when sizes fit."""
        c = label_embed.shape[0] // descriptions_per_tag
        embeds = label_embed[:c * descriptions_per_tag].float()  # label_embed is already flat, tag after tag
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
            offsets=torch.arange(c + 1, dtype=torch.int64) * descriptions_per_tag,
        )

    def subset(self, idx, thresholds=None) -> "Vocabulary":
        """The tags at positions `idx`, in that order (their rows copied once; all tags: shared)."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        th = np.asarray(self.thresholds if thresholds is None else thresholds, dtype=np.float32)
        if thresholds is None:
            th = th[idx.numpy()]
        names = [self.names[i] for i in idx.tolist()]
        zh = [self.zh[i] for i in idx.tolist()]
        if torch.equal(idx, torch.arange(len(self.names))):
            return Vocabulary(names, th, zh, self.embeds, self.offsets)
        counts = self.counts[idx]
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        return Vocabulary(names, th, zh, self.embeds[run_rows(self.offsets[:-1][idx], counts)], offsets)

    def content_id(self) -> str:
        """Hash of names, thresholds and embeddings: equal ids mean equal scores and tags.

        Where the padded layout of earlier versions was at most LEGACY_ID_BYTES, this is that
        layout's hash (the [C, D] mask, then the [C, D, 512] zero-padded embeddings), fed
        piece by piece without building it, so a vocabulary keeps the id it had; past that the
        padded bytes are too many to hash and the id hashes the counts and the flat rows.
        """
        h = hashlib.sha256()
        for name in self.names:
            h.update(name.encode("utf-8") + b"\0")
        h.update(np.ascontiguousarray(self.thresholds, dtype=np.float32).tobytes())
        counts = self.counts.numpy()
        emb = self.embeds.detach().to(torch.float32).contiguous().numpy()
        width = int(counts.max()) if len(counts) else 0
        row_bytes = emb.shape[1] * 4 if emb.ndim == 2 and emb.shape[0] else 0
        if len(counts) * width * row_bytes > LEGACY_ID_BYTES:
            h.update(b"flat-v2\0")
            h.update(counts.astype(np.int64).tobytes())
            h.update(emb)  # the array's own buffer: no copy
            return h.hexdigest()[:16]
        h.update((np.arange(width)[None, :] < counts[:, None]).tobytes())
        short = np.flatnonzero(counts < width)  # tags that were padded: zeros after their rows
        done, offsets = 0, self.offsets.numpy()
        for i in short.tolist():
            h.update(emb[offsets[done]:offsets[i + 1]])
            h.update(bytes((width - int(counts[i])) * row_bytes))
            done = i + 1
        h.update(emb[offsets[done]:])
        return h.hexdigest()[:16]


def run_rows(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row numbers of the given (start, count) runs, run after run: the gather index of chosen tags."""
    total = int(counts.sum())
    first = torch.zeros_like(counts)
    first[1:] = torch.cumsum(counts, 0)[:-1]
    return torch.repeat_interleave(starts - first, counts, output_size=total) + torch.arange(total)


def check_size(total: int, counts, names, where: str) -> None:
    """Refuse a vocabulary over MAX_DESCRIPTIONS before its rows are gathered, projected or shared."""
    if total <= MAX_DESCRIPTIONS:
        return
    counts = np.asarray(counts)
    big = int(np.argmax(counts)) if len(counts) else 0
    largest = f"; its largest tag, {names[big]!r}, has {int(counts[big]):,}" if len(counts) else ""
    raise VocabularyError(f"{where} has {total:,} descriptions in all{largest}; the limit is "
                          f"{MAX_DESCRIPTIONS:,} descriptions per vocabulary (ramplus_core.vocabulary.MAX_DESCRIPTIONS)")

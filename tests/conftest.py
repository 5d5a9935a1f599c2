"""Shared fixtures: the golden tiny model and checkpoints derived from it.

The golden checkpoint is the paper's own code on a tiny random model, so every checkpoint
the error tests need is made by re-saving its state dict with one thing changed: the test
then shows exactly that change is what the loader objects to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

GOLDEN_DIR = Path(__file__).parent / "golden" / "tiny"
GOLDEN_CKPT = GOLDEN_DIR / "ram_plus_checkpoint.pth"


@dataclass
class Golden:
    dir: Path
    expected: dict

    @property
    def checkpoint(self) -> Path:
        return self.dir / "ram_plus_checkpoint.pth"

    @property
    def image_paths(self) -> list[Path]:
        """In the order of pixels.npy and logits.npy."""
        return [self.dir / "images" / name for name in self.expected["images"]]

    @property
    def tags(self) -> list[str]:
        return self.expected["tags"]

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.expected["thresholds"], dtype=np.float32)

    @property
    def expected_tags(self) -> list[list[str]]:
        return self.expected["expected_tags"]

    def pixels(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.dir / "pixels.npy"))

    def logits(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.dir / "logits.npy"))


@pytest.fixture(scope="session")
def golden() -> Golden:
    return Golden(GOLDEN_DIR, json.loads((GOLDEN_DIR / "expected.json").read_text()))


def with_golden_vocabulary(model, golden: Golden):
    """The golden tags' names and thresholds (the tiny file only carries embeddings)."""
    v = model.vocabulary
    model.set_vocabulary(replace(v, names=list(golden.tags), thresholds=golden.thresholds))
    return model


def load_tiny(golden: Golden, **kwargs):
    from ramplus_core import RamPlus

    return with_golden_vocabulary(RamPlus.from_checkpoint(str(golden.checkpoint), device="cpu", **kwargs), golden)


@pytest.fixture(scope="session")
def tiny_model(golden):
    """Shared by many tests: do not change its vocabulary or settings in a test."""
    return load_tiny(golden)


@pytest.fixture(scope="session")
def golden_tokens(tiny_model, golden) -> torch.Tensor:
    """Image tokens of pixels.npy, so head tests need not rerun the backbone."""
    return tiny_model.image_tokens(golden.pixels())


@pytest.fixture(scope="session")
def golden_logits_ours(tiny_model, golden_tokens) -> torch.Tensor:
    return tiny_model.logits_from_tokens(golden_tokens)


@pytest.fixture(scope="session")
def golden_state() -> dict[str, torch.Tensor]:
    """The official-layout state dict of the golden file; never mutate it, copy it."""
    return torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)["model"]


@pytest.fixture
def write_checkpoint(golden_state, tmp_path) -> Callable[..., Path]:
    """Write a variant of the golden checkpoint and return its path.

    edit: state dict -> state dict (gets a shallow copy; replace tensors, do not modify them)
    random: replace every float tensor by seeded random values of the same shape
    dtype: cast float tensors (e.g. torch.float16, as some released files are)
    rename: (old_prefix, new_prefix), e.g. ("tagging_head.", "vision_multi.")
    extra: more top-level entries next to "model" (e.g. optimizer state)
    bare: save the state dict itself, not {"model": state_dict}
    """
    counter = iter(range(1_000_000))

    def make(*, edit=None, random: bool = False, dtype=None, rename=None, extra=None,
             bare: bool = False, name: str | None = None) -> Path:
        sd = dict(golden_state)
        if random:
            g = torch.Generator().manual_seed(0)
            sd = {k: (torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point() else v) for k, v in sd.items()}
        if dtype is not None:
            sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        if rename is not None:
            old, new = rename
            sd = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
        if edit is not None:
            sd = edit(sd)
        top = sd if bare else {"model": sd, **(extra or {})}
        path = tmp_path / (name or f"ckpt_{next(counter)}.pth")
        torch.save(top, path)
        return path

    return make

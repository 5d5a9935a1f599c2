"""The CLIP ViT-B/16 text tower that turns tag descriptions into RAM++ embeddings.

RAM++'s built-in descriptions were embedded with CLIP ViT-B/16's text encoder
(`text_embeds`, L2-normalised). New tags must be embedded by the same tower, or their
scores mean nothing. The user supplies the folder in the Hugging Face layout (the
`openai/clip-vit-base-patch16` repository, or a text-only export of it); nothing is
downloaded from a hub.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import VocabularyError

MAX_TOKENS = 77
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _local_folder(uri: str) -> str:
    """Remote folders (s3://...) are copied once to a temp dir; transformers reads local files."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if not os.path.isdir(path):
            raise VocabularyError(f"text_encoder folder not found: {path} (expected a CLIP ViT-B/16 folder in the Hugging Face layout)")
        return path
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    dest = tempfile.mkdtemp(prefix="ramplus-clip-")
    try:
        fs.get(root.rstrip("/") + "/", dest + "/", recursive=True)
    except Exception as e:  # noqa: BLE001
        raise VocabularyError(f"cannot copy text_encoder folder {uri}: {type(e).__name__}: {e}") from None
    return dest


def folder_id(path: str) -> str:
    """Content hash of the tower's config and weights: the embedding cache is keyed by it."""
    h = hashlib.sha256()
    names = ["config.json"] + [n for n in _WEIGHT_FILES if os.path.exists(os.path.join(path, n))]
    for name in names:
        p = Path(path, name)
        if not p.exists():
            continue
        h.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


class TextTower:
    """Batched, normalised CLIP text embeddings; on the GPU when there is one."""

    def __init__(self, uri: str, device=None, batch_size: int = 256):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        path = _local_folder(str(uri))
        missing = [n for n in ("config.json",) if not os.path.exists(os.path.join(path, n))]
        if missing or not any(os.path.exists(os.path.join(path, n)) for n in _WEIGHT_FILES):
            raise VocabularyError(
                f"{uri} is not a CLIP folder in the Hugging Face layout: it needs config.json, "
                f"model.safetensors (or pytorch_model.bin) and the tokenizer files"
            )
        self.uri = str(uri)
        self.id = folder_id(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a full CLIP folder also holds the vision tower: not news
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model, info = CLIPTextModelWithProjection.from_pretrained(path, output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise VocabularyError(f"cannot load the CLIP text tower from {uri}: {type(e).__name__}: {e}") from None
        finally:
            hf_logging.set_verbosity(level)
        missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
        if missing:
            raise VocabularyError(f"{uri}: the text tower's weights are incomplete, missing {missing[:5]}")
        self.model = model.eval().to(self.device)
        self.dim = int(self.model.config.projection_dim)

    @torch.inference_mode()
    def encode(self, texts: list[str], by_length: bool = True) -> np.ndarray:
        """texts -> float32 [n, dim], unit rows; longer texts are truncated at 77 tokens.

        A batch costs its longest text times its size, so texts are batched in order of
        their token count (`by_length`): LLM descriptions run from 8 to 77 tokens, and
        batches of similar lengths carry little padding. The order changes nothing else: the
        text tower's attention is causal and masked, so padding never reaches a text's tokens.
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if by_length else range(len(ids))
        order = np.asarray(list(order), dtype=np.int64)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            emb = self.model(**enc).text_embeds.float()
            out[rows] = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
        return out

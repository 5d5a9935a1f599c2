"""A small random CLIP model and tokenizer saved in the Hugging Face layout.

The real tower (openai/clip-vit-base-patch16) cannot be downloaded here; this one has the
same file layout (a full CLIPModel folder, as the hub repository holds) so the loading code
is the code users run.
"""

from __future__ import annotations

import string

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer


def build_clip_folder(path, projection_dim: int = 512, seed: int = 0) -> str:
    torch.manual_seed(seed)
    chars = list(string.ascii_lowercase + string.digits + ".,'-!?()")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for a, b in (("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("a", "n"), ("p", "h"), ("ph", "o")):
        merged = a + b
        if merged not in vocab:
            vocab[merged] = len(vocab)
        merges.append((a, b))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=projection_dim,
    )
    CLIPModel(cfg).eval().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)

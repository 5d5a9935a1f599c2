"""Text tower: descriptions encoded per second, and what the embedding cache saves on a re-run.

    .venv/bin/python benchmarks/text_tower.py              # 10 OpenImages-rare tags, 510 descriptions, ~4 min
    .venv/bin/python benchmarks/text_tower.py --limit 0    # all 200 tags, 10,200 descriptions (~40 min on 2 cores)

The released CLIP ViT-B/16 weights cannot be downloaded here, so the tower is the real
architecture (12 layers, width 512, 77 positions, projection 512) with random weights: the
cost of a forward pass does not depend on the weight values. Its tokenizer is a stand-in
built from the corpus's own words (CLIP's BPE vocabulary is part of the download), so the
token counts it gives are printed next to the rates; CLIP's BPE gives about as many tokens
as words for plain English. The cost grows with the padded length of each batch, so a
model-only row at fixed lengths (16, 32, 77 tokens) is there to read the figure for other
tokenizers off.

Encoding rows: the same descriptions in file order and batched by token count (what
`TextTower.encode` does), for the ratio. Vocabulary rows go through `load_vocabulary` with a
cache folder, as `--vocab` in the job does: a cold run encodes every sentence, a re-run
encodes none (hit rate 1.0), and ten more tags (the prompt-template ensemble) encode only
their own sentences.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tables import machine_line, table  # noqa: E402

DESCRIPTIONS = REPO / "ramplus_core" / "data" / "openimages_rare_200_llm_tag_descriptions.json"
WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")  # close to CLIP's pre-tokenizer on lowercase text


def corpus(limit: int | None) -> tuple[list[dict], list[str]]:
    entries = json.loads(DESCRIPTIONS.read_text())
    items = [{k: list(v)} for e in entries for k, v in e.items()]  # one {tag: [sentences]} per tag
    if limit:
        kept, n = [], 0
        for it in items:
            if n >= limit:
                break
            kept.append(it)
            n += len(next(iter(it.values())))
        items = kept
    texts = [s for it in items for s in next(iter(it.values()))]
    return items, texts


def build_tower(path: Path, texts: list[str]) -> str:
    """CLIP ViT-B/16's text configuration, random weights, a tokenizer that knows the corpus's words."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    words = sorted({w for t in texts for w in WORD.findall(t.lower())})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in words:  # merge each word left to right into one token, as BPE would for a known word
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            pair = (left, right)
            left = left + right
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    cfg = CLIPTextConfig(vocab_size=max(49408, len(vocab)), hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                         projection_dim=512, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModelWithProjection(cfg).eval().save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def model_only(tower, lengths=(16, 32, 77), batch: int = 64, reps: int = 1) -> list[tuple]:
    import torch

    rows = []
    for n_tok in lengths:
        ids = torch.randint(0, 40000, (batch, n_tok))
        ids[:, -1] = tower.model.config.eos_token_id
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            tower.model(input_ids=ids[:8], attention_mask=mask[:8])  # warm-up
            t = time.perf_counter()
            for _ in range(reps):
                tower.model(input_ids=ids, attention_mask=mask)
            dt = (time.perf_counter() - t) / reps
        rows.append(("model only", f"{n_tok} tokens, batch {batch}", f"{batch / dt:.0f} descriptions/s", ""))
    return rows


def vocab_file(path: Path, tower: str, cache: Path, extra: int = 0) -> str:
    import yaml

    doc = {"builtin": "none", "import": [str(path.parent / "descriptions.json")], "text_encoder": tower,
           "cache": str(cache)}
    if extra:
        doc["tags"] = [{"name": f"house style {i}"} for i in range(extra)]
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=510,
                   help="use the first tags' descriptions, about this many (0: all 10,200)")
    p.add_argument("--batch", type=int, default=256, help="TextTower batch size")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from ramplus_core.text_tower import TextTower
    from ramplus_core.vocab_file import TEMPLATES, load_vocabulary
    from ramplus_core.vocabulary import Vocabulary

    tmp = Path(tempfile.mkdtemp(prefix="ramplus-text-"))
    try:
        items, texts = corpus(args.limit or None)
        (tmp / "descriptions.json").write_text(json.dumps(items))
        t = time.perf_counter()
        folder = build_tower(tmp / "clip", texts)
        build_s = time.perf_counter() - t
        tower = TextTower(folder, batch_size=args.batch)
        lens = np.array([len(tower.tokenizer(s, truncation=True, max_length=77)["input_ids"]) for s in texts])
        words = np.array([len(WORD.findall(s.lower())) for s in texts])
        rows = [("section", "what", "result", "notes"),
                ("corpus", f"{len(items)} tags, {len(texts)} descriptions", f"{words.mean():.1f} words each",
                 f"stand-in tokens: mean {lens.mean():.1f}, p95 {np.percentile(lens, 95):.0f}, max {lens.max()} "
                 f"(with start and end); tower built in {build_s:.1f} s")]
        rows += model_only(tower)
        rates = {}
        for label, by_length in (("file order", False), ("by token count", True)):
            t = time.perf_counter()
            tower.encode(texts, by_length=by_length)
            rates[by_length] = len(texts) / (time.perf_counter() - t)
            rows.append(("encode", f"{len(texts)} descriptions, {label}, batch {args.batch}",
                         f"{rates[by_length]:.1f} descriptions/s",
                         f"{rates[True] / rates[False]:.2f}x file order" if by_length else ""))
        # builtin: none, so the checkpoint's own vocabulary only has to give the width (512)
        builtin = Vocabulary.from_label_embed(torch.nn.functional.normalize(torch.randn(2, 512), dim=-1), 1)
        cache = tmp / "cache"
        for label, extra in (("cold cache", 0), ("re-run", 0), (f"+10 tags ({len(TEMPLATES)} templates each)", 10)):
            t = time.perf_counter()
            vb = load_vocabulary(vocab_file(tmp / "vocab.yaml", folder, cache, extra), builtin, tower=tower)
            dt = time.perf_counter() - t
            rate = f"{vb.texts_encoded / dt:.0f} descriptions/s" if vb.texts_encoded else f"{dt:.2f} s"
            rows.append(("vocabulary", label, rate,
                         f"{vb.texts_encoded} encoded, cache hit rate {vb.cache_hit_rate:.3f}, "
                         f"{len(vb.vocabulary)} tags, {dt:.1f} s"))
        print(table(rows))
        print(f"{machine_line()}; torch threads {torch.get_num_threads()}; device {tower.device}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

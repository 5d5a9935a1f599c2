"""The run's vocabulary: a vocabulary file, a subset, thresholds; and what a new one can reuse.

Precedence, each step applied to the result of the one before:

1. `vocabulary.file` (`--vocab FILE`): the checkpoint's built-in tags (all, none or some)
   plus the file's own tags, with their thresholds; without a file, the built-in tags.
2. `vocabulary.tags` / `vocabulary.tags_file`: keep only these tags (of step 1).
3. `vocabulary.threshold`: one threshold for every kept tag.
4. `vocabulary.thresholds_file`: per-tag thresholds over whatever step 1-3 gave.

Growing a vocabulary. RAM++ tags never attend to each other, so a tag's score depends only
on the image and that tag's description embeddings. A tag is therefore "the same tag" in
two vocabularies when its name and its embeddings are equal: its identity is a hash of both
(a changed description is a new tag; a changed threshold is not). Each vocabulary a run
applies leaves a small descriptor, `_vocab/<vocab_id>.json` (names, identities,
thresholds), so a later run can tell which tags of an image's committed row it can copy.

Copying is exact only when the old row kept every score the new row needs. A row holds the
scores at or over the floor it was written with (plus every tag that was on). A tag absent
from it scored under that floor, which decides it for the new row only if the new floor and
the tag's new threshold are both at or over the old floor; otherwise that tag is computed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np

from ..errors import ConfigError, VocabularyError
from ..schema_errors import clip
from .config import VocabularyConfig
from .storage import Storage, join

VOCAB_DIR = "_vocab"


# -- building the run's vocabulary ---------------------------------------------------------------

def _read_lines(key: str, path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if not lines:
        raise ConfigError(f"{key}: {path} has no entries")
    return lines


def _read_thresholds(path: str) -> dict[str, float]:
    """`tag<TAB>0.7`, `tag,0.7` or `tag 0.7` per line (tag names may contain spaces)."""
    key = "vocabulary.thresholds_file"
    out = {}
    for n, line in enumerate(_read_lines(key, path), 1):
        sep = "\t" if "\t" in line else ("," if "," in line else None)
        parts = line.rsplit(sep, 1) if sep else line.rsplit(None, 1)
        try:
            name, value = parts[0].strip(), float(parts[1])
        except (IndexError, ValueError):
            raise ConfigError(f"{key}: {path} line {n}: expected 'tag<TAB>threshold', got {line!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: {path} line {n}: threshold {value} is not between 0 and 1")
        out[name] = value
    return out


def select_vocabulary(vocab, vc: VocabularyConfig):
    """Optionally keep only some tags and/or change thresholds (steps 2-4 above).

    Scores of the kept tags do not change: RAM++ tags never attend to each other.
    """
    where = "the vocabulary file's" if vc.file else "the checkpoint's"
    names = None
    key = "vocabulary.tags"
    if vc.tags_file:
        key = "vocabulary.tags_file"
        names = _read_lines(key, vc.tags_file)
    elif vc.tags:
        names = list(vc.tags)
    if names is None and vc.threshold is None and vc.thresholds_file is None:
        return vocab
    index = {n: i for i, n in enumerate(vocab.names)}
    if names is None:
        idx = list(range(len(vocab.names)))
    else:
        missing = [n for n in names if n not in index]
        if missing:
            raise ConfigError(f"{key}: {len(missing)} tag(s) not in {where} vocabulary, e.g. {missing[:3]}")
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}: a tag is listed twice")
        idx = [index[n] for n in names]
    thresholds = np.asarray(vocab.thresholds, dtype=np.float32)[idx]
    if vc.threshold is not None:
        thresholds = np.full(len(idx), vc.threshold, dtype=np.float32)
    if vc.thresholds_file is not None:
        given = _read_thresholds(vc.thresholds_file)
        unknown = [n for n in given if n not in index]
        if unknown:
            raise ConfigError(f"vocabulary.thresholds_file: {len(unknown)} tag(s) not in {where} "
                              f"vocabulary, e.g. {unknown[:3]}")
        pos = {vocab.names[i]: j for j, i in enumerate(idx)}
        for name, value in given.items():
            if name in pos:
                thresholds[pos[name]] = value
    return vocab.subset(idx, thresholds)


def _in_file(uri: str, e: VocabularyError) -> str:
    """The error under the key that named the file, which the message then need not repeat."""
    return f"vocabulary.file {clip(uri, 200)}: {str(e).removeprefix(clip(uri, 200) + ': ')}"


def check_vocabulary(vc: VocabularyConfig) -> None:
    """Read and check the vocabulary settings' files before any checkpoint byte is read.

    A typo in a tags file or a malformed vocabulary file then fails in a second rather than
    after a model load; whether named built-in tags exist is known only from the checkpoint.
    """
    if vc.tags_file:
        _read_lines("vocabulary.tags_file", vc.tags_file)
    if vc.thresholds_file:
        _read_thresholds(vc.thresholds_file)
    if vc.file:
        from ..vocab_file import check_file

        try:
            check_file(vc.file)
        except VocabularyError as e:
            raise VocabularyError(_in_file(vc.file, e)) from None


def build_vocabulary(vc: VocabularyConfig, builtin):
    """The run's vocabulary from the checkpoint's built-in one and the settings (see above)."""
    vocab = builtin
    if vc.file:
        from ..vocab_file import load_vocabulary

        try:
            vocab = load_vocabulary(vc.file, builtin).vocabulary
        except VocabularyError as e:
            raise VocabularyError(_in_file(vc.file, e)) from None
    return select_vocabulary(vocab, vc)


# -- identities and descriptors -------------------------------------------------------------------

def tag_identities(vocab) -> list[str]:
    """sha256(name, the tag's description embeddings as float32)[:16] per tag."""
    import torch

    emb = vocab.embeds.detach().to(torch.float32).cpu().contiguous().numpy()
    offsets = vocab.offsets.tolist()
    out = []
    for i, name in enumerate(vocab.names):
        h = hashlib.sha256(name.encode("utf-8") + b"\0")
        h.update(emb[offsets[i]:offsets[i + 1]])  # a contiguous slice: hashed in place, not copied
        out.append(h.hexdigest()[:16])
    return out


def descriptor(vocab, vocab_id: str) -> dict:
    return {"vocab_id": vocab_id, "names": list(vocab.names), "identities": tag_identities(vocab),
            "thresholds": [float(x) for x in np.asarray(vocab.thresholds, dtype=np.float32)]}


def descriptor_uri(output_uri: str, vocab_id: str) -> str:
    return join(output_uri, VOCAB_DIR, f"{vocab_id}.json")


def save_descriptor(storage: Storage, output_uri: str, desc: dict) -> None:
    """Content-addressed, so writing it again (a resumed run) changes nothing."""
    from .manifest import put_bytes

    put_bytes(storage, descriptor_uri(output_uri, desc["vocab_id"]), json.dumps(desc).encode("utf-8"))


def load_descriptor(storage: Storage, output_uri: str, vocab_id: str) -> Optional[dict]:
    from .manifest import get_json

    return get_json(storage, descriptor_uri(output_uri, vocab_id))


def copyable(new: dict, base: dict, new_floor: float, base_floor: Optional[float]) -> np.ndarray:
    """bool per tag of `new`: its score can be copied exactly from a row written with `base`.

    Same identity, and (the floor rule in the module docstring) the old floor is at or
    under both the new floor and the tag's new threshold.
    """
    thr = np.asarray(new["thresholds"], dtype=np.float32)
    if base_floor is None or np.float32(new_floor) < np.float32(base_floor):
        return np.zeros(len(thr), dtype=bool)
    ids = set(base["identities"])
    same = np.array([t in ids for t in new["identities"]], dtype=bool)
    return same & (thr >= np.float32(base_floor))

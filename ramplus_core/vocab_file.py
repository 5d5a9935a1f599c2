"""Vocabulary files: the built-in tags, a subset of them, or none, plus a library's own tags.

    builtin: all            # or none, or [dog, cat, ...]
    text_encoder: /models/clip-vit-base-patch16   # CLIP ViT-B/16 folder (HF layout), any fsspec URL
    cache: /var/cache/ramplus/text               # optional: embeddings kept by (tower, text)
    import: [openimages_rare_200_llm_tag_descriptions.json]   # [{tag: [sentences]}, ...]
    tags:
      - name: company logo
        descriptions: ["a photo of a company logo.", "..."]
        threshold: 0.6
        zh: 公司标志
      - name: house style
        embeddings: s3://bucket/vocab/house_style.npy   # [k, 512], unit rows
      - name: skateboard park   # neither: the prompt-template ensemble

Every mistake is reported with the tag's name, before any model work starts: the file's
shape (keys, types, ranges) is a pydantic model, read without YAML aliases, and a mistake is
one short sentence (schema_errors) whatever the size of the value that caused it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import numpy as np
import torch
import yaml
from pydantic import AfterValidator, BeforeValidator, Field, Strict, ValidationError, model_validator

from . import plain_yaml
from .errors import VocabularyError
from .schema_errors import clip, explain
from .schema_types import Num, Section, Text
from . import vocabulary as limits  # MAX_DESCRIPTIONS, read when a file is checked
from .vocabulary import OPEN_SET_THRESHOLD, Vocabulary, check_size

UNIT_TOLERANCE = 1e-3
MAX_NAME = 200  # characters of a tag name or its Chinese name
MAX_DESCRIPTION = 1000  # characters of one description (CLIP reads its first 77 tokens)

# Our own phrasings; their embeddings are averaged into one description (a CLIP-style
# prompt ensemble) for a tag given by name alone.
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a photo of many {}.",
)


def _number_as_name(v):
    """`name: 1984` is the tag "1984" (YAML reads it as a number)."""
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _stripped_name(v: str) -> str:
    if not v.strip():
        raise ValueError("a tag has an empty name")
    return v.strip()


def _builtin(v):
    if v is None or v in ("all", "none") or (
            isinstance(v, list) and all(isinstance(s, str) and len(s) <= MAX_NAME for s in v)):
        return v
    raise ValueError(f"must be 'all', 'none' or a list of tag names (each at most {MAX_NAME} characters)")


Name = Annotated[str, BeforeValidator(_number_as_name), Strict(), Field(max_length=MAX_NAME),
                 AfterValidator(_stripped_name)]


class TagEntry(Section):
    name: Name
    descriptions: Optional[list[Annotated[Text, Field(max_length=MAX_DESCRIPTION)]]] = None
    embeddings: Optional[Text] = None
    threshold: Num = Field(OPEN_SET_THRESHOLD, gt=0, lt=1)
    zh: Optional[Annotated[str, Strict(), Field(max_length=MAX_NAME)]] = None

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v):
        """`- skateboard park` is a tag given by name alone."""
        return {"name": v} if isinstance(v, str) else v


class VocabFile(Section):
    builtin: Annotated[Any, AfterValidator(_builtin)] = "all"
    tags: Optional[list[TagEntry]] = None
    import_: Optional[list[Text]] = Field(None, alias="import")
    text_encoder: Optional[Text] = None
    cache: Optional[Text] = None


@dataclass
class TagSpec:
    name: str
    where: str
    descriptions: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    threshold: float = OPEN_SET_THRESHOLD
    zh: str | None = None


def _read_text(uri: str) -> str:
    import fsspec

    try:
        with fsspec.open(uri, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise VocabularyError(f"vocabulary file not found: {clip(uri, 200)}") from None
    except Exception as e:  # noqa: BLE001
        raise VocabularyError(f"cannot read {clip(uri, 200)}: {type(e).__name__}: {clip(str(e), 200)}") from None


def _read_npy(uri: str, tag: str, room: int) -> np.ndarray:
    """The file's array, read once; its header is read first, so rows past `room` (what the
    vocabulary's description limit leaves) are refused before the body is read."""
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            rows = _npy_rows(f)
            if rows > room:
                raise VocabularyError(
                    f"tag {tag!r}: {clip(uri, 200)} holds {rows:,} descriptions, more than the {room:,} left under the limit of "
                    f"{limits.MAX_DESCRIPTIONS:,} descriptions per vocabulary (ramplus_core.vocabulary.MAX_DESCRIPTIONS)")
            f.seek(0)
            arr = np.load(f, allow_pickle=False)
    except VocabularyError:
        raise
    except FileNotFoundError:
        raise VocabularyError(f"tag {tag!r}: embeddings file not found: {clip(uri, 200)}") from None
    except Exception as e:  # noqa: BLE001
        raise VocabularyError(f"tag {tag!r}: cannot read embeddings {clip(uri, 200)} as .npy: {clip(str(e), 200)}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise VocabularyError(f"tag {tag!r}: {clip(uri, 200)} is not a .npy array (an .npz archive?)")
    return arr


def _npy_rows(f) -> int:
    """Rows of the .npy array in `f` from its header alone (0 when the header is not one we read)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        shape = read(f)[0] if read else ()
    except Exception:  # noqa: BLE001 - np.load below gives the precise error
        return 0
    return int(shape[0]) if len(shape) == 2 else 1


def read_llm_descriptions(uri: str) -> list[TagSpec]:
    """The paper's LLM-description JSON: a list of {tag: [sentences]} objects."""
    where = clip(uri, 200)
    try:
        data = json.loads(_read_text(uri))
    except json.JSONDecodeError as e:
        raise VocabularyError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise VocabularyError(f"{where}: expected a list of {{tag: [sentences]}} objects")
    specs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise VocabularyError(f"{where}: entry {i} is not an object")
        for name, sentences in item.items():
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise VocabularyError(f"{where}: tag {clip(name)!r}: descriptions must be a list of strings")
            specs.append(TagSpec(name=str(name).strip(), where=uri, descriptions=list(sentences)))
    return specs


def _parse_tag(entry: dict, i: int, base: str, room: int) -> TagSpec:
    """A TagSpec from one entry of a checked file (`_read_doc`); reads its embeddings file if any."""
    spec = TagSpec(name=entry["name"], where=f"tags[{i}]", descriptions=list(entry["descriptions"] or []),
                   threshold=float(entry["threshold"]), zh=entry["zh"])
    if entry["embeddings"] is not None:
        spec.embeddings = _read_npy(_resolve(entry["embeddings"], base), spec.name, room)
    return spec


def _rows_of(spec: TagSpec) -> int:
    """The rows a tag will have in the vocabulary: its embeddings, its descriptions, or one
    (the template ensemble is averaged into one description)."""
    return spec.embeddings.shape[0] if spec.embeddings is not None else max(1, len(spec.descriptions))


def _parse_tags(doc: dict, base: str, specs: list[TagSpec], builtin_rows: int, uri: str) -> None:
    """Append the file's own tags to `specs` (the imports'), then hold the whole to MAX_DESCRIPTIONS:
    before any embeddings file is read past the limit, and before any text is encoded."""
    total = builtin_rows + sum(_rows_of(s) for s in specs)
    for i, entry in enumerate(doc.get("tags") or []):
        specs.append(_parse_tag(entry, i, base, room=max(0, limits.MAX_DESCRIPTIONS - total)))
        total += _rows_of(specs[-1])
    counts = [_rows_of(s) for s in specs]
    check_size(total, counts, [s.name for s in specs], uri)


def _resolve(path: str, base: str) -> str:
    """Paths in a vocabulary file are relative to the file itself."""
    if "://" in path or path.startswith("/") or not base:
        return path
    return base.rstrip("/") + "/" + path


def _check_embeddings(name: str, emb: np.ndarray, dim: int) -> np.ndarray:
    if emb.ndim == 1:
        emb = emb[None, :]
    if emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] == 0:
        raise VocabularyError(f"tag {name!r}: embeddings must be [k, {dim}], got {list(emb.shape)}")
    emb = emb.astype(np.float32, copy=False)  # may be read-only (the file's buffer): never written
    if not np.isfinite(emb).all():
        raise VocabularyError(f"tag {name!r}: embeddings contain NaN or infinity")
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb))  # no [k, dim] temporary
    if np.abs(norms - 1.0).max() > UNIT_TOLERANCE:
        raise VocabularyError(f"tag {name!r}: embeddings must be unit vectors (norms {norms.min():.4f}..{norms.max():.4f})")
    return emb


def check_file(uri: str) -> list[str]:
    """Validate a vocabulary file without a model; the URIs it refers to (imports, embeddings, text encoder).

    The job runs this before it reads the checkpoint, so a wrong tag or a missing import fails
    in a second, and it identifies the file's inputs for the id cache (job/model_ids.py).
    Which built-in tags exist is checked later, against the checkpoint.
    """
    doc, base = _read_doc(uri)
    refs, specs = [], []
    for imp in doc.get("import") or []:
        refs.append(_resolve(imp, base))
        specs.extend(read_llm_descriptions(refs[-1]))
    _parse_tags(doc, base, specs, 0, uri)
    for entry in doc.get("tags") or []:
        if entry["embeddings"] is not None:
            refs.append(_resolve(entry["embeddings"], base))
    if doc.get("text_encoder"):
        refs.append(_resolve(str(doc["text_encoder"]), base))
    return refs


references = check_file


def _read_doc(uri: str) -> tuple[dict, str]:
    """The file checked against VocabFile, as plain data (tags as mappings with every key)."""
    text = _read_text(uri)
    try:
        raw = plain_yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise VocabularyError(f"{clip(uri, 200)}: {plain_yaml.problem(e)}") from None
    try:
        doc = VocabFile.model_validate({} if raw is None else raw)
    except ValidationError as e:
        raise VocabularyError(f"{clip(uri, 200)}: {_which_tag(raw, e)}{explain(e, VocabFile)}") from None
    return doc.model_dump(by_alias=True), (uri.rsplit("/", 1)[0] if "/" in uri else "")


def _which_tag(raw, err: ValidationError) -> str:
    """"tag 'name': " when the first error is inside a tag that has a name, so the message says which."""
    loc = err.errors(include_url=False)[0]["loc"]
    if len(loc) > 2 and loc[0] == "tags" and isinstance(loc[1], int) and loc[2] != "name" and isinstance(raw, dict):
        entry = (raw.get("tags") or [None] * (loc[1] + 1))[loc[1]]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"].strip():
            return f"tag {clip(entry['name'].strip())!r}: "
    return ""


def load_vocabulary(uri: str, builtin: Vocabulary, tower=None, cache=None) -> "VocabularyBuild":
    """Parse, validate, encode what is new, and return the merged Vocabulary.

    `tower`: a loaded TextTower to use instead of the file's `text_encoder` (only needed when
    some tag has no embeddings); `cache`: an EmbeddingCache instead of the file's `cache`.
    """
    doc, base = _read_doc(uri)

    sel = doc.get("builtin", "all")
    if sel == "all":
        keep = list(range(len(builtin)))
    elif sel in ("none", None):
        keep = []
    elif isinstance(sel, list):
        index = {n: i for i, n in enumerate(builtin.names)}
        missing = [s for s in sel if s not in index]
        if missing:
            raise VocabularyError(f"{clip(uri, 200)}: builtin lists {len(missing)} tag(s) that are not built in: "
                                  f"{[clip(m, 40) for m in missing[:3]]}")
        keep = [index[s] for s in sel]
    else:
        raise VocabularyError(f"{uri}: builtin must be 'all', 'none' or a list of tag names, got {sel!r}")

    specs: list[TagSpec] = []
    for imp in doc.get("import") or []:
        specs.extend(read_llm_descriptions(_resolve(str(imp), base)))
    _parse_tags(doc, base, specs, int(builtin.counts[keep].sum()), uri)

    seen = {builtin.names[i]: "builtin" for i in keep}
    for s in specs:
        if not s.name:
            raise VocabularyError(f"{s.where}: a tag has an empty name")
        if s.name in seen:
            raise VocabularyError(f"tag {s.name!r} is defined twice ({seen[s.name]} and {s.where})")
        seen[s.name] = s.where

    dim = builtin.embeds.shape[-1]
    need_text = [s for s in specs if s.embeddings is None]
    encoded = 0
    tower_id = None
    if need_text:
        enc_uri = doc.get("text_encoder")
        if tower is None:
            if not enc_uri:
                raise VocabularyError(
                    f"tag {need_text[0].name!r} needs text encoding, but {uri} sets no text_encoder "
                    f"(a CLIP ViT-B/16 folder in the Hugging Face layout)")
            from .text_tower import TextTower

            tower = TextTower(_resolve(str(enc_uri), base))
        tower_id = tower.id
        if cache is None and doc.get("cache"):
            from .embedding_cache import EmbeddingCache

            cache = EmbeddingCache(_resolve(str(doc["cache"]), base), tower.id)
        texts = []
        for s in need_text:
            texts.extend(s.descriptions or [t.format(s.name) for t in TEMPLATES])
        emb = cache.get_or_encode(texts, tower.encode) if cache is not None else tower.encode(texts)
        encoded = len(texts) if cache is None else cache.misses
        pos = 0
        for s in need_text:
            k = len(s.descriptions) or len(TEMPLATES)
            block = emb[pos:pos + k]
            pos += k
            if not s.descriptions:  # prompt ensemble: one averaged description
                block = block.mean(axis=0, keepdims=True)
                block = block / np.linalg.norm(block, axis=1, keepdims=True)
            s.embeddings = block
    for s in specs:
        s.embeddings = _check_embeddings(s.name, s.embeddings, dim)

    vocab = _merge(builtin.subset(keep), specs)
    return VocabularyBuild(vocab, num_builtin=len(keep), num_new=len(specs), texts_encoded=encoded,
                           cache_hit_rate=cache.hit_rate if cache is not None else math.nan, tower_id=tower_id)


def _merge(kept: Vocabulary, specs: list[TagSpec]) -> Vocabulary:
    """The kept built-in tags, then the file's: one flat matrix, each row copied once."""
    if not specs:
        return kept
    counts = torch.cat([kept.counts, torch.tensor([s.embeddings.shape[0] for s in specs], dtype=torch.int64)])
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    embeds = torch.empty(int(offsets[-1]), kept.embeds.shape[-1])
    row = kept.embeds.shape[0]
    embeds[:row] = kept.embeds
    rows = embeds.numpy()
    for s in specs:
        rows[row:row + s.embeddings.shape[0]] = s.embeddings
        row += s.embeddings.shape[0]
    return Vocabulary(
        names=kept.names + [s.name for s in specs],
        thresholds=np.concatenate([kept.thresholds, np.array([s.threshold for s in specs], dtype=np.float32)]),
        zh=kept.zh + [s.zh for s in specs],
        embeds=embeds,
        offsets=offsets,
    )


@dataclass
class VocabularyBuild:
    vocabulary: Vocabulary
    num_builtin: int
    num_new: int
    texts_encoded: int
    cache_hit_rate: float
    tower_id: str | None

"""Ground truth in the paper's format, tag lists, and matching annotated images to results.

Annotation files are the ones the RAM++ benchmarks ship (`*_ram_annots.txt`): one image per
line, `image_id,tag1,tag2,...`. An image with no tags (`image_id` alone) is a true negative
for every class, which matters for AP. Fields are read with the csv module, so a tag that
contains a comma can be quoted; plain lines read exactly as the paper's `split(",")`.

Tag lists are one name per line, in the benchmark's class order. Some of the paper's lists
name the same tag on two lines (two benchmark classes that map to one tag, e.g. "missile" in
imagenet_multi_1000); such names are one class here, with the number of lines kept so the
paper's per-line weighting can still be reported (see `metrics.evaluate`).

Image ids are matched to result URIs by a key, configurable because benchmarks differ in
what the id holds:
    stem  (default) file name without its extension: "0a1b2c" matches s3://b/imgs/0a1b2c.jpg,
          and so does "imgs/0a1b2c.jpg"; the paper's ids have no extension
    name  file name with its extension
    path  the id is a relative path; the URI must end with "/" + id
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .common import EvaluationError

KEY_MODES = ("stem", "name", "path")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_BUILTIN_SUFFIXES = ("_ram_taglist.txt", "_taglist.txt")


def builtin_taglists() -> dict[str, Path]:
    """Benchmark tag lists shipped with the package, by short name (e.g. 'openimages_common_214')."""
    out = {}
    for p in sorted(DATA_DIR.glob("*_taglist.txt")):
        name = p.name
        for suf in _BUILTIN_SUFFIXES:
            if name.endswith(suf):
                out[name[: -len(suf)]] = p
                break
    return out


def _read_text(uri: str, what: str) -> str:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise EvaluationError(f"{what} not found: {uri}") from None
    except IsADirectoryError:
        raise EvaluationError(f"{what} {uri} is a folder, not a file") from None
    except Exception as e:  # noqa: BLE001 - any fsspec backend
        raise EvaluationError(f"cannot read {what} {uri}: {type(e).__name__}: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"{what} {uri} is not UTF-8 text (byte {e.start})") from None


@dataclass(frozen=True)
class TagList:
    names: tuple[str, ...]  # the classes: unique, in order of first appearance
    line_counts: tuple[int, ...]  # lines naming each class (>1 for the paper's duplicates)
    source: str = ""
    line_classes: tuple[int, ...] = ()  # the class of each line, in file order (the paper's columns)

    @property
    def duplicates(self) -> dict[str, int]:
        return {n: c for n, c in zip(self.names, self.line_counts) if c > 1}

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_names(cls, names: Iterable[str], source: str = "") -> "TagList":
        counts: dict[str, int] = {}
        names = list(names)
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        index = {n: i for i, n in enumerate(counts)}
        return cls(tuple(counts), tuple(counts.values()), source, tuple(index[n] for n in names))


def read_taglist(path_or_name: str) -> TagList:
    """A tag list file, or the short name of a shipped benchmark list (see `builtin_taglists`)."""
    builtin = builtin_taglists()
    uri = path_or_name
    if path_or_name in builtin and not Path(path_or_name).exists():
        uri = str(builtin[path_or_name])
    text = _read_text(uri, "tag list")
    names = [ln.strip() for ln in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise EvaluationError(f"tag list {uri} has no tags")
    return TagList.from_names(names, uri)


@dataclass
class Annotations:
    ids: list[str]
    tags: list[list[str]]  # per image, unique, in file order
    lines: list[int]  # 1-based line of each image
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def all_tags(self) -> list[str]:
        seen: dict[str, None] = {}
        for t in self.tags:
            seen.update(dict.fromkeys(t))
        return list(seen)


def parse_annotations(text: str, source: str = "") -> Annotations:
    ids, tags, lines = [], [], []
    first_line: dict[str, int] = {}
    text = text[1:] if text.startswith("\ufeff") else text
    for n, row in enumerate(csv.reader(io.StringIO(text), skipinitialspace=True), 1):
        fields = [f.strip() for f in row]
        if not fields or not any(fields):
            continue
        image_id, rest = fields[0], [f for f in fields[1:] if f]
        if not image_id:
            raise EvaluationError(f"{source} line {n}: the image id (first field) is empty")
        if image_id in first_line:
            raise EvaluationError(f"{source} line {n}: image id {image_id!r} is also on line {first_line[image_id]}")
        first_line[image_id] = n
        ids.append(image_id)
        tags.append(list(dict.fromkeys(rest)))
        lines.append(n)
    if not ids:
        raise EvaluationError(f"annotation file {source} has no images (expected lines 'image_id,tag1,tag2,...')")
    return Annotations(ids, tags, lines, source)


def read_annotations(uri: str) -> Annotations:
    return parse_annotations(_read_text(uri, "annotation file"), uri)


def _names(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_known_tags(ann: Annotations, known: Iterable[str], vocabulary: str) -> None:
    """Every annotated tag must be a class; the error names the unknown ones and a line of each."""
    known = set(known)
    where: dict[str, int] = {}
    for tags, line in zip(ann.tags, ann.lines):
        for t in tags:
            if t not in known and t not in where:
                where[t] = line
    if where:
        missing = sorted(where)
        detail = ", ".join(f"{t!r} (line {where[t]})" for t in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EvaluationError(f"{len(missing)} tag(s) in {ann.source or 'the annotations'} are not in {vocabulary}: "
                              f"{detail}{more}")


def label_matrix(ann: Annotations, classes: Sequence[str], rows: Optional[Sequence[int]] = None) -> np.ndarray:
    """[images, classes] booleans for the given annotation rows (all by default)."""
    index = {n: i for i, n in enumerate(classes)}
    check_known_tags(ann, index, "the tag list")
    rows = range(len(ann)) if rows is None else rows
    out = np.zeros((len(rows), len(classes)), dtype=bool)
    for r, i in enumerate(rows):
        for t in ann.tags[i]:
            out[r, index[t]] = True
    return out


# -- matching image ids to result URIs --------------------------------------------------------

def _strip_scheme(s: str) -> str:
    return s.split("://", 1)[1] if "://" in s else s


def image_key(s: str, mode: str = "stem") -> str:
    """The part of an image id or URI that identifies the image under `mode`."""
    if mode not in KEY_MODES:
        raise EvaluationError(f"unknown key mode {mode!r}; use one of {', '.join(KEY_MODES)}")
    path = _strip_scheme(s).replace("\\", "/")
    if mode == "path":
        parts = [p for p in path.split("/") if p not in ("", ".")]
        return "/".join(parts)
    name = path.rsplit("/", 1)[-1]
    if mode == "name":
        return name
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


@dataclass
class Match:
    """Which result row each annotated image got, and what could not be matched."""

    rows: dict[int, int] = field(default_factory=dict)  # annotation index -> result index
    unmatched: list[int] = field(default_factory=list)  # annotation indexes without a result
    ambiguous: dict[int, list[int]] = field(default_factory=dict)  # annotation index -> result indexes
    unused: int = 0  # results no annotation refers to


def match_images(ids: Sequence[str], uris: Sequence[str], mode: str = "stem") -> Match:
    m = Match()
    if mode == "path":
        by_depth: dict[int, dict[str, list[int]]] = {}
        id_keys = [image_key(i, "path") for i in ids]
        for d in sorted({k.count("/") + 1 for k in id_keys}):
            table: dict[str, list[int]] = {}
            for j, u in enumerate(uris):
                parts = image_key(u, "path").split("/")
                if len(parts) >= d:
                    table.setdefault("/".join(parts[-d:]), []).append(j)
            by_depth[d] = table
        lookup = lambda k: by_depth[k.count("/") + 1].get(k, [])  # noqa: E731
    else:
        table = {}
        for j, u in enumerate(uris):
            table.setdefault(image_key(u, mode), []).append(j)
        id_keys = [image_key(i, mode) for i in ids]
        lookup = lambda k: table.get(k, [])  # noqa: E731
    used = set()
    for a, k in enumerate(id_keys):
        hits = lookup(k)
        if len(hits) == 1:
            m.rows[a] = hits[0]
            used.add(hits[0])
        elif not hits:
            m.unmatched.append(a)
        else:
            m.ambiguous[a] = hits
    m.unused = len(uris) - len(used)
    return m


def ambiguity_error(ids: Sequence[str], uris: Sequence[str], ambiguous: dict[int, list[int]], mode: str) -> EvaluationError:
    a, hits = next(iter(ambiguous.items()))
    return EvaluationError(
        f"{len(ambiguous)} annotated image id(s) match several results by {mode!r} (e.g. {ids[a]!r} -> "
        f"{_names([uris[h] for h in hits], 3)}); use a more specific --key (name or path)")

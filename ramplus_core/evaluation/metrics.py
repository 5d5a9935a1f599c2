"""Tag-quality metrics: the paper's mAP and precision/recall/F1 at the tagger's thresholds.

Average precision (AP) of one class is the standard non-interpolated AP over the images:
rank the images by the class score, and average, over the images that truly have the tag,
the precision among all images ranked at or above it. This is the definition the RAM++
paper's evaluation code uses (the ASL/ML-Decoder `average_precision`), mAP is its mean over
classes, and both are reported in percent by the CLI.

Ties. When several images share a score their relative order is arbitrary, and the
paper's code (a plain argsort) lets it change the result. Here tied images form one block:
every positive in a block gets the precision at the end of the block, i.e. "ranked at or
above" means "score >= its score". The result is deterministic, does not depend on the
order of the images, equals the usual step-wise definition
`sum_k (R_k - R_{k-1}) P_k` over distinct score cut-offs, and equals the paper's value
whenever there are no ties (scores from a sigmoid practically never tie unless they were
cut off by a score floor: see `results.py`).

Classes with no positive image have no defined AP. They are left out of the mean and
listed, rather than counted as 0 (the paper's code counts them as 0; on the full benchmark
sets every class has positives, so the two agree there).

At thresholds, a class is predicted for an image when the tagger put it in `tags` (score
over the tag's threshold). Per class: precision = TP/(TP+FP) (0 when nothing is predicted),
recall = TP/(TP+FN), F1 = 2PR/(P+R) (0 when P+R = 0). Micro averages pool TP/FP/FN over
every evaluated class, so false alarms on classes with no positives count; macro averages
are the plain mean of the per-class values over the classes with positives (the same
classes as mAP), and macro F1 is the mean of per-class F1, not the F1 of the macro P and R.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """AP of one class with tied scores as blocks (see the module docstring); NaN without positives."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    block_end = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]
    tp_at_end = tp[block_end]
    positives_in_block = np.diff(np.r_[0, tp_at_end])
    precision_at_end = tp_at_end / (block_end + 1)
    return float(np.sum(positives_in_block * precision_at_end) / positives)


def average_precisions(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class AP of an [images, classes] score matrix; NaN for classes without positives."""
    scores = np.asarray(scores)
    labels = np.asarray(labels).astype(bool)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the same [images, classes] shape")
    return np.array([average_precision(scores[:, k], labels[:, k]) for k in range(scores.shape[1])], dtype=np.float64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def prf(tp, fp, fn):
    """(precision, recall, F1) with 0 for an empty denominator, element-wise."""
    p = _safe_div(tp, np.asarray(tp) + np.asarray(fp))
    r = _safe_div(tp, np.asarray(tp) + np.asarray(fn))
    f = _safe_div(2 * p * r, p + r)
    return p, r, f


@dataclass
class ClassMetrics:
    name: str
    positives: int
    ap: Optional[float]  # None: no positives
    tp: int
    fp: int
    fn: int
    precision: float
    recall: Optional[float]  # None: no positives
    f1: Optional[float]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Metrics:
    """Everything `evaluate` computes; `as_dict` is what metrics.json holds."""

    images: int
    classes: int
    mAP: Optional[float]  # over classes with positives, 0..1; None when no class has a positive
    classes_without_positives: list[str]
    micro: dict
    macro: dict
    per_class: list[ClassMetrics]
    mAP_per_list_line: Optional[float] = None  # see `evaluate`: duplicates counted per tag-list line
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "per_class"}
        d["per_class"] = [c.as_dict() for c in self.per_class]
        return d


def evaluate(scores: np.ndarray, labels: np.ndarray, predicted: np.ndarray, names: Sequence[str],
             line_counts: Optional[Sequence[int]] = None) -> Metrics:
    """mAP, per-class AP and P/R/F1 for [images, classes] scores, true labels and predictions.

    `line_counts`: how many lines of the benchmark's tag list name each class. The paper's
    lists map a few benchmark classes to the same tag; its code then averages one AP per list
    line, so such a class weighs more. We count each class once (`mAP`) and, when a class
    appears on several lines, also give that weighting (`mAP_per_list_line`) for comparison
    with published figures.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    if not (scores.shape == labels.shape == predicted.shape) or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape}, labels {labels.shape} and predictions {predicted.shape} "
                         "must share one [images, classes] shape")
    if scores.shape[1] != len(names):
        raise ValueError(f"{scores.shape[1]} score columns but {len(names)} class names")
    aps = average_precisions(scores, labels)
    pos = labels.sum(axis=0)
    tp = (labels & predicted).sum(axis=0)
    fp = (~labels & predicted).sum(axis=0)
    fn = (labels & ~predicted).sum(axis=0)
    p, r, f = prf(tp, fp, fn)
    has = pos > 0
    per_class = [
        ClassMetrics(name=str(n), positives=int(pos[k]), ap=float(aps[k]) if has[k] else None, tp=int(tp[k]),
                     fp=int(fp[k]), fn=int(fn[k]), precision=float(p[k]), recall=float(r[k]) if has[k] else None,
                     f1=float(f[k]) if has[k] else None)
        for k, n in enumerate(names)]
    mp, mr, mf = prf(tp.sum(), fp.sum(), fn.sum())
    micro = {"tp": int(tp.sum()), "fp": int(fp.sum()), "fn": int(fn.sum()),
             "precision": float(mp), "recall": float(mr), "f1": float(mf)}
    macro = {"classes": int(has.sum()),
             "precision": float(p[has].mean()) if has.any() else None,
             "recall": float(r[has].mean()) if has.any() else None,
             "f1": float(f[has].mean()) if has.any() else None}
    m = Metrics(images=int(scores.shape[0]), classes=len(names),
                mAP=float(aps[has].mean()) if has.any() else None,
                classes_without_positives=[str(n) for n, h in zip(names, has) if not h],
                micro=micro, macro=macro, per_class=per_class)
    if line_counts is not None:
        w = np.asarray(line_counts, dtype=np.float64)
        if w.shape != (len(names),):
            raise ValueError("line_counts must give one count per class")
        if (w > 1).any() and has.any():
            m.mAP_per_list_line = float(np.sum(aps[has] * w[has]) / np.sum(w[has]))
    return m

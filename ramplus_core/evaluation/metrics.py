"""Tag-quality metrics: the paper's mAP and precision/recall/F1 at the tagger's thresholds.

Two modes. `default` is ours: deterministic, order-free, and explicit about classes it
cannot score. `official` reproduces the numbers of the RAM++ authors' evaluation script
(recognize-anything `batch_inference.py` with `ram/utils/metrics.py`), quirks included, for
comparison with published figures. Without ties, classes without positives, scores equal
to a threshold or duplicated tag-list lines, both give the same mAP up to the script's
1e-8 (a relative 1e-8 per class: far below the printed digits).

Average precision (AP) of one class is the non-interpolated AP over the images: rank the
images by the class score, and average, over the images that truly have the tag, the
precision among the images ranked at or above it. mAP is its mean over classes; both are
kept as fractions and printed in percent.

default
    Ties. Images that share a score form one block: every positive in a block gets the
    precision at the end of the block, i.e. "ranked at or above" means "score >= its
    score". The result does not depend on the order of the images and equals the usual
    step-wise definition `sum_k (R_k - R_{k-1}) P_k` over distinct score cut-offs.
    Classes with no positive image have no defined AP: they are left out of the mean and
    listed. At thresholds, a class is predicted when the tagger put it in `tags` (score >
    the tag's threshold, the job's own decision). Per class: precision = TP/(TP+FP) (0 when
    nothing is predicted), recall = TP/(TP+FN), F1 = 2PR/(P+R) (0 when P+R = 0). Micro
    averages pool TP/FP/FN over every class, so false alarms on classes with no positives
    count; macro averages are the plain mean of the per-class values over the classes with
    positives (the same classes as mAP), and macro F1 is the mean of per-class F1.

official
    Ranking: numpy's default `argsort` of the class's float32 scores, reversed. That sort
    is not stable, so among tied scores the order is whatever numpy's sort leaves (it
    varies with the numpy version and the CPU's SIMD extensions); it is reproduced exactly
    by making the same call on the same float32 column, images in annotation-file order.
    AP = sum over positives of (positives so far / rank) / (positives + 1e-8), so a class
    without positives gets AP 0 and counts in the mean, and a perfect class is 1 - 1e-8.
    mAP is the mean over tag-list lines: a tag named on two lines counts twice. Prediction
    is score >= threshold (the script's rule; the job's `tags` use >), so a score equal to
    its threshold is predicted. Per class P = TP/(TP+FP+1e-9), R = TP/(TP+FN+1e-9), and
    the script's CP and CR (our macro precision and recall) are their plain means over
    every class, including those without positives. The script reports no F1 and no micro
    figures; they are given here from the same predictions.
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


OFFICIAL_AP_EPS = 1e-8  # the script's epsilon in AP's denominator
OFFICIAL_PR_EPS = 1e-9  # and in precision's and recall's
MODES = ("default", "official")


def official_average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """AP as the RAM++ evaluation script computes it (see `official` in the module docstring).

    Pass the scores in the dtype the script saw (float32) and the images in its order: both
    decide where numpy's unstable sort puts tied scores.
    """
    s = np.asarray(scores)
    y = np.asarray(labels).astype(bool).ravel()
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    if s.size == 0:
        return 0.0
    hit = y[s.argsort()[::-1]]
    hits_so_far = np.cumsum(hit)
    rank = np.cumsum(np.ones(s.size))
    at_positives = np.where(hit, hits_so_far / rank, 0.0)
    return float(np.sum(at_positives) / (hits_so_far[-1] + OFFICIAL_AP_EPS))


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
    mode: str = "default"

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "per_class"}
        d["per_class"] = [c.as_dict() for c in self.per_class]
        return d


def evaluate(scores: np.ndarray, labels: np.ndarray, predicted: np.ndarray, names: Sequence[str],
             line_counts: Optional[Sequence[int]] = None, mode: str = "default",
             line_classes: Optional[Sequence[int]] = None) -> Metrics:
    """mAP, per-class AP and P/R/F1 for [images, classes] scores, true labels and predictions.

    `line_counts`: how many lines of the benchmark's tag list name each class. The paper's
    lists map a few benchmark classes to the same tag; its code then averages one AP per list
    line, so such a class weighs more. The default mode counts each class once (`mAP`) and,
    when a class appears on several lines, also gives that weighting (`mAP_per_list_line`)
    for comparison with published figures; the official mode's `mAP` is that weighting.
    `line_classes` (the class of each list line, in file order) lets the official mean add
    the lines up in the script's order; without it the lines are grouped by class.

    `predicted` is the caller's: the job's `tags` for the default mode, score >= threshold
    for the official one (see benchmark.official_predictions).
    """
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; use one of {', '.join(MODES)}")
    raw = np.asarray(scores)
    scores = raw.astype(np.float64)
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    if not (scores.shape == labels.shape == predicted.shape) or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape}, labels {labels.shape} and predictions {predicted.shape} "
                         "must share one [images, classes] shape")
    if scores.shape[1] != len(names):
        raise ValueError(f"{scores.shape[1]} score columns but {len(names)} class names")
    if line_counts is not None and np.asarray(line_counts).shape != (len(names),):
        raise ValueError("line_counts must give one count per class")
    official = mode == "official"
    if official:
        aps = np.array([official_average_precision(raw[:, k], labels[:, k]) for k in range(raw.shape[1])],
                       dtype=np.float64)
    else:
        aps = average_precisions(scores, labels)
    pos = labels.sum(axis=0)
    tp = (labels & predicted).sum(axis=0)
    fp = (~labels & predicted).sum(axis=0)
    fn = (labels & ~predicted).sum(axis=0)
    if official:
        p = tp / (tp + fp + OFFICIAL_PR_EPS)
        r = tp / (tp + fn + OFFICIAL_PR_EPS)
        f = _safe_div(2 * p * r, p + r)
    else:
        p, r, f = prf(tp, fp, fn)
    has = pos > 0
    scored = np.ones_like(has) if official else has  # the classes an AP, R and F1 are given for
    per_class = [
        ClassMetrics(name=str(n), positives=int(pos[k]), ap=float(aps[k]) if scored[k] else None, tp=int(tp[k]),
                     fp=int(fp[k]), fn=int(fn[k]), precision=float(p[k]), recall=float(r[k]) if scored[k] else None,
                     f1=float(f[k]) if scored[k] else None)
        for k, n in enumerate(names)]
    mp, mr, mf = prf(tp.sum(), fp.sum(), fn.sum())
    micro = {"tp": int(tp.sum()), "fp": int(fp.sum()), "fn": int(fn.sum()),
             "precision": float(mp), "recall": float(mr), "f1": float(mf)}
    macro = {"classes": int(scored.sum()),
             "precision": float(p[scored].mean()) if scored.any() else None,
             "recall": float(r[scored].mean()) if scored.any() else None,
             "f1": float(f[scored].mean()) if scored.any() else None}
    if official:
        if line_classes is not None and len(line_classes):
            per_line = aps[np.asarray(line_classes, dtype=np.int64)]
        elif line_counts is not None:
            per_line = np.repeat(aps, np.asarray(line_counts, dtype=np.int64))
        else:
            per_line = aps
        m_ap = float(per_line.mean()) if per_line.size else None
    else:
        m_ap = float(aps[has].mean()) if has.any() else None
    m = Metrics(images=int(scores.shape[0]), classes=len(names), mAP=m_ap,
                classes_without_positives=[str(n) for n, h in zip(names, has) if not h],
                micro=micro, macro=macro, per_class=per_class, mode=mode)
    if line_counts is not None and not official:
        w = np.asarray(line_counts, dtype=np.float64)
        if (w > 1).any() and has.any():
            m.mAP_per_list_line = float(np.sum(aps[has] * w[has]) / np.sum(w[has]))
    return m

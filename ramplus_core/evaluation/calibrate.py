"""Per-tag thresholds from a labelled sample: the best F1, or the most recall at a precision.

The job decides "tag is on" as score > threshold, so a threshold is a cut between two
distinct scores of the sample: everything above it is predicted. Tied scores fall on the
same side. For each class the candidate cuts are scanned from the top score down:

    f1         the cut with the highest F1; among equal F1 the higher threshold (fewer
               predictions).
    precision  the cut with the highest recall among those whose precision reaches the
               target; among equal recall the higher threshold. A class that reaches the
               target nowhere is reported and left out.

The threshold written is the midpoint between the lowest score kept and the next lower
score in the sample (or that score itself when the two are adjacent floats), so the
decision on the sample is exactly the one measured. Scores the run did not keep (under its
score floor) are unknown: no cut goes below the floor.

A class needs `min_positives` positive images to be calibrated; others are reported and
left out, so the job keeps their current thresholds. All figures are measured on the sample
itself and are optimistic; check them with `jobs/evaluate.py --thresholds` on held-out images.

Output format: the job reads per-tag thresholds from `vocabulary.thresholds_file`, a text
file of `tag<TAB>threshold` lines ('#' lines are comments) that overrides the thresholds of
the listed tags and keeps the others. That is what `write_thresholds` writes. (A vocabulary
YAML cannot set the threshold of a built-in tag, and the job's thresholds file can only name
tags of the checkpoint's vocabulary.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .common import EvaluationError
from .metrics import prf

MODES = ("f1", "precision")


@dataclass
class TagThreshold:
    tag: str
    positives: int
    threshold: Optional[float]  # None: not calibrated (see status)
    status: str  # "ok", or why not
    precision: Optional[float] = None  # on the sample, at `threshold`
    recall: Optional[float] = None
    f1: Optional[float] = None
    before: dict = field(default_factory=dict)  # P/R/F1 at the run's own thresholds

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _cut_value(s_keep: float, s_next: Optional[float], floor: float) -> float:
    """A float32 threshold t with s_keep > t >= s_next (every lower score excluded)."""
    lo = 0.0 if s_next is None else s_next
    if floor > 0:
        lo = max(lo, floor)
    t = np.float32((s_keep + lo) / 2.0)
    if not (np.float32(s_keep) > t >= np.float32(lo)):
        t = np.float32(lo)
    return float(t)


def best_threshold(scores: Sequence[float], labels: Sequence[bool], mode: str = "f1",
                   target_precision: Optional[float] = None, floor: float = 0.0):
    """(threshold, precision, recall, f1) for one class, or (None, reason) when there is none."""
    if mode not in MODES:
        raise EvaluationError(f"unknown calibration mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "precision" and (target_precision is None or not 0.0 < target_precision <= 1.0):
        raise EvaluationError(f"target precision must be in (0, 1], got {target_precision!r}")
    s = np.asarray(scores, dtype=np.float32).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    positives = int(y.sum())
    if positives == 0:
        return None, "no positives"
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    ends = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]
    block_score = s_sorted[ends]
    eligible = block_score > 0
    if floor > 0:
        eligible &= block_score >= np.float32(floor)
    if not eligible.any():
        return None, "no positive scored over the floor"
    tp_e = tp[ends]
    p, r, f = prf(tp_e, ends + 1 - tp_e, positives - tp_e)
    idx = np.flatnonzero(eligible)
    if mode == "f1":
        best = idx[np.argmax(f[idx])]  # argmax takes the first, i.e. the highest cut, among ties
        if f[best] <= 0:
            return None, "no cut predicts a positive"
    else:
        ok = idx[p[idx] >= target_precision - 1e-12]
        if not ok.size:
            return None, f"precision {target_precision:g} not reached (best {p[idx].max():.3f})"
        best = ok[np.argmax(r[ok])]
    s_next = float(block_score[best + 1]) if best + 1 < block_score.size else None
    t = _cut_value(float(block_score[best]), s_next, floor)
    return (t, float(p[best]), float(r[best]), float(f[best])), "ok"


@dataclass
class Calibration:
    mode: str
    target_precision: Optional[float]
    min_positives: int
    images: int
    tags: list[TagThreshold]
    run: dict
    annotations: str = ""

    @property
    def calibrated(self) -> list[TagThreshold]:
        return [t for t in self.tags if t.threshold is not None]

    def summary(self) -> dict:
        cal = self.calibrated
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        return {"tags": len(self.tags), "calibrated": len(cal), "skipped": len(self.tags) - len(cal),
                "macro_f1_before": mean([t.before["f1"] for t in cal]),
                "macro_f1_after": mean([t.f1 for t in cal]),
                "macro_precision_after": mean([t.precision for t in cal]),
                "macro_recall_after": mean([t.recall for t in cal])}

    def as_dict(self) -> dict:
        return {"mode": self.mode, "target_precision": self.target_precision, "min_positives": self.min_positives,
                "images": self.images, "run": self.run, "annotations": self.annotations,
                "summary": self.summary(), "tags": [t.as_dict() for t in self.tags]}


def calibrate(scores: np.ndarray, labels: np.ndarray, predicted: np.ndarray, names: Sequence[str], *,
              mode: str = "f1", target_precision: Optional[float] = None, min_positives: int = 3,
              floor: float = 0.0) -> list[TagThreshold]:
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    if min_positives < 1:
        raise EvaluationError(f"min positives must be >= 1, got {min_positives}")
    out = []
    for k, name in enumerate(names):
        y = labels[:, k]
        pos = int(y.sum())
        tp, fp = int((y & predicted[:, k]).sum()), int((~y & predicted[:, k]).sum())
        bp, br, bf = prf(tp, fp, pos - tp)
        before = {"precision": float(bp), "recall": float(br) if pos else None, "f1": float(bf) if pos else None}
        if pos < min_positives:
            why = "no positives" if pos == 0 else f"only {pos} positive(s), fewer than {min_positives}"
            out.append(TagThreshold(str(name), pos, None, why, before=before))
            continue
        found, status = best_threshold(scores[:, k], y, mode, target_precision, floor)
        if found is None:
            out.append(TagThreshold(str(name), pos, None, status, before=before))
            continue
        t, p, r, f = found
        out.append(TagThreshold(str(name), pos, t, "ok", p, r, f, before=before))
    return out


def calibrate_sample(sample, *, mode: str = "f1", target_precision: Optional[float] = None,
                     min_positives: int = 3) -> Calibration:
    """Calibrate every class of a `benchmark.LabelledSample`."""
    floor = sample.run.score_floor or 0.0
    tags = calibrate(sample.scores, sample.labels, sample.predicted, sample.classes, mode=mode,
                     target_precision=target_precision, min_positives=min_positives, floor=floor)
    r = sample.run
    return Calibration(mode=mode, target_precision=target_precision, min_positives=min_positives,
                       images=int(sample.scores.shape[0]), tags=tags,
                       run={"output": r.output, "run_id": r.run_id, "model_id": r.manifest.get("model_id"),
                            "vocab_id": r.manifest.get("vocab_id"), "score_floor": r.score_floor,
                            "table_versions": dict(r.versions)})


def write_thresholds(cal: Calibration, path: str) -> int:
    """Write the calibrated tags as the job's `vocabulary.thresholds_file`; returns how many."""
    rows = []
    for t in cal.calibrated:
        if "\t" in t.tag or "\n" in t.tag or t.tag.startswith("#"):
            raise EvaluationError(f"tag {t.tag!r} cannot be written to a thresholds file (tab, newline or leading '#')")
        rows.append(f"{t.tag}\t{format(float(np.float32(t.threshold)), '.9g')}\n")
    goal = "best F1" if cal.mode == "f1" else f"precision >= {cal.target_precision:g}, most recall"
    s = cal.summary()
    head = [
        "# RAM++ per-tag thresholds for the job's vocabulary.thresholds_file (tag<TAB>threshold; a tag is on when",
        "# its score > threshold; tags not listed keep their thresholds). Written by jobs/calibrate.py",
        f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}: {goal} on {cal.images} labelled images "
        f"({cal.annotations or 'annotations'})",
        f"# run {cal.run.get('run_id')} model {cal.run.get('model_id')} vocab {cal.run.get('vocab_id')}",
        f"# {s['calibrated']} of {s['tags']} tags calibrated; in-sample macro F1 "
        f"{_fmt(s['macro_f1_before'])} -> {_fmt(s['macro_f1_after'])}",
    ]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(head) + "\n" + "".join(rows), encoding="utf-8")
    return len(rows)


def read_thresholds(path: str) -> dict[str, float]:
    """Read a thresholds file the way the job does (for `evaluate --thresholds`)."""
    from ..errors import ConfigError
    from ..job.vocab import _read_thresholds

    try:
        return _read_thresholds(path)
    except ConfigError as e:
        raise EvaluationError(str(e).replace("vocabulary.thresholds_file: ", "thresholds file: ")) from None


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"

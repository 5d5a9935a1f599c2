"""A run's output against a labelled set: the shared loading of evaluate and calibrate.

Which classes: the tag list when one is given (the benchmark's class set; every annotated
tag must be on it), else every tag that occurs in the annotations.

Which vocabulary check: every class must be a tag the run scored. With floor 0 each tag
row lists every tag of the run's vocabulary, so when the tags seen in the run number what
the manifest says the vocabulary holds, a class outside them is an error that names it.
With a floor above 0 a class can be in the vocabulary yet never reach the floor; those are
reported as a warning and score 0 everywhere.

Which images: an annotated image that has no tag row is not silently dropped. It is listed
as `errored` (with the job's reason) or `missing` (never listed by the run), and left out
of the metrics, unless `missing_as_negative` counts it as an image the tagger scored 0 on
every class (the pessimistic reading: a benchmark image the job could not tag is a miss).
Rows are in annotation-file order, as the official script has them (its tie order depends
on it).

Which rows: every row of the tags table at the run's version (results.py), so an
incremental run's reused rows count. When those rows were written by more than one model or
vocabulary the result says so in a warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from . import metrics as mx
from .annotations import (Annotations, TagList, ambiguity_error, check_known_tags, image_key, label_matrix,
                          match_images)
from .common import EvaluationError
from .results import Run, floor_warning, read_errors, read_tag_column, score_matrix, vocabulary_thresholds


@dataclass
class LabelledSample:
    run: Run
    classes: list[str]
    line_counts: list[int]
    ids: list[str]  # annotated images in the metrics, in annotation order
    uris: list[Optional[str]]  # their result URI (None: counted as negative without a result)
    scores: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    images: dict  # counts and lists of what was and was not evaluated
    warnings: list[str] = field(default_factory=list)
    vocab_ids: list = field(default_factory=list)  # per row: the vocab_id of its tag row (None: no row)
    line_classes: list[int] = field(default_factory=list)  # the class of each tag-list line, in file order


def load_labelled(run: Run, ann: Annotations, taglist: Optional[TagList] = None, key: str = "stem",
                  missing_as_negative: bool = False) -> LabelledSample:
    notes: list[str] = []
    if taglist is not None:
        check_known_tags(ann, taglist.names, f"the tag list {taglist.source}")
        classes, line_counts = list(taglist.names), list(taglist.line_counts)
        line_classes = list(taglist.line_classes) or list(range(len(classes)))
    else:
        classes = sorted(ann.all_tags())
        line_counts = [1] * len(classes)
        line_classes = list(range(len(classes)))
        if not classes:
            raise EvaluationError(f"{ann.source}: no image has a tag, and no --taglist gives the classes")

    uris = read_tag_column(run, "uri")
    m = match_images(ann.ids, uris, key)
    if m.ambiguous:
        raise ambiguity_error(ann.ids, uris, m.ambiguous, key)

    errored, missing = [], []
    if m.unmatched:
        err = read_errors(run)
        by_key: dict[str, tuple[str, str, str]] = {}
        for u, e, s in zip(err.column("uri").to_pylist(), err.column("error").to_pylist(),
                           err.column("stage").to_pylist()):
            by_key.setdefault(image_key(u, key), (u, s, e))
        for a in m.unmatched:
            k = image_key(ann.ids[a], key)
            hit = by_key.get(k)
            if hit is None and key == "path":
                hit = next((v for kk, v in by_key.items() if kk.endswith("/" + k) or kk == k), None)
            if hit:
                errored.append({"id": ann.ids[a], "uri": hit[0], "stage": hit[1], "error": hit[2]})
            else:
                missing.append({"id": ann.ids[a]})

    keep = sorted(m.rows) if not missing_as_negative else list(range(len(ann)))
    if not keep:
        raise EvaluationError(f"none of the {len(ann)} annotated images has a result in run {run.run_id} "
                              f"(matching by {key!r}: e.g. id {ann.ids[0]!r} vs uri "
                              f"{uris[0] if uris else '(the run tagged no image)'!r}); check --key")
    rows_by_uri = {uris[m.rows[a]]: r for r, a in enumerate(keep) if a in m.rows}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = score_matrix(run, rows_by_uri, len(keep), classes)
    msg = floor_warning(run.score_floor)
    if msg:
        notes.append(msg)
    mixed = {k: v for k, v in run.row_versions().items() if len(v) > 1}
    if mixed:
        notes.append("the tag rows at this version were written with more than one "
                     + " and ".join(f"{k} ({', '.join(v[:4])}{' ...' if len(v) > 4 else ''})" for k, v in mixed.items())
                     + ": an incremental run kept earlier rows, and their scores are evaluated together")

    unseen = [c for c in classes if c not in sm.seen_tags]
    vocab_n = run.vocabulary_size
    complete = vocab_n is not None and len(sm.seen_tags) == vocab_n
    if unseen and complete:
        shown = ", ".join(repr(c) for c in unseen[:10]) + (f" and {len(unseen) - 10} more" if len(unseen) > 10 else "")
        raise EvaluationError(f"{len(unseen)} class(es) are not in run {run.run_id}'s vocabulary of {vocab_n} tags: "
                              f"{shown}; tag with a vocabulary that has them")
    if unseen:
        notes.append(f"{len(unseen)} class(es) never scored over the floor in this run (or are not in its vocabulary) "
                     f"and count as 0: {', '.join(repr(c) for c in unseen[:10])}{' ...' if len(unseen) > 10 else ''}")
    labels = label_matrix(ann, classes, keep)
    images = {
        "annotated": len(ann),
        "evaluated": len(keep),
        "with_results": len(m.rows),
        "errored": errored,
        "missing": missing,
        "counted_as_negative": (len(errored) + len(missing)) if missing_as_negative else 0,
        "results_not_annotated": m.unused,
    }
    if errored or missing:
        how = "counted as scoring 0 on every class" if missing_as_negative else "left out of the metrics"
        notes.append(f"{len(errored) + len(missing)} annotated image(s) have no result ({len(errored)} errored, "
                     f"{len(missing)} not in the run): {how}")
    return LabelledSample(run=run, classes=classes, line_counts=line_counts, ids=[ann.ids[a] for a in keep],
                          uris=[uris[m.rows[a]] if a in m.rows else None for a in keep], scores=sm.scores,
                          labels=labels, predicted=sm.predicted, images=images, warnings=notes,
                          vocab_ids=list(sm.vocab_ids), line_classes=line_classes)


def apply_thresholds(sample: LabelledSample, thresholds: Mapping[str, float]) -> np.ndarray:
    """Predictions with some tags re-thresholded (score > threshold, as the job decides)."""
    pred = sample.predicted.copy()
    for k, c in enumerate(sample.classes):
        if c in thresholds:
            pred[:, k] = sample.scores[:, k] > thresholds[c]
    return pred


def official_predictions(sample: LabelledSample, thresholds: Optional[Mapping[str, float]] = None
                         ) -> tuple[np.ndarray, list[str]]:
    """Predictions as the official script makes them: score >= the tag's threshold.

    A row's thresholds are those of the vocabulary it was tagged with (`_vocab/<vocab_id>.json`),
    or from `thresholds` (the --thresholds file) for the tags it lists. Compared in float64
    against the threshold's decimal value, as the script compares its float32 scores with the
    floats of its threshold file. Where no threshold is known the row's `tags` decide (a note
    says how many classes). Returns (predictions, notes).
    """
    pred = sample.predicted.copy()
    s64 = sample.scores.astype(np.float64)
    unknown: set = set()
    rows_by_vocab: dict = {}
    for i, v in enumerate(sample.vocab_ids):
        if v is not None:
            rows_by_vocab.setdefault(v, []).append(i)
    for v, rows in rows_by_vocab.items():
        known = vocabulary_thresholds(sample.run, v) or {}
        idx = np.asarray(rows, dtype=np.int64)
        for k, c in enumerate(sample.classes):
            t = thresholds[c] if thresholds and c in thresholds else known.get(c)
            if t is None:
                unknown.add(c)
                continue
            pred[idx, k] = s64[idx, k] >= float(t)
    notes = []
    if unknown:
        names = sorted(unknown)
        notes.append(f"official mode: no threshold known for {len(names)} class(es) (the run's vocabulary descriptor "
                     f"_vocab/<vocab_id>.json lacks them and --thresholds does not list them); the job's tags (score > "
                     f"threshold) decide them: {', '.join(repr(c) for c in names[:10])}{' ...' if len(names) > 10 else ''}")
    return pred, notes


def evaluate_sample(sample: LabelledSample, thresholds: Optional[Mapping[str, float]] = None,
                    mode: str = "default") -> dict:
    """metrics.json: the run, the images accounted for, mAP, averages and per-class figures."""
    notes = list(sample.warnings)
    if mode == "official":
        pred, more = official_predictions(sample, thresholds)
        notes.extend(more)
        lacking = len(sample.images["errored"]) + len(sample.images["missing"])
        if lacking:
            notes.append(f"official mode: {lacking} annotated image(s) have no tag row; the official script scores a "
                         "black 10x10 image in their place, so its figures differ unless every image is tagged")
    else:
        pred = sample.predicted if thresholds is None else apply_thresholds(sample, thresholds)
    m = mx.evaluate(sample.scores, sample.labels, pred, sample.classes, sample.line_counts, mode=mode,
                    line_classes=sample.line_classes)
    r = sample.run
    if mode == "official":
        how = "score >= threshold: --thresholds where given, else the run's vocabulary's"
    else:
        how = "from --thresholds where given, else the run's" if thresholds else "the run's"
    return {
        "mode": mode,
        "run": {"output": r.output, "run_id": r.run_id, "model_id": r.manifest.get("model_id"),
                "vocab_id": r.manifest.get("vocab_id"), "score_floor": r.score_floor,
                "table_versions": dict(r.versions)},
        "thresholds": how,
        "images": sample.images,
        "warnings": notes,
        **{k: v for k, v in m.as_dict().items() if k not in ("images", "mode")},  # `images` above says more
    }


def _pct(x: Optional[float]) -> str:
    return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"


def format_table(result: dict, max_classes: Optional[int] = None) -> str:
    """The readable summary printed by jobs/evaluate.py (figures in percent)."""
    lines = []
    r, im = result["run"], result["images"]
    official = result.get("mode") == "official"
    lines.append(f"run {r['run_id']}  model {r['model_id']}  vocab {r['vocab_id']}  score floor {r['score_floor']}")
    if official:
        lines.append("official mode: the RAM++ evaluation script's definitions (ties in numpy's sort order, classes "
                     "without positives count as AP 0, predicted when score >= threshold)")
    lines.append(f"images: {im['annotated']} annotated, {im['evaluated']} evaluated, {len(im['errored'])} errored, "
                 f"{len(im['missing'])} missing, {im['results_not_annotated']} results not annotated")
    lines.append("")
    lines.append(f"{'':<28}{'mAP':>8}{'P':>8}{'R':>8}{'F1':>8}")
    lines.append(f"{'macro (' + str(result['macro']['classes']) + ' classes)':<28}{_pct(result['mAP']):>8}"
                 f"{_pct(result['macro']['precision']):>8}{_pct(result['macro']['recall']):>8}"
                 f"{_pct(result['macro']['f1']):>8}")
    mi = result["micro"]
    lines.append(f"{'micro':<28}{'':>8}{_pct(mi['precision']):>8}{_pct(mi['recall']):>8}{_pct(mi['f1']):>8}")
    if result.get("mAP_per_list_line") is not None:
        lines.append(f"{'mAP per tag-list line':<28}{_pct(result['mAP_per_list_line']):>8}")
    if result["classes_without_positives"]:
        names = result["classes_without_positives"]
        how = "counted as AP 0 (official)" if official else "not in the means"
        lines.append(f"{len(names)} class(es) without positives, {how}: "
                     f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    lines.append("")
    per = result["per_class"]
    shown = per if max_classes is None else sorted(per, key=lambda c: (c["ap"] is None, c["ap"] or 0))[:max_classes]
    head = "per class" if max_classes is None or len(per) <= max_classes else f"per class (worst {max_classes} by AP)"
    width = max([len(head)] + [min(40, len(c["name"])) for c in shown]) + 2
    lines.append(f"{head:<{width}}{'pos':>6}{'AP':>8}{'P':>8}{'R':>8}{'F1':>8}{'TP':>6}{'FP':>6}{'FN':>6}")
    for c in shown:
        lines.append(f"{c['name'][:40]:<{width}}{c['positives']:>6}{_pct(c['ap']):>8}{_pct(c['precision']):>8}"
                     f"{_pct(c['recall']):>8}{_pct(c['f1']):>8}{c['tp']:>6}{c['fp']:>6}{c['fn']:>6}")
    for w in result["warnings"]:
        lines.append(f"warning: {w}")
    for e in im["errored"][:10]:
        lines.append(f"errored: {e['id']} ({e['stage']}): {e['error']}")
    for e in im["missing"][:10]:
        lines.append(f"missing: {e['id']} has no row in the run")
    more = len(im["errored"]) + len(im["missing"]) - min(10, len(im["errored"])) - min(10, len(im["missing"]))
    if more > 0:
        lines.append(f"... and {more} more images without results (see metrics.json)")
    return "\n".join(lines)

"""Threshold calibration against a brute-force search, and the file the job reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ramplus_core.evaluation.calibrate import best_threshold, calibrate, read_thresholds
from ramplus_core.evaluation.common import EvaluationError

from .conftest import write_run
from .synthetic import bench_errors, load_script, make_bench

calibrate_cli = load_script("calibrate")
evaluate_cli = load_script("evaluate")


def prf_at(scores, labels, t):
    pred = scores > np.float32(t)
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def brute_force_cuts(scores, labels, floor=0.0):
    """Every way to split the sample by score: predict the images scoring >= v, for each distinct v."""
    out = []
    for v in sorted(set(scores.tolist()), reverse=True):
        if v <= 0 or v < floor:
            continue
        pred = scores >= v
        tp = int((pred & labels).sum()); fp = int((pred & ~labels).sum()); fn = int((~pred & labels).sum())
        p = tp / (tp + fp); r = tp / (tp + fn) if tp + fn else 0.0
        out.append((v, p, r, 2 * p * r / (p + r) if p + r else 0.0))
    return out


@pytest.mark.parametrize("seed", range(25))
def test_f1_and_precision_modes_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    labels = rng.random(n) < 0.35
    labels[0] = True
    scores = np.clip(np.round(0.5 * rng.random(n) + 0.45 * labels, int(rng.integers(1, 3))), 0, 1).astype(np.float32)
    cuts = brute_force_cuts(scores, labels)
    (t, p, r, f), status = best_threshold(scores, labels, "f1")
    assert status == "ok"
    best_f1 = max(c[3] for c in cuts)
    assert f == pytest.approx(best_f1, abs=1e-12)
    # the highest cut among equally good ones, and the threshold decides exactly that split
    v = max(c[0] for c in cuts if abs(c[3] - best_f1) < 1e-12)
    assert (scores > np.float32(t)).tolist() == (scores >= v).tolist()
    assert prf_at(scores, labels, t) == pytest.approx((p, r, f))

    target = float(rng.choice([0.5, 0.7, 0.9, 1.0]))
    found, status = best_threshold(scores, labels, "precision", target)
    ok = [c for c in cuts if c[1] >= target]
    if not ok:
        assert found is None and "not reached" in status
    else:
        t, p, r, f = found
        best_r = max(c[2] for c in ok)
        assert r == pytest.approx(best_r) and p >= target
        v = max(c[0] for c in ok if abs(c[2] - best_r) < 1e-12)
        assert (scores > np.float32(t)).tolist() == (scores >= v).tolist()


def test_no_cut_goes_under_the_floor():
    # scores under the floor were not kept and read as 0: their true order is unknown
    scores = np.array([0.9, 0.6, 0.0, 0.0, 0.0, 0.35], np.float32)
    labels = np.array([1, 0, 1, 1, 1, 1], bool)
    (t, p, r, f), _ = best_threshold(scores, labels, "f1", floor=0.3)
    assert t >= 0.3 and (scores > t).sum() == 3
    assert best_threshold(np.zeros(4, np.float32), np.array([1, 0, 1, 0], bool), "f1", floor=0.3) == \
        (None, "no positive scored over the floor")
    with pytest.raises(EvaluationError, match="mode"):
        best_threshold(scores, labels, "recall")
    with pytest.raises(EvaluationError, match="target precision"):
        best_threshold(scores, labels, "precision", 1.5)


def test_classes_without_enough_positives_are_left_out():
    rng = np.random.default_rng(0)
    scores = rng.random((20, 3)).astype(np.float32)
    labels = np.zeros((20, 3), bool)
    labels[:2, 1] = True
    labels[:10, 2] = True
    res = calibrate(scores, labels, scores > 0.5, ["none", "two", "ten"], min_positives=3)
    assert [(t.tag, t.threshold is None, t.status) for t in res[:2]] == [
        ("none", True, "no positives"), ("two", True, "only 2 positive(s), fewer than 3")]
    assert res[2].threshold is not None and res[2].status == "ok"
    assert res[2].before["f1"] == pytest.approx(prf_at(scores[:, 2], labels[:, 2], 0.5)[2])


def test_cli_writes_the_jobs_thresholds_file_and_evaluate_reproduces_it(tmp_path, capsys):
    b = make_bench(seed=10, n=60)
    out = tmp_path / "out"
    write_run(out, b.rows(), bench_errors(b))
    ann = tmp_path / "gt.csv"
    ann.write_text(b.annotation_text())
    tsv, js = tmp_path / "thr" / "thresholds.tsv", tmp_path / "cal.json"
    rc = calibrate_cli.main(["--run", str(out), "--annotations", str(ann), "--out", str(tsv), "--json", str(js),
                             "--min-positives", "2"])
    printed = capsys.readouterr().out
    assert rc == 0
    cal = json.loads(js.read_text())
    written = {t["tag"]: t for t in cal["tags"] if t["threshold"] is not None}
    assert set(written) == {"cat", "dog", "car", "sky"}  # "tree" has no positives in the annotations
    assert "vocabulary.thresholds_file" in printed and "in-sample" in printed
    # the job's own reader accepts it; values round-trip exactly as float32
    from ramplus_core.job.vocab import _read_thresholds

    got = _read_thresholds(str(tsv))
    assert got == read_thresholds(str(tsv))
    assert {k: np.float32(v) for k, v in got.items()} == {k: np.float32(t["threshold"]) for k, t in written.items()}
    assert tsv.read_text().startswith("# RAM++ per-tag thresholds")
    # evaluating with those thresholds reproduces the calibration's figures
    assert evaluate_cli.main(["--run", str(out), "--annotations", str(ann), "--thresholds", str(tsv),
                              "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    per = {c["name"]: c for c in m["per_class"]}
    for tag, t in written.items():
        assert per[tag]["f1"] == pytest.approx(t["f1"]) and per[tag]["precision"] == pytest.approx(t["precision"])
        assert t["f1"] >= t["before"]["f1"] - 1e-12  # in-sample, the best F1 is at least the run's
    # a target precision
    rc = calibrate_cli.main(["--run", str(out), "--annotations", str(ann), "--out", str(tsv), "--mode", "precision",
                             "--target-precision", "0.8", "--json", str(js), "--min-positives", "2"])
    assert rc == 0
    for t in json.loads(js.read_text())["tags"]:
        assert t["threshold"] is None or t["precision"] >= 0.8


def test_cli_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        calibrate_cli.main(["--run", "x", "--annotations", "y", "--out", "z", "--mode", "precision"])
    assert e.value.code == 2 and "--target-precision" in capsys.readouterr().err

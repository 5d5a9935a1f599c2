"""AP, mAP and P/R/F1 against computations written independently in the tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ramplus_core.evaluation.annotations import TagList
from ramplus_core.evaluation.metrics import average_precision, average_precisions, evaluate, official_average_precision

from .conftest import brute_force_ap


def paper_style_ap(scores, labels) -> float:
    """The cumulative-count form of the paper's code (valid when there are no ties)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, 1):
        if labels[i]:
            hits += 1
            total += hits / rank
    return total / max(hits, 1)


def test_hand_computed_example_with_a_tie():
    # ranks: 0.9 (pos) | 0.8, 0.8 tied (one pos, one neg) | 0.1 (neg)
    # first positive: 1/1; the tied positive: 2 positives among the 3 images scoring >= 0.8
    assert average_precision([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.8, 0.8, 0.9, 0.1], [0, 1, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize("seed", range(40))
def test_ap_matches_brute_force_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    scores = np.round(rng.random(n), int(rng.integers(0, 3)))  # 0-2 decimals: heavy ties
    labels = rng.random(n) < rng.random()
    got = average_precision(scores, labels)
    want = brute_force_ap(scores, labels)
    if not labels.any():
        assert math.isnan(got) and math.isnan(want)
    else:
        assert got == pytest.approx(want, abs=1e-12)
        perm = rng.permutation(n)  # ties as blocks: the image order cannot matter
        assert average_precision(scores[perm], labels[perm]) == pytest.approx(got, abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_without_ties_ap_is_the_papers(seed):
    rng = np.random.default_rng(100 + seed)
    scores = rng.random(200)
    labels = rng.random(200) < 0.2
    assert average_precision(scores, labels) == pytest.approx(paper_style_ap(list(scores), list(labels)), abs=1e-12)


def test_edge_cases():
    assert average_precision([0.5, 0.5, 0.5], [1, 1, 1]) == 1.0
    assert average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0]) == pytest.approx(0.25)
    assert average_precision([0.1, 0.9], [1, 0]) == pytest.approx(0.5)
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))
    with pytest.raises(ValueError):
        average_precision([float("nan"), 0.2], [1, 0])
    with pytest.raises(ValueError):
        average_precision([0.1, 0.2, 0.3], [1, 0])


def test_map_excludes_and_reports_classes_without_positives():
    rng = np.random.default_rng(7)
    scores = np.round(rng.random((30, 5)), 1)
    labels = rng.random((30, 5)) < 0.3
    labels[:, 2] = False  # no positives
    labels[:, 4] = False
    names = ["a", "b", "c", "d", "e"]
    m = evaluate(scores, labels, scores > 0.5, names)
    want = [brute_force_ap(scores[:, k], labels[:, k]) for k in (0, 1, 3)]
    assert m.mAP == pytest.approx(np.mean(want), abs=1e-12)
    assert m.classes_without_positives == ["c", "e"]
    assert [c.ap for c in m.per_class][2] is None
    assert np.isnan(average_precisions(scores, labels)[[2, 4]]).all()
    assert m.macro["classes"] == 3


def test_duplicate_names_in_a_tag_list_are_one_class():
    # as in imagenet_multi_1000: two list lines name one tag
    tl = TagList.from_names(["cat", "missile", "dog", "missile", "car"])
    assert tl.names == ("cat", "missile", "dog", "car")
    assert tl.line_counts == (1, 2, 1, 1)
    assert tl.duplicates == {"missile": 2}

    rng = np.random.default_rng(3)
    scores = np.round(rng.random((25, 4)), 2)
    labels = rng.random((25, 4)) < 0.4
    labels[0, :] = True
    m = evaluate(scores, labels, scores > 0.5, tl.names, tl.line_counts)
    aps = [brute_force_ap(scores[:, k], labels[:, k]) for k in range(4)]
    assert m.mAP == pytest.approx(np.mean(aps), abs=1e-12)
    # the paper's per-line mean: one AP per list line, so "missile" counts twice
    per_line = [aps[tl.names.index(n)] for n in ["cat", "missile", "dog", "missile", "car"]]
    assert m.mAP_per_list_line == pytest.approx(np.mean(per_line), abs=1e-12)
    assert evaluate(scores, labels, scores > 0.5, tl.names, [1, 1, 1, 1]).mAP_per_list_line is None


def test_precision_recall_f1_micro_and_macro():
    rng = np.random.default_rng(11)
    n, c = 40, 6
    labels = rng.random((n, c)) < 0.3
    labels[:, 5] = False  # a class without positives: its false alarms still count in micro
    pred = rng.random((n, c)) < 0.35
    pred[:, 1] = False  # a class predicted nowhere: precision 0 by convention
    m = evaluate(rng.random((n, c)), labels, pred, list("abcdef"))
    tps = fps = fns = 0
    ps, rs, fs = [], [], []
    for k in range(c):
        tp = sum(1 for i in range(n) if labels[i, k] and pred[i, k])
        fp = sum(1 for i in range(n) if not labels[i, k] and pred[i, k])
        fn = sum(1 for i in range(n) if labels[i, k] and not pred[i, k])
        tps, fps, fns = tps + tp, fps + fp, fns + fn
        p = tp / (tp + fp) if tp + fp else 0.0
        pc = m.per_class[k]
        assert (pc.tp, pc.fp, pc.fn) == (tp, fp, fn)
        assert pc.precision == pytest.approx(p)
        if tp + fn:
            r = tp / (tp + fn)
            f = 2 * p * r / (p + r) if p + r else 0.0
            assert pc.recall == pytest.approx(r) and pc.f1 == pytest.approx(f)
            ps.append(p), rs.append(r), fs.append(f)
        else:
            assert pc.recall is None and pc.f1 is None
    assert m.per_class[1].precision == 0.0
    mp, mr = tps / (tps + fps), tps / (tps + fns)
    assert m.micro["precision"] == pytest.approx(mp) and m.micro["recall"] == pytest.approx(mr)
    assert m.micro["f1"] == pytest.approx(2 * mp * mr / (mp + mr))
    assert m.macro["precision"] == pytest.approx(np.mean(ps))
    assert m.macro["recall"] == pytest.approx(np.mean(rs))
    assert m.macro["f1"] == pytest.approx(np.mean(fs))


# -- the official mode: the RAM++ evaluation script's definitions ---------------------------------

def official_by_hand(scores, labels, order) -> float:
    """The script's AP written out: walk the ranking, add hits/rank at each positive, divide by
    (positives + 1e-8). `order` is the ranking (best first)."""
    hits, total = 0, 0.0
    for rank, i in enumerate(order, 1):
        if labels[i]:
            hits += 1
            total += hits / rank
    return total / (hits + 1e-8)


def numpy_ranking(scores32) -> list:
    """Where the script's `argsort()[::-1]` puts each image (ties: numpy's unstable sort)."""
    return list(np.asarray(scores32, np.float32).argsort()[::-1])


@pytest.mark.parametrize("seed", range(30))
def test_official_ap_matches_the_script_definition_written_out(seed):
    rng = np.random.default_rng(500 + seed)
    n = int(rng.integers(1, 80))
    scores = np.round(rng.random(n), int(rng.integers(0, 3))).astype(np.float32)  # heavy ties
    labels = rng.random(n) < rng.random()
    got = official_average_precision(scores, labels)
    assert got == pytest.approx(official_by_hand(scores, labels, numpy_ranking(scores)), abs=1e-12)
    if not labels.any():
        assert got == 0.0


@pytest.mark.parametrize("seed", range(10))
def test_without_ties_official_and_default_agree_up_to_the_epsilon(seed):
    rng = np.random.default_rng(600 + seed)
    scores = rng.random(300).astype(np.float32)
    labels = rng.random(300) < 0.3
    assert len(set(scores.tolist())) == 300
    by_python = sorted(range(300), key=lambda i: -float(scores[i]))  # no numpy in the ranking
    off = official_average_precision(scores, labels)
    assert off == pytest.approx(official_by_hand(scores, labels, by_python), abs=1e-12)
    assert off == pytest.approx(average_precision(scores, labels) * labels.sum() / (labels.sum() + 1e-8), abs=1e-12)


def test_ties_the_default_is_order_free_the_official_follows_the_sort():
    # one block of three tied images, two of them positive
    s = np.array([0.5, 0.5, 0.5], np.float32)
    y = np.array([1, 1, 0], bool)
    assert average_precision(s, y) == pytest.approx(2 / 3)  # each positive: 2 positives among 3 at >= 0.5
    by_order = {"PPN": 1.0, "PNP": (1 + 2 / 3) / 2, "NPP": (1 / 2 + 2 / 3) / 2}
    off = official_average_precision(s, y)
    ranked = "".join("P" if y[i] else "N" for i in numpy_ranking(s))
    assert off == pytest.approx(by_order[ranked], abs=1e-7)
    assert all(abs(v - 2 / 3) > 0.05 for v in by_order.values())  # no order gives the block value
    for perm in ([2, 0, 1], [1, 2, 0]):  # the default does not move with the rows; the official may
        assert average_precision(s[perm], y[perm]) == pytest.approx(2 / 3)
        ranked = "".join("P" if y[perm][i] else "N" for i in numpy_ranking(s[perm]))
        assert official_average_precision(s[perm], y[perm]) == pytest.approx(by_order[ranked], abs=1e-7)


def test_classes_without_positives_the_official_counts_them_as_zero():
    rng = np.random.default_rng(9)
    scores = rng.random((20, 3)).astype(np.float32)
    labels = rng.random((20, 3)) < 0.4
    labels[:, 1] = False
    d = evaluate(scores, labels, scores > 0.5, ["a", "b", "c"])
    o = evaluate(scores, labels, scores >= 0.5, ["a", "b", "c"], mode="official")
    aps = [official_by_hand(scores[:, k], labels[:, k], numpy_ranking(scores[:, k])) for k in range(3)]
    assert aps[1] == 0.0
    assert o.mAP == pytest.approx(np.mean(aps), abs=1e-12)
    assert d.mAP == pytest.approx(np.mean([brute_force_ap(scores[:, k], labels[:, k]) for k in (0, 2)]), abs=1e-12)
    assert o.mAP < d.mAP
    assert o.per_class[1].ap == 0.0 and d.per_class[1].ap is None
    assert d.classes_without_positives == o.classes_without_positives == ["b"]
    # P and R: the script's eps formulas, averaged over every class (b has R 0)
    pred = scores >= 0.5
    tp = (pred & labels).sum(0); fp = (pred & ~labels).sum(0); fn = (~pred & labels).sum(0)
    assert o.macro["classes"] == 3 and d.macro["classes"] == 2
    assert o.macro["precision"] == pytest.approx(np.mean(tp / (tp + fp + 1e-9)), abs=1e-15)
    assert o.macro["recall"] == pytest.approx(np.mean(tp / (tp + fn + 1e-9)), abs=1e-15)


def test_official_map_counts_each_tag_list_line():
    tl = TagList.from_names(["cat", "missile", "dog", "missile", "car"])
    assert tl.line_classes == (0, 1, 2, 1, 3)
    rng = np.random.default_rng(4)
    scores = rng.random((30, 4)).astype(np.float32)
    labels = rng.random((30, 4)) < 0.4
    o = evaluate(scores, labels, scores >= 0.5, tl.names, tl.line_counts, mode="official",
                 line_classes=tl.line_classes)
    per_line = [official_by_hand(scores[:, k], labels[:, k], numpy_ranking(scores[:, k])) for k in tl.line_classes]
    assert o.mAP == pytest.approx(np.mean(per_line), abs=1e-12)
    assert o.mAP_per_list_line is None  # the official mAP is already per line
    with pytest.raises(ValueError, match="mode"):
        evaluate(scores, labels, scores >= 0.5, tl.names, mode="paper")

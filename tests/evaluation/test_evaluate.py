"""jobs/evaluate.py and the run reader on synthetic runs written in the job's exact layout."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ramplus_core.evaluation.annotations import parse_annotations, read_taglist
from ramplus_core.evaluation.benchmark import load_labelled
from ramplus_core.evaluation.common import EvaluationError, ScoreFloorWarning
from ramplus_core.evaluation.results import open_run, read_tag_column, score_matrix

from .conftest import brute_force_ap, write_run
from .synthetic import CLASSES, REPO, THRESHOLD, VOCAB, bench_errors, load_script, make_bench

evaluate_cli = load_script("evaluate")


def files(tmp_path, b, taglist_lines=None):
    ann = tmp_path / "gt.csv"
    ann.write_text(b.annotation_text())
    tl = tmp_path / "taglist.txt"
    tl.write_text("\n".join(taglist_lines or (CLASSES[:2] + ["dog"] + CLASSES[2:])) + "\n")  # "dog" twice
    return ann, tl


def expected(b, floor=0.0):
    s = b.scores[b.annotated][:, [VOCAB.index(c) for c in CLASSES]].astype(np.float64)
    s = np.where(s >= floor, s, 0.0)
    aps = {c: brute_force_ap(s[:, k], b.labels[:, k]) for k, c in enumerate(CLASSES)}
    return s, aps


def test_cli_metrics_match_an_independent_computation(tmp_path, capsys):
    b = make_bench()
    out = tmp_path / "out"
    run_id = write_run(out, b.rows(), bench_errors(b), vocab_size=len(VOCAB))
    ann, tl = files(tmp_path, b)
    rc = evaluate_cli.main(["--run", str(out), "--annotations", str(ann), "--taglist", str(tl),
                            "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    s, aps = expected(b)
    with_pos = [c for c in CLASSES if not np.isnan(aps[c])]
    assert m["classes_without_positives"] == ["tree"]
    assert m["mAP"] == pytest.approx(np.mean([aps[c] for c in with_pos]), abs=1e-9)
    per = {c["name"]: c for c in m["per_class"]}
    for c in with_pos:
        assert per[c]["ap"] == pytest.approx(aps[c], abs=1e-9)
    # the duplicated list line weighs "dog" twice in the paper's per-line mean
    w = [2 if c == "dog" else 1 for c in with_pos]
    assert m["mAP_per_list_line"] == pytest.approx(np.average([aps[c] for c in with_pos], weights=w), abs=1e-9)
    # P/R/F1 at the run's thresholds: predicted = score > THRESHOLD
    pred = s > THRESHOLD
    tp = int((pred & b.labels).sum()); fp = int((pred & ~b.labels).sum()); fn = int((~pred & b.labels).sum())
    assert (m["micro"]["tp"], m["micro"]["fp"], m["micro"]["fn"]) == (tp, fp, fn)
    # images: none silently dropped
    im = m["images"]
    assert im["annotated"] == len(b.annotated) + 2
    assert im["evaluated"] == len(b.annotated)
    assert im["errored"] == [{"id": "broken_one", "uri": b.errored_uri, "stage": "decode",
                              "error": "cannot decode: not a JPEG file"}]
    assert im["missing"] == [{"id": "never_listed"}]
    assert im["results_not_annotated"] == len(b.uris) - len(b.annotated)
    assert m["run"]["run_id"] == run_id and m["warnings"] and "no result" in m["warnings"][0]
    assert "mAP" in printed.out and "errored: broken_one (decode)" in printed.out
    assert "missing: never_listed" in printed.out
    table = (tmp_path / "eval" / "metrics.txt").read_text()
    assert all(c in table for c in CLASSES)


def test_missing_as_negative_counts_images_without_results(tmp_path):
    b = make_bench(seed=1)
    out = tmp_path / "out"
    write_run(out, b.rows(), bench_errors(b))
    ann = parse_annotations(b.annotation_text(), "gt.csv")
    sample = load_labelled(open_run(str(out)), ann, read_taglist(str(files(tmp_path, b)[1])), missing_as_negative=True)
    assert sample.scores.shape[0] == len(ann)
    assert sample.images["counted_as_negative"] == 2
    assert sample.uris[-2:] == [None, None]
    assert not sample.scores[-2:].any() and sample.labels[-2:].any()


def test_only_committed_runs_are_read(tmp_path):
    b1, b2 = make_bench(seed=2), make_bench(seed=3)
    out = tmp_path / "out"
    first = write_run(out, b1.rows(), run_id="20260101T000000Z-aaaaaa")
    crashed = write_run(out, b2.rows(), run_id="20260102T000000Z-bbbbbb", commit=False)
    failed = write_run(out, b2.rows(), run_id="20260102T000000Z-cccccc", commit=False, failed=True)
    ann = parse_annotations(b1.annotation_text(), "gt.csv")
    k = VOCAB.index("cat")
    run = open_run(str(out))
    assert run.run_id == first  # the newer runs staged rows but merged nothing and wrote no manifest
    sample = load_labelled(run, ann, None)
    assert np.array_equal(sample.scores[:, sample.classes.index("cat")], b1.scores[b1.annotated, k])
    for rid in (crashed, failed):
        with pytest.raises(EvaluationError, match=f"run {rid} is not committed.*{first}"):
            open_run(str(out), rid)
    # a later run replaces the same images' rows: seen from its versions on, and the first run's
    # scores stay readable by time travel
    later = write_run(out, b2.rows(), run_id="20260103T000000Z-dddddd")
    assert open_run(str(out)).run_id == later
    assert open_run(str(out)).versions["tags"] > open_run(str(out), first).versions["tags"]
    ann2 = parse_annotations(b2.annotation_text(), "gt.csv")
    now = load_labelled(open_run(str(out)), ann2, None)
    assert np.array_equal(now.scores[:, now.classes.index("cat")], b2.scores[b2.annotated, k])
    then = load_labelled(open_run(str(out), first), ann, None)
    assert np.array_equal(then.scores[:, then.classes.index("cat")], b1.scores[b1.annotated, k])
    with pytest.raises(EvaluationError, match="no committed run"):
        open_run(str(tmp_path / "empty"))


def test_a_run_reads_earlier_runs_rows_that_are_still_current(tmp_path):
    """An incremental run that tagged other images: its version holds both runs' rows."""
    b = make_bench(seed=4)
    rows = b.rows()
    out = tmp_path / "out"
    first = write_run(out, rows[:25], run_id="20260101T000000Z-aaaaaa")
    second = write_run(out, rows[25:], run_id="20260102T000000Z-bbbbbb")
    ann = parse_annotations(b.annotation_text(), "gt.csv")
    sample = load_labelled(open_run(str(out)), ann, None)
    k = VOCAB.index("dog")
    assert sample.images["evaluated"] == len(b.annotated)
    assert np.array_equal(sample.scores[:, sample.classes.index("dog")], b.scores[b.annotated, k])
    assert {r for r in read_tag_column(open_run(str(out)), "run_id")} == {first, second}
    assert len(read_tag_column(open_run(str(out), first))) == 25


def test_a_manifest_without_table_versions_is_refused_with_how_to_migrate(tmp_path):
    b = make_bench(seed=5)
    out = tmp_path / "out"
    rid = write_run(out, b.rows())
    m = json.loads((out / "_runs" / f"{rid}.json").read_text())
    del m["tables"]
    (out / "_runs" / f"{rid}.json").write_text(json.dumps(m))
    with pytest.raises(EvaluationError, match="migrated to the Delta tables"):
        open_run(str(out))
    old = tmp_path / "old"  # the layout before the tables: a manifest and a marker, no table
    (old / "_runs").mkdir(parents=True)
    (old / "_runs" / f"{rid}.json").write_text(json.dumps(m))
    (old / "_runs" / f"{rid}._SUCCESS").write_text("{}")
    with pytest.raises(EvaluationError, match=r"before the Delta tables: migrate it with `python -m ramplus_core "
                                              r"migrate .*old`"):
        open_run(str(old))


def test_a_vacuumed_version_is_an_evaluation_error(tmp_path):
    b1, b2 = make_bench(seed=2), make_bench(seed=3)
    out = tmp_path / "out"
    first = write_run(out, b1.rows(), run_id="20260101T000000Z-aaaaaa")
    write_run(out, b2.rows(), run_id="20260102T000000Z-bbbbbb")
    from ramplus_core.job import table as tb
    from ramplus_core.job.storage import Storage

    tb.maintain(Storage(), str(out), optimize=False, vacuum_hours=0)
    with pytest.raises(EvaluationError, match="vacuum"):
        read_tag_column(open_run(str(out), first))


def test_a_score_floor_warns_and_scores_under_it_count_as_zero(tmp_path, capsys):
    b = make_bench(seed=6)
    out = tmp_path / "out"
    write_run(out, b.rows(floor=0.3), floor=0.3)
    run = open_run(str(out))
    with pytest.warns(ScoreFloorWarning, match="score_floor=0"):
        score_matrix(run, {}, 0, CLASSES)
    ann, tl = files(tmp_path, b)
    assert evaluate_cli.main(["--run", str(out), "--annotations", str(ann), "--taglist", str(tl),
                              "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert any("inference.score_floor" in w for w in m["warnings"])
    assert "warning:" in capsys.readouterr().out
    _, aps = expected(b, floor=0.3)
    got = {c["name"]: c["ap"] for c in m["per_class"]}
    for c in CLASSES:
        if not np.isnan(aps[c]):
            assert got[c] == pytest.approx(aps[c], abs=1e-9)


def test_tags_outside_the_vocabulary_are_errors_naming_them(tmp_path, capsys):
    b = make_bench(seed=7)
    out = tmp_path / "out"
    write_run(out, b.rows(), vocab_size=len(VOCAB))
    ann, _ = files(tmp_path, b)
    # a benchmark class the run's (fully known) vocabulary lacks
    tl = tmp_path / "tl2.txt"
    tl.write_text("\n".join(CLASSES + ["unicorn"]) + "\n")
    rc = evaluate_cli.main(["--run", str(out), "--annotations", str(ann), "--taglist", str(tl), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("evaluate: error:") and "'unicorn'" in err[0] and "vocabulary" in err[0]
    # an annotated tag that is not on the tag list
    tl.write_text("cat\ndog\n")
    rc = evaluate_cli.main(["--run", str(out), "--annotations", str(ann), "--taglist", str(tl), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "'car'" in err and "'sky'" in err and "not in the tag list" in err
    # without a tag list the annotated tags are the classes, and must be in the run's vocabulary
    ann.write_text(b.annotation_text() + "extra_img,zebra\n")
    rc = evaluate_cli.main(["--run", str(out), "--annotations", str(ann), "--out", str(tmp_path / "e")])
    assert rc == 2 and "'zebra'" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    ann = tmp_path / "gt.csv"
    ann.write_text("a,cat\n")
    rc = evaluate_cli.main(["--run", str(tmp_path / "nothing"), "--annotations", str(ann), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no committed run" in err[0]
    rc = evaluate_cli.main(["--run", str(tmp_path), "--annotations", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "e")])
    assert rc == 2 and "annotation file not found" in capsys.readouterr().err
    b = make_bench(seed=8)
    write_run(tmp_path / "out", b.rows())
    ann.write_text("zzz_1,cat\nzzz_2,dog\n")
    rc = evaluate_cli.main(["--run", str(tmp_path / "out"), "--annotations", str(ann), "--out", str(tmp_path / "e")])
    assert rc == 2 and "none of the 2 annotated images" in capsys.readouterr().err


def test_help_is_quick_and_explains():
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for word in ("--run", "--annotations", "--taglist", "--out", "score_floor=0", "mAP"):
        assert word in r.stdout


def official_script_by_hand(logits, targets, taglist, thresholds):
    """The official script's figures from its own inputs, written out: logits [images, lines]
    float32 in annotation order, targets bool, one threshold per line."""
    aps = []
    for k in range(len(taglist)):
        col = logits[:, k]
        order = list(col.argsort()[::-1])  # the script's ranking, ties included
        hits, total = 0, 0.0
        for rank, i in enumerate(order, 1):
            if targets[i, k]:
                hits += 1
                total += hits / rank
        aps.append(total / (hits + 1e-8))
    tags = list(dict.fromkeys(taglist))
    ps, rs = [], []
    for t in tags:
        k = taglist.index(t)
        pred = [float(s) >= thresholds[k] for s in logits[:, k].tolist()]
        tp = sum(1 for i, p in enumerate(pred) if p and targets[i, k])
        fp = sum(1 for i, p in enumerate(pred) if p and not targets[i, k])
        fn = sum(1 for i, p in enumerate(pred) if not p and targets[i, k])
        ps.append(tp / (tp + fp + 1e-9))
        rs.append(tp / (tp + fn + 1e-9))
    return float(np.mean(aps)), aps, float(np.mean(ps)), float(np.mean(rs))


def test_official_matches_the_script_written_out_and_differs_from_the_default(tmp_path, capsys):
    b = make_bench(seed=13)
    out = tmp_path / "out"
    # thresholds as the job's vocabulary descriptor holds them; 0.5 and 0.3 are scores of the
    # bench (tenths), so some scores equal their threshold: predicted by the script (>=), not by the job (>)
    thr = {t: (0.3 if t == "car" else THRESHOLD) for t in VOCAB}
    rows = b.rows()
    for r in rows:
        r["tags"] = [t for t, s in r["scores"].items() if np.float32(s) > np.float32(thr[t])]
    write_run(out, rows, bench_errors(b), vocab_size=len(VOCAB), thresholds=thr)
    ann, tl = files(tmp_path, b)  # "dog" on two lines; "tree" has no positives
    taglist = CLASSES[:2] + ["dog"] + CLASSES[2:]
    for mode in ("default", "official"):
        args = ["--run", str(out), "--annotations", str(ann), "--taglist", str(tl), "--out", str(tmp_path / mode)]
        assert evaluate_cli.main(args + (["--official"] if mode == "official" else [])) == 0
    printed = capsys.readouterr().out
    d = json.loads((tmp_path / "default" / "metrics.json").read_text())
    o = json.loads((tmp_path / "official" / "metrics.json").read_text())
    assert (d["mode"], o["mode"]) == ("default", "official") and "official mode" in printed
    logits = b.scores[b.annotated][:, [VOCAB.index(t) for t in taglist]].astype(np.float32)
    targets = b.labels[:, [CLASSES.index(t) for t in taglist]]
    m_ap, aps, cp, cr = official_script_by_hand(logits, targets, taglist, [thr[t] for t in taglist])
    assert o["mAP"] == pytest.approx(m_ap, abs=1e-12)
    per = {c["name"]: c for c in o["per_class"]}
    for t, ap in zip(taglist, aps):
        assert per[t]["ap"] == pytest.approx(ap, abs=1e-12)
    assert o["macro"]["precision"] == pytest.approx(cp, abs=1e-12)
    assert o["macro"]["recall"] == pytest.approx(cr, abs=1e-12)
    # how they differ here: "tree" (no positives) is AP 0 in the official mean, left out of ours
    assert per["tree"]["ap"] == 0.0 and {c["name"]: c for c in d["per_class"]}["tree"]["ap"] is None
    assert d["mAP"] != pytest.approx(o["mAP"], abs=1e-3)
    # scores equal to a threshold: predicted by the official rule only
    s = b.scores[b.annotated]
    at = sum(int((s[:, VOCAB.index(c)] == np.float32(thr[c])).sum()) for c in CLASSES)
    assert at > 0
    assert o["micro"]["tp"] + o["micro"]["fp"] == d["micro"]["tp"] + d["micro"]["fp"] + at
    assert any("black 10x10" in w for w in o["warnings"])  # two annotated images have no row


def test_official_thresholds_compare_as_the_scripts_decimal_text(tmp_path):
    """The script compares a float32 score (as float64) with the float64 of its threshold file:
    a score of float32(0.65) = 0.64999998 is not >= 0.65, though it equals the float32 threshold."""
    out = tmp_path / "out"
    rows = [{"uri": f"file:///p/i{i}.jpg", "scores": {"cat": s}, "tags": []}
            for i, s in enumerate([0.65, 0.9, 0.1])]
    write_run(out, rows, thresholds={"cat": 0.65})
    ann = parse_annotations("i0,cat\ni1\ni2,cat\n", "gt.csv")
    sample = load_labelled(open_run(str(out)), ann, None)
    from ramplus_core.evaluation.benchmark import official_predictions

    pred, notes = official_predictions(sample)
    assert pred[:, 0].tolist() == [False, True, False] and not notes
    assert float(np.float32(0.65)) < 0.65
    pred, _ = official_predictions(sample, {"cat": 0.6})  # --thresholds wins over the vocabulary's
    assert pred[:, 0].tolist() == [True, True, False]

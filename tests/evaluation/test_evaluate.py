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
from ramplus_core.evaluation.results import open_run, score_matrix

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
    ann = parse_annotations(b1.annotation_text(), "gt.csv")
    run = open_run(str(out))
    assert run.run_id == first  # the newer run has data files but no marker
    sample = load_labelled(run, ann, None)
    k = VOCAB.index("cat")
    assert np.array_equal(sample.scores[:, sample.classes.index("cat")], b1.scores[b1.annotated, k])
    with pytest.raises(EvaluationError, match=f"run {crashed} is not committed.*{first}"):
        open_run(str(out), crashed)
    later = write_run(out, b2.rows(), run_id="20260103T000000Z-cccccc")
    assert open_run(str(out)).run_id == later
    assert open_run(str(out), first).run_id == first
    # a manifest changed after the commit is refused
    (out / "_runs" / f"{first}.json").write_text(json.dumps({"run_id": first, "status": "committed"}))
    with pytest.raises(EvaluationError, match="not the one that was committed"):
        open_run(str(out), first)
    with pytest.raises(EvaluationError, match="no committed run"):
        open_run(str(tmp_path / "empty"))


def test_manifest_without_a_file_list_reads_this_runs_rows_only(tmp_path):
    b1, b2 = make_bench(seed=4), make_bench(seed=5)
    out = tmp_path / "out"
    write_run(out, b1.rows(), run_id="20260101T000000Z-aaaaaa", list_files=False)
    write_run(out, b2.rows(), run_id="20260102T000000Z-bbbbbb", commit=False)
    ann = parse_annotations(b1.annotation_text(), "gt.csv")
    sample = load_labelled(open_run(str(out)), ann, None)
    k = VOCAB.index("dog")
    assert np.array_equal(sample.scores[:, sample.classes.index("dog")], b1.scores[b1.annotated, k])


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

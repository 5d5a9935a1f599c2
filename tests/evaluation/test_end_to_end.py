"""A real tagging run (the job on the golden tiny model) evaluated, calibrated and reported.

The expected figures are computed here from the run's Delta tables read directly with
deltalake at the versions its manifest records, and a brute-force AP, not through the
evaluation package's reader.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from deltalake import DeltaTable

from . import browser
from .conftest import brute_force_ap
from .synthetic import load_script
from .test_report import check_screenshot

evaluate_cli = load_script("evaluate")
calibrate_cli = load_script("calibrate")
report_cli = load_script("report")


def read_directly(out, manifest):
    v = manifest["tables"]["versions"]
    t = DeltaTable(str(out / "tags"), version=v["tags"]).to_pyarrow_table().to_pylist()
    e = DeltaTable(str(out / "errors"), version=v["errors"]).to_pyarrow_table().to_pylist()
    return {r["uri"].rsplit("/", 1)[-1].rsplit(".", 1)[0]: r for r in t}, e


def labelled(real_run, tmp_path):
    """Ground truth for the tagged images: some tags right, some wrong, one class unused."""
    rows, errs = read_directly(real_run.output, real_run.manifest)
    rng = np.random.default_rng(5)
    names = real_run.names
    lines, truth = [], {}
    for stem in sorted(rows):
        scores = {s["tag"]: s["score"] for s in rows[stem]["scores"]}
        labels = [t for t in names[:-1] if (scores[t] > 0.55) != (rng.random() < 0.25)]
        truth[stem] = set(labels)
        lines.append(",".join([stem] + labels))
    lines.append("broken,tag_000")  # the job could not decode it: reported, not dropped
    ann = tmp_path / "gt.csv"
    ann.write_text("\n".join(lines) + "\n")
    tl = tmp_path / "taglist.txt"
    tl.write_text("\n".join(names + ["tag_003"]) + "\n")  # one class on two lines
    return ann, tl, rows, errs, truth


def test_evaluate_a_real_run(real_run, tmp_path):
    ann, tl, rows, errs, truth = labelled(real_run, tmp_path)
    assert evaluate_cli.main(["--run", str(real_run.output), "--annotations", str(ann), "--taglist", str(tl),
                              "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    stems = sorted(rows)
    aps = {}
    for t in real_run.names:
        s = [next(x["score"] for x in rows[st]["scores"] if x["tag"] == t) for st in stems]
        aps[t] = brute_force_ap(s, [t in truth[st] for st in stems])
    with_pos = [t for t in real_run.names if not np.isnan(aps[t])]
    assert m["classes_without_positives"] == [real_run.names[-1]]
    assert m["mAP"] == pytest.approx(np.mean([aps[t] for t in with_pos]), abs=1e-6)
    for c in m["per_class"]:
        if c["ap"] is not None:
            assert c["ap"] == pytest.approx(aps[c["name"]], abs=1e-6)
    tp = sum(len(set(rows[st]["tags"]) & truth[st]) for st in stems)
    fp = sum(len(set(rows[st]["tags"]) - truth[st]) for st in stems)
    assert (m["micro"]["tp"], m["micro"]["fp"]) == (tp, fp)
    assert m["images"]["evaluated"] == len(stems) == real_run.manifest["counts"]["tagged"]
    [err] = m["images"]["errored"]
    assert err["id"] == "broken" and err["stage"] == "decode" and err["error"] == errs[0]["error"]
    assert m["run"]["score_floor"] == 0.0 and not any("score_floor" in w for w in m["warnings"])


def test_official_mode_on_a_real_run_matches_the_script_written_out(real_run, tmp_path):
    """Real float32 scores and the thresholds of the job's own vocabulary descriptor."""
    from .test_evaluate import official_script_by_hand

    ann, tl, rows, errs, truth = labelled(real_run, tmp_path)
    assert evaluate_cli.main(["--run", str(real_run.output), "--annotations", str(ann), "--taglist", str(tl),
                              "--official", "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    stems = sorted(rows)  # the annotation file's order
    taglist = real_run.names + ["tag_003"]
    logits = np.array([[next(x["score"] for x in rows[st]["scores"] if x["tag"] == t) for t in taglist]
                       for st in stems], dtype=np.float32)
    targets = np.array([[t in truth[st] for t in taglist] for st in stems])
    thr = dict(zip(real_run.names, real_run.thresholds))
    m_ap, aps, cp, cr = official_script_by_hand(logits, targets, taglist, [thr[t] for t in taglist])
    assert m["mode"] == "official" and not any("no threshold known" in w for w in m["warnings"])
    assert m["mAP"] == pytest.approx(m_ap, abs=1e-12)
    assert m["macro"]["precision"] == pytest.approx(cp, abs=1e-12)
    assert m["macro"]["recall"] == pytest.approx(cr, abs=1e-12)


def test_calibrate_a_real_run_and_the_job_uses_the_file(real_run, tmp_path):
    ann, tl, rows, errs, truth = labelled(real_run, tmp_path)
    tsv, js = tmp_path / "thresholds.tsv", tmp_path / "cal.json"
    assert calibrate_cli.main(["--run", str(real_run.output), "--annotations", str(ann), "--taglist", str(tl),
                               "--min-positives", "2", "--out", str(tsv), "--json", str(js)]) == 0
    cal = {t["tag"]: t for t in json.loads(js.read_text())["tags"] if t["threshold"] is not None}
    assert len(cal) >= 5
    # the job's own config loading accepts the file and applies it to the run's vocabulary
    from ramplus_core.job import load_config
    from ramplus_core.job.vocab import select_vocabulary
    from ramplus_core.vocabulary import Vocabulary

    cfg = load_config(None, overrides=[("vocabulary.thresholds_file", str(tsv))], require_uris=False)
    import torch

    base = Vocabulary(names=list(real_run.names), thresholds=np.asarray(real_run.thresholds, np.float32),
                      zh=[""] * len(real_run.names), embeds=torch.zeros(len(real_run.names), 4),
                      offsets=torch.arange(len(real_run.names) + 1))
    v = select_vocabulary(base, cfg.vocabulary)
    for i, name in enumerate(v.names):
        want = cal[name]["threshold"] if name in cal else real_run.thresholds[i]
        assert float(v.thresholds[i]) == pytest.approx(want, abs=1e-7)
    # and the tags it would produce with them on this run reach the calibrated F1
    assert evaluate_cli.main(["--run", str(real_run.output), "--annotations", str(ann), "--taglist", str(tl),
                              "--thresholds", str(tsv), "--out", str(tmp_path / "eval")]) == 0
    per = {c["name"]: c for c in json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_class"]}
    for name, t in cal.items():
        assert per[name]["f1"] == pytest.approx(t["f1"])
        stems = sorted(rows)
        on = [st for st in stems if next(x["score"] for x in rows[st]["scores"] if x["tag"] == name)
              > np.float32(v.thresholds[v.names.index(name)])]
        assert per[name]["tp"] + per[name]["fp"] == len(on)


def test_report_of_a_real_run_renders_in_chromium(real_run, tmp_path):
    page = tmp_path / "report.html"
    assert report_cli.main(["--run", str(real_run.output), "--sample", "6", "--out", str(page)]) == 0
    html = page.read_text()
    assert real_run.run_id in html
    assert html.count("data:image/jpeg;base64,") == 6  # every sampled image has a thumbnail
    assert "broken.jpg" in html and "Errors: 1 image(s) not tagged" in html
    counts = real_run.manifest["counts"]
    n = counts["tagged"] + counts["errors"]
    assert f"0 before the run, + {n} added, \u2212 0 removed = {n} after it" in html  # from the change feed
    r = browser.render(page)
    assert r.errors == [], r.errors
    check_screenshot(r.png, tmp_path / "report.png")

"""The HTML report: its content on synthetic runs, and that it renders cleanly in Chromium."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ramplus_core.evaluation.report import sample_rows
from ramplus_core.evaluation.results import open_run

from . import browser
from .conftest import write_run
from .synthetic import load_script

report_cli = load_script("report")


def check_screenshot(png: bytes, path) -> None:
    """A real page, not a blank or failed render: right size, some ink, many colours."""
    path.write_bytes(png)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (1280, 2000)
    arr = np.asarray(img.convert("RGB"), dtype=np.int32)
    non_white = (np.abs(arr - 255).sum(axis=2) > 30).mean()
    assert non_white > 0.02, f"the screenshot is nearly blank ({non_white:.3%} ink)"
    packed = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
    colours = np.count_nonzero(np.bincount(packed.ravel(), minlength=1 << 24))
    assert colours > 64, f"only {colours} colours: too few for text, plots and thumbnails"


def test_the_browser_harness_sees_console_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>broken</p><img src=\"missing.png\">"
                   "<script>console.error('from the page'); undefinedFunction();</script></body></html>")
    r = browser.render(bad)
    text = "\n".join(r.errors)
    assert "console.error: from the page" in text
    assert "undefinedFunction" in text
    assert "missing.png" in text
    assert r.png.startswith(b"\x89PNG")


def tricky_run(tmp_path, n=30):
    rows = []
    for i in range(n):
        scores = {"cat": 0.9 - i / 100, "<b>bold</b>": 0.7, "dog": 0.2 + i / 100, "tree": 0.05}
        rows.append({"uri": f"file://{tmp_path}/photos/img_{i:02d}.jpg", "scores": scores,
                     "tags": [t for t, s in scores.items() if s > 0.5], "width": 640, "height": 480})
    errors = [{"uri": f"file://{tmp_path}/photos/evil.jpg", "stage": "decode",
               "error": "cannot decode: <script>console.error('not escaped')</script>"},
              {"uri": f"file://{tmp_path}/photos/huge.jpg", "stage": "fetch", "error": "file is larger than 1000 bytes"}]
    out = tmp_path / "out"
    write_run(out, rows, errors, floor=0.1)
    return out, rows


def test_sampling_is_seeded_uniform_and_reads_only_the_runs_version(tmp_path):
    out, rows = tricky_run(tmp_path)
    write_run(out, [{"uri": "file:///other/x.jpg", "scores": {"cat": 0.9}, "tags": ["cat"]}],
              run_id="20270101T000000Z-zzzzzz", commit=False)  # staged, never merged
    run = open_run(str(out))
    assert len(run.dataset("tags").files) > 1  # rows spread over several files (shards)
    a = [r["uri"] for r in sample_rows(run, 10, seed=1)]
    assert len(a) == 10 == len(set(a)) and a == sorted(a)
    assert a == [r["uri"] for r in sample_rows(run, 10, seed=1)]
    assert a != [r["uri"] for r in sample_rows(run, 10, seed=2)]
    assert {r["uri"] for r in sample_rows(run, 100)} == {r["uri"] for r in rows}  # all of them, nothing else
    assert sample_rows(run, 0) == []
    # a later run's rows are not in an earlier run's sample
    write_run(out, [{"uri": "file:///other/y.jpg", "scores": {"cat": 0.9}, "tags": ["cat"]}],
              run_id="20270102T000000Z-yyyyyy")
    assert "file:///other/y.jpg" not in {r["uri"] for r in sample_rows(open_run(str(out), run.run_id), 100)}
    assert "file:///other/y.jpg" in {r["uri"] for r in sample_rows(open_run(str(out)), 100)}


def test_sampling_is_uniform_over_rows_not_files(tmp_path):
    """Files of very different sizes: each row, not each file, has the same chance."""
    out = tmp_path / "out"
    rows = [{"uri": f"file:///p/{i:03d}.jpg", "scores": {"cat": 0.5}, "tags": []} for i in range(60)]
    write_run(out, rows[:50], run_id="20260101T000000Z-aaaaaa", shards=2)
    write_run(out, rows[50:], run_id="20260102T000000Z-bbbbbb")  # small files added by a nightly run
    run = open_run(str(out))
    hits = Counter()
    for seed in range(300):
        hits.update(r["uri"] for r in sample_rows(run, 6, seed=seed))
    late = sum(hits[r["uri"]] for r in rows[50:]) / sum(hits.values())
    assert 0.1 < late < 0.24  # 10 of 60 rows: 1/6


def changed_catalog(tmp_path):
    """Run 1: 6 tagged, 2 errors. Run 2: retags 2, adds 1, fixes 1 error, breaks 1 image, deletes 1."""
    out = tmp_path / "out"
    tagged = lambda u, t: {"uri": f"file:///p/{u}.jpg", "scores": {t: 0.9, "other": 0.2}, "tags": [t]}  # noqa: E731
    err = lambda u: {"uri": f"file:///p/{u}.jpg", "stage": "decode", "error": "cannot decode: <b>truncated</b>"}  # noqa: E731
    write_run(out, [tagged(f"a{i}", "cat") for i in range(6)], [err("e0"), err("e1")],
              run_id="20260101T000000Z-aaaaaa")
    second = write_run(out, [tagged("a0", "dog"), tagged("a1", "bird"), tagged("new", "cat"), tagged("e0", "cat")],
                       [err("a2")], run_id="20260102T000000Z-bbbbbb", deleted=["file:///p/a3.jpg"])
    return out, second


def test_report_shows_the_catalog_and_what_the_run_changed(tmp_path):
    from ramplus_core.evaluation.report import catalog_state, run_changes
    from ramplus_core.evaluation.results import read_errors

    out, second = changed_catalog(tmp_path)
    run = open_run(str(out))
    cat = catalog_state(run, read_errors(run))
    # after: a0 a1 a4 a5 new e0 tagged; e1 a2 errors (a3 gone)
    assert (cat.tagged, cat.errors, cat.images) == (6, 2, 8) and cat.errors_by_stage == {"decode": 2}
    ch = run_changes(run)
    assert ch.images == {"added": 1, "fixed": 1, "retagged": 2, "failed": 0, "broke": 1, "error_again": 0,
                         "removed": 1}
    assert ch.tables["tags"] == {"inserted": 2, "updated": 2, "deleted": 2}
    assert ch.tables["errors"] == {"inserted": 1, "updated": 0, "deleted": 1}
    assert cat.images - ch.added + ch.removed == 8  # 6 + 2 before the run
    ex = {k: v for k, v in ch.examples.items() if v}
    assert [r["uri"] for r in ex["retagged"]] == ["file:///p/a0.jpg", "file:///p/a1.jpg"]
    assert ex["retagged"][0]["tags_before"] == ["cat"] and ex["retagged"][0]["tags"] == ["dog"]
    assert ex["broke"][0]["stage"] == "decode" and ex["removed"][0]["uri"] == "file:///p/a3.jpg"
    # the first run, by time travel: everything was new then
    first = open_run(str(out), "20260101T000000Z-aaaaaa")
    ch1 = run_changes(first)
    assert ch1.images["added"] == 6 and ch1.images["failed"] == 2 and ch1.removed == 0
    assert catalog_state(first, read_errors(first)).images == 8
    page = tmp_path / "r.html"
    assert report_cli.main(["--run", str(out), "--sample", "3", "--out", str(page)]) == 0
    html = page.read_text()
    assert "Catalog after this run" in html and "What this run changed" in html
    assert "8 before the run, + 1 added, \u2212 1 removed = 8 after it" in html
    assert "&lt;b&gt;truncated&lt;/b&gt;" in html and "<b>truncated" not in html
    assert "Sample: 3 of 6 tagged images" in html
    # the catalog's manifests are version 1 (`skipped` for objects that are not images): still read
    assert '<b>0</b><span class="muted">not images</span>' in html


def test_report_content_is_escaped_and_renders_without_errors(tmp_path, capsys):
    out, rows = tricky_run(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(0, 30, 3):  # some images exist (thumbnails), the others show why they have none
        Image.fromarray(np.full((48, 64, 3), (i * 8, 120, 200 - i * 5), np.uint8)).save(photos / f"img_{i:02d}.jpg")
    page = tmp_path / "report.html"
    assert report_cli.main(["--run", str(out), "--sample", "12", "--seed", "3", "--out", str(page)]) == 0
    assert "wrote" in capsys.readouterr().out
    html = page.read_text()
    assert "<script" not in html and "&lt;script&gt;console.error(&#x27;not escaped&#x27;)&lt;/script&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold</b>" not in html
    assert html.count('class="card"') == 12
    assert 0 < html.count("data:image/jpeg;base64,") < 12
    assert "FileNotFoundError" in html
    assert "Errors: 2 image(s) not tagged" in html and "file is larger than 1000 bytes" in html
    assert html.count("<svg") == 2 and "floor 0.1" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html), "the page must not load anything"
    assert "Content-Security-Policy" in html
    r = browser.render(page)
    assert r.errors == [], r.errors
    check_screenshot(r.png, tmp_path / "report.png")


def test_report_cli_errors(tmp_path, capsys):
    rc = report_cli.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")])
    assert rc == 2 and "no committed run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_cli.main(["--run", "x", "--out", "y", "--sample", "-1"])

"""The HTML report: its content on synthetic runs, and that it renders cleanly in Chromium."""

from __future__ import annotations

import io
import re

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
    write_run(out, rows, errors, floor=0.1, files_per_kind=3)
    return out, rows


def test_sampling_is_seeded_uniform_and_reads_only_the_run(tmp_path):
    out, rows = tricky_run(tmp_path)
    write_run(out, [{"uri": "file:///other/x.jpg", "scores": {"cat": 0.9}, "tags": ["cat"]}],
              run_id="20270101T000000Z-zzzzzz", commit=False)
    run = open_run(str(out))
    a = [r["uri"] for r in sample_rows(run, 10, seed=1)]
    assert len(a) == 10 == len(set(a)) and a == sorted(a)
    assert a == [r["uri"] for r in sample_rows(run, 10, seed=1)]
    assert a != [r["uri"] for r in sample_rows(run, 10, seed=2)]
    assert {r["uri"] for r in sample_rows(run, 100)} == {r["uri"] for r in rows}  # all of them, nothing else
    assert sample_rows(run, 0) == []


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

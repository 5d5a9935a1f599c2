"""Fixed costs of a night and failing fast: no model for a night without work, checks before the checkpoint.

Runs go through the real job in this process (the tiny golden checkpoint, images in a
temporary folder, the driver path: no Ray); the command-line cases run jobs/tag_bucket.py
as a user does. Nothing is mocked: what a run loaded is read from its manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from ramplus_core.job import load_config, run
from ramplus_core.job import model_ids as mi
from ramplus_core.job.storage import Storage
from ramplus_core.release import RELEASED_URL

from .conftest import CHECKPOINT, GOLDEN, REPO, table_rows


@pytest.fixture()
def night(tmp_path):
    """An input folder with the golden images, an output, and the checkpoint copied (so it can change)."""
    src, out, ck = tmp_path / "in", tmp_path / "out", tmp_path / "ck.pth"
    shutil.copytree(GOLDEN / "images", src)
    shutil.copy(CHECKPOINT, ck)

    def go(output=out, **overrides):
        ov = [("ray.progress_bars", False)] + list(overrides.items())
        cfg = load_config(None, inputs=[str(src)], output=str(output), checkpoint=str(ck), overrides=ov)
        return run(cfg, emit=lambda line: None).manifest

    return src, out, ck, go


def _tags(output) -> dict:
    t = table_rows(str(output), "tags", Storage(), columns=["uri", "tags", "scores"])
    return {u: (tags, [(s["tag"], round(s["score"], 6)) for s in scores])
            for u, tags, scores in zip(*(t.column(c).to_pylist() for c in ("uri", "tags", "scores")))}


def test_a_night_without_work_loads_no_model_but_commits_deletions(night):
    src, out, ck, go = night
    first = go()
    assert first["model_loaded"] and first["ids_from"] == "checkpoint"
    assert (out / mi.CACHE_DIR / mi.CACHE_NAME).is_file()

    second = go()
    assert second["counts"]["incremental"]["work"] == 0
    assert not second["model_loaded"] and second["ids_from"] == "cache"
    assert second["actors"] == [] and second["resources"] == {} and "model_load" not in second["timings_s"]
    assert (second["model_id"], second["vocab_id"]) == (first["model_id"], first["vocab_id"])

    gone = sorted(src.iterdir())[0]
    gone.unlink()
    third = go()
    assert third["counts"]["incremental"]["deleted"] == 1 and not third["model_loaded"]
    assert third["status"] == "committed" and gone.as_uri() not in _tags(out)


def test_a_night_without_work_imports_no_torch(night):
    """torch and timm (1.5-3.5 s here) were imported for the id cache's answer and the manifest's
    version list: most of a no-op night. The night from the shell, as cron runs it."""
    src, out, ck, go = night
    go()
    probe = ("import runpy, sys\n"
             f"sys.argv = ['tag_bucket.py', '--input', {str(src)!r}, '--output', {str(out)!r}, "
             f"'--checkpoint', {str(ck)!r}, '--quiet']\n"
             "try:\n    runpy.run_path('jobs/tag_bucket.py', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('heavy:', sorted(m for m in ('torch', 'timm') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ids from the cache" in r.stdout and "0 to do" in r.stdout, r.stdout[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "heavy: []", r.stdout[-2000:]


def test_new_images_load_the_model_once_with_the_cached_ids(night):
    src, out, ck, go = night
    first = go()
    shutil.copy(sorted(src.iterdir())[0], src / "new.jpg")
    second = go()
    assert second["counts"]["incremental"]["new"] == 1 and second["model_loaded"]
    assert second["ids_from"] == "cache" and second["model_id"] == first["model_id"]
    assert second["timings_s"]["model_load"] > 0


def test_a_changed_checkpoint_file_gets_its_id_computed_again(night):
    import torch

    src, out, ck, go = night
    first = go()
    os.utime(ck, ns=(1, 1))  # same bytes, another mtime: computed again, to the same id
    touched = go()
    assert touched["ids_from"] == "checkpoint" and touched["model_id"] == first["model_id"]
    assert touched["counts"]["incremental"]["work"] == 0

    state = torch.load(ck, weights_only=True)
    model = state.get("model", state)
    key = next(k for k, v in model.items() if k.startswith("visual_encoder.") and v.is_floating_point())
    model[key] = model[key] + 0.01
    torch.save(state, ck)
    changed = go()
    assert changed["ids_from"] == "checkpoint" and changed["model_id"] != first["model_id"]
    assert changed["counts"]["incremental"]["retagged"] == first["counts"]["tagged"]


def test_the_identity_sees_bytes_that_size_and_mtime_do_not(tmp_path):
    f = tmp_path / "ck.pth"
    f.write_bytes(b"PK\x03\x04" + bytes(3_000_000))
    st = os.stat(f)
    before = mi.checkpoint_identity(str(f), Storage())
    with open(f, "r+b") as h:
        h.seek(st.st_size - 10)
        h.write(b"x")  # the zip's central directory (its CRCs) lives at the end
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = mi.checkpoint_identity(str(f), Storage())
    assert (after["size"], after["mtime_ns"]) == (before["size"], before["mtime_ns"]) and after != before


def test_threshold_change_and_tag_removal_cost_no_model_and_match_a_full_run(night, tmp_path):
    src, out, ck, go = night
    first = go()
    thr = go(**{"vocabulary.threshold": 0.7})
    assert not thr["model_loaded"] and thr["counts"]["incremental"]["vocab_changed"] == first["counts"]["tagged"] > 0
    assert thr["ids_from"].startswith("cached model_id")
    (chg,) = thr["vocabulary"]["changed_from"].values()  # thresholds only: no tag added or removed
    assert (chg["vocab_id"], chg["added_tags"], chg["removed_tags"]) == (first["vocab_id"], 0, 0)
    fresh = go(output=tmp_path / "fresh", **{"vocabulary.threshold": 0.7})
    assert fresh["model_loaded"] and fresh["vocab_id"] == thr["vocab_id"]  # same id without the model
    assert _tags(out) == _tags(tmp_path / "fresh")

    sub = go(**{"vocabulary.threshold": 0.7, "vocabulary.tags": ("tag_000", "tag_003", "tag_007")})
    assert not sub["model_loaded"] and sub["counts"]["incremental"]["vocab_changed"] > 0
    (chg,) = sub["vocabulary"]["changed_from"].values()  # a tag removal is reported as one
    assert (chg["added_tags"], chg["removed_tags"], chg["computed_tags"]) == (0, thr["vocabulary"]["tags"] - 3, 0)
    fresh_sub = go(output=tmp_path / "fresh_sub",
                   **{"vocabulary.threshold": 0.7, "vocabulary.tags": ("tag_000", "tag_003", "tag_007")})
    assert fresh_sub["vocab_id"] == sub["vocab_id"]
    copied, computed = _tags(out), _tags(tmp_path / "fresh_sub")
    assert copied.keys() == computed.keys()
    for uri, (tags, scores) in copied.items():  # the head over 3 tags rounds in another order: 1e-6
        assert tags == computed[uri][0] and [t for t, _ in scores] == [t for t, _ in computed[uri][1]]
        assert np.allclose([v for _, v in scores], [v for _, v in computed[uri][1]], atol=1e-5)


# -- fail fast: one line, exit 2, before the checkpoint is read --------------------------------

def _cli(*args, env=None, preexec=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "jobs" / "tag_bucket.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=preexec)


def _one_line(r) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("tag_bucket: error: ") and r.stderr.strip().count("\n") == 0, r.stderr
    return r.stderr


def test_a_missing_checkpoint_says_where_to_get_it_and_writes_nothing(tmp_path):
    err = _one_line(_cli("--input", str(GOLDEN / "images"), "--output", str(tmp_path / "out"),
                         "--checkpoint", str(tmp_path / "ram_plus_swin_large_14m.pth")))
    assert RELEASED_URL in err and "Getting the checkpoint" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["output_is_a_file", "output_cannot_be_written", "vocab_file", "tags_file"])
def test_checks_without_a_model_come_before_the_checkpoint(tmp_path, case):
    """Each case also names a checkpoint that does not exist: its error must not be the one shown."""
    args = ["--input", str(GOLDEN / "images"), "--output", str(tmp_path / "out"),
            "--checkpoint", str(tmp_path / "missing.pth")]
    if case == "output_is_a_file":
        (tmp_path / "blocker").write_text("a file where the output's folder should be")
        args[3] = str(tmp_path / "blocker" / "out")
        expect = "blocker is a file"
    elif case == "output_cannot_be_written":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "_cache").write_text("a file where a folder is written")  # fails even as root
        expect = "output: cannot write under"
    elif case == "vocab_file":
        (tmp_path / "v.yaml").write_text("builtin: all\ntags:\n  - name: logo\n    colour: red\n")
        args += ["--vocab", str(tmp_path / "v.yaml")]
        expect = "tag 'logo': unknown key 'tags[0].colour'"
    else:
        args += ["--set", f"vocabulary.tags_file={tmp_path / 'no-such-tags.txt'}"]
        expect = "vocabulary.tags_file"
    err = _one_line(_cli(*args))
    assert expect in err and "missing.pth" not in err, err


def _limit_file_size():
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_full_disk_names_the_failed_write_and_a_rerun_resumes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(GOLDEN / "images", src)
    args = ("--input", str(src), "--output", str(out), "--checkpoint", str(CHECKPOINT), "--quiet")
    r = _cli(*args, preexec=_limit_file_size)
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "step " in r.stderr and "disk or quota is full" in r.stderr and "resumes" in r.stderr, r.stderr
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    (manifest,) = [p for p in (out / "_runs").iterdir() if p.name.endswith(".json") and "FAILED" not in p.name]
    m = json.loads(manifest.read_text())
    assert m["status"] == "committed" and m["counts"]["tagged"] + m["counts"]["errors"] == m["counts"]["listed"]
    assert np.isfinite(m["timings_s"]["total"])

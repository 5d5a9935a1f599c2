"""The command line as a user meets it.

Two tests start real `python -m ramplus_core` processes (tagging the golden images, and a
missing checkpoint, where exit code and a traceback-free stderr matter); the rest call
`main()` in this process, since each new process spends seconds importing torch and timm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ramplus_core import RamPlus
from ramplus_core.checkpoint import RELEASED_URL, export_safetensors
from ramplus_core.cli import _Unusable, main, read_thresholds
from ramplus_core.vocabulary import BUILTIN_SIZE, builtin_names

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAMPLUS_CHECKPOINT"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "ramplus_core", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def not_an_image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cli") / "notes.jpg"
    p.write_text("not a picture\n")
    return p


@pytest.fixture(scope="module")
def builtin_vocab_checkpoint(tmp_path_factory, tiny_model) -> Path:
    """The tiny weights with a 4585-tag vocabulary (one description each), so the built-in
    names, Chinese names and thresholds apply; small enough to write in a test."""
    first = tiny_model.vocabulary.embeds[tiny_model.vocabulary.offsets[:-1]]  # [24, 512]: each tag's first
    label_embed = first[torch.arange(BUILTIN_SIZE) % first.shape[0]].contiguous()
    fake = SimpleNamespace(net=tiny_model.net, label_embed=label_embed,
                           config=replace(tiny_model.config, descriptions_per_tag=1))
    path = tmp_path_factory.mktemp("ckpt") / "tiny_builtin_vocab.safetensors"
    export_safetensors(fake, str(path))
    return path


def _main(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- what a user runs -------------------------------------------------------------------------

def test_tag_json_on_golden_images(golden, not_an_image):
    picks = [0, 4, 5]  # RGB JPEG, palette GIF, CMYK JPEG; test_golden covers all six via tag()
    images = [golden.image_paths[0], not_an_image, golden.image_paths[4], golden.image_paths[5]]
    r = run_cli("tag", *images, "--checkpoint", golden.checkpoint, "--json", "--zh", "--batch-size", "3",
                "--thresholds-from", golden.dir / "expected.json")
    assert r.returncode == 1, r.stderr  # one image failed, the rest were still tagged
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in images]  # input order kept
    bad = rows.pop(1)
    assert bad["stage"] == "decode" and "not an image" in bad["error"] and "tags" not in bad
    assert [sorted(row["tags"]) for row in rows] == [golden.expected_tags[i] for i in picks]
    for row in rows:
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert len(row["tags_zh"]) == len(row["tags"])  # --zh adds them (None: tiny tags have no Chinese)
        assert row["width"] > 0 and row["height"] > 0
    assert "Traceback" not in r.stderr


def test_tag_text_with_chinese_names(capsys, monkeypatch, builtin_vocab_checkpoint, golden):
    monkeypatch.chdir(REPO)
    code, out, err = _main(capsys, "tag", golden.image_paths[0], "ramplus_core/samples/cat_exif_orientation6.jpg",
                           "--checkpoint", builtin_vocab_checkpoint, "--zh")
    assert code == 0, err
    names, zh, _ = builtin_names()
    shown_as = {f"{n}/{z}" for n, z in zip(names, zh)}  # English/Chinese, as the built-in lists pair them
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("ramplus_core/samples/cat_exif_orientation6.jpg (451x300): ")
    items = [item for line in lines for item in line.partition("): ")[2].split(", ")]
    assert items
    for item in items:
        pair, score = item.rsplit(" ", 1)
        assert pair in shown_as, pair
        assert 0.0 <= float(score) <= 1.0


def test_export_command(capsys, golden, tiny_model, tmp_path):
    out = tmp_path / "tiny.safetensors"
    code, stdout, err = _main(capsys, "export", golden.checkpoint, out)
    assert code == 0, err
    assert out.exists()
    assert "load time: source" in stdout and "s, export" in stdout
    assert tiny_model.model_id in stdout  # the export holds the same weights
    assert RamPlus.from_checkpoint(str(out), device="cpu").model_id == tiny_model.model_id


def test_missing_checkpoint_one_line_exit_2(golden, tmp_path):
    missing = tmp_path / "ram_plus_swin_large_14m.pth"
    r = run_cli("tag", golden.image_paths[0], "--checkpoint", missing)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "not found" in lines[0] and str(missing) in lines[0] and RELEASED_URL in lines[0]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("tag", "export", "describe", "maintain", "migrate", RELEASED_URL, "Getting the checkpoint"):
        assert word in out
    for command in ("tag", "export", "describe", "maintain", "migrate"):
        assert len([ln for ln in out.splitlines() if ln.split()[:1] == [command]]) == 1, f"{command} listed twice"


_HEAVY = ("torch", "timm", "ray", "deltalake")


@pytest.mark.parametrize("argv", [["--help"], ["tag", "--help"], ["export", "--help"], ["maintain", "--help"]])
def test_help_imports_no_torch_or_ray(argv):
    """`--help` took ~30 s on a cold cache: torch, timm and Ray were imported before argparse ran."""
    probe = ("import runpy, sys\n"
             f"sys.argv = ['ramplus'] + {argv!r}\n"
             "try:\n    runpy.run_module('ramplus_core', run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code == 0, e.code\n"
             f"print(sorted(m for m in {_HEAVY!r} if m in sys.modules), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr
    assert "usage:" in r.stdout


# -- option details ----------------------------------------------------------------------------

@pytest.mark.parametrize("command,words", [
    ("tag", ["--json", "--zh", "--batch-size", "--dtype", "--device", "--vocabulary", "--thresholds-from",
             RELEASED_URL, "Exit status"]),
    ("export", ["--fp16", "OUT.safetensors", RELEASED_URL]),
])
def test_command_help(capsys, command, words):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out, w


@pytest.mark.parametrize("case", ["text", "pickled", "no_checkpoint", "batch_size"])
def test_unusable_setups_exit_2(capsys, monkeypatch, golden, tmp_path, case):
    monkeypatch.delenv("RAMPLUS_CHECKPOINT", raising=False)
    img = golden.image_paths[0]
    if case == "text":
        args, expect = ["tag", img, "-c", golden.dir / "expected.json"], "not a checkpoint"
    elif case == "pickled":
        bad = tmp_path / "evil.pth"
        torch.save({"model": {}, "x": SimpleNamespace(a=1)}, bad)
        args, expect = ["tag", img, "-c", bad], "refused"
    elif case == "no_checkpoint":
        args, expect = ["tag", img], "no checkpoint given"
    else:
        args, expect = ["tag", img, "-c", golden.checkpoint, "--batch-size", "0"], "--batch-size"
    code, out, err = _main(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expect in err, err


def test_checkpoint_from_environment(capsys, monkeypatch, golden):
    monkeypatch.setenv("RAMPLUS_CHECKPOINT", str(golden.checkpoint))
    code, out, err = _main(capsys, "tag", golden.image_paths[3], "--thresholds-from", golden.dir / "expected.json")
    assert code == 0, err
    assert out.startswith(f"{golden.image_paths[3]} (256x256): ")
    shown = [item.rsplit(" ", 1)[0] for item in out.strip().partition("): ")[2].split(", ")]
    assert sorted(shown) == golden.expected_tags[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu(capsys, golden):
    code, _, err = _main(capsys, "tag", golden.image_paths[0], "-c", golden.checkpoint, "--device", "cuda")
    assert code == 2 and "CUDA" in err


def test_export_fp16_in_process(capsys, golden, tmp_path):
    out = tmp_path / "tiny16.safetensors"
    code, stdout, err = _main(capsys, "export", golden.checkpoint, out, "--fp16")
    assert code == 0, err
    assert "fp16" in stdout
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}


def test_vocabulary_file(capsys, golden, tiny_model, golden_logits_ours, tmp_path):
    """Two built-in tags plus a new one made of tag_005's descriptions: it scores as tag_005."""
    np.save(tmp_path / "mine.npy", tiny_model.vocabulary.descriptions(5).numpy())
    (tmp_path / "vocab.yaml").write_text(
        "builtin: [tag_003, tag_007]\n"
        "tags:\n"
        "  - name: my tag\n"
        "    embeddings: mine.npy\n"
        "    threshold: 0.01\n"
        "    zh: 我的标签\n")
    code, out, err = _main(capsys, "tag", golden.image_paths[0], "-c", golden.checkpoint, "--json", "--zh",
                           "--vocabulary", tmp_path / "vocab.yaml")
    assert code == 0, err
    row = json.loads(out)
    assert set(row["tags"]) <= {"tag_003", "tag_007", "my tag"} and "my tag" in row["tags"]
    i = row["tags"].index("my tag")
    assert row["tags_zh"][i] == "我的标签"
    # the CLI decodes as `decode` does by default (fast mode), so the reference decodes the same way
    from ramplus_core.preprocess import decode, normalize

    px = normalize(decode(golden.image_paths[0].read_bytes()).array[None].copy())
    assert row["scores"][i] == pytest.approx(torch.sigmoid(tiny_model.logits(px)[0, 5]).item(), abs=1e-4)


def test_bad_vocabulary_file_exit_2(capsys, golden, tmp_path):
    (tmp_path / "vocab.yaml").write_text("builtin: all\ncolour: red\n")
    code, out, err = _main(capsys, "tag", golden.image_paths[0], "-c", golden.checkpoint,
                           "--vocabulary", tmp_path / "vocab.yaml")
    assert code == 2 and out == "" and "unknown key 'colour'" in err and len(err.strip().splitlines()) == 1


def test_inference_failure_fails_only_its_batch(capsys, monkeypatch, golden):
    real = RamPlus.logits
    calls = []

    def flaky(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, pixels)

    monkeypatch.setattr(RamPlus, "logits", flaky)
    code, out, _ = _main(capsys, "tag", golden.image_paths[3], golden.image_paths[4], "-c", golden.checkpoint,
                         "--json", "--batch-size", "1")
    assert code == 1
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["stage"] == "infer" and "out of memory" in first["error"]
    assert second["tags"] and "error" not in second


def test_describe_is_dispatched(capsys):
    with pytest.raises(SystemExit) as e:
        main(["describe", "--help"])
    assert e.value.code == 0
    assert "--endpoint" in capsys.readouterr().out


# -- thresholds files ----------------------------------------------------------------------

NAMES = ["cat", "air conditioner", "dog"]
CURRENT = np.array([0.5, 0.5, 0.5], dtype=np.float32)


@pytest.mark.parametrize("name,text,expected", [
    ("t.txt", "0.7\n0.8\n0.9\n", [0.7, 0.8, 0.9]),
    ("t.txt", "# tuned\nair conditioner 0.8\ndog\t0.6\n", [0.5, 0.8, 0.6]),
    ("t.json", "[0.1, 0.2, 0.3]", [0.1, 0.2, 0.3]),
    ("t.json", '{"dog": 0.95}', [0.5, 0.5, 0.95]),
    ("t.json", '{"tags": ["dog", "cat"], "thresholds": [0.2, 0.3]}', [0.3, 0.5, 0.2]),
    ("t.json", '{"thresholds": [0.6, 0.6, 0.6]}', [0.6, 0.6, 0.6]),
])
def test_thresholds_file_formats(tmp_path, name, text, expected):
    p = tmp_path / name
    p.write_text(text)
    assert read_thresholds(str(p), NAMES, CURRENT).tolist() == pytest.approx(expected)
    assert CURRENT.tolist() == [0.5, 0.5, 0.5]  # the current thresholds are not modified


@pytest.mark.parametrize("text,expect", [
    ("0.7\n0.8\n", "has 2 thresholds but the vocabulary has 3"),
    ("horse 0.7\n", "not in the vocabulary: horse"),
    ("[0.1, 2.0, 0.3]", "between 0 and 1"),
    ("cat high\n", "not a thresholds file"),
    ('{"tags": ["cat"], "thresholds": [0.1, 0.2]}', "differ in length"),
])
def test_thresholds_file_errors(tmp_path, text, expect):
    p = tmp_path / "t.txt"
    p.write_text(text)
    with pytest.raises(_Unusable, match=expect):
        read_thresholds(str(p), NAMES, CURRENT)

"""Hostile settings: config files, --set values and vocabulary files that try to hang the driver,
flood the log, slip past a range or walk around the output guard. Every one ends in one short
sentence that names the key or tag, exit 2, before any work. The inputs are built here."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from ramplus_core.errors import ConfigError, VocabularyError
from ramplus_core.job.config import load_config, parse_set
from ramplus_core.job.scrub import Scrubber
from ramplus_core.vocab_file import check_file, load_vocabulary
from ramplus_core.vocabulary import Vocabulary

from .conftest import CHECKPOINT, REPO

MAX_MESSAGE = 400  # characters: one readable line, whatever the input
BIG = 5_000_000


def _laughs(levels: int = 10) -> str:
    """A flow list whose anchors expand to 10**(levels-1) strings: a few hundred bytes of YAML."""
    items = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def _config_error(tmp_path, text: str = "", **kw) -> str:
    path = None
    if text:
        path = tmp_path / "job.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path) if path else None, require_uris=False, **kw)
    msg = str(e.value)
    assert len(msg) <= MAX_MESSAGE and "\n" not in msg, (len(msg), msg[:500])
    return msg


def _builtin() -> Vocabulary:
    return Vocabulary.from_padded(names=["cat"], thresholds=np.array([0.5], np.float32), zh=[None],
                                  embeds=torch.ones((1, 1, 512)) / 512 ** 0.5)


def _vocab_error(tmp_path, text: str) -> str:
    path = tmp_path / "vocab.yaml"
    path.write_text(text)
    with pytest.raises(VocabularyError) as e:
        load_vocabulary(str(path), _builtin())
    msg = str(e.value)
    assert len(msg) <= MAX_MESSAGE and "\n" not in msg, (len(msg), msg[:500])
    with pytest.raises(VocabularyError):
        check_file(str(path))  # the job's early check refuses it the same way
    return msg


# -- YAML aliases ("billion laughs") ------------------------------------------------------------

@pytest.mark.parametrize("key", ["input", "vocabulary:\n  tags", "decode:\n  mode"])
def test_billion_laughs_in_a_config_is_refused_at_once(tmp_path, key):
    t = time.monotonic()
    msg = _config_error(tmp_path, f"{key}: {_laughs()}\n")
    assert time.monotonic() - t < 2.0
    assert "YAML aliases are not allowed (line " in msg and "job.yaml" in msg, msg


def test_aliases_are_refused_in_set_values_and_vocabulary_files(tmp_path):
    with pytest.raises(ConfigError, match="--set input: YAML aliases are not allowed"):
        parse_set([f"input={_laughs()}"])
    t = time.monotonic()
    msg = _vocab_error(tmp_path, f"builtin: none\ntags: {_laughs()}\n")
    assert time.monotonic() - t < 2.0
    assert "vocab.yaml" in msg and "YAML aliases are not allowed" in msg, msg
    # a lone anchor is refused too (it has no use in a settings file), and so is a merge key
    assert "YAML aliases" in _vocab_error(tmp_path, "builtin: &b none\n")
    assert "YAML aliases" in _config_error(tmp_path, "decode: &d {batch_size: 4}\ninference:\n  <<: *d\n")


# -- values too large to repeat ---------------------------------------------------------------------

@pytest.mark.parametrize("data, key", [
    ({"decode": {"mode": "x" * BIG}}, "decode.mode"),
    ({"output": "/" + "y" * BIG}, "output"),
    ({"listing": {"extensions": ["." + "j" * BIG]}}, "listing.extensions[0]"),
    ({"decode": {"batch_size": ["z" * BIG] * 3}}, "decode.batch_size"),
    ({"storage": {"secret_access_key": ["s" * BIG]}}, "storage.secret_access_key"),
])
def test_a_5mb_value_gives_a_short_message(tmp_path, data, key):
    t = time.monotonic()
    msg = _config_error(tmp_path, json.dumps(data))  # JSON is YAML; json writes 5 MB at once
    assert msg.startswith(key + ":"), msg[:200]
    assert time.monotonic() - t < 10.0
    assert _config_error(tmp_path, overrides=list(data.items())).startswith(key + ":")  # as --set gives it


def test_a_5mb_key_or_tag_gives_a_short_message(tmp_path):
    assert "unknown key" in _config_error(tmp_path, overrides=[("k" * BIG, 1)])
    assert "unknown key 'decode." in _config_error(tmp_path, overrides=[("decode", {"k" * BIG: 1})])
    assert "not valid YAML" in _config_error(tmp_path, json.dumps({"k" * BIG: 1}))  # YAML keys stop at 1024
    for item in ("k" * BIG, "k" * BIG + "=1", "decode.mode=" + "[" * BIG):
        with pytest.raises(ConfigError) as e:
            load_config(None, require_uris=False, overrides=parse_set([item]))
        assert len(str(e.value)) <= MAX_MESSAGE
    msg = _vocab_error(tmp_path, json.dumps({"builtin": "none", "tags": [{"name": "n" * BIG}]}))
    assert "tags[0].name: must be at most 200 characters" in msg, msg
    msg = _vocab_error(tmp_path, json.dumps({"builtin": "none", "tags": [{"name": "logo", "zh": "z" * BIG}]}))
    assert "tag 'logo': tags[0].zh: must be at most 200 characters" in msg, msg
    msg = _vocab_error(tmp_path, json.dumps({"builtin": ["c" * BIG]}))
    assert "builtin" in msg, msg


# -- wrong types and ranges: exit 2 with a sentence, never a traceback ------------------------------

@pytest.mark.parametrize("doc, needle", [
    ("tags: 5", "tags: must be a list, got 5"),
    ("tags: {logo: 1}", "tags: must be a list"),
    ("import: 5", "import: must be a list"),
    ("builtin: [[cat]]", "builtin: must be 'all', 'none' or a list of tag names"),
    ("tags: [{name: logo, zh: [1]}]", "tag 'logo': tags[0].zh: must be a string"),
    ("tags: [{name: logo, threshold: '0.5'}]", "tag 'logo': tags[0].threshold: must be a number"),
    ("tags: [{name: logo, threshold: .nan}]", "tag 'logo': tags[0].threshold"),
    ("tags: [{name: logo, descriptions: [a photo, 5]}]", "tags[0].descriptions[1]: must be a string"),
    ("tags: [{name: logo, embeddings: {a: 1}}]", "tag 'logo': tags[0].embeddings: must be a string"),
    ("tags: [{name: [logo]}]", "tags[0].name: must be a string"),
    ("text_encoder: [a]", "text_encoder: must be a string"),
    ("tags: [logo, {name: kite, colour: red}]", "tag 'kite': unknown key 'tags[1].colour'; known keys here"),
    ("tags: [{name: kite, treshold: 0.5}]", "did you mean 'tags[0].threshold'?"),
])
def test_a_wrong_type_in_a_vocabulary_file_names_the_tag(tmp_path, doc, needle):
    assert needle in _vocab_error(tmp_path, "builtin: none\n" + doc + "\n")


def _main(argv: list[str], capsys) -> tuple[int, str]:
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import tag_bucket
    finally:
        sys.path.pop(0)
    code = tag_bucket.main(argv)
    return code, capsys.readouterr().err


def _cli(tmp_path, *extra: str) -> list[str]:
    (tmp_path / "in").mkdir(exist_ok=True)
    return ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--checkpoint", str(CHECKPOINT), *extra]


@pytest.mark.parametrize("doc", ["builtin: none\ntags: 5\n", "builtin: [[cat]]\n", "tags: [{name: logo, zh: {a: 1}}]\n"])
def test_the_cli_refuses_a_wrong_vocabulary_file_exit_2(tmp_path, capsys, doc):
    (tmp_path / "vocab.yaml").write_text(doc)
    code, err = _main(_cli(tmp_path, "--vocab", str(tmp_path / "vocab.yaml")), capsys)
    assert code == 2 and err.startswith("tag_bucket: error: ") and len(err.strip().splitlines()) == 1, err
    assert "vocab.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("item, needle", [
    ("decode.num_cpus=.inf", "decode.num_cpus: must be a finite number"),
    ("table.vacuum_retention_hours=.inf", "table.vacuum_retention_hours: must be a finite number"),
    ("inference.gpus_per_actor=1.0e+400", "inference.gpus_per_actor: must be a finite number"),
    ("decode.batch_size=true", "decode.batch_size: must be an integer, got True"),
    ("decode.max_bytes=100000000000000000000000000000", "decode.max_bytes: must be at most"),
    ("fetch.retries=[1]", "fetch.retries: must be an integer, got [1]"),
    ("layout.compression=xz", "layout.compression: must be one of"),
    ("ray.progress_interval_s=.nan", "ray.progress_interval_s: must be a finite number"),
])
def test_set_with_a_wrong_type_or_range_is_one_line_exit_2(tmp_path, capsys, item, needle):
    code, err = _main(_cli(tmp_path, "--set", item), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_an_empty_extension_list_is_refused(tmp_path):
    assert _config_error(tmp_path, "listing:\n  extensions: []\n").startswith("listing.extensions: must not be empty")
    assert _config_error(tmp_path, overrides=parse_set(["listing.extensions="])).startswith("listing.extensions:")
    one = load_config(None, require_uris=False, overrides=parse_set(["listing.extensions=.jpg"]))
    assert one.listing.extensions == (".jpg",)  # a single string is a list of one


@pytest.mark.parametrize("key", ["fetch.retries", "inference.max_restarts", "inference.max_task_retries",
                                 "table.commit_retries", "storage.max_attempts"])
def test_retry_counts_have_an_upper_bound(tmp_path, key):
    msg = _config_error(tmp_path, overrides=parse_set([f"{key}={10 ** 9}"]))
    assert msg.startswith(f"{key}: must be at most") and "1000000000" in msg, msg
    ok = load_config(None, require_uris=False, overrides=parse_set([f"{key}=3"]))
    section, name = key.split(".")
    assert getattr(getattr(ok, section), name) == 3
    if key.startswith("inference."):  # -1: Ray's "no limit", stated in conf/default.yaml
        assert getattr(load_config(None, require_uris=False, overrides=[(key, -1)]).inference, name) == -1


# -- the output guard through links -------------------------------------------------------------------

def test_a_symlinked_output_inside_the_input_is_refused(tmp_path):
    src = tmp_path / "photos"
    (src / "2026").mkdir(parents=True)
    (tmp_path / "results").symlink_to(src / "2026")       # looks like a sibling; is inside the input
    (tmp_path / "photos-link").symlink_to(src)           # the input itself under another name
    for out in (tmp_path / "results" / "tags", tmp_path / "results", tmp_path / "photos-link" / "out"):
        with pytest.raises(ConfigError, match=r"output: .* overlaps input\[0\] .*\(a link to .*photos") as e:
            load_config(None, inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
        assert len(str(e.value)) <= MAX_MESSAGE
    with pytest.raises(ConfigError, match=r"input\[1\]: .* is inside input\[0\]"):
        load_config(None, inputs=[str(src), str(tmp_path / "results")], output=str(tmp_path / "o"),
                    checkpoint=str(CHECKPOINT))
    with pytest.raises(ConfigError, match=r"output: .* overlaps input\[0\]"):  # an input link onto the output
        load_config(None, inputs=[f"file://{tmp_path / 'photos-link'}"], output=str(src / "out"),
                    checkpoint=str(CHECKPOINT))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out-link").symlink_to(tmp_path / "elsewhere")
    cfg = load_config(None, inputs=[str(src)], output=str(tmp_path / "out-link"), checkpoint=str(CHECKPOINT))
    assert cfg.output == str(tmp_path / "out-link")  # a link that leads outside the input is fine


# -- the log scrubber ----------------------------------------------------------------------------------

def test_the_scrubber_keeps_the_words_next_to_a_key_name():
    s = Scrubber()
    for line in ("storage.access_key_id / storage.secret_access_key: give both or neither",
                 "storage.session_token: must be a string (value not shown: it is a secret)",
                 "argv: --set storage.session_token= --vocab v.yaml"):
        assert s.text(line) == line
    assert s.text("argv: --set storage.secret_access_key=abc123 --vocab v.yaml") == \
        "argv: --set storage.secret_access_key=*** --vocab v.yaml"
    assert s.text("['--set', 'storage.access_key_id=AKIA1', '--input']") == "['--set', 'storage.access_key_id=***', '--input']"


def test_the_cli_says_give_both_or_neither_in_full(tmp_path, capsys, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    code, err = _main(_cli(tmp_path, "--set", "storage.access_key_id=AKIA-ONLY-THE-ID"), capsys)
    assert code == 2 and "storage.secret_access_key: give both or neither" in err, err
    assert "AKIA-ONLY-THE-ID" not in err

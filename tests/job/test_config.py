"""Config validation, secrets redaction and the CLI's failures: all before any work starts."""

from __future__ import annotations

import re

import pytest
import yaml

from ramplus_core.errors import ConfigError
from ramplus_core.job.config import JobConfig, describe_keys, load_config, parse_set, redacted
from ramplus_core.job.storage import Storage, preflight

from .conftest import CHECKPOINT, REPO, run_tag_bucket


def cfg_file(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(p)


def load(tmp_path, data, **kw):
    kw.setdefault("inputs", [str(tmp_path)])
    kw.setdefault("output", str(tmp_path.parent / "out"))
    kw.setdefault("checkpoint", str(CHECKPOINT))
    return load_config(cfg_file(tmp_path, data), **kw)


def test_defaults_and_overrides(tmp_path):
    cfg = load(tmp_path, {"decode": {"batch_size": 8}},
               overrides=parse_set(["inference.batch_size=64", "decode.mode=exact", "table.optimize_every=0"]))
    assert isinstance(cfg, JobConfig)
    assert cfg.decode.batch_size == 8 and cfg.inference.batch_size == 64
    assert cfg.decode.mode == "exact" and cfg.table.optimize_every == 0
    assert cfg.input == (str(tmp_path),)


@pytest.mark.parametrize("data, key", [
    ({"decode": {"jpg_draft": True}}, "decode.jpg_draft"),
    ({"inferense": {}}, "inferense"),
    ({"decode": {"batch_size": "8"}}, "decode.batch_size"),
    ({"decode": {"batch_size": 0}}, "decode.batch_size"),
    ({"decode": {"jpeg_draft": "yes"}}, "decode.jpeg_draft"),
    ({"decode": {"jpeg_draft": True}}, "decode.jpeg_draft"),  # fast mode: draft has no meaning there
    ({"decode": {"mode": "quick"}}, "decode.mode"),
    ({"decode": {"device": "tpu"}}, "decode.device"),
    ({"decode": {"device": "gpu", "mode": "exact"}}, "decode.device"),
    ({"inference": {"score_floor": 1.5}}, "inference.score_floor"),
    ({"inference": {"dtype": "int8"}}, "inference.dtype"),
    ({"inference": {"device": "tpu"}}, "inference.device"),
    ({"table": {"commit_retries": -1}}, "table.commit_retries"),
    ({"layout": {"compression": "xz"}}, "layout.compression"),
    ({"listing": {"extensions": ["jpg"]}}, "listing.extensions[0]"),
    ({"run_id": "../escape"}, "run_id"),
    ({"storage": ["x"]}, "storage"),
    ({"vocabulary": {"tags_file": "/nonexistent/tags.txt"}}, "vocabulary.tags_file"),
    ({"vocabulary": {"threshold": 0.5, "thresholds_file": __file__}}, "vocabulary.thresholds_file"),
])
def test_bad_values_name_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, data)
    assert key in str(e.value), str(e.value)


def test_typo_suggests_the_known_key(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'decode\.jpeg_draft'"):
        load(tmp_path, {"decode": {"jpeg_drafts": True}})


def test_decode_limits_and_where_jpegs_decode(tmp_path):
    from ramplus_core.preprocess import DecodeLimits

    cfg = load(tmp_path, {"decode": {"max_pixels": 5000, "mode": "exact", "jpeg_draft": True}})
    assert cfg.decode.limits() == DecodeLimits(max_bytes=cfg.decode.max_bytes, max_pixels=5000, mode="exact",
                                               jpeg_draft=True)
    assert load(tmp_path, {}).decode.limits() == DecodeLimits()  # the job's default is the library's default
    auto, gpu, cpu = (load(tmp_path, {"decode": {"device": d}}).decode for d in ("auto", "gpu", "cpu"))
    assert [auto.in_actor(d) for d in ("cuda", "cuda:1", "cpu", None)] == [True, True, False, False]
    assert gpu.in_actor("cuda") and not cpu.in_actor("cuda")
    assert not load(tmp_path, {"decode": {"mode": "exact"}}).decode.in_actor("cuda")  # exact: CPU tasks
    with pytest.raises(ConfigError, match="decode.device: gpu needs GPU"):
        gpu.in_actor("cpu")


def test_uris_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"input\[0\].*unsupported URI scheme"):
        load(tmp_path, {}, inputs=["nosuchscheme://x/y"])
    with pytest.raises(ConfigError, match=r"input\[1\].*inside input\[0\]"):
        load(tmp_path, {}, inputs=["s3://bucket/photos", "s3://bucket/photos/2026/"])
    with pytest.raises(ConfigError, match=r"output.*overlaps input\[0\]"):
        load(tmp_path, {}, inputs=["s3://bucket/photos/"], output="s3://bucket/photos/tags/")
    with pytest.raises(ConfigError, match=r"output: no output"):
        load_config(cfg_file(tmp_path, {}), inputs=["/x"], checkpoint="/y")
    with pytest.raises(ConfigError, match=r"input: no input"):
        load_config(cfg_file(tmp_path, {}), output="/x", checkpoint="/y")
    with pytest.raises(ConfigError, match=r"--config: file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        load_config(cfg_file(tmp_path, "- a\n- b\n"))


def test_preflight_names_missing_paths(tmp_path):
    storage = Storage()
    cfg = load(tmp_path, {}, inputs=[str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match=r"input\[0\]: .*nope does not exist"):
        preflight(cfg, storage)
    cfg = load(tmp_path, {}, checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match=r"checkpoint: .*missing.pth does not exist"):
        preflight(cfg, storage)


def test_preflight_s3_wrong_keys_and_missing_prefix(s3_server, tmp_path):
    good = s3_server.storage_config()
    cfg = load(tmp_path, {"storage": {**good, "secret_access_key": "wrong"}}, inputs=[f"s3://{s3_server.bucket}/"],
               output=f"s3://{s3_server.bucket}-out/x/")
    with pytest.raises(ConfigError, match=r"input\[0\]") as e:
        preflight(cfg, Storage.from_config(cfg.storage, environ={}))
    assert "wrong" not in str(e.value)
    cfg = load(tmp_path, {"storage": good}, inputs=[f"s3://{s3_server.bucket}/no/such/prefix/"])
    with pytest.raises(ConfigError, match=r"input\[0\]: s3://.*does not exist"):
        preflight(cfg, Storage.from_config(cfg.storage, environ={}))
    s3_server.fs().pipe(f"{s3_server.bucket}/preflight/a.jpg", b"x")
    ok = load(tmp_path, {"storage": good}, inputs=[f"s3://{s3_server.bucket}/preflight"],
              output=f"s3://{s3_server.bucket}/brand-new-prefix/")
    preflight(ok, Storage.from_config(ok.storage, environ={}))  # a new output prefix is fine
    one = load(tmp_path, {"storage": good}, inputs=[f"s3://{s3_server.bucket}/preflight/a.jpg"])
    preflight(one, Storage.from_config(one.storage, environ={}))  # so is a single object as input
    bad = load(tmp_path, {"storage": good}, inputs=[f"s3://{s3_server.bucket}/preflight"], output="s3://no-such-bucket-x/o/")
    with pytest.raises(ConfigError, match=r"output: s3://no-such-bucket-x/o/ does not exist"):
        preflight(bad, Storage.from_config(bad.storage, environ={}))


def test_secrets_are_redacted(tmp_path):
    cfg = load(tmp_path, {"storage": {"access_key_id": "AKIAEXAMPLE", "secret_access_key": "s3cr3t-value",
                                      "endpoint_url": "http://127.0.0.1:9000"}},
               inputs=["ftp://user:pa55word@host/photos/"])
    d = redacted(cfg)
    text = repr(d)
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "pa55word"):
        assert secret not in text
    assert d["storage"]["secret_access_key"] == "***"
    assert d["storage"]["endpoint_url"] == "http://127.0.0.1:9000"
    st = Storage.from_config(cfg.storage, environ={})
    assert "s3cr3t" not in repr(st) and "AKIA" not in repr(st)


def test_storage_takes_the_aws_environment():
    from ramplus_core.job.config import StorageConfig

    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://h:1", "AWS_REGION": "r"}
    st = Storage.from_config(StorageConfig(), environ=env)
    assert (st.access_key_id, st.secret_access_key, st.endpoint_url, st.region) == ("k", "s", "http://h:1", "r")
    assert Storage.from_config(StorageConfig(access_key_id="c", secret_access_key="d"), environ=env).access_key_id == "c"
    with pytest.raises(ConfigError, match="give both or neither"):
        Storage.from_config(StorageConfig(access_key_id="only"), environ={})


def test_conf_files_load_and_document_every_key():
    default = (REPO / "conf" / "default.yaml").read_text()
    data = yaml.safe_load(default)
    cfg = load_config(str(REPO / "conf" / "default.yaml"), require_uris=False)
    assert cfg == JobConfig(), "conf/default.yaml must state the defaults"
    for key in describe_keys():
        section, _, name = key.rpartition(".")
        node = data[section] if section else data
        assert name in node, f"conf/default.yaml lacks {key}"
        assert _commented(default, name), f"{key} has no comment above it (or above its group)"
    sample = load_config(str(REPO / "conf" / "sample.yaml"), checkpoint=str(CHECKPOINT))
    assert sample.input == ("ramplus_core/samples",)


def test_docs_config_table_lists_every_key():
    """docs/job.md's table of keys is what users read; a key missing there is a key nobody finds."""
    rows = {}
    for line in (REPO / "docs" / "job.md").read_text().splitlines():
        m = re.match(r"\| (top level|`(\w+)`) \| (.*?) \|", line)
        if m:
            rows[m.group(2) or ""] = set(re.findall(r"`(\w+)`", m.group(3)))
    for key in describe_keys():
        section, _, name = key.rpartition(".")
        assert name in rows.get(section, set()), f"docs/job.md's config table lacks {key}"


def _commented(text: str, name: str) -> bool:
    """The key's line, or the run of key lines it is in, directly follows a comment."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"\s*{re.escape(name)}:", line):
            j = i - 1
            while j >= 0 and re.match(r"\s*\w+:", lines[j]) and not lines[j].rstrip().endswith(":"):
                j -= 1
            return j >= 0 and lines[j].lstrip().startswith("#")
    return False


# -- the command line --------------------------------------------------------------------------

def run_cli(*args, timeout=120):
    return run_tag_bucket(*args, timeout=timeout)


def test_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0
    for word in ("--config", "--input", "--output", "--checkpoint", "--set", "Delta Lake", "change data feed", "AWS_ACCESS_KEY_ID"):
        assert word in r.stdout


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    r = run_cli("--config", cfg_file(tmp_path, {"decode": {"max_byte": 1}}), "--input", str(tmp_path),
                "--output", str(tmp_path / "out"), "--checkpoint", str(CHECKPOINT))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("tag_bucket: error: unknown key 'decode.max_byte'")


def test_cli_bad_checkpoint_fails_fast_before_listing(tmp_path):
    bad = tmp_path / "ram_plus.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    r = run_cli("--input", str(REPO / "tests" / "golden" / "tiny" / "images"), "--output", str(tmp_path / "out"),
                "--checkpoint", str(bad))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("tag_bucket: error: ") and r.stderr.strip().count("\n") == 0, r.stderr
    assert "ram_plus.pth" in r.stderr
    assert not (tmp_path / "out").exists(), "nothing may be listed or written"
    # "fast" is what did not happen: no listing, no Ray (a wall-clock bound fails on a loaded machine)
    assert "listed" not in r.stdout and "ray:" not in r.stdout


def test_cli_refuses_a_checkpoint_with_nan_weights_exit_2(tmp_path):
    import torch

    top = torch.load(CHECKPOINT, weights_only=True)
    w = top["model"]["fc.weight"].clone()
    w[0, 0] = float("nan")
    top["model"]["fc.weight"] = w
    bad = tmp_path / "nan.pth"
    torch.save(top, bad)
    r = run_cli("--input", str(REPO / "tests" / "golden" / "tiny" / "images"), "--output", str(tmp_path / "out"),
                "--checkpoint", str(bad))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "nan.pth" in r.stderr and "fc.weight holds NaN" in r.stderr
    assert not (tmp_path / "out").exists()

"""End to end on a real local Ray: mixed good and bad images from a folder and from S3."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from ramplus_core.errors import CheckpointError
from ramplus_core.job import committed_runs, load_config, read_manifest, run
from ramplus_core.job import table as tb
from ramplus_core.job.schemas import ERRORS_SCHEMA, TAGS_SCHEMA
from ramplus_core.job.storage import Storage

from .conftest import CHECKPOINT, GOLDEN, MAX_BYTES, job_config, mixed_files, table_rows

EXPECTED = {rel: stage for rel, (_, stage) in mixed_files().items()}
N_TAGGED = sum(1 for s in EXPECTED.values() if s is None)
N_ERRORS = sum(1 for s in EXPECTED.values() if s in ("fetch", "decode"))
N_SKIPPED = sum(1 for s in EXPECTED.values() if s == "skip")


def golden_thresholds_file(tmp_path):
    """The golden thresholds (the tiny checkpoint carries embeddings only, not thresholds)."""
    exp = json.loads((GOLDEN / "expected.json").read_text())
    p = tmp_path / "thresholds.tsv"
    p.write_text("".join(f"{t}\t{v}\n" for t, v in zip(exp["tags"], exp["thresholds"])))
    return p, exp


def read_output(output: str, storage: Storage, run_id: str):
    tags, errors = table_rows(output, "tags", storage), table_rows(output, "errors", storage)
    schemas = [tb.open_table(storage, output, k).schema().to_arrow() for k in ("tags", "errors")]
    return tags, errors, *[__import__("pyarrow").schema(s) for s in schemas]


def check_run(output: str, storage: Storage, result, prefix: str, tmp_path, exp, extra_errors=None):
    extra_errors = extra_errors or {}
    n_errors = N_ERRORS + len(extra_errors)
    m = result.manifest
    assert m["status"] == "committed"
    assert m["counts"]["listed"] == N_TAGGED + n_errors
    assert (m["counts"]["tagged"], m["counts"]["errors"], m["counts"]["not_images"]) == (N_TAGGED, n_errors, N_SKIPPED)
    assert m["invariant"]["ok"], m["invariant"]
    assert result.run_id in committed_runs(output, storage)
    assert read_manifest(output, result.run_id, storage) == json.loads(json.dumps(m, default=str))

    tags, errors, tags_schema, errors_schema = read_output(output, storage, result.run_id)
    # schema: the tables hold exactly our columns (delta-rs may widen string types to views)
    assert tags_schema.names == TAGS_SCHEMA.names and errors_schema.names == ERRORS_SCHEMA.names
    assert tags.cast(TAGS_SCHEMA).schema == TAGS_SCHEMA and errors.cast(ERRORS_SCHEMA).schema == ERRORS_SCHEMA

    # the invariant, checked here independently of the job
    rel = lambda u: u.split(prefix, 1)[1]  # noqa: E731
    tagged = {rel(u) for u in tags.column("uri").to_pylist()}
    failed = {rel(u): s for u, s in zip(errors.column("uri").to_pylist(), errors.column("stage").to_pylist())}
    assert tags.num_rows == len(tagged) == N_TAGGED
    assert errors.num_rows == len(failed) == n_errors
    assert tagged.isdisjoint(failed)
    assert tagged == {r for r, s in EXPECTED.items() if s is None}
    assert failed == {**{r: s for r, s in EXPECTED.items() if s in ("fetch", "decode")}, **extra_errors}
    reasons = dict(zip(map(rel, errors.column("uri").to_pylist()), errors.column("error").to_pylist()))
    assert "empty" in reasons["bad/empty.png"]
    assert "bomb" in reasons["bad/bomb.png"] or "pixels" in reasons["bad/bomb.png"]
    assert str(MAX_BYTES) in reasons["bad/huge.jpg"]
    assert set(tags.column("run_id").to_pylist()) == {result.run_id}
    assert set(tags.column("model_id").to_pylist()) == {m["model_id"]}
    assert set(tags.column("vocab_id").to_pylist()) == {m["vocab_id"]}

    # size, etag (S3 ETag of a single-part upload == MD5 == the hash computed for local files)
    files = mixed_files()
    rows = {rel(r["uri"]): r for r in tags.to_pylist()}
    for r, row in rows.items():
        data = files[r][0]
        assert row["size"] == len(data)
        assert row["etag"] == hashlib.md5(data).hexdigest()
        assert row["width"] > 0 and row["height"] > 0

    # scores = sigmoid(RamPlus.logits) of the same bytes; tags = the golden expected tags
    from ramplus_core import RamPlus
    from ramplus_core.job.config import DecodeConfig
    from ramplus_core.preprocess import decode, normalize

    model = RamPlus.from_checkpoint(str(CHECKPOINT), device="cpu")
    limits = DecodeConfig(max_bytes=MAX_BYTES).limits()  # as the job decodes by default (decode.mode: fast)
    names = exp["tags"]
    thr = np.asarray(exp["thresholds"], dtype=np.float32)
    for r, row in rows.items():
        d = decode(files[r][0], limits)
        assert (row["width"], row["height"]) == (d.width, d.height)
        probs = torch.sigmoid(model.logits(normalize(d.array[None].copy()))).numpy()[0]
        got = {s["tag"]: s["score"] for s in row["scores"]}
        assert list(got) == sorted(got, key=lambda t: -got[t]), "scores sorted by score"
        assert set(got) == set(names), "floor 0: every tag has a score"
        assert max(abs(got[t] - float(probs[i])) for i, t in enumerate(names)) < 1e-5
        assert row["tags"] == [t for t in got if got[t] > thr[names.index(t)]]
    for name, want in zip(exp["images"], exp["expected_tags"]):
        assert sorted(rows[f"golden/{name}"]["tags"]) == sorted(want), name
    return tags, errors


def test_local_folder_end_to_end(ray_local, mixed_dir, tmp_path):
    thresholds, exp = golden_thresholds_file(tmp_path)
    out = tmp_path / "out"
    cfg = load_config(
        str(job_config(tmp_path, inference={"score_floor": 0.0, "actors": 2, "num_cpus": 0.5},
                       vocabulary={"thresholds_file": str(thresholds)}, layout={"shards": 4, "rows_per_file": 1000})),
        inputs=[str(mixed_dir)], output=str(out), checkpoint=str(CHECKPOINT))
    lines = []
    result = run(cfg, emit=lines.append)
    storage = Storage()
    check_run(str(out), storage, result, f"file://{mixed_dir}/", tmp_path, exp, extra_errors={"bad/loop.jpg": "list"})
    m = result.manifest

    # the vocabulary: put once by the driver, read from the same shared memory by every actor
    actors = m["actors"]
    assert len(actors) == 2
    assert len({a["pid"] for a in actors}) == 2
    for key in ("embeds", "projected", "index"):
        locs = {(a["node_id"], a["vocab_memory"][key]["device"], a["vocab_memory"][key]["inode"],
                 a["vocab_memory"][key]["offset"]) for a in actors}
        assert len(locs) == 1, f"{key}: actors read different copies: {locs}"
        assert all(not a["vocab_memory"][key]["writeable"] for a in actors)
        assert all("plasma" in (a["vocab_memory"][key]["file"] or "") for a in actors)
    assert len({a["vocab_ref"] for a in actors}) == 1

    # files of a sensible size: one per partition for this small run, not one per batch of 4
    assert len(m["staged_files"]) <= 2
    assert len(tb.open_table(storage, str(out), "tags").file_uris()) <= 4
    assert any(line.startswith("progress: ") for line in lines)
    assert "invariant" in result.summary and "ok" in result.summary
    assert not (out / "_staging").exists()


def test_s3_end_to_end(ray_local, s3_server, mixed_s3, tmp_path):
    thresholds, exp = golden_thresholds_file(tmp_path)
    output = f"s3://{s3_server.bucket}/results/"
    cfg = load_config(
        str(job_config(tmp_path, storage=s3_server.storage_config(), inference={"score_floor": 0.0},
                       vocabulary={"thresholds_file": str(thresholds)})),
        inputs=[mixed_s3], output=output, checkpoint=str(CHECKPOINT))
    result = run(cfg, emit=lambda s: None)
    storage = Storage.from_config(cfg.storage, environ={})
    check_run(output, storage, result, mixed_s3, tmp_path, exp)
    text = json.dumps(result.manifest)
    assert s3_server.secret not in text and s3_server.key not in text
    fs = s3_server.fs()
    manifest_text = fs.cat(f"{s3_server.bucket}/results/_runs/{result.run_id}.json").decode()
    assert s3_server.secret not in manifest_text
    dt = tb.open_table(storage, output, "tags")
    assert dt.history(1)[0]["ramplus.run_id"] == result.run_id
    assert fs.find(f"{s3_server.bucket}/results/_staging/{result.run_id}") == []


def test_bad_checkpoint_fails_before_listing(tmp_path, mixed_dir):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"this is not a checkpoint")
    out = tmp_path / "out"
    cfg = load_config(None, inputs=[str(mixed_dir)], output=str(out), checkpoint=str(bad))
    with pytest.raises(CheckpointError):
        run(cfg, emit=lambda s: None)
    assert not (out / "_staging").exists(), "listing must not start with a bad checkpoint"
    assert not (out / "_runs").exists()


def test_empty_input_commits_an_empty_run(ray_local, tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "readme.txt").write_text("no images here")
    out = tmp_path / "out"
    cfg = load_config(str(job_config(tmp_path)), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
    result = run(cfg, emit=lambda s: None)
    assert result.manifest["counts"] == {**result.manifest["counts"], "listed": 0, "tagged": 0, "errors": 0, "not_images": 1}
    assert result.manifest["invariant"]["ok"]
    assert committed_runs(str(out)) == [result.run_id]
    with pytest.raises(Exception, match="already used"):
        run(load_config(str(job_config(tmp_path)), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT),
                        run_id=result.run_id), emit=lambda s: None)


def test_actors_must_leave_a_whole_cpu_for_the_data_tasks(ray_local, tmp_path):
    """Ray Data's read and repartition tasks take one whole CPU each: with less beside the
    actors they never start and the run would wait forever, so the job refuses up front."""
    from ramplus_core.errors import ConfigError
    from ramplus_core.job.pipeline import plan_resources

    def cfg(num_cpus):
        return load_config(str(job_config(tmp_path, inference={"actors": 1, "num_cpus": num_cpus})),
                           inputs=[str(GOLDEN / "images")], output=str(tmp_path / "out"), checkpoint=str(CHECKPOINT))

    with pytest.raises(ConfigError, match=r"inference.actors x inference.num_cpus = 1 x 1.5 leaves 0.5 of the "
                                          r"cluster's 2 CPUs"):
        plan_resources(cfg(1.5))
    assert plan_resources(cfg(1.0)).actors == 1

"""The reading examples of docs/job.md, run as written on a real job's output."""

from __future__ import annotations

import re
import shutil

import pytest

from ramplus_core.job import committed_runs, load_config, read_manifest, run

from .conftest import CHECKPOINT, GOLDEN, REPO, job_config

DOC = REPO / "docs" / "job.md"


def doc_examples() -> dict[str, str]:
    text = DOC.read_text()
    section = text.split("### Reading the current result of each image", 1)[1].split("\n### Maintenance", 1)[0]
    blocks = re.findall(r"\n([\w ]+?)(?: \([^\n]*)?:\n\n```python\n(.*?)```", section, flags=re.S)
    return {name: code for name, code in blocks}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """Incremental runs: all, one changed image, one deleted image and one that got fixed."""
    tmp = tmp_path_factory.mktemp("docs")
    src = tmp / "in"
    shutil.copytree(GOLDEN / "images", src)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp / "out"

    def go():
        cfg = load_config(str(job_config(tmp)), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
        return run(cfg, emit=lambda s: None).run_id

    ids = [go()]
    changed = src / "gray_500x300.jpg"
    changed.write_bytes((src / "rgb_640x480.jpg").read_bytes())  # new content: new size and mtime
    ids.append(go())
    (src / "rgba_256.png").unlink()
    (src / "broken.jpg").write_bytes((src / "cmyk_400.jpg").read_bytes())  # an error that is an image now
    ids.append(go())
    return out, ids, {"changed": f"file://{changed}", "deleted": f"file://{src / 'rgba_256.png'}",
                      "fixed": f"file://{src / 'broken.jpg'}"}


def test_examples_exist():
    assert set(doc_examples()) == {"deltalake", "DuckDB", "Polars", "change feed"}


def _exec(code: str, out, **names) -> dict:
    code, n = re.subn(r'^OUT = "[^"]*"', f'OUT = "{out}"', code, flags=re.M)
    assert n == 1, "the example must set OUT once"
    scope: dict = dict(names)
    exec(compile(code, str(DOC), "exec"), scope)
    return scope


def _check_current(rows: dict, ids, uris) -> None:
    assert len(rows) == 6, "one row per image: 5 golden images left plus the fixed one"
    assert uris["deleted"] not in rows
    assert rows[uris["changed"]] == ids[1], "the changed image's row is from the run that re-tagged it"
    assert rows[uris["fixed"]] == ids[2]
    assert {r for u, r in rows.items() if u not in (uris["changed"], uris["fixed"])} == {ids[0]}


def test_deltalake_example_reads_the_current_rows(runs):
    out, ids, uris = runs
    assert committed_runs(str(out)) == ids
    scope = _exec(doc_examples()["deltalake"], out)
    table = scope["table"]
    _check_current(dict(zip(table.column("uri").to_pylist(), table.column("run_id").to_pylist())), ids, uris)
    assert scope["errors"].num_rows == 0, "broken.jpg was fixed: in neither table twice, in errors no more"


def test_duckdb_example_reads_the_current_rows(runs):
    out, ids, uris = runs
    latest = _exec(doc_examples()["DuckDB"], out)["latest"]
    _check_current({r[0]: r[3] for r in latest}, ids, uris)
    for _uri, tags, scores, _ in latest:
        assert set(tags) <= {s["tag"] for s in scores}


def test_polars_example_reads_the_current_rows(runs):
    out, ids, uris = runs
    frame = _exec(doc_examples()["Polars"], out)["frame"]
    _check_current(dict(zip(frame["uri"].to_list(), frame["run_id"].to_list())), ids, uris)


def test_change_feed_replayed_from_zero_equals_the_table(runs):
    out, ids, uris = runs
    scope = _exec(doc_examples()["change feed"], out)
    from deltalake import DeltaTable

    table = DeltaTable(f"{out}/tags").to_pyarrow_table(columns=["uri", "tags"])
    assert scope["index"] == dict(zip(table.column("uri").to_pylist(), table.column("tags").to_pylist()))
    # a sync from the first run's version on sees exactly what the later runs changed
    v1 = read_manifest(str(out), ids[0])["tables"]["versions"]["tags"]
    scope = _exec(doc_examples()["change feed"].replace("last_synced = 0 ", f"last_synced = {v1} "), out)
    assert set(scope["index"]) == {uris["changed"], uris["fixed"]}, "the update and the insert since v1"
    import pyarrow as pa

    changes = pa.table(DeltaTable(f"{out}/tags").load_cdf(starting_version=v1 + 1))
    kinds = {(u, k) for u, k in zip(changes.column("uri").to_pylist(), changes.column("_change_type").to_pylist())}
    assert (uris["deleted"], "delete") in kinds and (uris["changed"], "update_postimage") in kinds
    assert (uris["fixed"], "insert") in kinds


def test_each_run_commits_once_per_table_with_its_run_id(runs):
    out, ids, _ = runs
    from deltalake import DeltaTable

    for kind in ("tags", "errors"):
        hist = [h for h in DeltaTable(f"{out}/{kind}").history() if h.get("ramplus.run_id")]
        per_run = {}
        for h in hist:
            per_run.setdefault(h["ramplus.run_id"], []).append(h["ramplus.step"])
        assert set(per_run) <= set(ids)
        assert all(len(steps) == len(set(steps)) for steps in per_run.values()), per_run
    m = read_manifest(str(out), ids[2])
    assert "3-errors" in m["tables"]["steps"], "the fixed image left the errors table in a third step"

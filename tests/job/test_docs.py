"""The reading examples of docs/job.md, run as written on a real job's output."""

from __future__ import annotations

import re
import shutil

import pyarrow.parquet as pq
import pytest

from ramplus_core.job import committed_runs, load_config, run

from .conftest import CHECKPOINT, GOLDEN, REPO, job_config

DOC = REPO / "docs" / "job.md"


def doc_examples() -> dict[str, str]:
    text = DOC.read_text()
    section = text.split("### Reading the current result of each image", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"\n(\w+):\n\n```python\n(.*?)```", section, flags=re.S)
    return {name: code for name, code in blocks}


@pytest.fixture(scope="module")
def runs_and_a_crash(ray_local, tmp_path_factory):
    """Incremental runs (all, one changed image, one deleted image), plus a run that never committed."""
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
    ids.append(go())
    # a crashed run: its data and index files are there, its marker is not (and its id sorts last)
    crashed = "29991231T000000Z-crash0"
    first = next((out / "tags").rglob(f"part-{ids[0]}-*.parquet"))
    t = pq.read_table(first)
    t = t.set_column(t.schema.get_field_index("run_id"), "run_id", [[crashed] * t.num_rows])
    pq.write_table(t, first.parent / f"part-{crashed}-01-00000.parquet")
    idx = pq.read_table(out / "_index" / f"delta-{ids[0]}.parquet")
    idx = idx.set_column(idx.schema.get_field_index("run_id"), "run_id", [[crashed] * idx.num_rows])
    pq.write_table(idx, out / "_index" / f"delta-{crashed}.parquet")
    return out, ids, crashed, {"changed": f"file://{changed}", "deleted": f"file://{src / 'rgba_256.png'}"}


def test_examples_exist():
    assert set(doc_examples()) == {"DuckDB", "pyarrow"}


def _exec(code: str, out) -> dict:
    code, n = re.subn(r'^OUT = "[^"]*"', f'OUT = "{out}"', code, flags=re.M)
    assert n == 1, "the example must set OUT once"
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    return scope


def test_duckdb_example_reads_the_current_rows(runs_and_a_crash):
    out, ids, crashed, uris = runs_and_a_crash
    assert committed_runs(str(out)) == ids
    latest = _exec(doc_examples()["DuckDB"], out)["latest"]
    by_uri = {r[0]: r for r in latest}
    assert len(latest) == len(by_uri) == 5, "one row per image (broken.jpg is in errors/, one image was deleted)"
    assert uris["deleted"] not in by_uri
    assert by_uri[uris["changed"]][3] == ids[1], "the changed image's row is from the run that re-tagged it"
    assert {r[3] for u, r in by_uri.items() if u != uris["changed"]} == {ids[0]}
    assert crashed not in {r[3] for r in latest}
    for _uri, tags, scores, _ in latest:
        assert set(tags) <= {s["tag"] for s in scores}


def test_pyarrow_example_reads_the_current_rows(runs_and_a_crash):
    out, ids, crashed, uris = runs_and_a_crash
    table = _exec(doc_examples()["pyarrow"], out)["table"]
    rows = dict(zip(table.column("uri").to_pylist(), table.column("run_id").to_pylist()))
    assert table.num_rows == len(rows) == 5
    assert rows[uris["changed"]] == ids[1] and uris["deleted"] not in rows
    assert crashed not in rows.values()

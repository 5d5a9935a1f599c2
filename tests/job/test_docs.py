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
    section = text.split("### Reading only committed runs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"\n(\w+):\n\n```python\n(.*?)```", section, flags=re.S)
    return {name: code for name, code in blocks}


@pytest.fixture(scope="module")
def two_runs_and_a_crash(ray_local, tmp_path_factory):
    """Two committed runs over the same images, plus data of a run that never committed."""
    tmp = tmp_path_factory.mktemp("docs")
    src = tmp / "in"
    shutil.copytree(GOLDEN / "images", src)
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp / "out"
    ids = []
    for _ in range(2):
        cfg = load_config(str(job_config(tmp)), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
        ids.append(run(cfg, emit=lambda s: None).run_id)
    # a crashed run: its files are there, its marker is not (and its id sorts last)
    crashed = "29991231T000000Z-crash0"
    first = next((out / "tags").rglob(f"part-{ids[0]}-*.parquet"))
    t = pq.read_table(first)
    t = t.set_column(t.schema.get_field_index("run_id"), "run_id", [[crashed] * t.num_rows])
    pq.write_table(t, first.parent / f"part-{crashed}-00000.parquet")
    return out, ids, crashed


def test_examples_exist():
    assert set(doc_examples()) == {"DuckDB", "pyarrow"}


def _exec(code: str, out) -> dict:
    code, n = re.subn(r'^OUT = "[^"]*"', f'OUT = "{out}"', code, flags=re.M)
    assert n == 1, "the example must set OUT once"
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    return scope


def test_duckdb_example_reads_newest_committed_rows(two_runs_and_a_crash):
    out, ids, crashed = two_runs_and_a_crash
    assert committed_runs(str(out)) == ids
    latest = _exec(doc_examples()["DuckDB"], out)["latest"]
    uris = [r[0] for r in latest]
    assert len(uris) == len(set(uris)) == 6, "one row per image (broken.jpg is in errors/)"
    assert {r[3] for r in latest} == {ids[1]}, "the newest committed run wins; the crashed run is ignored"
    for _uri, tags, scores, _ in latest:
        assert set(tags) <= {s["tag"] for s in scores}


def test_pyarrow_example_reads_committed_runs_only(two_runs_and_a_crash):
    out, ids, crashed = two_runs_and_a_crash
    table = _exec(doc_examples()["pyarrow"], out)["table"]
    assert sorted(set(table.column("run_id").to_pylist())) == ids
    assert table.num_rows == 12
    assert crashed not in table.column("run_id").to_pylist()

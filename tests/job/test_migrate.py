"""An output of the layout before Delta tables: refused with a sentence, converted by `migrate`."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ramplus_core.cli import main as cli_main
from ramplus_core.errors import ConfigError
from ramplus_core.job import table as tb
from ramplus_core.job.storage import Storage

from .conftest import table_rows

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SCORE = pa.struct([("tag", pa.string()), ("score", pa.float32())])


def old_output(root):
    """Two committed runs and a crashed one, in the old folders, written as the old job did."""
    def tags(run_id, uris, etag="e"):
        return pa.table({"uri": uris, "size": [10] * len(uris), "etag": [etag] * len(uris),
                         "mtime": pa.array([T0] * len(uris), pa.timestamp("us", tz="UTC")),
                         "width": pa.array([4] * len(uris), pa.int32()), "height": pa.array([3] * len(uris), pa.int32()),
                         "tags": [["dog"]] * len(uris), "scores": pa.array([[{"tag": "dog", "score": 0.9}]] * len(uris),
                                                                           pa.list_(SCORE)),
                         "model_id": ["m"] * len(uris), "vocab_id": ["v"] * len(uris), "run_id": [run_id] * len(uris)})

    r1, r2, crashed = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc"
    for rid, folder in ((r1, "run_date=2026-01-01/shard=00"), (r2, "run_date=2026-01-02/shard=00"),
                        (crashed, "run_date=2026-01-03/shard=00")):
        (root / "tags" / folder).mkdir(parents=True)
    pq.write_table(tags(r1, ["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/c.jpg"]),
                   root / "tags/run_date=2026-01-01/shard=00/part-1.parquet")
    pq.write_table(tags(r2, ["s3://b/b.jpg"], etag="e2"), root / "tags/run_date=2026-01-02/shard=00/part-1.parquet")
    pq.write_table(tags(crashed, ["s3://b/a.jpg"], etag="e3"), root / "tags/run_date=2026-01-03/shard=00/part-1.parquet")
    (root / "errors/run_date=2026-01-01").mkdir(parents=True)
    pq.write_table(pa.table({"uri": ["s3://b/bad.jpg"], "error": ["corrupt"], "stage": ["decode"], "run_id": [r1]}),
                   root / "errors/run_date=2026-01-01/part-1.parquet")
    (root / "tombstones/run_date=2026-01-02").mkdir(parents=True)
    pq.write_table(pa.table({"uri": ["s3://b/c.jpg"], "etag": ["e"], "run_id": [r2]}),
                   root / "tombstones/run_date=2026-01-02/part-1.parquet")
    (root / "_index").mkdir()
    (root / "_runs").mkdir()
    for rid in (r1, r2):
        (root / "_runs" / f"{rid}.json").write_text(json.dumps(
            {"run_id": rid, "model_id": "m", "finished_at": T0.isoformat(), "config": {"inference": {"score_floor": 0.1}}}))
        (root / "_runs" / f"{rid}._SUCCESS").write_text("{}")
    return r1, r2


def test_old_layout_is_refused_then_migrated(tmp_path, capsys):
    out = tmp_path / "out"
    r1, r2 = old_output(out)
    with pytest.raises(tb.LegacyLayout, match=r"ramplus_core migrate"):
        tb.refuse_legacy(Storage(), str(out))
    assert issubclass(tb.LegacyLayout, ConfigError), "the job exits 2 with one line"
    assert cli_main(["migrate", str(out), "--shards", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["runs"], report["tagged"], report["errors"]) == (2, 2, 1)
    rows = {r["uri"]: r for r in table_rows(out, "tags").to_pylist()}
    assert set(rows) == {"s3://b/a.jpg", "s3://b/b.jpg"}, "c.jpg was deleted; the crashed run's row is ignored"
    assert rows["s3://b/b.jpg"]["run_id"] == r2 and rows["s3://b/b.jpg"]["version"] == "e2"
    assert rows["s3://b/a.jpg"]["etag"] == "e" and rows["s3://b/a.jpg"]["score_floor"] == pytest.approx(0.1)
    assert table_rows(out, "errors").column("uri").to_pylist() == ["s3://b/bad.jpg"]
    tb.refuse_legacy(Storage(), str(out))  # the tables exist now: accepted
    assert cli_main(["migrate", str(out)]) == 2, "a second migrate refuses"
    assert cli_main(["maintain", str(out), "--vacuum-hours", "0"]) == 0

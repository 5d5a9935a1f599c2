"""The table state and the plan without Ray: table rows and listing shards written by hand."""

from __future__ import annotations

import json
import threading
import zlib
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ramplus_core.job import index as ix
from ramplus_core.job import table as tb
from ramplus_core.job.listing import Fingerprint
from ramplus_core.job.schemas import LISTING_SCHEMA, RESULT_SCHEMA, WORK_SCHEMA
from ramplus_core.job.plan import make_plan
from ramplus_core.job.storage import Storage
from ramplus_core.job.vocab import copyable, descriptor
from ramplus_core.job.writer import shard_of
from ramplus_core.vocabulary import Vocabulary

MODEL = "m" * 16
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def vocab(names, thresholds=0.5, seed=0, changed=()):
    emb = torch.zeros(len(names), 2, 512)
    for i, n in enumerate(names):
        r = np.random.default_rng(zlib.crc32(f"{n}|{n in changed}".encode())).normal(size=512)
        emb[i, 0] = torch.from_numpy(r / np.linalg.norm(r)).float()
    mask = torch.zeros(len(names), 2, dtype=torch.bool)
    mask[:, 0] = True
    th = np.full(len(names), thresholds, np.float32) if np.isscalar(thresholds) else np.asarray(thresholds, np.float32)
    return Vocabulary.from_padded(list(names), th, [None] * len(names), emb, mask)


class Out:
    """An output folder with committed runs written by hand in the job's layout."""

    def __init__(self, root):
        self.root = root
        self.uri = str(root)
        self.storage = Storage()
        self.descs: dict = {}

    def commit(self, run_id: str, rows: list[dict], tags: dict | None = None, deleted: tuple = ()):
        """rows: (status, uri, version, ...) merged into the tables; tags: uri -> {tag: score}."""
        tb.ensure_tables(self.storage, self.uri, shards=4)
        full = []
        for r in rows:
            r = {"etag": r.get("version"), "size": 1, "mtime": T0, "stage": None, "model_id": MODEL,
                 "vocab_id": None, "score_floor": 0.1, "run_id": run_id, "tokens_file": None, "tokens_row": None,
                 "width": 10, "height": 20, **r}
            s = (tags or {}).get(r["uri"], {})
            r["tags"] = [k for k, v in s.items() if v > 0.5]
            r["scores"] = [{"tag": k, "score": v} for k, v in s.items()]
            if r.pop("status") == "error":
                r["error"], r["vocab_id"], r["score_floor"] = "bad", None, None
            r["shard"] = int(shard_of([r["uri"]], 4)[0])
            full.append(r)
        table = pa.Table.from_pylist(full, schema=RESULT_SCHEMA)
        gone = pa.table({"uri": list(deleted), "shard": pa.array(shard_of(list(deleted), 4), pa.int32())})
        tb.commit_run(self.storage, self.uri, run_id, results=lambda: iter(table.to_batches()),
                      deleted=lambda: iter(gone.to_batches()), metadata={"run_id": run_id}, errors_to_tags=True,
                      retries=0)

    def listing(self, tmp, entries: list[tuple]) -> list[str]:
        """entries: (uri, etag or None, size, mtime, list_error)."""
        (tmp / "staging" / "listing").mkdir(parents=True, exist_ok=True)
        cols = ("uri", "etag", "size", "mtime", "list_error")
        t = pa.table({k: [e[i] for e in entries] for i, k in enumerate(cols)}).select(LISTING_SCHEMA.names)
        t = t.cast(LISTING_SCHEMA)
        path = str(tmp / "staging" / "listing" / "part-00000.parquet")
        pq.write_table(t, path)
        fp = Fingerprint()
        fp.update(t.column("uri"))
        self.listing_fp = fp
        return [path]

    def plan(self, tmp, files, vocab_id="v1", desc=None, mode="missing", floor=0.1, prefixes=("s3://b/in",),
             cache=False, retry=("list", "fetch", "infer")):
        state = ix.load_state(self.storage, self.uri)
        desc = desc or {"vocab_id": vocab_id, "names": [], "identities": [], "thresholds": []}
        return state, make_plan(
            storage=self.storage, output_uri=self.uri, staging=str(tmp / "staging"), listing_files=files, state=state,
            mode=mode, model_id=MODEL, vocab_id=vocab_id, desc=desc, score_floor=floor, retry_stages=retry,
            prefixes=list(prefixes), token_cache=cache, rows_per_file=1000, descriptors=lambda v: self.descs.get(v))


def plan_rows(plan) -> dict:
    rows = {}
    for f in plan.files:
        for r in pq.read_table(f).to_pylist():
            rows[r["uri"]] = r
    return rows


def u(name):
    return f"s3://b/in/{name}.jpg"


def test_classification_and_deletions(tmp_path):
    out = Out(tmp_path / "out")
    tagged = dict(status="tagged", vocab_id="v1")
    out.commit("20260101T000000Z-aaaaaa", [
        {"uri": u("same"), "version": "e1", **tagged},
        {"uri": u("changed"), "version": "e1", **tagged},
        {"uri": u("decode_err"), "version": "e1", "status": "error", "stage": "decode"},
        {"uri": u("fetch_err"), "version": "e1", "status": "error", "stage": "fetch"},
        {"uri": u("gone"), "version": "e1", **tagged},
        {"uri": u("other_model"), "version": "e1", **tagged, "model_id": "x" * 16},
        {"uri": "s3://b/elsewhere/x.jpg", "version": "e1", **tagged},  # outside the inputs: not deleted
        {"uri": u("hidden/a"), "version": "e1", **tagged},  # under a folder that cannot be listed
        {"uri": u("superseded"), "version": "e1", **tagged},
    ])
    out.commit("20260102T000000Z-bbbbbb", [{"uri": u("superseded"), "version": "e2", **tagged}])
    files = out.listing(tmp_path, [
        (u("same"), "e1", 1, T0, None), (u("changed"), "e2", 1, T0, None), (u("decode_err"), "e1", 1, T0, None),
        (u("fetch_err"), "e1", 1, T0, None), (u("other_model"), "e1", 1, T0, None), (u("new"), "e1", 1, T0, None),
        (u("superseded"), "e2", 1, T0, None), ("s3://b/in/hidden", None, None, None, "folder could not be listed: x"),
    ])
    state, plan = out.plan(tmp_path, files)
    assert len(state) == 9 and state.rows_read == 9, "one current row per image"
    assert state.versions == {"tags": 2, "errors": 1}
    assert plan.counts == {"already_done": 3, "new": 2, "changed": 1, "retried": 1, "vocab_changed": 0, "retagged": 1,
                           "deleted": 1}
    rows = plan_rows(plan)
    assert set(rows) == {u("changed"), u("fetch_err"), u("other_model"), u("new"), "s3://b/in/hidden"}
    assert {r["need"] for r in rows.values()} == {"pixels"}
    assert plan.work == 5 and plan.work_fp[0] + plan.skipped_fp[0] == 8
    total = tuple((a + b) % 2**64 for a, b in zip(plan.work_fp, plan.skipped_fp))
    assert Fingerprint(*total) == out.listing_fp, "work + skipped is exactly the listing"
    gone = pq.read_table(plan.deleted["path"]).to_pylist()
    assert gone == [{"uri": u("gone"), "shard": int(shard_of([u("gone")], 4)[0])}]
    # a decode error is retried once configured; mode all re-tags everything and still finds deletions
    _, plan = out.plan(tmp_path, files, retry=("decode",))
    assert plan.counts["retried"] == 1 and u("decode_err") in plan_rows(plan)
    _, plan = out.plan(tmp_path, files, mode="all")
    assert plan.work == 8 and plan.counts["already_done"] == 0 and plan.counts["deleted"] == 1


def test_local_versions_use_size_and_mtime(tmp_path):
    out = Out(tmp_path / "out")
    v = ix.version_strings(pa.array([None, "abc"]), pa.array([5, 5]), pa.array([T0, T0]))
    assert v.to_pylist() == [f"size=5,mtime={int(T0.timestamp() * 1e6)}", "abc"]
    out.commit("20260101T000000Z-aaaaaa", [{"uri": "file:///in/a.jpg", "version": v[0].as_py(), "status": "tagged",
                                            "vocab_id": "v1"}])
    later = datetime(2026, 3, 2, tzinfo=timezone.utc)
    files = out.listing(tmp_path, [("file:///in/a.jpg", None, 5, T0, None), ("file:///in/b.jpg", None, 5, T0, None)])
    _, plan = out.plan(tmp_path, files, prefixes=["file:///in"])
    assert (plan.counts["already_done"], plan.counts["new"]) == (1, 1)
    files = out.listing(tmp_path, [("file:///in/a.jpg", None, 5, later, None)])
    _, plan = out.plan(tmp_path, files, prefixes=["file:///in"])
    assert plan.counts["changed"] == 1


def test_grown_rows_carry_the_old_scores_and_the_copy_rule(tmp_path):
    out = Out(tmp_path / "out")
    old = vocab(["a", "b", "c", "d"])
    new = vocab(["a", "b", "c", "e", "f"], thresholds=[0.5, 0.5, 0.05, 0.5, 0.5], changed=("c",))
    out.descs["v0"] = descriptor(old, "v0")
    desc = descriptor(new, "v1")
    # a: same tag; b: same tag; c: new description (a new tag); d: removed; e, f: added
    mask = copyable(desc, out.descs["v0"], 0.1, 0.1)
    assert mask.tolist() == [True, True, False, False, False]
    assert not copyable(desc, out.descs["v0"], 0.05, 0.1).any(), "a lower floor needs every score again"
    low = vocab(["a", "b"], thresholds=[0.05, 0.5])
    assert copyable(descriptor(low, "v2"), out.descs["v0"], 0.1, 0.1).tolist() == [False, True], \
        "a threshold under the old floor needs the score again"
    scores = {u("x"): {"a": 0.9, "d": 0.3}, u("y"): {"b": 0.2}}
    out.commit("20260101T000000Z-aaaaaa", [{"uri": k, "version": f"e-{k}", "status": "tagged", "vocab_id": "v0",
                                            "tokens_file": "tok.npy", "tokens_row": i}
                                           for i, k in enumerate(scores)], tags=scores)
    files = out.listing(tmp_path, [(k, f"e-{k}", 1, T0, None) for k in scores] + [(u("z"), "e", 1, T0, None)])
    _, plan = out.plan(tmp_path, files, desc=desc, cache=True)
    assert (plan.counts["vocab_changed"], plan.counts["new"]) == (2, 1)
    key = "v0@0.10000000149011612"
    assert plan.keys[key]["compute"] == [2, 3, 4] and plan.keys[key]["copied_tags"] == 2
    rows = plan_rows(plan)
    assert rows[u("x")]["base_key"] == key and rows[u("x")]["need"] == "tokens"
    assert rows[u("x")]["base_scores"] == [{"tag": "a", "score": pytest.approx(0.9)}, {"tag": "d", "score": pytest.approx(0.3)}]
    assert (rows[u("x")]["width"], rows[u("x")]["height"], rows[u("x")]["tokens_file"], rows[u("y")]["tokens_row"]) == \
        (10, 20, "tok.npy", 1)
    assert rows[u("z")]["need"] == "pixels" and rows[u("z")]["base_key"] is None
    assert pq.read_schema(plan.files[0]) == WORK_SCHEMA
    # only re-thresholding: nothing to compute, nothing to fetch
    again = vocab(["a", "b"], thresholds=[0.7, 0.2])
    _, plan = out.plan(tmp_path, files[:1], desc=descriptor(again, "v3"), vocab_id="v3")
    assert plan.need == {"none": 2, "pixels": 1}


def test_state_is_the_current_rows_and_survives_compaction(tmp_path):
    out = Out(tmp_path / "out")
    for day in range(1, 6):
        rid = f"202601{day:02d}T000000Z-aaaaaa"
        out.commit(rid, [{"uri": u(f"i{j}"), "version": f"e{day}", "status": "tagged", "vocab_id": "v1"}
                         for j in range(day == 4, day * 3)], deleted=(u("i0"),) if day == 4 else ())
    before = ix.load_state(out.storage, out.uri)
    assert len(before) == 15 and before.rows_read == 15, "each image once, whatever its history"
    assert before.nbytes / len(before) <= 40
    info = tb.maintain(out.storage, out.uri, optimize=True, vacuum_hours=0)
    assert set(info["tags"]["optimize"]) >= {"numFilesAdded", "numFilesRemoved"}
    after = ix.load_state(out.storage, out.uri)
    assert np.array_equal(before.h1, after.h1) and np.array_equal(before.hv, after.hv)
    dt = tb.open_table(out.storage, out.uri, "tags", version=3)
    assert dt is not None and dt.version() == 3, "time travel reaches the versions a vacuum keeps"
    assert json.loads(json.dumps(info))["tags"]["version"] > info["tags"]["version_before"]


def test_a_commit_that_races_another_is_rerun_on_top(tmp_path):
    """The other run commits while this merge is reading its source: delta-rs refuses ours,
    it runs again on the new version and updates instead of inserting a second row."""
    out = Out(tmp_path / "out")
    out.commit("20260101T000000Z-aaaaaa", [{"uri": u("old"), "version": "e1", "status": "tagged", "vocab_id": "v1"}])
    rows = [{"uri": u(f"n{i}"), "version": "e1", "status": "tagged", "vocab_id": "v1"} for i in range(3)]
    raced = []
    real_commit = out.commit

    def racing_results(table):
        def gen():
            raced.append(1)
            if len(raced) == 2:  # the tags step (the errors step reads the rows first)
                # lands after our merge loaded the table (a thread: delta-rs is mid-call in this one)
                t = threading.Thread(target=real_commit, args=("20260102T000000Z-other0", rows))
                t.start()
                t.join()
            yield from table.to_batches()
        return gen

    tb.ensure_tables(out.storage, out.uri, shards=4)
    full = [{**r, "etag": "e1", "size": 1, "mtime": T0, "model_id": MODEL, "score_floor": 0.1,
             "run_id": "20260102T000000Z-mine00", "width": 1, "height": 1, "tags": [], "scores": [],
             "shard": int(shard_of([r["uri"]], 4)[0])} for r in rows]
    for r in full:
        r.pop("status")
    table = pa.Table.from_pylist(full, schema=RESULT_SCHEMA)
    empty = pa.table({"uri": pa.array([], pa.string()), "shard": pa.array([], pa.int32())})
    res = tb.commit_run(out.storage, out.uri, "20260102T000000Z-mine00", results=racing_results(table),
                        deleted=lambda: iter(empty.to_batches()), metadata={}, errors_to_tags=False, retries=2)
    assert res["2-tags"]["attempts"] == 2 and res["2-tags"]["num_target_rows_updated"] == 3
    state = ix.load_state(out.storage, out.uri)
    assert len(state) == 4 and state.rows_read == 4, "each image once"

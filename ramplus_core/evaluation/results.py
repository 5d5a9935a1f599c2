"""Reading one committed tagging run back: its manifest, its tag rows and its error rows.

Only committed runs are read (a `_runs/<run_id>._SUCCESS` marker whose manifest hash
matches), by run id or the latest one, and only the files that run's manifest lists, so
rows of crashed runs or of other runs in the same output are never mixed in.

Scores and the floor. The job keeps, per image, the scores at or over
`inference.score_floor` (plus every tag over its threshold). A score that was not kept is
read as 0 here. With floor 0 every score is kept and AP is exact. With a floor above 0,
all images below the floor for a class tie at 0 at the bottom of the ranking; AP then
counts them as one tied block (see metrics.py), which changes it only through positives
scored under the floor, i.e. the tail of the ranking. Run the job with
`--set inference.score_floor=0` for exact mAP; `score_matrix` warns (ScoreFloorWarning)
when the floor is higher. To keep such a run small, restrict the vocabulary to the
benchmark's tags (`vocabulary.tags_file`): every tag's score is independent of the others.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..job import manifest as mf
from ..job.storage import Storage, join
from .common import EvaluationError, ScoreFloorWarning


@dataclass
class Run:
    output: str
    run_id: str
    manifest: dict
    storage: Storage

    @property
    def score_floor(self) -> Optional[float]:
        try:
            return float(self.manifest["config"]["inference"]["score_floor"])
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def vocabulary_size(self) -> Optional[int]:
        try:
            return int(self.manifest["vocabulary"]["tags"])
        except (KeyError, TypeError, ValueError):
            return None

    def files(self, kind: str) -> Optional[list[dict]]:
        files = (self.manifest.get("files") or {}).get(kind)
        return list(files) if isinstance(files, list) else None


def open_run(output: str, run_id: Optional[str] = None, storage: Optional[Storage] = None) -> Run:
    """The committed run `run_id`, or the latest committed run, of a job's output URI."""
    storage = storage or Storage()
    try:
        runs = mf.committed_runs(output, storage)
    except Exception as e:  # noqa: BLE001 - any storage backend
        raise EvaluationError(f"cannot list runs under {output}: {type(e).__name__}: {e}") from None
    if not runs:
        raise EvaluationError(f"no committed run under {output} (no {mf.RUNS_DIR}/*{mf.MARKER_SUFFIX} marker); "
                              "is this the job's --output?")
    if run_id is None:
        run_id = runs[-1]
    elif run_id not in runs:
        raise EvaluationError(f"run {run_id} is not committed under {output}; committed runs: "
                              f"{', '.join(runs[-5:])}{' ...' if len(runs) > 5 else ''}")
    fs, path = storage.pyarrow(join(output, mf.RUNS_DIR, f"{run_id}.json"))
    with fs.open_input_stream(path) as f:
        data = f.read()
    fs, mpath = storage.pyarrow(join(output, mf.RUNS_DIR, f"{run_id}{mf.MARKER_SUFFIX}"))
    with fs.open_input_stream(mpath) as f:
        marker_text = f.read()
    try:
        want = json.loads(marker_text).get("manifest_sha256")
    except (ValueError, AttributeError):
        want = None
    if want and hashlib.sha256(data).hexdigest() != want:
        raise EvaluationError(f"run {run_id}: the manifest under {output} is not the one that was committed "
                              "(its hash differs from the marker's)")
    return Run(output, run_id, json.loads(data), storage)


def _dataset(run: Run, kind: str):
    """A pyarrow dataset of exactly the run's files of one kind (tags or errors)."""
    import pyarrow.dataset as pads

    files = run.files(kind)
    if files is not None:
        if not files:
            return None
        fs, _ = run.storage.pyarrow(join(run.output, kind))
        paths = [run.storage.pyarrow(join(run.output, f["path"]))[1] for f in files]
        return pads.dataset(paths, filesystem=fs, format="parquet")
    # a manifest without a file list: scan the folder, keep this run's rows
    fs, root = run.storage.pyarrow(join(run.output, kind))
    from pyarrow.fs import FileType

    if fs.get_file_info(root).type == FileType.NotFound:
        return None
    return pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive")


def iter_tag_batches(run: Run, columns: Sequence[str], batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """The run's tag rows in bounded batches (floor-0 scores of a large vocabulary are big)."""
    import pyarrow.dataset as pads

    ds = _dataset(run, "tags")
    if ds is None:
        return
    flt = pads.field("run_id") == run.run_id
    yield from ds.to_batches(columns=list(columns), filter=flt, batch_size=batch_size)


def read_tag_column(run: Run, column: str = "uri") -> list:
    out: list = []
    for b in iter_tag_batches(run, [column], batch_size=65536):
        out.extend(b.column(0).to_pylist())
    return out


def read_errors(run: Run) -> pa.Table:
    import pyarrow.dataset as pads

    schema = pa.schema([("uri", pa.string()), ("error", pa.string()), ("stage", pa.string())])
    ds = _dataset(run, "errors")
    if ds is None:
        return schema.empty_table()
    return ds.to_table(columns=schema.names, filter=pads.field("run_id") == run.run_id).cast(schema)


def floor_warning(floor: Optional[float]) -> Optional[str]:
    if floor is None:
        return ("the run's manifest does not record inference.score_floor; scores that were not kept count as 0, "
                "so mAP may be approximate")
    if floor > 0:
        return (f"the run kept only scores >= {floor:g} (inference.score_floor); scores under it count as 0, so "
                "mAP is approximate. Re-run with --set inference.score_floor=0 for exact mAP")
    return None


@dataclass
class ScoreMatrix:
    scores: np.ndarray  # float32 [rows, classes]; scores not kept are 0
    predicted: np.ndarray  # bool [rows, classes]: the tag is in the row's `tags`
    found: np.ndarray  # bool [rows]: a result row was read for this row
    seen_tags: set  # every tag name that appears in any kept score of the run


def _fill(target: np.ndarray, lists: pa.ChunkedArray, rows: np.ndarray, classes: pa.Array, field_name: Optional[str]):
    """Scatter a list column (of strings, or of {tag, score} structs) into target[rows, class]."""
    for chunk in lists.chunks:
        if len(chunk) == 0:
            continue
        parents = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(chunk)
        names = flat.field("tag") if field_name else flat
        cls = pc.index_in(names, value_set=classes)
        ok = cls.is_valid().to_numpy(zero_copy_only=False)
        if not ok.any():
            continue
        r = rows[parents[ok]]
        c = cls.filter(cls.is_valid()).to_numpy(zero_copy_only=False)
        keep = r >= 0
        if field_name:
            vals = flat.field(field_name).filter(pa.array(ok)).to_numpy(zero_copy_only=False)
            target[r[keep], c[keep]] = vals[keep]
        else:
            target[r[keep], c[keep]] = True


def score_matrix(run: Run, rows_by_uri: Mapping[str, int], n_rows: int, classes: Sequence[str],
                 batch_size: int = 1024) -> ScoreMatrix:
    """Scores and predictions of `classes` for the images in `rows_by_uri` (uri -> output row).

    Warns with ScoreFloorWarning when the run's score floor is not 0 (see the module docstring).
    """
    msg = floor_warning(run.score_floor)
    if msg:
        warnings.warn(msg, ScoreFloorWarning, stacklevel=2)
    scores = np.zeros((n_rows, len(classes)), dtype=np.float32)
    predicted = np.zeros((n_rows, len(classes)), dtype=bool)
    found = np.zeros(n_rows, dtype=bool)
    seen: set = set()
    class_arr = pa.array(list(classes), pa.string())
    for batch in iter_tag_batches(run, ["uri", "tags", "scores"], batch_size):
        uris = batch.column(0).to_pylist()
        rows = np.fromiter((rows_by_uri.get(u, -1) for u in uris), dtype=np.int64, count=len(uris))
        score_col = pa.chunked_array([batch.column(2)])
        for chunk in score_col.chunks:
            seen.update(pc.unique(pc.list_flatten(chunk).field("tag")).to_pylist())
        if not (rows >= 0).any():
            continue
        found[rows[rows >= 0]] = True
        _fill(scores, score_col, rows, class_arr, "score")
        _fill(predicted, pa.chunked_array([batch.column(1)]), rows, class_arr, None)
    return ScoreMatrix(scores, predicted, found, seen)

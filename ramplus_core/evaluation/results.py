"""Reading the job's output as it was right after one committed run.

The output is two Delta tables, `tags` and `errors` (docs/job.md, "Output"). A run's
manifest (`_runs/<run_id>.json`) records the table versions its commits produced
(`tables.versions`), so a `Run` is the catalog at those versions, read by time travel: a
later run's commits, or rows a crashed run staged but never merged, are never seen, and the
run's figures stay reproducible after the output has moved on (until `vacuum` removes the
files of that version).

Every row of the tags table at that version is read, not only the rows the run wrote
itself. An incremental run reuses the earlier runs' rows of unchanged images, and those rows
are part of the output as of that run: evaluating the latest run evaluates the catalog as a
reader sees it. (To evaluate only what one run tagged, tag the benchmark into its own
--output.) The rows then may come from several runs; `Run.row_versions` says whether they
differ in model or vocabulary, and the benchmark warns when they do.

Scores and the floor. The job keeps, per image, the scores at or over
`inference.score_floor` (plus every tag over its threshold). A score that was not kept is
read as 0 here. With floor 0 every score is kept and AP is exact. With a floor above 0,
all images below the floor for a class tie at 0 at the bottom of the ranking; AP then
counts them as one tied block (see metrics.py), which changes it only through positives
scored under the floor, i.e. the tail of the ranking. Run the job with
`--set inference.score_floor=0` for exact mAP; `score_matrix` warns (ScoreFloorWarning)
when a row was written with a higher floor. To keep such a run small, restrict the
vocabulary to the benchmark's tags (`vocabulary.tags_file`): every tag's score is
independent of the others.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..job import manifest as mf
from ..job import table as tb
from ..job.storage import Storage
from .common import EvaluationError, ScoreFloorWarning

KINDS = tb.KINDS


@dataclass
class Run:
    output: str
    run_id: str
    manifest: dict
    storage: Storage
    versions: dict  # {"tags": v, "errors": v}: the tables right after the run's commits
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def table(self, kind: str):
        """The Delta table `kind` at the run's version (opened once)."""
        key = ("table", kind)
        if key not in self._cache:
            self._cache[key] = _open_version(self, kind)
        return self._cache[key]

    def dataset(self, kind: str):
        """A pyarrow dataset of the table at the run's version (S3 through delta-rs's own store)."""
        key = ("dataset", kind)
        if key not in self._cache:
            self._cache[key] = self.table(kind).to_pyarrow_dataset()
        return self._cache[key]

    def file_stats(self, kind: str) -> pa.Table:
        """The table's data files at the run's version with their row counts and column stats,
        from the Delta log alone (no data file is opened)."""
        key = ("stats", kind)
        if key not in self._cache:
            self._cache[key] = pa.table(self.table(kind).get_add_actions(flatten=True))
        return self._cache[key]

    @property
    def score_floor(self) -> Optional[float]:
        """The highest floor any tag row at this version was written with.

        Rows reused from earlier runs keep the floor they were written with, so the run's
        own configuration is not enough; the per-file maxima in the Delta log answer without
        reading data. None when no row records one and the manifest does not either.
        """
        key = ("floor",)
        if key not in self._cache:
            self._cache[key] = _max_floor(self)
        return self._cache[key]

    @property
    def vocabulary_size(self) -> Optional[int]:
        try:
            return int(self.manifest["vocabulary"]["tags"])
        except (KeyError, TypeError, ValueError):
            return None

    def row_versions(self) -> dict[str, list[str]]:
        """Distinct model_id and vocab_id of the tag rows at this version.

        The log's per-file min/max settle the usual case (one model, one vocabulary) without
        a scan; otherwise the two columns are read.
        """
        key = ("row_versions",)
        if key in self._cache:
            return self._cache[key]
        out: dict[str, list[str]] = {}
        stats = self.file_stats("tags")
        for col in ("model_id", "vocab_id"):
            lo, hi = f"min.{col}", f"max.{col}"
            if stats.num_rows == 0:
                out[col] = []
                continue
            if lo in stats.column_names and hi in stats.column_names:
                vals = set(stats.column(lo).to_pylist()) | set(stats.column(hi).to_pylist())
                nulls = stats.column(f"null_count.{col}").to_pylist() if f"null_count.{col}" in stats.column_names \
                    else [None]
                if len(vals) == 1 and None not in vals and all(n == 0 for n in nulls):
                    out[col] = [vals.pop()]
                    continue
            seen: set = set()
            for b in iter_tag_batches(self, [col], batch_size=65_536):
                seen.update(pc.unique(b.column(0)).to_pylist())
            out[col] = sorted(v for v in seen if v is not None)
        self._cache[key] = out
        return out


def _open_version(run: Run, kind: str):
    v = run.versions[kind]
    try:
        dt = tb.open_table(run.storage, run.output, kind, v)
    except Exception as e:  # noqa: BLE001 - delta-rs raises its own types for a missing log version
        raise EvaluationError(
            f"run {run.run_id}: version {v} of the {kind} table under {run.output} cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); its log may have been "
            "cleaned up since: evaluate a later run") from None
    if dt is None:
        raise EvaluationError(f"run {run.run_id}: the {kind} table under {run.output} is missing "
                              f"({tb.table_uri(run.output, kind)}); is this the job's --output?")
    return dt


def _max_floor(run: Run) -> Optional[float]:
    stats = run.file_stats("tags")
    col = "max.score_floor"
    if stats.num_rows and col in stats.column_names:
        vals = [v for v in stats.column(col).to_pylist() if v is not None]
        if vals:
            return float(np.float32(max(vals)))
    try:
        return float(run.manifest["config"]["inference"]["score_floor"])
    except (KeyError, TypeError, ValueError):
        return None


def _manifest_versions(manifest: dict) -> Optional[dict]:
    v = (manifest.get("tables") or {}).get("versions") if isinstance(manifest.get("tables"), dict) else None
    if not isinstance(v, dict):
        return None
    try:
        return {k: int(v[k]) for k in KINDS}
    except (KeyError, TypeError, ValueError):
        return None


def open_run(output: str, run_id: Optional[str] = None, storage: Optional[Storage] = None) -> Run:
    """The output as it was right after the committed run `run_id` (default: the latest one)."""
    storage = storage or Storage()
    try:
        runs = mf.committed_runs(output, storage)
    except Exception as e:  # noqa: BLE001 - any storage backend
        raise EvaluationError(f"cannot list runs under {output}: {type(e).__name__}: {e}") from None
    if not runs:
        raise EvaluationError(f"no committed run under {output} (no {mf.RUNS_DIR}/<run_id>.json manifest); "
                              "is this the job's --output?")
    if run_id is None:
        run_id = runs[-1]
    elif run_id not in runs:
        raise EvaluationError(f"run {run_id} is not committed under {output}; committed runs: "
                              f"{', '.join(runs[-5:])}{' ...' if len(runs) > 5 else ''}")
    try:
        manifest = mf.read_manifest(output, run_id, storage)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"run {run_id}: cannot read its manifest under {output}: {type(e).__name__}: {e}") \
            from None
    if not isinstance(manifest, dict) or manifest.get("status", "committed") != "committed":
        status = manifest.get("status") if isinstance(manifest, dict) else None
        raise EvaluationError(f"run {run_id} is not committed under {output} (its manifest says status "
                              f"{status!r})")
    versions = _manifest_versions(manifest)
    if versions is None:
        if tb.open_table(storage, output, "tags") is None:
            raise EvaluationError(f"run {run_id} under {output} was written by ramplus before the Delta tables: "
                                  f"migrate it with `python -m ramplus_core migrate {output}`")
        raise EvaluationError(f"run {run_id} was committed before {output} was migrated to the Delta tables and "
                              "records no table versions; evaluate a run committed since")
    return Run(output, run_id, manifest, storage, versions)


def _vacuumed(run: Run, kind: str, e: BaseException) -> EvaluationError:
    return EvaluationError(
        f"run {run.run_id}: a data file of version {run.versions[kind]} of the {kind} table under {run.output} "
        f"is gone ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); vacuum removes the "
        "files of versions older than its retention: evaluate a later run")


def _batches(run: Run, kind: str, columns: Sequence[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    try:
        yield from run.dataset(kind).to_batches(columns=list(columns), batch_size=batch_size)
    except (FileNotFoundError, OSError) as e:
        if "not found" in str(e).lower() or isinstance(e, FileNotFoundError):
            raise _vacuumed(run, kind, e) from None
        raise


def iter_tag_batches(run: Run, columns: Sequence[str], batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Every tag row at the run's version, in bounded batches (floor-0 scores of a large
    vocabulary are big)."""
    yield from _batches(run, "tags", columns, batch_size)


def read_tag_column(run: Run, column: str = "uri") -> list:
    out: list = []
    for b in iter_tag_batches(run, [column], batch_size=65536):
        out.extend(b.column(0).to_pylist())
    return out


ERROR_COLUMNS = pa.schema([("uri", pa.string()), ("error", pa.string()), ("stage", pa.string())])


def read_errors(run: Run) -> pa.Table:
    """The errors table at the run's version: every image that could not be tagged then."""
    batches = list(_batches(run, "errors", ERROR_COLUMNS.names, 65_536))
    if not batches:
        return ERROR_COLUMNS.empty_table()
    return pa.Table.from_batches(batches).cast(ERROR_COLUMNS)


def floor_warning(floor: Optional[float]) -> Optional[str]:
    if floor is None:
        return ("the output records no inference.score_floor for its rows; scores that were not kept count as 0, "
                "so mAP may be approximate")
    if floor > 0:
        return (f"rows were written keeping only scores >= {floor:g} (inference.score_floor); scores under it count "
                "as 0, so mAP is approximate. Re-run with --set inference.score_floor=0 for exact mAP")
    return None


@dataclass
class ScoreMatrix:
    scores: np.ndarray  # float32 [rows, classes]; scores not kept are 0
    predicted: np.ndarray  # bool [rows, classes]: the tag is in the row's `tags`
    found: np.ndarray  # bool [rows]: a result row was read for this row
    seen_tags: set  # every tag name that appears in any kept score of the run
    vocab_ids: list = field(default_factory=list)  # per row: the vocab_id its tags were decided with (None: no row)


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

    Warns with ScoreFloorWarning when a row was written with a floor above 0 (see the module
    docstring).
    """
    msg = floor_warning(run.score_floor)
    if msg:
        warnings.warn(msg, ScoreFloorWarning, stacklevel=2)
    scores = np.zeros((n_rows, len(classes)), dtype=np.float32)
    predicted = np.zeros((n_rows, len(classes)), dtype=bool)
    found = np.zeros(n_rows, dtype=bool)
    vocab_ids: list = [None] * n_rows
    seen: set = set()
    class_arr = pa.array(list(classes), pa.string())
    for batch in iter_tag_batches(run, ["uri", "tags", "scores", "vocab_id"], batch_size):
        uris = batch.column(0).to_pylist()
        rows = np.fromiter((rows_by_uri.get(u, -1) for u in uris), dtype=np.int64, count=len(uris))
        score_col = pa.chunked_array([batch.column(2)])
        for chunk in score_col.chunks:
            seen.update(pc.unique(pc.list_flatten(chunk).field("tag")).to_pylist())
        if not (rows >= 0).any():
            continue
        found[rows[rows >= 0]] = True
        vids = batch.column(3).to_pylist()
        for i in np.flatnonzero(rows >= 0):
            vocab_ids[rows[i]] = vids[i]
        _fill(scores, score_col, rows, class_arr, "score")
        _fill(predicted, pa.chunked_array([batch.column(1)]), rows, class_arr, None)
    return ScoreMatrix(scores, predicted, found, seen, vocab_ids)


def vocabulary_thresholds(run: Run, vocab_id: str) -> Optional[dict[str, float]]:
    """tag -> threshold of a vocabulary the job applied (`_vocab/<vocab_id>.json`), or None.

    The descriptor stores float32 values; each is returned as the shortest decimal that
    rounds to it (0.65, not 0.6499999762), i.e. the number a thresholds file would have said,
    so a comparison in float64 agrees with one against the file's text.
    """
    from ..job.vocab import load_descriptor

    desc = load_descriptor(run.storage, run.output, vocab_id)
    if not desc or "names" not in desc or "thresholds" not in desc:
        return None
    return {n: float(str(np.float32(t))) for n, t in zip(desc["names"], desc["thresholds"])}

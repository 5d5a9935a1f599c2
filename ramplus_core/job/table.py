"""The output's two Delta tables, `tags` and `errors`: opening, reading and committing.

Why Delta: a reader must see whole runs only, a nightly run must replace a changed image's
row rather than add a second one, and indexers must be able to ask what changed since their
last sync. delta-rs gives all of that with nothing but the bucket: an atomic commit is one
conditional PUT of `_delta_log/<version>.json`, merges rewrite only the files that hold a
matched row, and the change data feed records inserts, updates and deletes.

A run commits with `merge` on the uri, never a blind append, so committing is idempotent:
a resumed run that commits again, or two runs that tagged the same new image, still leave
one row per image. delta-rs refuses a merge whose read partitions another writer changed
since (CommitFailedError); it is re-run on the new version, where it updates instead of
inserting. Each commit carries an app transaction `ramplus:<run_id>:<step>`, so a run that
died after some of its commits skips those on resume.

Order of one run's commits, so that a reader never misses an image (briefly in both tables
is allowed, in neither is not):

    1. errors  upsert the run's error rows; delete images gone from the store
    2. tags    upsert the run's tagged rows; delete the run's error images and gone images
    3. errors  delete images that are tagged now (only when some were errors before)
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Iterable, Iterator, Optional
from urllib.parse import urlparse

import pyarrow as pa

from ..errors import ConfigError
from .config import uri_scheme
from .credentials import delta_keys
from .schemas import DELETED_SCHEMA, TABLE_SCHEMAS
from .storage import Storage, join, local_path

KINDS = ("tags", "errors")
APP = "ramplus"
PARTITION = ["shard"]


class LegacyLayout(ConfigError):
    """An output written by ramplus before the Delta tables."""


# delta-rs retries 10 times within ~3 s by default: a store that restarts (a rolling upgrade,
# a MinIO failover) takes longer than that, and a failed read of the log fails the whole run.
# These ride out up to three minutes of outage (the backoff is jittered, so the retry count
# is set high and the time bound is what holds).
RETRY_OPTIONS = {"max_retries": "100", "retry_timeout": "180s", "backoff_config.init_backoff": "200ms",
                 "backoff_config.max_backoff": "10s", "backoff_config.base": "2"}


def table_uri(output: str, kind: str) -> str:
    if uri_scheme(output) == "file":
        return local_path(join(output, kind))
    scheme, rest = output.split("://", 1)
    return f"{'s3' if scheme in ('s3', 's3a') else scheme}://{rest.rstrip('/')}/{kind}"


def delta_options(storage: Storage, output: str) -> dict:
    """delta-rs storage options from our storage settings (never logged: they hold keys)."""
    if uri_scheme(output) not in ("s3", "s3a"):
        return {}
    opts = {"AWS_REGION": storage.region or os.environ.get("AWS_REGION") or "us-east-1", **RETRY_OPTIONS}
    if storage.endpoint_url:
        opts["AWS_ENDPOINT_URL"] = storage.endpoint_url
        if urlparse(storage.endpoint_url).scheme == "http":
            opts["AWS_ALLOW_HTTP"] = "true"
    if storage.access_key_id:
        opts["AWS_ACCESS_KEY_ID"] = storage.access_key_id
        opts["AWS_SECRET_ACCESS_KEY"] = storage.secret_access_key
        if storage.session_token:
            opts["AWS_SESSION_TOKEN"] = storage.session_token
    else:  # the node's own chain; a profile is resolved here because delta-rs ignores profiles
        opts.update(delta_keys())
    return opts


def open_table(storage: Storage, output: str, kind: str, version: Optional[int] = None):
    """The table, at `version` (time travel) or the newest; None when it does not exist yet."""
    from deltalake import DeltaTable

    uri, opts = table_uri(output, kind), delta_options(storage, output)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    return DeltaTable(uri, version=version, storage_options=opts)


def ensure_tables(storage: Storage, output: str, shards: int = 8, migrating: bool = False) -> dict:
    """Create missing tables (empty, partitioned by shard, change feed on).

    Returns {"tags": version, "errors": version, "shards": n}. The shard count is fixed
    when the tables are created (it is in the merge key: a changed count would let an image
    get a second row), so an existing table's count wins over `layout.shards`.
    """
    from deltalake import DeltaTable

    if not migrating:
        refuse_legacy(storage, output)
    out = {}
    for kind in KINDS:
        dt = open_table(storage, output, kind)
        if dt is None:
            try:
                dt = DeltaTable.create(table_uri(output, kind), schema=TABLE_SCHEMAS[kind], mode="ignore",
                                       partition_by=PARTITION, name=f"ramplus_{kind}",
                                       description=json.dumps({"ramplus_shards": shards}),
                                       configuration={"delta.enableChangeDataFeed": "true"},
                                       storage_options=delta_options(storage, output))
            except Exception:  # noqa: BLE001 - another run created it first
                dt = open_table(storage, output, kind)
                if dt is None:
                    raise
        _check_schema(dt, kind)
        out[kind] = dt.version()
        out.setdefault("shards", table_shards(dt, shards))
    return out


def table_shards(dt, default: int) -> int:
    try:
        return int(json.loads(dt.metadata().description or "{}").get("ramplus_shards", default))
    except (ValueError, TypeError, AttributeError):
        return default


def _check_schema(dt, kind: str) -> None:
    have = pa.schema(dt.schema().to_arrow())
    want = TABLE_SCHEMAS[kind]
    missing = [f.name for f in want if f.name not in have.names]
    if missing:
        raise ConfigError(f"output: the {kind} table at {dt.table_uri} lacks the column(s) {', '.join(missing)}; "
                          "it was not written by this version of ramplus: use another --output")


def refuse_legacy(storage: Storage, output: str) -> None:
    """The pre-Delta layout (`_index/`, `_runs/*._SUCCESS`) is refused with how to move on."""
    import pyarrow.fs as pafs

    fs, root = storage.pyarrow(output)
    legacy = False
    for probe in (f"{root}/_index", f"{root}/tombstones"):
        if fs.get_file_info(probe).type == pafs.FileType.Directory:
            legacy = True
    if not legacy:
        runs = fs.get_file_info(pafs.FileSelector(f"{root}/_runs", allow_not_found=True))
        legacy = any(i.base_name.endswith("._SUCCESS") for i in runs)
    if legacy and open_table(storage, output, "tags") is None:
        raise LegacyLayout(
            f"output: {output} holds results in the layout of ramplus before Delta tables (_index/, "
            f"_runs/*._SUCCESS); convert it once with `python -m ramplus_core migrate {output}` "
            "(committed runs only), or write to a new --output")


# -- reading -------------------------------------------------------------------------------

def scan(storage: Storage, output: str, kind: str, columns: list[str], version: Optional[int] = None,
         batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Batches of some columns of a table version (nothing when the table does not exist)."""
    dt = open_table(storage, output, kind, version)
    if dt is None:
        return
    yield from dt.to_pyarrow_dataset().to_batches(columns=columns, batch_size=batch_size)


# -- committing --------------------------------------------------------------------------------

def step_done(dt, run_id: str, step: str) -> bool:
    return dt.transaction_version(f"{APP}:{run_id}:{step}") is not None


def _merge(storage: Storage, output: str, kind: str, run_id: str, step: str, source_fn, *, upsert: bool,
           metadata: dict, retries: int) -> Optional[dict]:
    """One idempotent merge; re-run on the new version when a concurrent commit conflicts."""
    from deltalake import CommitProperties, Transaction
    from deltalake.exceptions import CommitFailedError

    cols = TABLE_SCHEMAS[kind].names
    for attempt in range(retries + 1):
        dt = open_table(storage, output, kind)
        if step_done(dt, run_id, step):
            return None
        props = CommitProperties(
            custom_metadata={f"{APP}.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
            | {f"{APP}.step": step},
            app_transactions=[Transaction(f"{APP}:{run_id}:{step}", 1)], max_commit_retries=50)
        m = dt.merge(source_fn(), "t.shard = s.shard AND t.uri = s.uri", source_alias="s", target_alias="t",
                     commit_properties=props)
        m = m.when_matched_delete("s._delete")
        if upsert:
            sets = {c: f"s.{c}" for c in cols}
            m = m.when_matched_update(sets).when_not_matched_insert(sets, predicate="NOT s._delete")
        before = dt.version()
        try:
            out = m.execute()
            # dt moved to this commit's version (a reopen could see a later run's); a merge with
            # nothing to change commits nothing and leaves it where it was
            out["version"] = dt.version() if dt.version() != before else None
            out["attempts"] = attempt + 1
            return out
        except CommitFailedError:
            if attempt >= retries:
                raise
    return None  # pragma: no cover


def _reader(schema: pa.Schema, parts: Iterable[pa.RecordBatch]) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(schema, parts)


def commit_run(storage: Storage, output: str, run_id: str, *, results, deleted, metadata: dict,
               errors_to_tags: bool, retries: int) -> dict:
    """The run's three steps (see the module docstring); their merge metrics and versions.

    `results()` yields RESULT_SCHEMA batches (the staged rows), `deleted()` DELETED_SCHEMA
    batches; both are called once per attempt of a step, so a re-run reads them again.
    """
    def src(kind: str, keep_errors: bool, delete_other: bool, with_gone: bool):
        schema = TABLE_SCHEMAS[kind]
        out_schema = pa.schema(list(schema) + [("_delete", pa.bool_())])

        def parts():
            for b in results():
                t = pa.Table.from_batches([b])
                is_err = t.column("error").is_valid()
                mine = t.filter(is_err if keep_errors else pa.compute.invert(is_err))
                if mine.num_rows:
                    mine = mine.select(schema.names).cast(schema)
                    yield from _with_delete(mine, False, out_schema).to_batches()
                if delete_other:
                    other = t.filter(pa.compute.invert(is_err) if keep_errors else is_err)
                    if other.num_rows:
                        yield from _delete_rows(other.select(["uri", "shard"]), out_schema).to_batches()
            if with_gone:
                for b in deleted():
                    yield from _delete_rows(pa.Table.from_batches([b], DELETED_SCHEMA), out_schema).to_batches()

        return lambda: _reader(out_schema, parts())

    out = {}
    out["1-errors"] = _merge(storage, output, "errors", run_id, "1-errors", src("errors", True, False, True),
                           upsert=True, metadata=metadata, retries=retries)
    out["2-tags"] = _merge(storage, output, "tags", run_id, "2-tags", src("tags", False, True, True),
                         upsert=True, metadata=metadata, retries=retries)
    if errors_to_tags:
        out["3-errors"] = _merge(storage, output, "errors", run_id, "3-errors",
                                       src("errors", True, True, False), upsert=False, metadata=metadata,
                                       retries=retries)
    return out


def _with_delete(t: pa.Table, flag: bool, schema: pa.Schema) -> pa.Table:
    return t.append_column("_delete", pa.array([flag] * t.num_rows, pa.bool_())).cast(schema)


def _delete_rows(keys: pa.Table, schema: pa.Schema) -> pa.Table:
    """Rows that only say "delete this uri": nulls except the merge keys."""
    n = keys.num_rows
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols["uri"], cols["shard"] = keys.column("uri"), keys.column("shard").cast(pa.int32())
    cols["_delete"] = pa.array([True] * n, pa.bool_())
    return pa.table(cols, schema=schema)


def versions(storage: Storage, output: str) -> dict[str, Optional[int]]:
    out = {}
    for kind in KINDS:
        dt = open_table(storage, output, kind)
        out[kind] = dt.version() if dt is not None else None
    return out


# -- maintenance -----------------------------------------------------------------------------

def commits_since_optimize(dt) -> int:
    n = 0
    for h in dt.history(200):
        if h.get("operation") == "OPTIMIZE":
            return n
        if h.get("operation") == "MERGE":
            n += 1
    return n


def maintain(storage: Storage, output: str, *, optimize: bool, vacuum_hours: Optional[float],
             target_file_size: Optional[int] = None) -> dict:
    """Compact small files (optimize) and delete files no version within the retention needs."""
    from deltalake import CommitProperties

    report = {}
    for kind in KINDS:
        dt = open_table(storage, output, kind)
        if dt is None:
            continue
        r: dict = {"version_before": dt.version()}
        if optimize:
            m = dt.optimize.compact(target_size=target_file_size,
                                    commit_properties=CommitProperties(max_commit_retries=50))
            r["optimize"] = {k: m.get(k) for k in ("numFilesAdded", "numFilesRemoved", "totalConsideredFiles")}
        if vacuum_hours is not None:
            hours = int(vacuum_hours)
            gone = dt.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=hours >= 168)
            r["vacuum_files_deleted"] = len(gone)
        r["version"] = dt.version()
        report[kind] = r
    return report


# -- the store must refuse a second PUT of the same commit --------------------------------------

def check_conditional_writes(storage: Storage, output: str) -> None:
    """Refuse a store whose PUT ignores If-None-Match: two commits could both 'win' a version."""
    if uri_scheme(output) not in ("s3", "s3a"):
        return
    from .storage import _s3_sync

    fs = storage._s3fs()
    rest = output.split("://", 1)[1].rstrip("/")
    bucket, _, prefix = rest.partition("/")
    key = "/".join(p for p in (prefix, "_staging", f".conditional-put-probe-{uuid.uuid4().hex}") if p)
    try:
        _s3_sync(fs, "put_object", Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            _s3_sync(fs, "put_object", Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*")
            honoured = False
        except Exception as e:  # noqa: BLE001
            code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""
            honoured = code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or "412" in str(e) \
                or "PreconditionFailed" in str(e)
            if not honoured:
                raise
    finally:
        try:
            _s3_sync(fs, "delete_object", Bucket=bucket, Key=key)
        except Exception:  # noqa: BLE001
            pass
    if not honoured:
        raise ConfigError(f"output: the store at {storage.endpoint_url or 's3'} accepted a second PUT with "
                          "If-None-Match: *; Delta commits need conditional writes (S3, MinIO, SeaweedFS and "
                          "GCS have them) or two runs could overwrite each other's commit")

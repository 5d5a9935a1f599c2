"""Job settings: one YAML file, a few CLI flags on top, validated before any work starts.

A nightly job that fails after an hour because of a typo in a key is the failure we most
want to avoid, so every key is known here: an unknown key, a wrong type or a bad URI stops
the run at once with a message that names the key (and the nearest known one for typos).
The settings are plain frozen dataclasses so the rest of the job reads `cfg.decode.max_bytes`
rather than dictionary lookups that fail late.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import ConfigError
from ..preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")
REDACTED = "***"


def _positive(v) -> Optional[str]:
    return None if v > 0 else "must be > 0"


def _non_negative(v) -> Optional[str]:
    return None if v >= 0 else "must be >= 0"


def _retry_count(v) -> Optional[str]:
    return None if v >= -1 else "must be >= 0, or -1 for unlimited"


def _unit_interval(v) -> Optional[str]:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _check(fn, help_: str = ""):
    return {"check": fn, "help": help_}


@dataclass(frozen=True)
class StorageConfig:
    """Object-store access; every field falls back to the AWS_* environment when unset."""

    endpoint_url: Optional[str] = None
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    session_token: Optional[str] = None
    region: Optional[str] = None
    # attempts per request of the Parquet client (data files, listing shards, manifests)
    max_attempts: int = field(default=10, metadata=_check(_positive))


@dataclass(frozen=True)
class ListingConfig:
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    rows_per_file: int = field(default=100_000, metadata=_check(_positive))
    follow_links: bool = False  # off: only links to files inside the input folder are listed


@dataclass(frozen=True)
class FetchConfig:
    threads: int = field(default=8, metadata=_check(_positive))
    retries: int = field(default=6, metadata=_check(_non_negative))
    backoff_s: float = field(default=1.0, metadata=_check(_non_negative))
    max_backoff_s: float = field(default=10.0, metadata=_check(_non_negative))


def _one_of(*choices: str):
    def check(v) -> Optional[str]:
        return None if v in choices else f"must be one of {', '.join(choices)}"
    return check


@dataclass(frozen=True)
class DecodeConfig:
    """How images become the model's input; docs/job.md, "Decode".

    mode: `fast` (default: libjpeg-turbo DCT-scaled JPEG decode + torch's antialiased
    resize, 2-5x the paper's speed per core, within ~0.15 uint8 levels on average) or
    `exact` (the paper's Pillow transform bit for bit; use it for evaluation and paper
    reproduction). device: where JPEGs are decoded: `cpu` (decode tasks), `gpu` (the
    inference actors, nvJPEG; fast mode only), `auto` (gpu when the actors have one).
    jpeg_draft: exact mode only, the old Pillow draft switch (large JPEGs decoded at
    1/2-1/8 scale, never below 768 px, then Pillow's resize); fast mode already does this.
    """

    max_bytes: int = field(default=DEFAULT_MAX_BYTES, metadata=_check(_positive))
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata=_check(_positive))
    mode: str = field(default="fast", metadata=_check(_one_of("fast", "exact")))
    device: str = field(default="auto", metadata=_check(_one_of("auto", "cpu", "gpu")))
    jpeg_draft: bool = False
    batch_size: int = field(default=16, metadata=_check(_positive))
    num_cpus: float = field(default=0.5, metadata=_check(_positive))
    tasks: Optional[int] = field(default=None, metadata=_check(_positive))

    def __post_init__(self):
        if self.jpeg_draft and self.mode != "exact":
            raise ConfigError("decode.jpeg_draft: applies to decode.mode: exact only (fast mode already decodes "
                              "large JPEGs at reduced scale); set decode.mode: exact to keep the old draft decode, "
                              "or remove decode.jpeg_draft")
        if self.device == "gpu" and self.mode == "exact":
            raise ConfigError("decode.device: gpu decodes with nvJPEG, which is not the paper's exact decode; "
                              "use decode.mode: fast with it, or decode.device: cpu (or auto) with exact mode")

    def limits(self):
        """The `preprocess.DecodeLimits` every decode of this run uses (tasks, actors and fallbacks alike)."""
        from ..preprocess import DecodeLimits

        return DecodeLimits(max_bytes=self.max_bytes, max_pixels=self.max_pixels, mode=self.mode,
                            jpeg_draft=self.jpeg_draft)

    def in_actor(self, actor_device: Optional[str]) -> bool:
        """Whether JPEG bytes travel compressed to the inference actors and are decoded there (nvJPEG).

        `actor_device` is the actors' torch device (`cuda`, `cuda:0`, `cpu`; None: CPU).
        Exact mode always decodes in the CPU tasks; `gpu` on CPU actors is a mistake, said at once.
        """
        on_gpu = bool(actor_device) and str(actor_device).startswith("cuda")
        if self.device == "gpu" and not on_gpu:
            raise ConfigError(f"decode.device: gpu needs GPU inference actors, but they run on "
                              f"{actor_device or 'cpu'}; use decode.device: auto or cpu")
        return self.mode == "fast" and (self.device == "gpu" or (self.device == "auto" and on_gpu))


@dataclass(frozen=True)
class InferenceConfig:
    batch_size: int = field(default=32, metadata=_check(_positive))
    actors: Optional[int] = field(default=None, metadata=_check(_positive))
    gpus_per_actor: Optional[float] = field(default=None, metadata=_check(_non_negative))
    num_cpus: float = field(default=1.0, metadata=_check(_positive))
    torch_threads: Optional[int] = field(default=None, metadata=_check(_positive))
    device: Optional[str] = None
    dtype: str = "fp32"
    chunk_size: int = field(default=1024, metadata=_check(_positive))
    score_floor: float = field(default=0.1, metadata=_check(_unit_interval))
    driver_max_images: int = field(default=200, metadata=_check(_non_negative))
    # Ray restarts a crashed replica and re-sends its batch, this many times (-1: forever)
    max_restarts: int = field(default=5, metadata=_check(_retry_count))
    max_task_retries: int = field(default=-1, metadata=_check(_retry_count))
    # elastic pool (null = actors: a fixed pool); with no live node able to host one replica
    # for capacity_wait_s the run fails, uncommitted, and a re-run resumes it
    min_actors: Optional[int] = field(default=None, metadata=_check(_positive))
    max_actors: Optional[int] = field(default=None, metadata=_check(_positive))
    capacity_wait_s: float = field(default=600.0, metadata=_check(_positive))


@dataclass(frozen=True)
class VocabularyConfig:
    file: Optional[str] = None
    tags: Optional[tuple[str, ...]] = None
    tags_file: Optional[str] = None
    threshold: Optional[float] = field(default=None, metadata=_check(_unit_interval))
    thresholds_file: Optional[str] = None


@dataclass(frozen=True)
class LayoutConfig:
    shards: int = field(default=8, metadata=_check(_positive))
    rows_per_file: int = field(default=100_000, metadata=_check(_positive))
    compression: str = "zstd"
    keep_listing: bool = False


@dataclass(frozen=True)
class IncrementalConfig:
    retry_stages: tuple[str, ...] = ("list", "fetch", "infer")
    resume: bool = True
    stale_after_s: float = field(default=120.0, metadata=_check(_positive))


@dataclass(frozen=True)
class TableConfig:
    # a commit that conflicts with another run's is re-run on the new version this often
    commit_retries: int = field(default=5, metadata=_check(_non_negative))
    optimize_every: int = field(default=30, metadata=_check(_non_negative))
    vacuum_retention_hours: Optional[float] = field(default=168.0, metadata=_check(_non_negative))
    target_file_size: Optional[int] = field(default=None, metadata=_check(_positive))


@dataclass(frozen=True)
class CacheConfig:
    image_tokens: bool = False
    token_dtype: str = "fp16"


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None
    num_cpus: Optional[int] = field(default=None, metadata=_check(_positive))
    progress_interval_s: float = field(default=10.0, metadata=_check(_positive))
    progress_bars: bool = True


@dataclass(frozen=True)
class JobConfig:
    input: tuple[str, ...] = ()
    output: Optional[str] = None
    checkpoint: Optional[str] = None
    run_id: Optional[str] = None
    mode: str = "missing"
    storage: StorageConfig = StorageConfig()
    listing: ListingConfig = ListingConfig()
    fetch: FetchConfig = FetchConfig()
    decode: DecodeConfig = DecodeConfig()
    inference: InferenceConfig = InferenceConfig()
    vocabulary: VocabularyConfig = VocabularyConfig()
    layout: LayoutConfig = LayoutConfig()
    incremental: IncrementalConfig = IncrementalConfig()
    table: TableConfig = TableConfig()
    cache: CacheConfig = CacheConfig()
    ray: RayConfig = RayConfig()


# -- building from plain data --------------------------------------------------------------

def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(tp, value, key: str):
    if key.rsplit(".", 1)[-1] in SECRET_KEYS and not (value is None or (isinstance(value, str) and value.strip())):
        raise ConfigError(f"{key}: must be a non-empty string (value not shown: it is a secret)")
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must be set ({_type_name(inner)}), got null")
    if dataclasses.is_dataclass(inner):
        return _build(inner, value, key + ".")
    if typing.get_origin(inner) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{key}: must be a list of strings, got {value!r}")
        return tuple(value)
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if inner is str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: must be a non-empty string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {inner}")  # pragma: no cover


def _build(cls, data, prefix: str = ""):
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for k in data:
        if k not in known:
            near = difflib.get_close_matches(str(k), list(known), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; known keys here: {', '.join(known)}"
            raise ConfigError(f"unknown key '{prefix}{k}'{hint}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        key = prefix + name
        value = _coerce(hints[name], data[name], key)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{key}: {problem}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def yaml_problem(e: "yaml.YAMLError") -> str:
    """One line for a YAML error; a language-specific tag (`!!python/object`) is named as refused.

    Files are read with yaml.safe_load, which builds plain values only; such a tag in a job
    config is either a mistake or an attempt to run code, and "not valid YAML" hides which.
    """
    where = ""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = f" (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in str(getattr(e, "problem", "")):
        tag = re.search(r"tag '([^']*)'", e.problem)
        return (f"refused: the YAML tag {tag.group(1) if tag else ''!r}{where} would build a program object; "
                "only plain values, lists and mappings are allowed")
    return f"not valid YAML{where}: {' '.join(str(getattr(e, 'problem', None) or e).split())}"


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings; values are parsed as YAML so `true`, `8` and `[a, b]` work."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set decode.jpeg_draft=false")
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v) if v.strip() else None))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {k}: {yaml_problem(e)}") from None
    return out


def load_config(path: Optional[str] = None, *, inputs: Optional[list[str]] = None, output: Optional[str] = None,
                checkpoint: Optional[str] = None, run_id: Optional[str] = None,
                vocab: Optional[str] = None, mode: Optional[str] = None,
                overrides: Optional[list[tuple[str, Any]]] = None, require_uris: bool = True) -> JobConfig:
    """YAML file (optional), then `--set` overrides, then the explicit flags; then validate."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: {yaml_problem(e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = copy.deepcopy(loaded or {})
    for k, v in overrides or []:
        _set_dotted(data, k, v)
    if inputs:
        data["input"] = list(inputs)
    for key, value in (("output", output), ("checkpoint", checkpoint), ("run_id", run_id), ("mode", mode)):
        if value is not None:
            data[key] = value
    if vocab is not None:
        section = data.setdefault("vocabulary", {})
        if not isinstance(section, dict):
            raise ConfigError("vocabulary: must be a mapping of keys to values")
        section["file"] = vocab
    cfg = _build(JobConfig, data)
    validate(cfg, require_uris=require_uris)
    return cfg


# -- cross-field checks (no I/O: existence is checked by storage.preflight) ----------------

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def uri_scheme(uri: str) -> str:
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else "file"


def _check_uri(key: str, uri: str) -> None:
    scheme = uri_scheme(uri)
    if scheme == "file":
        return
    import fsspec

    if scheme not in fsspec.available_protocols():
        raise ConfigError(f"{key}: unsupported URI scheme '{scheme}://' in {redact_uri(uri)}")
    if scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        rest = uri.split("://", 1)[1]
        bucket = rest.split("/", 1)[0]
        if "@" in bucket:
            raise ConfigError(f"{key}: '{redact_uri(uri)}': keys in the URI are not supported (they would end up in "
                              "logs and output rows); use storage.access_key_id / storage.secret_access_key or "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if len(bucket) < 3:
            raise ConfigError(f"{key}: '{redact_uri(uri)}' has no valid bucket name")


def _norm_prefix(uri: str) -> str:
    if uri_scheme(uri) == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return "file://" + str(Path(path).expanduser().absolute()).rstrip("/") + "/"
    return uri.rstrip("/") + "/"


def validate(cfg: JobConfig, require_uris: bool = True) -> None:
    if require_uris:
        if not cfg.input:
            raise ConfigError("input: no input given; pass --input URI (repeatable) or set 'input' in the config")
        if not cfg.output:
            raise ConfigError("output: no output given; pass --output URI or set 'output' in the config")
        if not cfg.checkpoint:
            raise ConfigError("checkpoint: no checkpoint given; pass --checkpoint PATH_OR_URI or set 'checkpoint'")
    for i, uri in enumerate(cfg.input):
        _check_uri(f"input[{i}]", uri)
    if cfg.output:
        _check_uri("output", cfg.output)
    if cfg.checkpoint:
        _check_uri("checkpoint", cfg.checkpoint)
    prefixes = [_norm_prefix(u) for u in cfg.input]
    for i, a in enumerate(prefixes):
        for j, b in enumerate(prefixes):
            if i != j and b.startswith(a):
                raise ConfigError(f"input[{j}]: {redact_uri(cfg.input[j])} is inside input[{i}] "
                                  f"({redact_uri(cfg.input[i])}); its images would be tagged twice")
    if cfg.output:
        out = _norm_prefix(cfg.output)
        for i, a in enumerate(prefixes):
            if out.startswith(a) or a.startswith(out):
                raise ConfigError(f"output: {redact_uri(cfg.output)} overlaps input[{i}] ({redact_uri(cfg.input[i])}); "
                                  "write the results somewhere the listing does not read")
    if cfg.run_id is not None and not _RUN_ID.match(cfg.run_id):
        raise ConfigError(f"run_id: {cfg.run_id!r} must be letters, digits, '-', '_' or '.' (it names files)")
    for i, ext in enumerate(cfg.listing.extensions):
        if not ext.startswith(".") or len(ext) < 2:
            raise ConfigError(f"listing.extensions[{i}]: {ext!r} must look like '.jpg'")
    if cfg.layout.compression not in ("zstd", "snappy", "gzip", "lz4", "brotli", "none"):
        raise ConfigError(f"layout.compression: {cfg.layout.compression!r} is not one of zstd, snappy, gzip, lz4, brotli, none")
    if cfg.inference.dtype not in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16"):
        raise ConfigError(f"inference.dtype: {cfg.inference.dtype!r} is not one of fp32, bf16, fp16")
    if cfg.inference.device is not None and not re.match(r"^(cpu|cuda(:\d+)?)$", cfg.inference.device):
        raise ConfigError(f"inference.device: {cfg.inference.device!r} must be cpu, cuda or cuda:N")
    if cfg.vocabulary.tags is not None and cfg.vocabulary.tags_file is not None:
        raise ConfigError("vocabulary.tags_file: give either vocabulary.tags or vocabulary.tags_file, not both")
    if cfg.vocabulary.threshold is not None and cfg.vocabulary.thresholds_file is not None:
        raise ConfigError("vocabulary.thresholds_file: give either vocabulary.threshold or vocabulary.thresholds_file, not both")
    for key in ("tags_file", "thresholds_file", "file"):
        path = getattr(cfg.vocabulary, key)
        if path is not None and uri_scheme(path) == "file" and not Path(path.removeprefix("file://")).is_file():
            raise ConfigError(f"vocabulary.{key}: file not found: {path}")
    if cfg.mode not in ("missing", "all"):
        raise ConfigError(f"mode: {cfg.mode!r} is not one of missing (only what has no committed result), all")
    for i, st in enumerate(cfg.incremental.retry_stages):
        if st not in ("list", "fetch", "decode", "infer"):
            raise ConfigError(f"incremental.retry_stages[{i}]: {st!r} is not one of list, fetch, decode, infer")
    if cfg.cache.token_dtype not in ("fp16", "fp32"):
        raise ConfigError(f"cache.token_dtype: {cfg.cache.token_dtype!r} is not one of fp16, fp32")
    if cfg.vocabulary.tags is not None and not cfg.vocabulary.tags:
        raise ConfigError("vocabulary.tags: the list is empty; leave it null to use every tag")


# -- for the manifest ------------------------------------------------------------------------

_USERINFO = re.compile(r"(^[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact_uri(uri: str) -> str:
    """Drop `user:password@` from URLs such as ftp://u:p@host/ before they reach a log."""
    return _USERINFO.sub(r"\1***@", uri)


def redacted(cfg: JobConfig) -> dict:
    """The config as plain data with secrets replaced, for the manifest and the logs."""
    d = dataclasses.asdict(cfg)
    for k in SECRET_KEYS:
        if d["storage"].get(k):
            d["storage"][k] = REDACTED
    d["input"] = [redact_uri(u) for u in d["input"]]
    for k in ("output", "checkpoint"):
        if d[k]:
            d[k] = redact_uri(d[k])
    if d["vocabulary"].get("file"):
        d["vocabulary"]["file"] = redact_uri(d["vocabulary"]["file"])
    return _lists(d)


def _lists(x):
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


def describe_keys(cls=JobConfig, prefix: str = "") -> list[str]:
    """Every settable key, for --help and the docs test that keeps conf/default.yaml complete."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        inner, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            out += describe_keys(inner, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out

"""Job settings: one YAML file, a few CLI flags on top, validated before any work starts.

A nightly job that fails after an hour because of a typo in a key is the failure we most
want to avoid, so every key is declared here as a pydantic model field: an unknown key, a
wrong type, a value out of range or a bad URI stops the run at once with one short sentence
that names the key (and the nearest known one for typos). The ranges are what a sane run
can use (conf/default.yaml states them): a retry count of 10^9 or 10^30 bytes is a typo,
and refusing it here beats an overflow deep in Ray or pyarrow. The sections are frozen
models, so the rest of the job reads `cfg.decode.max_bytes` rather than dictionary lookups
that fail late.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .. import plain_yaml
from ..errors import ConfigError
from ..preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..schema_errors import KeyProblem, clip, explain
from ..schema_types import Flag, Int, Num, Section, Text, Texts, listed, matching

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")
REDACTED = "***"
Secret = Annotated[Optional[Text], Field(repr=False)]
Retries = Annotated[Int, Field(ge=-1, le=1000)]  # -1: no limit


class StorageConfig(Section):
    """Object-store access; every field falls back to the AWS_* environment when unset."""

    endpoint_url: Optional[Text] = None
    access_key_id: Secret = None
    secret_access_key: Secret = None
    session_token: Secret = None
    region: Optional[Text] = None
    # attempts per request of the Parquet client (data files, listing shards, manifests)
    max_attempts: Int = Field(10, gt=0, le=100)


Extension = Annotated[Text, matching(r"^\.[^\s/]{1,15}$", "must look like '.jpg'")]


class ListingConfig(Section):
    extensions: listed(Extension) = Field(IMAGE_EXTENSIONS, min_length=1, max_length=100)
    rows_per_file: Int = Field(100_000, gt=0, le=10_000_000)
    follow_links: Flag = False  # off: only links to files inside the input folder are listed
    parallelism: Int = Field(8, gt=0, le=256)  # S3 folder listings at once


class FetchConfig(Section):
    threads: Int = Field(8, gt=0, le=256)
    retries: Int = Field(6, ge=0, le=100)
    backoff_s: Num = Field(1.0, ge=0, le=3600)
    max_backoff_s: Num = Field(10.0, ge=0, le=3600)


class DecodeConfig(Section):
    """How images become the model's input; docs/job.md, "Decode".

    mode: `fast` (default: libjpeg-turbo DCT-scaled JPEG decode + torch's antialiased
    resize, 2-5x the paper's speed per core, within ~0.15 uint8 levels on average) or
    `exact` (the paper's Pillow transform bit for bit; use it for evaluation and paper
    reproduction). device: where JPEGs are decoded: `cpu` (decode tasks), `gpu` (the
    inference actors, nvJPEG; fast mode only), `auto` (gpu when the actors have one).
    jpeg_draft: exact mode only, the old Pillow draft switch (large JPEGs decoded at
    1/2-1/8 scale, never below 768 px, then Pillow's resize); fast mode already does this.
    """

    max_bytes: Int = Field(DEFAULT_MAX_BYTES, gt=0, le=2**36)
    max_pixels: Int = Field(DEFAULT_MAX_PIXELS, gt=0, le=2**34)
    mode: Literal["fast", "exact"] = "fast"
    device: Literal["auto", "cpu", "gpu"] = "auto"
    jpeg_draft: Flag = False
    batch_size: Int = Field(16, gt=0, le=4096)
    num_cpus: Num = Field(0.5, gt=0, le=1024)
    tasks: Optional[Int] = Field(None, gt=0, le=100_000)

    @model_validator(mode="after")
    def _mode_fits(self):
        if self.jpeg_draft and self.mode != "exact":
            raise KeyProblem("jpeg_draft", "applies to decode.mode: exact only (fast mode already decodes large "
                             "JPEGs at reduced scale); set decode.mode: exact to keep the old draft decode, "
                             "or remove decode.jpeg_draft")
        if self.device == "gpu" and self.mode == "exact":
            raise KeyProblem("device", "gpu decodes with nvJPEG, which is not the paper's exact decode; use "
                             "decode.mode: fast with it, or decode.device: cpu (or auto) with exact mode")
        return self

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


class InferenceConfig(Section):
    batch_size: Int = Field(32, gt=0, le=65_536)
    actors: Optional[Int] = Field(None, gt=0, le=10_000)
    gpus_per_actor: Optional[Num] = Field(None, ge=0, le=64)
    num_cpus: Num = Field(1.0, gt=0, le=1024)
    torch_threads: Optional[Int] = Field(None, gt=0, le=1024)
    device: Optional[Annotated[Text, matching(r"^(cpu|cuda(:\d{1,3})?)$", "must be cpu, cuda or cuda:N")]] = None
    dtype: Literal["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = "fp32"
    chunk_size: Int = Field(1024, gt=0, le=1_000_000)
    score_floor: Num = Field(0.1, ge=0, le=1)
    driver_max_images: Int = Field(200, ge=0, le=1_000_000)
    # Ray restarts a crashed replica and re-sends its batch, this many times (-1: forever)
    max_restarts: Retries = 5
    max_task_retries: Retries = -1
    # elastic pool (null = actors: a fixed pool); with no live node able to host one replica
    # for capacity_wait_s the run fails, uncommitted, and a re-run resumes it
    min_actors: Optional[Int] = Field(None, gt=0, le=10_000)
    max_actors: Optional[Int] = Field(None, gt=0, le=10_000)
    capacity_wait_s: Num = Field(600.0, gt=0, le=7 * 86400)


class VocabularyConfig(Section):
    file: Optional[Text] = None
    tags: Optional[Texts] = Field(None, min_length=1)
    tags_file: Optional[Text] = None
    threshold: Optional[Num] = Field(None, ge=0, le=1)
    thresholds_file: Optional[Text] = None

    @model_validator(mode="after")
    def _one_of_each(self):
        if self.tags is not None and self.tags_file is not None:
            raise KeyProblem("tags_file", "give either vocabulary.tags or vocabulary.tags_file, not both")
        if self.threshold is not None and self.thresholds_file is not None:
            raise KeyProblem("thresholds_file", "give either vocabulary.threshold or vocabulary.thresholds_file, not both")
        return self


class LayoutConfig(Section):
    shards: Int = Field(8, gt=0, le=4096)
    rows_per_file: Int = Field(100_000, gt=0, le=10_000_000)
    compression: Literal["zstd", "snappy", "gzip", "lz4", "brotli", "none"] = "zstd"
    keep_listing: Flag = False


class IncrementalConfig(Section):
    retry_stages: tuple[Literal["list", "fetch", "decode", "infer"], ...] = ("list", "fetch", "infer")
    resume: Flag = True
    stale_after_s: Num = Field(120.0, gt=0, le=7 * 86400)


class TableConfig(Section):
    # a commit that conflicts with another run's is re-run on the new version this often
    commit_retries: Int = Field(5, ge=0, le=100)
    optimize_every: Int = Field(30, ge=0, le=1_000_000)
    vacuum_retention_hours: Optional[Num] = Field(168.0, ge=0, le=10 * 365 * 24)
    target_file_size: Optional[Int] = Field(None, gt=0, le=2**40)


class CacheConfig(Section):
    image_tokens: Flag = False
    token_dtype: Literal["fp16", "fp32"] = "fp16"


class RayConfig(Section):
    address: Optional[Text] = None
    num_cpus: Optional[Int] = Field(None, gt=0, le=1_000_000)
    progress_interval_s: Num = Field(10.0, gt=0, le=86400)
    progress_bars: Optional[Flag] = None  # null: on only when stderr is a terminal


class JobConfig(Section):
    input: Texts = ()
    output: Optional[Text] = None
    checkpoint: Optional[Text] = None
    run_id: Optional[Annotated[Text, matching(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                                               "must be letters, digits, '-', '_' or '.' (it names files)")]] = None
    mode: Literal["missing", "all"] = "missing"
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


# -- reading: the file, then --set, then the flags -------------------------------------------

def _set_dotted(d: dict, dotted_key: str, value) -> None:
    parts = dotted_key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {clip(dotted_key)}: '{clip(p)}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings; values are parsed as YAML so `true`, `8` and `[a, b]` work."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {clip(item)!r}: expected key=value, e.g. --set decode.jpeg_draft=false")
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), plain_yaml.safe_load(v) if v.strip() else None))
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {clip(k)}: {plain_yaml.problem(e)}") from None
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
            raise ConfigError(f"--config: file not found: {clip(path)}")
        try:
            loaded = plain_yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {clip(path)}: {plain_yaml.problem(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {clip(path)}: not UTF-8 text (byte {e.start})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config {clip(path)}: the top level must be a mapping of keys, "
                              f"got {type(loaded).__name__}")
        data = loaded or {}
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
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e, JobConfig, hidden=SECRET_KEYS)) from None
    validate(cfg, require_uris=require_uris)
    return cfg


# -- checks across keys (no I/O but local files: existence is checked by storage.preflight) -----

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def uri_scheme(uri: str) -> str:
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else "file"


def _check_uri(key: str, uri: str) -> None:
    scheme = uri_scheme(uri)
    if scheme == "file":
        return
    import fsspec

    if scheme not in fsspec.available_protocols():
        raise ConfigError(f"{key}: unsupported URI scheme '{clip(scheme, 20)}://' in {shown_uri(uri)}")
    if scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        rest = uri.split("://", 1)[1]
        bucket = rest.split("/", 1)[0]
        if "@" in bucket:
            raise ConfigError(f"{key}: '{shown_uri(uri)}': keys in the URI are not supported (they would end up in "
                              "logs and output rows); use storage.access_key_id / storage.secret_access_key or "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if len(bucket) < 3:
            raise ConfigError(f"{key}: '{shown_uri(uri)}' has no valid bucket name")


def _norm_prefix(uri: str) -> str:
    """A prefix to compare URIs by; a local path with its symlinks resolved, so a link cannot hide an overlap."""
    if uri_scheme(uri) == "file":
        return "file://" + os.path.realpath(_local(uri)).rstrip("/") + "/"
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
                raise ConfigError(f"input[{j}]: {shown_uri(cfg.input[j])} is inside input[{i}] "
                                  f"({shown_uri(cfg.input[i])}); its images would be tagged twice")
    if cfg.output:
        out = _norm_prefix(cfg.output)
        for i, a in enumerate(prefixes):
            if out.startswith(a) or a.startswith(out):
                raise ConfigError(f"output: {shown_uri(cfg.output)} overlaps input[{i}] ({shown_uri(cfg.input[i])})"
                                  f"{_via_link(cfg.output)}; write the results somewhere the listing does not read")
    for key in ("tags_file", "thresholds_file", "file"):
        path = getattr(cfg.vocabulary, key)
        if path is not None and uri_scheme(path) == "file" and not Path(path.removeprefix("file://")).is_file():
            raise ConfigError(f"vocabulary.{key}: file not found: {clip(path)}")


def _local(uri: str) -> str:
    return os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri)


def _via_link(uri: str) -> str:
    """' (a link to /real/path)' when a symlink is what makes the overlap, so the message explains itself."""
    if uri_scheme(uri) != "file" or os.path.realpath(_local(uri)) == os.path.abspath(_local(uri)):
        return ""
    return f" (a link to {clip(os.path.realpath(_local(uri)), 200)})"


# -- for the manifest ------------------------------------------------------------------------

_USERINFO = re.compile(r"(^[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact_uri(uri: str) -> str:
    """Drop `user:password@` from URLs such as ftp://u:p@host/ before they reach a log."""
    return _USERINFO.sub(r"\1***@", uri)


def shown_uri(uri: str) -> str:
    """A URI as a message repeats it: without userinfo, at most a line's worth."""
    return clip(redact_uri(uri), 200)


def redacted(cfg: JobConfig) -> dict:
    """The config as plain data with secrets replaced, for the manifest and the logs."""
    d = cfg.model_dump(mode="json")
    for k in SECRET_KEYS:
        if d["storage"].get(k):
            d["storage"][k] = REDACTED
    d["input"] = [redact_uri(u) for u in d["input"]]
    for k in ("output", "checkpoint"):
        if d[k]:
            d[k] = redact_uri(d[k])
    if d["vocabulary"].get("file"):
        d["vocabulary"]["file"] = redact_uri(d["vocabulary"]["file"])
    return d


def describe_keys(cls: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Every settable key, for --help and the docs test that keeps conf/default.yaml complete."""
    out = []
    for name, info in cls.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += describe_keys(info.annotation, prefix + name + ".")
        else:
            out.append(prefix + name)
    return out

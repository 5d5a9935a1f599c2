"""Where bytes live: one picklable recipe that builds fsspec and pyarrow filesystems anywhere.

The driver resolves the object-store settings once (config first, then the AWS_* variables)
and ships this recipe to every Ray task and actor, so a worker on another node reaches the
same endpoint with the same keys even if its environment differs. The recipe is the only
place the keys live; its repr and `describe()` never show them, and `scrub()` removes them
from any text (client error messages) before it reaches a log, a manifest or an error row.

Retries are explicit and bounded per client, so an outage of the store has a known cost:
the Parquet client (pyarrow: listing shards, data files, manifests) retries each request
`storage.max_attempts` times with the AWS SDK's exponential backoff (25 ms x 2^n: 10 attempts
wait 25 s in all); the image client (s3fs, `fetch_fs`) makes exactly one request per call
and the reader owns the retry policy (`fetch.retries`, `fetch.backoff_s`, `fetch.max_backoff_s`).
Left at their defaults, botocore and s3fs would nest their retries (5 x 5 attempts, ~10 s per
call against a refused connection) under the reader's and turn a minute of outage into many.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote_to_bytes, urlparse

from ..errors import ConfigError
from .config import StorageConfig, redact_uri, uri_scheme

_S3_SCHEMES = ("s3", "s3a")
DEFAULT_MAX_ATTEMPTS = 10
_cache: dict = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Storage:
    endpoint_url: Optional[str] = None
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    session_token: Optional[str] = None
    region: Optional[str] = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    @classmethod
    def from_config(cls, cfg: StorageConfig, environ: Optional[dict] = None) -> "Storage":
        env = os.environ if environ is None else environ
        # `or None`: an empty variable is unset, as in botocore and the AWS SDK (the chain goes on)
        key = cfg.access_key_id or env.get("AWS_ACCESS_KEY_ID") or None
        secret = cfg.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY") or None
        if bool(key) != bool(secret):
            raise ConfigError("storage.access_key_id / storage.secret_access_key: give both or neither "
                              "(in the config or as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        endpoint = cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            u = urlparse(endpoint)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise ConfigError(f"storage.endpoint_url: {endpoint!r} must look like http://host:port")
        return cls(
            endpoint_url=endpoint,
            access_key_id=key,
            secret_access_key=secret,
            session_token=cfg.session_token or env.get("AWS_SESSION_TOKEN") or None,
            region=cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            max_attempts=getattr(cfg, "max_attempts", DEFAULT_MAX_ATTEMPTS),
        )

    def __repr__(self) -> str:
        return f"Storage({self.describe()})"

    def describe(self) -> str:
        keys = "keys from config/env" if self.access_key_id else "default credential chain"
        endpoint = redact_uri(self.endpoint_url) if self.endpoint_url else "default"
        return f"endpoint={endpoint}, region={self.region or 'default'}, {keys}"

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.access_key_id, self.secret_access_key, self.session_token) if s)

    def scrub(self, text: str) -> str:
        """`text` without this recipe's keys or any `user:password@` of a URL in it."""
        return scrub(text, self.secrets())

    # -- fsspec -------------------------------------------------------------------------
    def fsspec(self, uri: str):
        """(filesystem, path) for listing and reading objects."""
        scheme = uri_scheme(uri)
        if scheme == "file":
            return _cached(("file",), _local_fs), local_path(uri)
        if scheme in _S3_SCHEMES:
            return _cached(("s3", self), self._s3fs), uri.split("://", 1)[1]
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path

    def fetch_fs(self, uri: str):
        """(filesystem, path) whose every call is a single request: the caller retries."""
        if uri_scheme(uri) in _S3_SCHEMES:
            return _cached(("s3-once", self), lambda: self._s3fs(single_attempt=True)), uri.split("://", 1)[1]
        return self.fsspec(uri)

    def list_fs(self, uri: str, make_session):
        """(s3fs filesystem, path) for S3 listings on `make_session()` (s3_listing's), made once."""
        return _cached(("s3-list", self), lambda: self._s3fs(session=make_session())), uri.split("://", 1)[1]

    def _s3fs(self, single_attempt: bool = False, session=None):
        import s3fs

        client_kwargs = {"region_name": self.region} if self.region else {}
        config_kwargs = {"retries": {"total_max_attempts": 1, "mode": "standard"}} if single_attempt else None
        fs = s3fs.S3FileSystem(
            session=session,
            endpoint_url=self.endpoint_url,
            key=self.access_key_id,
            secret=self.secret_access_key,
            token=self.session_token,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            use_listings_cache=False,
            skip_instance_cache=True,
        )
        if single_attempt:
            fs.retries = 1  # s3fs's own loop around botocore (class default 5)
        return fs

    # -- pyarrow (Parquet reads and writes, Ray Data) ---------------------------------------
    def pyarrow(self, uri: str):
        """(pyarrow filesystem, path) for Parquet; S3 uses pyarrow's native client."""
        import pyarrow.fs as pafs

        scheme = uri_scheme(uri)
        if scheme == "file":
            return _cached(("pa-file",), pafs.LocalFileSystem), local_path(uri)
        if scheme in _S3_SCHEMES:
            return _cached(("pa-s3", self), self._pa_s3), uri.split("://", 1)[1].rstrip("/")
        fs, path = self.fsspec(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

    def _pa_s3(self):
        import pyarrow.fs as pafs

        kw = {}
        if self.endpoint_url:
            u = urlparse(self.endpoint_url)
            kw["endpoint_override"] = u.netloc
            kw["scheme"] = u.scheme
        if self.access_key_id:
            kw.update(access_key=self.access_key_id, secret_key=self.secret_access_key,
                      session_token=self.session_token)
        region = self.region or ("us-east-1" if self.endpoint_url else None)
        if region:
            kw["region"] = region
        kw["retry_strategy"] = pafs.AwsDefaultS3RetryStrategy(max_attempts=self.max_attempts)
        return pafs.S3FileSystem(**kw)


_USERINFO_ANYWHERE = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")


def scrub(text: str, secrets=()) -> str:
    """Replace each secret (and any URL's `user:password@`) in text with `***`.

    Client libraries put what they were given into their messages (URLs with userinfo,
    sometimes a key id); every message that leaves the job passes through here.
    """
    if not text:
        return text
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, "***")
    return _USERINFO_ANYWHERE.sub(r"\1***@", text)


def _local_fs():
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def _cached(key, make):
    """One filesystem object per process and recipe: clients are costly to build per object."""
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _cache[key] = make()
        return fs


def ensure_dir(fs, path: str) -> None:
    """Create a folder where folders exist; object stores get none (no empty marker objects,
    which S3-compatible stores may keep as phantom folders after the data is deleted)."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.S3FileSystem):
        return
    fs.create_dir(path, recursive=True)


def local_path(uri: str) -> str:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return _from_uri_text(str(Path(path).expanduser().absolute()))


def to_uri(scheme: str, path: str) -> str:
    """The URI recorded in the output for a listed object (always with a scheme)."""
    if scheme == "file":
        return "file://" + _uri_text(path)
    return f"{scheme}://{path}"


def _uri_text(path: str) -> str:
    """A local path as text a table can hold.

    A name that is not UTF-8 (Latin-1 names from SMB shares or old archives) comes from the
    OS with surrogate escapes, which no Arrow string or hash accepts. Such a path is written
    with its non-ASCII bytes and its '%' percent-encoded so `local_path` can rebuild the
    exact bytes; every UTF-8 path stays as it always was, so no existing URI changes.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "".join(chr(b) if b < 0x80 and b != 0x25 else f"%{b:02X}" for b in os.fsencode(path))


def _from_uri_text(path: str) -> str:
    """The OS path of `_uri_text`'s output (a path that exists as spelled is taken as it is)."""
    if "%" not in path or os.path.lexists(path):
        return path
    raw = unquote_to_bytes(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(raw)
    return path


def encoded_name_taken(path: str) -> bool:
    """Whether a non-UTF-8 path's URI spelling is itself the name of another file (then the
    URI would be ambiguous: the listing leaves that object out and says so)."""
    text = _uri_text(path)
    return text != path and os.path.lexists(text)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts])


def preflight(cfg, storage: Storage, checkpoint: bool = True) -> None:
    """Cheap existence and access checks so a wrong path fails before listing or Ray start.

    `checkpoint` False: the job checks the checkpoint itself, after the vocabulary files and
    a real write under the output (runner.run), so the cheaper mistakes are said first.
    """
    for i, uri in enumerate(cfg.input):
        _check_readable(f"input[{i}]", uri, storage, want_dir=True)
    _check_output(cfg, storage)
    if cfg.checkpoint and checkpoint:  # last: its error says where to get one, once the rest is known to be right
        from ..release import GET_IT

        _check_readable("checkpoint", cfg.checkpoint, storage, want_dir=False, hint=GET_IT)


def _check_output(cfg, storage: Storage) -> None:
    if cfg.output and uri_scheme(cfg.output) == "file":
        parent = Path(local_path(cfg.output))
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"output: {cfg.output} cannot be a folder because {parent} is a file; "
                              "choose another output or move that file")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"output: {cfg.output} is not writable (no write permission on {parent})")
    elif cfg.output and uri_scheme(cfg.output) in _S3_SCHEMES:
        fs, path = storage.fsspec(cfg.output)
        # the bucket must exist and let us list; an empty bucket or a new prefix is fine
        _s3_call("output", cfg.output, lambda: _s3_probe(fs, path.split("/", 1)[0]), storage)


def _check_readable(key: str, uri: str, storage: Storage, want_dir: bool, hint: str = "") -> None:
    scheme = uri_scheme(uri)
    hint = f". {hint}" if hint else ""
    if scheme == "file":
        p = Path(local_path(uri))
        if not p.exists():
            raise ConfigError(f"{key}: {uri} does not exist{hint}")
        if not want_dir and not p.is_file():
            raise ConfigError(f"{key}: {uri} is not a file{hint}")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{key}: {uri} is not readable (permission denied)")
        return
    fs, path = storage.fsspec(uri)
    if want_dir and scheme in _S3_SCHEMES:
        def probe():
            if not _s3_probe(fs, path):
                raise FileNotFoundError(path)
    elif want_dir:
        def probe():
            if fs.isdir(path) or fs.isfile(path):
                return
            raise FileNotFoundError(path)
    else:
        def probe():
            if not fs.isfile(path):
                raise FileNotFoundError(path)
    _s3_call(key, uri, probe, storage, hint)


def _s3_probe(fs, path: str) -> bool:
    """Is there anything at this bucket/prefix (or object)? One list request of 2 keys at most.

    s3fs's isdir/ls list every direct child of a prefix: on a flat prefix of millions of
    images that is thousands of requests and millions of dicts in the driver, before the
    streaming listing even starts.
    """
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")
    key = key.strip("/")

    async def first():
        async for _ in fs._iterdir(bucket, prefix=key + "/" if key else "", delimiter="/", max_items=1):
            return True
        return False

    if sync(fs.loop, first):
        return True
    return bool(key) and fs.isfile(path)


def _s3_call(key: str, uri: str, fn, storage: Optional[Storage] = None, hint: str = "") -> None:
    where = redact_uri(uri)
    secrets = storage.secrets() if storage is not None else ()
    try:
        fn()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {where} does not exist (no such bucket, prefix or object){hint}") from None
    except PermissionError as e:
        raise ConfigError(f"{key}: access to {where} was refused ({scrub(_first_line(e), secrets)}); check the keys "
                          "(storage.* or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None
    except Exception as e:  # noqa: BLE001 - network and client errors of any library
        raise ConfigError(f"{key}: cannot reach {where}: {type(e).__name__}: "
                          f"{scrub(_first_line(e), secrets)}") from None


def last_line(e: BaseException) -> str:
    """An exception's last line: what a chained client error finally says."""
    s = str(e).strip()
    return s.splitlines()[-1] if s else ""


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _s3_sync(fs, method: str, **kwargs):
    """One raw S3 API call through s3fs's client (for what fsspec has no verb for)."""
    from fsspec.asyn import sync

    async def call():
        client = await fs.set_session()  # the client, created on first use
        return await getattr(client, method)(**kwargs)

    return sync(fs.loop, call)


def probe_write(storage: Storage, output: str) -> None:
    """Write and delete one small object under the output, before the checkpoint is read.

    Permission bits say little on network mounts, read-only mounts or object stores; one
    real write says whether the run's results could be written at all, in a second, instead
    of after the model has loaded and the images are tagged.
    """
    import uuid

    from .manifest import put_bytes

    uri = join(output, "_cache", f".write-probe-{uuid.uuid4().hex[:12]}")
    created = []  # local folders this probe makes, removed again: a refused run leaves nothing behind
    if uri_scheme(output) == "file":
        d = Path(local_path(uri)).parent
        while not d.exists():
            created.append(d)
            d = d.parent
    try:
        put_bytes(storage, uri, b"ok")
        fs, path = storage.pyarrow(uri)
        fs.delete_file(path)
        for d in created:
            try:
                d.rmdir()  # only if empty: another process may have started using it
            except OSError:
                break
    except Exception as e:  # noqa: BLE001 - any store's refusal, said in one line
        raise ConfigError(storage.scrub(
            f"output: cannot write under {redact_uri(output)} ({type(e).__name__}: {_first_line(e)[:200]}); "
            "check its permissions and free space, then start the job again")) from None

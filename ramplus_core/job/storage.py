"""Where bytes live: one picklable recipe that builds fsspec and pyarrow filesystems anywhere.

The driver resolves the object-store settings once (config first, then the AWS_* variables)
and ships this recipe to every Ray task and actor, so a worker on another node reaches the
same endpoint with the same keys even if its environment differs. The recipe is the only
place the keys live; its repr and `describe()` never show them.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from ..errors import ConfigError
from .config import StorageConfig, redact_uri, uri_scheme

_S3_SCHEMES = ("s3", "s3a")
_cache: dict = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Storage:
    endpoint_url: Optional[str] = None
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    session_token: Optional[str] = None
    region: Optional[str] = None

    @classmethod
    def from_config(cls, cfg: StorageConfig, environ: Optional[dict] = None) -> "Storage":
        env = os.environ if environ is None else environ
        key = cfg.access_key_id or env.get("AWS_ACCESS_KEY_ID")
        secret = cfg.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY")
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
            session_token=cfg.session_token or env.get("AWS_SESSION_TOKEN"),
            region=cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        )

    def __repr__(self) -> str:
        return f"Storage({self.describe()})"

    def describe(self) -> str:
        keys = "keys from config/env" if self.access_key_id else "default credential chain"
        return f"endpoint={self.endpoint_url or 'default'}, region={self.region or 'default'}, {keys}"

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

    def _s3fs(self):
        import s3fs

        client_kwargs = {"region_name": self.region} if self.region else {}
        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            key=self.access_key_id,
            secret=self.secret_access_key,
            token=self.session_token,
            client_kwargs=client_kwargs,
            use_listings_cache=False,
            skip_instance_cache=True,
        )

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
        return pafs.S3FileSystem(**kw)


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
    return str(Path(path).expanduser().absolute())


def to_uri(scheme: str, path: str) -> str:
    """The URI recorded in the output for a listed object (always with a scheme)."""
    if scheme == "file":
        return "file://" + path
    return f"{scheme}://{path}"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts])


def preflight(cfg, storage: Storage) -> None:
    """Cheap existence and access checks so a wrong path fails before listing or Ray start."""
    for i, uri in enumerate(cfg.input):
        _check_readable(f"input[{i}]", uri, storage, want_dir=True)
    if cfg.checkpoint:
        _check_readable("checkpoint", cfg.checkpoint, storage, want_dir=False)
    if cfg.output and uri_scheme(cfg.output) == "file":
        parent = Path(local_path(cfg.output))
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"output: {cfg.output} is not writable (no write permission on {parent})")
    elif cfg.output and uri_scheme(cfg.output) in _S3_SCHEMES:
        fs, path = storage.fsspec(cfg.output)
        bucket = path.split("/", 1)[0]
        _s3_call(f"output", cfg.output, lambda: fs.ls(bucket, detail=False)[:0])


def _check_readable(key: str, uri: str, storage: Storage, want_dir: bool) -> None:
    scheme = uri_scheme(uri)
    if scheme == "file":
        p = Path(local_path(uri))
        if not p.exists():
            raise ConfigError(f"{key}: {uri} does not exist")
        if not want_dir and not p.is_file():
            raise ConfigError(f"{key}: {uri} is not a file")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{key}: {uri} is not readable (permission denied)")
        return
    fs, path = storage.fsspec(uri)
    if want_dir:
        def probe():
            if fs.isdir(path) or fs.isfile(path):
                return
            raise FileNotFoundError(path)
    else:
        def probe():
            if not fs.isfile(path):
                raise FileNotFoundError(path)
    _s3_call(key, uri, probe)


def _s3_call(key: str, uri: str, fn) -> None:
    where = redact_uri(uri)
    try:
        fn()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {where} does not exist (no such bucket, prefix or object)") from None
    except PermissionError as e:
        raise ConfigError(f"{key}: access to {where} was refused ({_first_line(e)}); check the keys "
                          "(storage.* or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None
    except Exception as e:  # noqa: BLE001 - network and client errors of any library
        raise ConfigError(f"{key}: cannot reach {where}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__

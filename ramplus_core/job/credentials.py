"""Keys from the AWS default credential chain for delta-rs, which does not read profiles.

s3fs (botocore) and pyarrow (the AWS C++ SDK) each walk the whole default chain themselves:
environment, `AWS_PROFILE` with the shared credentials and config files, SSO,
credential_process, web identity, container and instance roles. delta-rs (object_store)
walks only part of it (environment, web identity, container and instance roles) and ignores
profiles: with deltalake 1.6.6, a node whose keys are in `~/.aws/credentials` or under
`AWS_PROFILE` lists and reads its images, then fails at the commit asking the instance
metadata endpoint for keys. For such a node the keys are resolved here, in the process that
commits, through botocore's chain, and handed to delta-rs in its storage options (never
logged); the values are remembered so the run's scrubber removes them from any text.

Sources delta-rs reads itself are left to it: it refreshes role credentials, which keys
passed in once would not be.
"""

from __future__ import annotations

import os
import threading

#: botocore's names for the sources delta-rs resolves (and refreshes) on its own.
DELTA_RESOLVES = frozenset({"env", "iam-role", "container-role", "assume-role-with-web-identity"})
#: what decides where botocore finds keys; a change (a test, a notebook) resolves again
_CHAIN_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
              "AWS_ACCESS_KEY_ID", "AWS_EC2_METADATA_DISABLED")

_lock = threading.Lock()
_chain: dict = {}
_seen: set = set()


def _credentials():
    """botocore's credentials for this process's environment (None: the chain found none)."""
    key = tuple(os.environ.get(k) for k in _CHAIN_ENV)
    with _lock:
        if key not in _chain:
            import botocore.session

            _chain[key] = botocore.session.get_session().get_credentials()
        return _chain[key]


def delta_keys() -> dict:
    """delta-rs storage options with the chain's keys, or {} when delta-rs finds them itself.

    Called when no keys are configured (storage.* or AWS_ACCESS_KEY_ID). Refreshable
    credentials (SSO, assume-role profiles) are frozen per call, so each table opened gets
    keys that are valid then.
    """
    creds = _credentials()
    if creds is None or creds.method in DELTA_RESOLVES:
        return {}
    frozen = creds.get_frozen_credentials()
    if not (frozen.access_key and frozen.secret_key):
        return {}
    with _lock:
        _seen.update(s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s)
    opts = {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key}
    if frozen.token:
        opts["AWS_SESSION_TOKEN"] = frozen.token
    return opts


def resolved_secrets() -> tuple[str, ...]:
    """The key values this process has read from the chain so far (for the scrubber)."""
    with _lock:
        return tuple(_seen)

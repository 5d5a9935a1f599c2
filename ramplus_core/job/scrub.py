"""Keeping keys out of everything the job prints or writes.

The keys themselves are never formatted into a message by this code, but text from
elsewhere is: client libraries' error messages (which can hold a URL with `user:password@`
or echo what they were given), tracebacks, `sys.argv` (`--set storage.secret_access_key=...`
on a command line). So every line the driver emits, the manifest, the pipeline's error text
and the CLI's last words pass through one Scrubber that knows the run's actual key values
(from the config and the environment) and replaces them, wherever they appear, with `***`.
Error rows are scrubbed in the reader with the same Storage recipe. Keys that a node's
credential chain gave this process (`credentials.delta_keys`) are scrubbed as soon as read.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Optional

from .config import SECRET_KEYS
from .credentials import resolved_secrets
from .storage import scrub

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# `--set storage.secret_access_key=VALUE` as argv shows it: the value is what is attached to
# the `=`, up to a space, quote, comma or brace. A message that merely names the key
# ("storage.secret_access_key: give both or neither") holds no value, and an empty value
# (`...=` then a space) must not take the next word with it.
_SET_SECRET = re.compile(r"(storage\.(?:%s)=)[^\s'\",}]+" % "|".join(SECRET_KEYS))


class Scrubber:
    def __init__(self, secrets: Iterable[Optional[str]] = ()):
        self.secrets = tuple(s for s in secrets if s)

    @classmethod
    def for_run(cls, cfg=None, storage=None, environ: Optional[dict] = None) -> "Scrubber":
        env = os.environ if environ is None else environ
        found = [env.get(k) for k in SECRET_ENV]
        if cfg is not None:
            found += [getattr(cfg.storage, k, None) for k in SECRET_KEYS]
        if storage is not None:
            found += list(storage.secrets())
        return cls(found)

    def text(self, s: str) -> str:
        if not isinstance(s, str) or not s:
            return s
        return _SET_SECRET.sub(r"\1***", scrub(s, self.secrets + resolved_secrets()))

    def obj(self, x):
        """A copy of plain data (dicts, lists, strings) with every string scrubbed."""
        if isinstance(x, str):
            return self.text(x)
        if isinstance(x, dict):
            return {self.text(k) if isinstance(k, str) else k: self.obj(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [self.obj(v) for v in x]
        return x

    def emit(self, fn: Callable[[str], None]) -> Callable[[str], None]:
        return lambda line: fn(self.text(line))

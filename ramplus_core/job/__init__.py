"""The batch tagging job: object storage -> Ray Data -> actor pool -> partitioned Parquet.

Entry point: `jobs/tag_bucket.py`; `run(load_config(...))` does the same from Python.
See docs/job.md for the layout of the output and how to read only committed runs.
Names are imported lazily so that reading a config does not import Ray.
"""

_EXPORTS = {
    "JobConfig": "config", "load_config": "config",
    "run": "runner", "RunResult": "runner", "JobFailed": "runner",
    "committed_runs": "manifest", "read_manifest": "manifest",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)

#!/usr/bin/env python
"""Tag every image under one or more prefixes with RAM++ and write partitioned Parquet.

    python jobs/tag_bucket.py --config conf/default.yaml \\
        --input s3://photos/2026/ --output s3://tags/ramplus/ --checkpoint s3://models/ram_plus_swin_large_14m.pth

    ray job submit --working-dir . -- python jobs/tag_bucket.py --config conf/default.yaml ...

Exit status: 0 committed, 2 bad config or checkpoint (one line on stderr), 3 the run did
not commit (invariant or pipeline failure; see _runs/<run_id>.FAILED.json), 1 anything else
(a traceback on stderr). Whatever is printed has the run's keys replaced by ***.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _ensure_importable() -> None:
    """Run from a checkout without installing: put the repo root on the path, for workers too."""
    try:
        import ramplus_core  # noqa: F401
        return
    except ImportError:
        pass
    root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, root)
    # A Ray started by this process passes its environment to its workers.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


EPILOG = """\
config keys (YAML; override any with --set key=value, e.g. --set inference.batch_size=64):
  conf/default.yaml documents every key. Unknown keys are rejected.

credentials: storage.* in the config, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
  AWS_SESSION_TOKEN / AWS_REGION / AWS_ENDPOINT_URL in the environment of the driver (they
  are passed to the Ray workers; they are never printed or written to the manifest).

incremental: by default (--mode missing) a run tags only what the tables do not hold for
  this model and vocabulary (new or changed objects, retryable errors, tags a grown
  vocabulary adds), removes rows of deleted objects, and resumes an unfinished run started
  with the same settings (a killed driver): just start it again.

output (Delta Lake tables; read them with deltalake, DuckDB, Polars, Spark, Trino...):
  <output>/tags/     one row per image that has tags now (uri unique), partitioned by shard
  <output>/errors/   one row per image that cannot be tagged now, with the reason and stage
  <output>/_runs/<run_id>.json   the run's manifest: counts, timings, the table versions
  Each run commits once per table (a reader sees the whole run or none of it); the
  change data feed tells indexers what changed since any version. See docs/job.md.

exit codes: 0 committed; 2 bad config, checkpoint, vocabulary or output (nothing done);
  3 the run did not commit (start it again to resume); 4 other runs kept committing to the
  same tables (start it again: it commits on top of theirs); 1 anything else.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tag_bucket.py",
        description="Tag every image under the input prefixes with RAM++ on Ray and commit the results "
                    "to two Delta Lake tables (tags, errors) plus a run manifest under the output URI.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML", help="job settings (see conf/default.yaml); optional")
    p.add_argument("--input", action="append", metavar="URI",
                   help="folder or prefix to tag: s3://bucket/prefix/, /local/dir, any fsspec URL; "
                        "repeat for several (replaces 'input' of the config)")
    p.add_argument("--output", metavar="URI", help="where the tags and errors tables and _runs/ live")
    p.add_argument("--checkpoint", metavar="URI", help="RAM++ checkpoint (.pth or .safetensors), local or any URL")
    p.add_argument("--vocab", metavar="FILE", help="vocabulary file (YAML: builtin, tags, import, text_encoder, "
                                                   "cache); sets vocabulary.file")
    p.add_argument("--mode", choices=("missing", "all"),
                   help="missing (default): only images without a committed result for this model and "
                        "vocabulary; all: re-tag everything")
    p.add_argument("--run-id", help="name of this run (default: UTC start time + random suffix; the id of an "
                                    "unfinished run resumes it)")
    p.add_argument("--ray-address", help="Ray cluster to use ('local' starts one here; default: RAY_ADDRESS, "
                                         "a running local cluster, else a new local one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set inference.batch_size=64 (repeatable)")
    bars = p.add_mutually_exclusive_group()
    bars.add_argument("--progress-bars", action="store_true",
                      help="Ray Data's progress bars even when stderr is not a terminal (ray.progress_bars: true)")
    bars.add_argument("--quiet", action="store_true",
                      help="no Ray Data progress bars, even on a terminal (ray.progress_bars: false); by default "
                           "they are drawn only on a terminal. The job's own 'progress:' lines stay")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help is instant
    _ensure_importable()
    from ramplus_core.errors import CheckpointError, ConfigError, VocabularyError
    from ramplus_core.job.config import load_config, parse_set
    from ramplus_core.job.scrub import Scrubber

    scrubber = Scrubber.for_run()  # keys from the environment; those of the config once it is read

    def fail(msg: str, code: int) -> int:
        print(scrubber.text(f"tag_bucket: error: {msg}"), file=sys.stderr, flush=True)
        return code

    try:
        overrides = parse_set(args.set)
        if args.ray_address:
            overrides.append(("ray.address", args.ray_address))
        if args.quiet or args.progress_bars:
            overrides.append(("ray.progress_bars", bool(args.progress_bars)))
        cfg = load_config(args.config, inputs=args.input, output=args.output, checkpoint=args.checkpoint,
                          run_id=args.run_id, vocab=args.vocab, mode=args.mode, overrides=overrides)
        scrubber = Scrubber.for_run(cfg)
        from ramplus_core.job.runner import EXIT_CONFLICT, CommitConflict, JobFailed, run

        try:
            run(cfg, emit=lambda line: print(line, flush=True))
        except CommitConflict as e:
            return fail(str(e), EXIT_CONFLICT)
        except JobFailed as e:
            return fail(str(e), 3)
    except (ConfigError, CheckpointError, VocabularyError) as e:
        return fail(" ".join(str(e).split()), 2)
    except Exception:  # noqa: BLE001 - e.g. the store went away during listing: a traceback, without keys
        import traceback

        sys.stderr.write(scrubber.text(traceback.format_exc()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

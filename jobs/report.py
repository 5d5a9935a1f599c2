#!/usr/bin/env python
"""Make a static HTML page of a tagging run: the catalog, what the run changed, thumbnails with tags.

    python jobs/report.py --run s3://tags/ramplus/ --sample 48 --out report.html

Everything is as of right after the run's commits: the tables' counts (images with tags +
images with errors = images in the catalog), what the run's commits inserted, updated and
deleted (the change data feed), the manifest's figures for the run's work, a seeded sample of
the tags table, and the errors table. The page has no scripts and loads nothing: thumbnails and plots are embedded, so it can be
opened offline or mailed. Exit status: 0 done, 2 bad input (one line on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _ensure_importable() -> None:
    """Run from a checkout without installing: put the repo root on the path."""
    import importlib.util

    if importlib.util.find_spec("ramplus_core") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cli():
    """The shared argument helpers, loaded by path: importing the package would load torch
    first, and --help and usage errors should not wait seconds for that."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "ramplus_core" / "evaluation" / "cli.py"
    spec = importlib.util.spec_from_file_location("_ramplus_evaluation_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_parser() -> argparse.ArgumentParser:
    cli = _cli()

    p = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0], epilog=cli.STORAGE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_run_args(p)
    p.add_argument("--sample", type=int, default=48, metavar="N", help="tagged images to show (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    p.add_argument("--thumb-px", type=int, default=192, metavar="PX", help="thumbnail size (default 192)")
    p.add_argument("--max-errors", type=int, default=500, metavar="N", help="error rows to list (default 500)")
    p.add_argument("--out", required=True, metavar="FILE.html", help="where to write the page")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # before the heavy imports: --help is instant
    _ensure_importable()
    if args.sample < 0 or args.thumb_px < 16 or args.max_errors < 0:
        parser.error("--sample and --max-errors must be >= 0 and --thumb-px >= 16")
    from ramplus_core.evaluation.cli import run_tool, storage_from

    def body() -> int:
        from ramplus_core.evaluation.report import build_report

        page = build_report(args.run, args.run_id, sample=args.sample, seed=args.seed, storage=storage_from(args),
                            thumb_px=args.thumb_px, max_errors=args.max_errors)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        print(f"wrote {out} ({len(page.encode()) / 1024:.0f} KiB)")
        return 0

    return run_tool("report", body)


if __name__ == "__main__":
    sys.exit(main())

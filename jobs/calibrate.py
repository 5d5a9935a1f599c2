#!/usr/bin/env python
"""Tune per-tag thresholds on labelled images and write them as a file the tagging job reads.

    python jobs/calibrate.py --run s3://tags/ramplus/ --annotations labelled.csv --out thresholds.tsv
    python jobs/tag_bucket.py ... --set vocabulary.thresholds_file=thresholds.tsv

Exit status: 0 done, 2 bad input (one line on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
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


EPILOG = """\
modes:
  f1         (default) per tag, the threshold with the best F1 on the labelled images
  precision  per tag, the lowest threshold whose precision reaches --target-precision
             (the most recall at that precision); tags that never reach it are left out

output: tag<TAB>threshold lines (with '#' comment lines), the format of the job's
  vocabulary.thresholds_file; tags not in the file keep their thresholds. Tags with fewer
  than --min-positives positive images, or none over the run's score floor, are left out and
  reported. Figures are measured on the same images (optimistic): check them on held-out
  images with jobs/evaluate.py --thresholds FILE.

"""


def build_parser() -> argparse.ArgumentParser:
    cli = _cli()

    p = argparse.ArgumentParser(prog="calibrate.py", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG + cli.STORAGE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_run_args(p)
    cli.add_labelled_args(p)
    p.add_argument("--mode", choices=("f1", "precision"), default="f1", help="what to optimise (default f1)")
    p.add_argument("--target-precision", type=float, metavar="P", help="with --mode precision: e.g. 0.9")
    p.add_argument("--min-positives", type=int, default=3, metavar="N",
                   help="calibrate only tags with at least N positive images (default 3)")
    p.add_argument("--out", required=True, metavar="FILE.tsv", help="thresholds file to write")
    p.add_argument("--json", metavar="FILE.json", help="also write every tag's figures and status as JSON")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # before the heavy imports: --help is instant
    _ensure_importable()
    if args.mode == "precision" and args.target_precision is None:
        parser.error("--mode precision needs --target-precision, e.g. 0.9")
    if args.mode == "f1" and args.target_precision is not None:
        parser.error("--target-precision goes with --mode precision")
    from ramplus_core.evaluation.cli import run_tool, storage_from

    def body() -> int:
        from ramplus_core.evaluation.annotations import read_annotations, read_taglist
        from ramplus_core.evaluation.benchmark import load_labelled
        from ramplus_core.evaluation.calibrate import calibrate_sample, write_thresholds
        from ramplus_core.evaluation.results import open_run

        ann = read_annotations(args.annotations)
        taglist = read_taglist(args.taglist) if args.taglist else None
        run = open_run(args.run, args.run_id, storage_from(args))
        sample = load_labelled(run, ann, taglist, key=args.key, missing_as_negative=args.missing_as_negative)
        for w in sample.warnings:
            print(f"calibrate: warning: {w}", file=sys.stderr)
        cal = calibrate_sample(sample, mode=args.mode, target_precision=args.target_precision,
                               min_positives=args.min_positives)
        cal.annotations = args.annotations
        n = write_thresholds(cal, args.out)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(cal.as_dict(), indent=2) + "\n", encoding="utf-8")
        print(format_calibration(cal))
        print(f"\nwrote {n} threshold(s) to {args.out}; use it with --set vocabulary.thresholds_file={args.out}")
        return 0

    return run_tool("calibrate", body)


def format_calibration(cal) -> str:
    pct = lambda x: "   -  " if x is None else f"{100 * x:6.2f}"  # noqa: E731
    width = max([8] + [min(36, len(t.tag)) for t in cal.tags]) + 2
    lines = [f"{'tag':<{width}}{'pos':>5}{'thresh':>9}{'P':>8}{'R':>8}{'F1':>8}{'F1 before':>11}  status"]
    for t in cal.tags:
        th = "-" if t.threshold is None else f"{t.threshold:.4f}"
        lines.append(f"{t.tag[:36]:<{width}}{t.positives:>5}{th:>9}{pct(t.precision):>8}{pct(t.recall):>8}"
                     f"{pct(t.f1):>8}{pct(t.before.get('f1')):>11}  {t.status}")
    s = cal.summary()
    lines.append(f"\n{s['calibrated']} of {s['tags']} tags calibrated on {cal.images} images; macro F1 on these images "
                 f"{pct(s['macro_f1_before']).strip()} -> {pct(s['macro_f1_after']).strip()} (in-sample)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

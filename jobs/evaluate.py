#!/usr/bin/env python
"""Score a tagging run against ground truth: mAP, per-class AP, precision/recall/F1.

    python jobs/evaluate.py --run s3://tags/ramplus/ --annotations openimages_common_214_ram_annots.txt \\
        --taglist openimages_common_214 --out eval/common214

Writes OUT/metrics.json (everything, per class too) and OUT/metrics.txt (the table it prints).
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
what is computed (docs/evaluation.md has the details):
  AP per class: the mean, over the images that have the tag, of the precision among the
  images scoring at least as high (tied scores count as one block); mAP: the mean over
  classes that have at least one positive image (the others are listed, not averaged in).
  P/R/F1 at thresholds: from the tags the job put on each image (score > threshold), or from
  --thresholds. Macro: mean over classes with positives; micro: pooled counts.
  For exact mAP the run must keep every score: tag with --set inference.score_floor=0 (a
  warning says so otherwise). Annotated images without a result are listed, not dropped.
  The run is the output as it was right after that run's commits (Delta time travel): every
  image tagged then, including rows an incremental run kept from earlier runs.
  --official: the RAM++ authors' evaluation script's numbers instead (numpy's sort order
  among tied scores, classes without positives count as AP 0 in mAP, one AP per tag-list
  line, predicted when score >= threshold, P and R averaged over every class).

"""


def build_parser() -> argparse.ArgumentParser:
    cli = _cli()

    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG + cli.STORAGE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_run_args(p)
    cli.add_labelled_args(p)
    p.add_argument("--thresholds", metavar="FILE.tsv",
                   help="re-threshold these tags (tag<TAB>threshold, e.g. from jobs/calibrate.py) before P/R/F1")
    p.add_argument("--official", action="store_true",
                   help="reproduce the official RAM++ evaluation script's figures (see below and docs/evaluation.md) "
                        "instead of the default, order-free definitions")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json and metrics.txt")
    p.add_argument("--show", type=int, default=40, metavar="N",
                   help="print the N classes with the lowest AP (default 40; 0 for all); metrics.txt has all")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help is instant
    _ensure_importable()
    from ramplus_core.evaluation.cli import run_tool, storage_from

    def body() -> int:
        from ramplus_core.evaluation.annotations import read_annotations, read_taglist
        from ramplus_core.evaluation.benchmark import evaluate_sample, format_table, load_labelled
        from ramplus_core.evaluation.calibrate import read_thresholds
        from ramplus_core.evaluation.results import open_run

        thresholds = read_thresholds(args.thresholds) if args.thresholds else None
        ann = read_annotations(args.annotations)
        taglist = read_taglist(args.taglist) if args.taglist else None
        run = open_run(args.run, args.run_id, storage_from(args))
        sample = load_labelled(run, ann, taglist, key=args.key, missing_as_negative=args.missing_as_negative)
        result = evaluate_sample(sample, thresholds, mode="official" if args.official else "default")
        result["annotations"] = args.annotations
        result["taglist"] = taglist.source if taglist else None
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out / "metrics.txt").write_text(format_table(result) + "\n", encoding="utf-8")
        print(format_table(result, max_classes=args.show or None))
        print(f"\nwrote {out / 'metrics.json'} and {out / 'metrics.txt'}")
        return 0

    return run_tool("evaluate", body)


if __name__ == "__main__":
    sys.exit(main())

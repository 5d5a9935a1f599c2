"""Command line: `ramplus tag` for a quick look at what the model sees, `ramplus export`.

The CLI is for people at a terminal, so every failure a user can cause (no checkpoint, a
bad file, an unusable image) ends in one readable line, never a traceback. Exit codes:
0 all images tagged, 1 some images failed (the others are still printed), 2 nothing could
run (checkpoint, device or option problem).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from .checkpoint import GET_IT, RELEASED_NAME
from .errors import ImageError, RamPlusError

EXIT_OK, EXIT_SOME_FAILED, EXIT_UNUSABLE = 0, 1, 2
CHECKPOINT_ENV = "RAMPLUS_CHECKPOINT"

_CHECKPOINT_HELP = (
    f"the RAM++ checkpoint: the released {RELEASED_NAME} or a ramplus safetensors export, "
    f"as a local path or any fsspec URL (s3://..., file://...); see 'Getting the checkpoint' below"
)
_GETTING_IT = f"Getting the checkpoint:\n  {GET_IT}\n"

_DESCRIPTION = f"""\
RAM++ (Recognize Anything Plus) image tagging.

commands:
  tag       tag images and print the tags over threshold with their scores
  export    rewrite a checkpoint as safetensors, which loads much faster than the .pth
  describe  write LLM descriptions of new tags for a vocabulary file (see its --help)

Getting the checkpoint:
  {GET_IT}

Run 'ramplus COMMAND --help' for each command's options.
"""

_TAG_EPILOG = """\
examples:
  python -m ramplus_core tag ramplus_core/samples/*.jpg --checkpoint ram_plus_swin_large_14m.pth
  python -m ramplus_core tag photo.jpg --checkpoint s3://models/ram_plus.safetensors --json --zh

--thresholds-from FILE replaces the per-tag thresholds (default: the paper's calibrated
ones for the 4585 built-in tags, 0.5 for others). FILE is either text with one threshold
per line in tag order (the format of ram_tag_list_threshold.txt) or 'TAG THRESHOLD' per line
for some tags; or JSON: a list in tag order, a {"tag": threshold} object, or an object with
"thresholds" (and optionally "tags") lists.

Exit status: 0 all tagged, 1 some images failed (each is reported with its reason and the
rest are still printed), 2 nothing ran (checkpoint, device or option problem).

""" + _GETTING_IT

_EXPORT_EPILOG = """\
The export holds only the inference weights (no optimizer state) in ramplus's names, with
the architecture in its metadata; load it anywhere a checkpoint is accepted. The command
prints how long the source and the export take to load.

""" + _GETTING_IT


class _Unusable(Exception):
    """A problem that stops the whole command (exit 2); carries the one line to print."""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ramplus", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{tag,export,describe,maintain,migrate}")
    sub.required = True

    t = sub.add_parser("tag", help="tag images and print the tags over threshold",
                       description="Tag images with RAM++ and print, per image, the tags over threshold "
                                   "with their scores (probabilities), highest first.",
                       epilog=_TAG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, GIF, WebP, TIFF, ...)")
    t.add_argument("--checkpoint", "-c", metavar="CKPT", default=os.environ.get(CHECKPOINT_ENV),
                   help=_CHECKPOINT_HELP + f" (default: ${CHECKPOINT_ENV})")
    t.add_argument("--json", action="store_true",
                   help="one JSON object per image and line: image, tags, scores, width, height "
                        "(or image, error, stage for an image that failed)")
    t.add_argument("--zh", action="store_true", help="also print the Chinese tag names")
    t.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default 8)")
    t.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="compute precision: fp32 gives the paper's tags; bf16 is faster on recent "
                        "hardware and agrees on nearly all decisions (default fp32)")
    t.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda when available, else cpu)")
    t.add_argument("--vocabulary", metavar="FILE",
                   help="a vocabulary file (YAML: built-in tags, a subset or none, plus your own; see README, "
                        "'Your own tags') instead of the checkpoint's built-in tags")
    t.add_argument("--thresholds-from", metavar="FILE", help="per-tag thresholds to use instead of the defaults (see below)")

    e = sub.add_parser("export", help="write a checkpoint as safetensors (fast to load)",
                       description="Convert a RAM++ checkpoint to a safetensors file that loads much faster.",
                       epilog=_EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("checkpoint", metavar="CKPT", help=_CHECKPOINT_HELP)
    e.add_argument("out", metavar="OUT.safetensors", help="where to write the export")
    e.add_argument("--fp16", action="store_true", help="store fp16 tensors: half the size; tags nearly always equal")

    # parsed by describe.main (see main below); listed here so --help shows it
    sub.add_parser("describe", help="write LLM descriptions of new tags (its own --help)", add_help=False)
    sub.add_parser("maintain", help="compact and vacuum a tagging job's Delta tables (its own --help)",
                   add_help=False)
    sub.add_parser("migrate", help="convert a job output of the layout before Delta tables (its own --help)",
                   add_help=False)
    return p


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _load_model(checkpoint: str | None, device=None, dtype=None):
    import torch  # noqa: F401 - imported here so `--help` stays fast

    from .model import RamPlus

    if not checkpoint:
        raise _Unusable(f"no checkpoint given: pass --checkpoint or set ${CHECKPOINT_ENV}. {GET_IT}")
    if device == "cuda" and not torch.cuda.is_available():
        raise _Unusable("--device cuda was asked for but no CUDA GPU is visible to PyTorch; use --device cpu")
    try:
        return RamPlus.from_checkpoint(checkpoint, device=device, dtype=dtype)
    except RamPlusError as e:
        raise _Unusable(_one_line(e)) from None
    except MemoryError:
        raise _Unusable(f"out of memory while loading {checkpoint}") from None


def read_thresholds(path: str, names: list[str], current: np.ndarray) -> np.ndarray:
    """Thresholds from a file, either for every tag in order or for named tags only."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _Unusable(f"cannot read thresholds file {path}: {getattr(e, 'strerror', None) or e}") from None
    out = np.array(current, dtype=np.float32, copy=True)
    index = {n: i for i, n in enumerate(names)}

    def by_name(pairs) -> np.ndarray:
        unknown = [str(n) for n, _ in pairs if n not in index]
        if unknown:
            raise _Unusable(f"{path}: tags not in the vocabulary: {', '.join(unknown[:5])}"
                            + (" ..." if len(unknown) > 5 else ""))
        for n, v in pairs:
            out[index[n]] = v
        return out

    def in_order(values) -> np.ndarray:
        if len(values) != len(names):
            raise _Unusable(f"{path} has {len(values)} thresholds but the vocabulary has {len(names)} tags")
        return np.asarray(values, dtype=np.float32)

    try:
        if path.endswith(".json") or text.lstrip()[:1] in ("[", "{"):
            data = json.loads(text)
            if isinstance(data, dict) and "thresholds" in data:
                if "tags" in data:
                    if len(data["tags"]) != len(data["thresholds"]):
                        raise _Unusable(f"{path}: 'tags' and 'thresholds' differ in length")
                    result = by_name(list(zip(data["tags"], map(float, data["thresholds"]))))
                else:
                    result = in_order([float(x) for x in data["thresholds"]])
            elif isinstance(data, dict):
                result = by_name([(k, float(v)) for k, v in data.items()])
            elif isinstance(data, list):
                result = in_order([float(x) for x in data])
            else:
                raise _Unusable(f"{path}: expected a JSON list or object of thresholds")
        else:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            if all(len(ln.split()) == 1 for ln in lines):
                result = in_order([float(ln) for ln in lines])
            else:
                pairs = []
                for ln in lines:
                    name, _, value = ln.rpartition(" ") if "\t" not in ln else ln.rpartition("\t")
                    pairs.append((name.strip(), float(value)))
                result = by_name(pairs)
    except (ValueError, TypeError) as e:
        raise _Unusable(f"{path}: not a thresholds file ({_one_line(e)})") from None
    if not np.all((result >= 0) & (result <= 1)):
        raise _Unusable(f"{path}: thresholds must be probabilities between 0 and 1")
    return result


def _format_text(image: str, result, zh: bool) -> str:
    if zh:
        parts = [f"{t}/{z} {s:.3f}" if z else f"{t} {s:.3f}" for t, z, s in zip(result.tags, result.zh, result.scores)]
    else:
        parts = [f"{t} {s:.3f}" for t, s in zip(result.tags, result.scores)]
    return f"{image} ({result.width}x{result.height}): " + (", ".join(parts) if parts else "(no tag over threshold)")


def cmd_tag(args) -> int:
    if args.batch_size < 1:
        raise _Unusable("--batch-size must be at least 1")
    model = _load_model(args.checkpoint, args.device, args.dtype)
    if args.vocabulary:
        from .vocab_file import load_vocabulary

        try:
            model.set_vocabulary(load_vocabulary(args.vocabulary, model.vocabulary).vocabulary)
        except RamPlusError as e:
            raise _Unusable(_one_line(e)) from None
        except OSError as e:
            raise _Unusable(f"cannot read vocabulary {args.vocabulary}: {getattr(e, 'strerror', None) or e}") from None
    if args.thresholds_from:
        v = model.vocabulary
        v = replace(v, thresholds=read_thresholds(args.thresholds_from, v.names, v.thresholds))
        model.set_vocabulary(v, prepared=model.prepared)

    from .preprocess import decode_any, normalize

    failed = 0

    def report_error(image: str, err: ImageError) -> None:
        nonlocal failed
        failed += 1
        if args.json:
            print(json.dumps({"image": image, "error": err.reason, "stage": err.stage}, ensure_ascii=False), flush=True)
        else:
            print(f"{image}: cannot tag ({err.stage}): {_one_line(err)}", file=sys.stderr, flush=True)

    for start in range(0, len(args.images), args.batch_size):
        batch = args.images[start:start + args.batch_size]
        decoded: list = []
        for image in batch:
            try:
                decoded.append(decode_any(image))
            except ImageError as e:
                decoded.append(e)
        good = [d for d in decoded if not isinstance(d, ImageError)]
        rows = iter(())
        if good:
            try:
                probs, on = model.decide(model.logits(normalize(np.stack([d.array for d in good]))))
                rows = iter(zip(good, probs, on))
            except RuntimeError as e:  # e.g. out of memory: this batch fails, later ones may not
                err = ImageError(f"inference failed for its batch: {_one_line(e)[:300]}", stage="infer")
                decoded = [err if not isinstance(d, ImageError) else d for d in decoded]
        for image, d in zip(batch, decoded):
            if isinstance(d, ImageError):
                report_error(image, d)
                continue
            _, p, o = next(rows)
            result = model._result(p, o, d.width, d.height)
            if args.json:
                print(json.dumps({"image": image, **result.as_dict(zh=args.zh)}, ensure_ascii=False), flush=True)
            else:
                print(_format_text(image, result, args.zh), flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def cmd_export(args) -> int:
    import torch

    from .checkpoint import export_safetensors
    from .model import RamPlus

    t0 = time.perf_counter()
    model = _load_model(args.checkpoint, device="cpu")
    t_source = time.perf_counter() - t0
    try:
        export_safetensors(model, args.out, dtype=torch.float16 if args.fp16 else None)
    except OSError as e:
        raise _Unusable(f"cannot write {args.out}: {e.strerror or e}") from None
    t0 = time.perf_counter()
    try:
        again = RamPlus.from_checkpoint(args.out, device="cpu")
    except RamPlusError as e:
        raise _Unusable(f"the export {args.out} does not load back: {_one_line(e)}") from None
    t_export = time.perf_counter() - t0
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1e6:.1f} MB, {'fp16' if args.fp16 else 'fp32'}, "
          f"{len(again.vocabulary)} tags, model_id {again.model_id})")
    print(f"load time: source {t_source:.2f} s, export {t_export:.2f} s "
          f"(speedup {t_source / max(t_export, 1e-9):.1f}x)")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["describe"]:  # its own parser, in describe.py
        from .describe import main as describe_main

        return describe_main(argv[1:])
    if argv[:1] in (["maintain"], ["migrate"]):  # the job's tables: job/admin.py
        from .job.admin import main as admin_main

        return admin_main(argv)
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ramplus: %(message)s")
    # torch warns about the pickle protocol of files it is about to refuse anyway; the
    # refusal is the one line the user needs.
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    try:
        return cmd_tag(args) if args.command == "tag" else cmd_export(args)
    except _Unusable as e:
        print(f"ramplus: error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    except BrokenPipeError:  # `ramplus tag ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SOME_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

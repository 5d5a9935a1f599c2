"""What jobs/evaluate.py, jobs/calibrate.py and jobs/report.py share: storage flags and errors.

Each tool fails with one line on stderr naming what is wrong and exit status 2 for bad
input (a missing file, an unknown tag, no committed run), so a script around them can tell
a user's mistake from a crash (status 1, with the traceback).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable

STORAGE_HELP = """\
storage: the output URI and image URIs may be local paths, s3://... or any fsspec URL.
  S3 keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN,
  AWS_REGION, AWS_ENDPOINT_URL) as for the tagging job; --endpoint-url overrides the endpoint.
"""


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="OUTPUT_URI",
                   help="the tagging job's --output (the folder holding the tags/ and errors/ tables and _runs/)")
    p.add_argument("--run-id", metavar="ID",
                   help="a committed run id (default: the latest committed run); the tables are read as they were "
                        "right after that run's commits")
    p.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333")


def add_labelled_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, metavar="FILE.csv",
                   help="ground truth, one image per line: image_id,tag1,tag2,... (the paper's *_ram_annots.txt)")
    p.add_argument("--taglist", metavar="FILE|NAME",
                   help="the classes, one per line (default: every tag in the annotations); or a shipped list: "
                        "openimages_common_214, openimages_rare_200, hico_600, imagenet_multi_1000")
    p.add_argument("--key", choices=("stem", "name", "path"), default="stem",
                   help="how image ids match result URIs: file name without extension (default), with it, "
                        "or the id is a relative path the URI ends with")
    p.add_argument("--missing-as-negative", action="store_true",
                   help="count annotated images without a result (errors, not listed) as scoring 0 everywhere "
                        "instead of leaving them out (they are reported either way)")


def storage_from(args):
    from ramplus_core.job.config import StorageConfig
    from ramplus_core.job.storage import Storage

    return Storage.from_config(StorageConfig(endpoint_url=args.endpoint_url))


def run_tool(prog: str, body: Callable[[], int]) -> int:
    """Run `body`, turning the errors a user can fix into one line and status 2."""
    from ramplus_core.errors import RamPlusError

    def warn(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)

    saved, warnings.showwarning = warnings.showwarning, warn
    try:
        return body()
    except RamPlusError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # files, permissions, and storage clients (pyarrow's S3 errors are OSErrors)
        what = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {what}", file=sys.stderr, flush=True)
        return 2
    finally:
        warnings.showwarning = saved

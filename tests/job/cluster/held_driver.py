"""jobs/tag_bucket.py with HeldTagger in the pipeline's seam (pipeline.TAGGER_CLASS): the
job's own driver and code path, replicas that wait while $HOLD_FILE exists."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import held_tagger  # noqa: E402
import ray.cloudpickle  # noqa: E402

import ramplus_core.job.pipeline as pp  # noqa: E402

ray.cloudpickle.register_pickle_by_value(held_tagger)  # replicas need not import tests/
held_tagger.HeldTagger.hold_file = os.environ.get("HOLD_FILE", "")
pp.TAGGER_CLASS = held_tagger.HeldTagger
sys.argv[0] = str(REPO / "jobs" / "tag_bucket.py")
runpy.run_path(sys.argv[0], run_name="__main__")

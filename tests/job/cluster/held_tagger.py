"""The job's Tagger, held at a gate (tests only): while the hold file exists, a batch waits
inside the replica before it is tagged. A test thereby knows that batches are in flight
when it takes a node or the driver away, however slow the machine is, and lets them go
by deleting the file. Every node of the test cluster shares this machine's filesystem."""

from __future__ import annotations

import os
import time

from ramplus_core.job.inference import Tagger


class HeldTagger(Tagger):
    hold_file = ""  # set by held_driver.py before the class is sent to the replicas

    def __call__(self, batch):
        deadline = time.monotonic() + 600
        while self.hold_file and os.path.exists(self.hold_file) and time.monotonic() < deadline:
            time.sleep(0.1)
        return super().__call__(batch)

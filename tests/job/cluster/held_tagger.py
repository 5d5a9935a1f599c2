"""The job's Tagger, held at a gate (tests only): while the hold file exists, a batch waits
inside the replica before it is tagged. A test thereby knows that batches are in flight
when it takes a node or the driver away, however slow or fast the machine is, and lets them
go by deleting the file. The file may hold a number: that many batches pass before the gate
shuts (counted across replicas under a lock), so "some work staged, the rest in flight" needs
no race against a fast machine. Every node of the test cluster shares this filesystem."""

from __future__ import annotations

import fcntl
import os
import time

from ramplus_core.job.inference import Tagger


class HeldTagger(Tagger):
    hold_file = ""  # set by held_driver.py before the class is sent to the replicas

    def __call__(self, batch):
        if self.hold_file and not self._passes():
            deadline = time.monotonic() + 600
            while os.path.exists(self.hold_file) and time.monotonic() < deadline:
                time.sleep(0.1)
        return super().__call__(batch)

    def _passes(self) -> bool:
        """True when the gate is open (no file) or a free pass is left (one is used up)."""
        try:
            with open(self.hold_file, "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                text = f.read().strip()
                left = int(text) if text else 0
                if left <= 0:
                    return False
                f.seek(0)
                f.truncate()
                f.write(str(left - 1))
                return True
        except FileNotFoundError:
            return True

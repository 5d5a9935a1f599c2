"""Progress while the job runs and the summary table at the end.

Ray Data's bars show rows per operator; an operator wants one line they can grep in a log
that says how many images are done, how fast, and how many failed. The inference actors
report each batch to a small counter actor (no CPU reserved), and a driver thread prints
a line from it every `ray.progress_interval_s` seconds. The same actor collects what each
inference actor reports at start-up (load time, where its vocabulary lives), which the
manifest records.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import ray


@ray.remote(num_cpus=0, max_concurrency=4)
class ProgressCounter:
    def __init__(self):
        self.tagged = 0
        self.errors = 0
        self.by_stage: dict = {}
        self.actors: list = []
        self.prepare_calls = 0
        self.infer_s = 0.0
        self.first = None  # wall time when the first batch finished inference
        self.first_n = 0  # rows of that batch
        self.last = None
        self.work: dict = {}  # model work: backbone images, token reads, head tag scores, copied scores

    def add(self, tagged: int, errors: int, by_stage: dict, prepare_calls: int = 0, infer_s: float = 0.0,
            work: Optional[dict] = None) -> None:
        now = time.time()
        if self.first is None:
            self.first, self.first_n = now, tagged + errors
        self.last = now
        self.tagged += tagged
        self.errors += errors
        for k, v in by_stage.items():
            self.by_stage[k] = self.by_stage.get(k, 0) + v
        self.prepare_calls = max(self.prepare_calls, prepare_calls)
        self.infer_s += infer_s
        for k, v in (work or {}).items():
            self.work[k] = self.work.get(k, 0) + v

    def actor_ready(self, info: dict) -> None:
        self.actors.append(info)

    def snapshot(self) -> dict:
        return {"tagged": self.tagged, "errors": self.errors, "by_stage": dict(self.by_stage),
                "actors": list(self.actors), "prepare_calls": self.prepare_calls, "infer_s": self.infer_s,
                "first": self.first, "first_n": self.first_n, "last": self.last, "work": dict(self.work)}


def steady_rate(snap: dict) -> float:
    """Images/s between the first and the last finished batch: throughput without start-up."""
    if not snap.get("first") or not snap.get("last") or snap["last"] <= snap["first"]:
        return 0.0
    return (snap["tagged"] + snap["errors"] - snap["first_n"]) / (snap["last"] - snap["first"])


class ProgressReporter:
    """Prints `progress: ...` lines from the counter until stopped."""

    def __init__(self, counter, total: int, interval_s: float, emit: Callable[[str], None]):
        self.counter, self.total, self.interval_s, self.emit = counter, total, interval_s, emit
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.t0 = time.monotonic()

    def start(self) -> "ProgressReporter":
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="ramplus-progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                snap = ray.get(self.counter.snapshot.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            self.emit(progress_line(snap, self.total, time.monotonic() - self.t0))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def progress_line(snap: dict, total: int, elapsed: float) -> str:
    done = snap["tagged"] + snap["errors"]
    rate = done / elapsed if elapsed > 0 else 0.0
    pct = 100.0 * done / total if total else 100.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    eta_s = f"{eta:.0f}s" if eta == eta else "?"
    return (f"progress: {done}/{total} images ({pct:.1f}%), {snap['tagged']} tagged, {snap['errors']} errors, "
            f"{rate:.1f} images/s, elapsed {elapsed:.0f}s, eta {eta_s}")


def summary_table(m: dict) -> str:
    """The final table printed by the job (and reproducible from any manifest)."""
    c, t = m["counts"], m["timings_s"]
    rows = [
        ("run_id", m["run_id"]),
        ("status", m["status"]),
        ("listed", c["listed"]),
        ("tagged", c["tagged"]),
        ("errors", c["errors"] if not c.get("errors_by_stage") else
         f"{c['errors']} (" + ", ".join(f"{k} {v}" for k, v in sorted(c["errors_by_stage"].items())) + ")"),
        ("skipped (not images)", c["skipped"]),
    ]
    inc = c.get("incremental")
    if inc:
        rows += [
            ("mode", inc.get("mode", "")),
            ("already done (skipped)", inc.get("skipped", 0)),
            ("work", ", ".join(f"{k} {inc.get(k, 0)}" for k in ("new", "changed", "retried", "grown", "retagged"))),
            ("deleted (gone from the store)", inc.get("deleted", 0)),
        ]
    if m.get("resume", {}).get("attempt", 1) > 1:
        r = m["resume"]
        rows.append(("resumed", f"attempt {r['attempt']}: {r.get('kept_rows', 0)} rows of earlier attempts kept"))
    w_ = m.get("model_work")
    if w_:
        rows.append(("model work", ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in w_.items())))
    rows += [
        ("invariant", "ok: every listed image is already done or in exactly one of this run's staged rows"
         if m["invariant"]["ok"] else f"VIOLATED: {m['invariant']['detail']}"),
        ("images/s", f"{m['images_per_s']:.2f} over the pipeline, {m.get('steady_images_per_s', 0):.2f} "
                     "first to last batch"),
        ("time: total", f"{t['total']:.1f}s"),
        ("time: checkpoint", f"{t.get('checkpoint', 0):.1f}s"),
        ("time: listing", f"{t.get('listing', 0):.1f}s"),
        ("time: plan (table join)", f"{t.get('plan', 0):.1f}s"),
        ("time: pipeline", f"{t.get('pipeline', 0):.1f}s"),
        ("time: verify", f"{t.get('verify', 0):.1f}s"),
        ("time: commit", f"{t.get('commit', 0):.1f}s"),
        ("actors", f"{len(m.get('actors', []))} x {m['resources'].get('device', '-')}" if m.get("resources")
         else "none (no model work)"),
        ("tables", ", ".join(f"{k} v{v}" for k, v in (m.get("tables") or {}).get("versions", {}).items())
         or "not committed"),
        ("output", m["output"]),
    ]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(str(v)) for _, v in rows))
    return "\n".join([line] + [f"{k:<{w}} | {v}" for k, v in rows] + [line])

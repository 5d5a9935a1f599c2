"""Progress while the job runs and the summary table at the end.

Ray Data's bars show rows per operator; an operator wants one line they can grep in a log
that says how many images are done, how fast, and how many failed. The inference actors
report each batch to a small counter actor (no CPU reserved), and a driver thread prints
a line from it every `ray.progress_interval_s` seconds. The same actor collects what each
inference actor reports at start-up (load time, where its vocabulary lives), which the
manifest records.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable, Optional

import ray

from .manifest import counts_of


@ray.remote(num_cpus=0, max_concurrency=4)
class ProgressCounter:
    """The run's live counts, which the manifest's actors, model work and rates come from.

    Started with `counter_on_driver_node()`: placed anywhere, it can land on a worker node that is
    then lost (a reclaimed spot instance), and the run finishes with its counts gone.
    """
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
                "first": self.first, "first_n": self.first_n, "last": self.last, "work": dict(self.work),
                "now": time.time()}  # the clock of `first` and `last` (the driver may be on another node)


def counter_on_driver_node() -> "ray.actor.ActorHandle":
    """A ProgressCounter on the driver's own node: it lives exactly as long as the run can."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ProgressCounter.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def steady_rate(snap: dict) -> float:
    """Images/s between the first and the last finished batch: throughput without start-up."""
    if not snap.get("first") or not snap.get("last") or snap["last"] <= snap["first"]:
        return 0.0
    return (snap["tagged"] + snap["errors"] - snap["first_n"]) / (snap["last"] - snap["first"])


def live_rate(snap: dict, now: float) -> Optional[float]:
    """Images/s from the first finished batch until now, or None before a second batch is in.

    Not done / elapsed: the actors' start-up (minutes for the released model on CPU) is no
    image work, and counting it made the first ETAs tens of times too long. Until `now`
    rather than until the last batch, so a stalled run shows its rate falling.
    """
    first, done = snap.get("first"), snap["tagged"] + snap["errors"]
    if not first or now <= first or done <= snap.get("first_n", 0):
        return None
    return (done - snap["first_n"]) / (now - first)


class ProgressReporter:
    """Prints `progress: ...` lines from the counter until stopped.

    A thread of the driver: the pipeline's driver side (Ray Data's executor) runs in other
    threads and releases the GIL while it waits, so the lines keep their interval.
    """

    def __init__(self, counter, total: int, interval_s: float, emit: Callable[[str], None], actors: int = 0):
        self.counter, self.total, self.interval_s, self.emit = counter, total, interval_s, emit
        self.actors = actors
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.t0 = time.monotonic()

    def start(self) -> "ProgressReporter":
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="ramplus-progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        # a line every interval, on a fixed clock: when the counter does not answer in time
        # (its process still starting on a loaded node) the last counts are printed again
        snap: dict = {"tagged": 0, "errors": 0, "first": None, "first_n": 0, "actors": []}
        tick = self.t0
        while True:
            tick += self.interval_s
            if self._stop.wait(max(0.0, tick - time.monotonic())):
                return
            try:
                snap = ray.get(self.counter.snapshot.remote(), timeout=self.interval_s / 2)
            except Exception:  # noqa: BLE001 - progress is best effort
                pass
            self.emit(progress_line(snap, self.total, time.monotonic() - self.t0, actors=self.actors))
            tick = max(tick, time.monotonic() - self.interval_s / 2)  # no burst of lines after a stall

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(snap: dict, total: int, elapsed: float, actors: int = 0, now: Optional[float] = None) -> str:
    """`progress: done/total images (pct), tagged, errors, images/s, eta, elapsed`.

    Before the first batch the rate and ETA are unknown; the line says what the run waits
    for instead (the inference actors loading the model), so 0/N does not read as a hang.
    """
    done = snap["tagged"] + snap["errors"]
    pct = 100.0 * done / total if total else 100.0
    head = (f"progress: {done}/{total} images ({pct:.1f}%), {snap['tagged']} tagged, "
            f"{snap['errors']} errors")
    tail = f"elapsed {_seconds(elapsed)}"
    rate = live_rate(snap, now if now is not None else snap.get("now") or time.time())
    if done >= total:
        return f"{head}, {f'{rate:.1f}' if rate else '?'} images/s, eta 0s, {tail}"
    if not snap.get("first"):
        ready = len({a.get("pid") for a in snap.get("actors", [])})
        wait = (f"{min(ready, actors)}/{actors} inference actors ready" if actors else "no batch done yet")
        return f"{head}, images/s ?, eta ? (starting: {wait}), {tail}"
    if rate is None or rate <= 0:
        return f"{head}, images/s ?, eta ? (one batch done so far), {tail}"
    return f"{head}, {rate:.1f} images/s, eta {_seconds((total - done) / rate)}, {tail}"


def bars_on(setting: Optional[bool], stream=None) -> bool:
    """`ray.progress_bars`: true or false as set; null (auto) only when stderr is a terminal.

    Off a terminal (a log file, `ray job submit`, cron) Ray Data does not draw bars but logs a
    block of lines per operator every few seconds, most of a job's log; our own lines say
    what an operator needs there.
    """
    if setting is not None:
        return bool(setting)
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _BarsOffNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def quiet_bars_off_notice() -> None:
    """Ray Data warns "Progress bars disabled. To enable, ..." when they are off: here that
    is the configured default, not a problem, so that one record is dropped (once per process)."""
    log = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _BarsOffNotice) for f in log.filters):
        log.addFilter(_BarsOffNotice())


def summary_table(m: dict) -> str:
    """The final table printed by the job (and reproducible from any manifest)."""
    c, t = counts_of(m), m["timings_s"]
    rows = [
        ("run_id", m["run_id"]),
        ("status", m["status"]),
        ("listed", c["listed"]),
        ("tagged", c["tagged"]),
        ("errors", c["errors"] if not c.get("errors_by_stage") else
         f"{c['errors']} (" + ", ".join(f"{k} {v}" for k, v in sorted(c["errors_by_stage"].items())) + ")"),
        ("not images (other names)", c.get("not_images", 0)),
    ]
    if c.get("not_regular"):
        rows.append(("left out (links not followed, FIFOs, devices)", c["not_regular"]))
    inc = c.get("incremental")
    if inc:
        rows += [
            ("mode", inc.get("mode", "")),
            ("already done", inc.get("already_done", 0)),
            ("work", ", ".join(f"{k.replace('_', ' ')} {inc.get(k, 0)}"
                               for k in ("new", "changed", "retried", "vocab_changed", "retagged"))),
            ("deleted (gone from the store)", inc.get("deleted", 0)),
        ]
    for v in ((m.get("vocabulary") or {}).get("changed_from") or {}).values():
        rows.append(("vocabulary change", f"from {v.get('vocab_id')}: +{v.get('added_tags', '?')} tags, "
                                          f"-{v.get('removed_tags', '?')} tags, {v.get('copied_tags', 0)} "
                                          f"scores copied, {v.get('computed_tags', 0)} tags scored"))
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

"""Whether the cluster can still host an inference replica, watched while the pipeline runs.

When a node is lost, Ray restarts its replicas wherever their GPUs and CPUs are free and
Ray Data waits for them, with no time limit. While another node can host a replica that
is right (a spot node comes back, the autoscaler adds one, a busy replica finishes). When
no live node can host even one, say the last GPU node was reclaimed, the run would wait
forever. So the driver runs the pipeline in a thread and, every few seconds, checks the
live nodes' total resources; with none able to host a replica for `inference.capacity_wait_s`
the run stops with one sentence. Nothing is committed, and the batches already staged
are kept for the re-run, which resumes.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class NoCapacity(RuntimeError):
    """No live node could host one inference replica for the whole wait."""


def hosts(nodes: list[dict], cpus: float, gpus: float) -> int:
    """How many live nodes have, in total, the CPUs and GPUs of one replica (`ray.nodes()` rows)."""
    return sum(1 for n in nodes if n.get("Alive") and n.get("Resources", {}).get("CPU", 0.0) >= cpus
               and (gpus <= 0 or n.get("Resources", {}).get("GPU", 0.0) >= gpus))


def need(cpus: float, gpus: float) -> str:
    return f"{gpus:g} GPU and {cpus:g} CPU" if gpus > 0 else f"{cpus:g} CPU"


def run_watched(fn: Callable, *, cpus: float, gpus: float, wait_s: float, emit: Optional[Callable] = None,
                poll_s: float = 2.0, nodes: Optional[Callable[[], list]] = None):
    """`fn()` in a daemon thread; its result, its exception, or NoCapacity.

    On NoCapacity the thread is left waiting inside Ray Data (it cannot be interrupted
    from outside); the job then fails, and its driver exits, which ends the Ray job.
    """
    import ray

    nodes = nodes or ray.nodes
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    th = threading.Thread(target=target, name="ramplus-pipeline", daemon=True)
    th.start()
    lost_since = None
    while True:
        th.join(poll_s)
        if not th.is_alive():
            break
        try:
            ok = hosts(nodes(), cpus, gpus) > 0
        except Exception:  # noqa: BLE001 - the GCS busy or restarting: no verdict this time
            continue
        if ok:
            if lost_since is not None and emit:
                emit("capacity: a node that can host an inference replica is back")
            lost_since = None
        elif lost_since is None:
            lost_since = time.monotonic()
            if emit:
                emit(f"capacity: no live node can host an inference replica ({need(cpus, gpus)}); waiting up to "
                     f"{wait_s:g} s (inference.capacity_wait_s) for one to join")
        elif time.monotonic() - lost_since >= wait_s:
            raise NoCapacity(f"no live node could host an inference replica ({need(cpus, gpus)}) for "
                             f"{wait_s:g} s (inference.capacity_wait_s); the batches already staged are kept")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def object_nodes(ref) -> list[str]:
    """Ids of the nodes whose object stores hold a copy of `ref` now (the vocabulary: the driver's
    node plus one per node whose replicas read it, however many replicas that node ran)."""
    import ray

    try:
        return sorted(ray.experimental.get_object_locations([ref], timeout_ms=10_000)[ref]["node_ids"])
    except Exception:  # noqa: BLE001 - a record only
        return []

"""The capacity watch and the elastic pool's settings, without a cluster (fast)."""

from __future__ import annotations

import threading
import time

import pytest

from ramplus_core.job.capacity import NoCapacity, hosts, run_watched
from ramplus_core.job.pipeline import Resources, actor_pool


def node(cpu: float, gpu: float = 0.0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


def test_hosts_counts_live_nodes_with_a_replicas_resources():
    nodes = [node(2), node(1, 1), node(1, 1, alive=False), node(0.1, 4)]
    assert hosts(nodes, cpus=0.25, gpus=1) == 1
    assert hosts(nodes, cpus=0.25, gpus=0) == 2  # CPU replicas: any live node with the CPUs
    assert hosts(nodes, cpus=1, gpus=2) == 0


def test_run_watched_returns_raises_or_gives_up_when_no_node_can_host():
    assert run_watched(lambda: 7, cpus=1, gpus=1, wait_s=1, nodes=lambda: [node(1, 1)], poll_s=0.01) == 7
    with pytest.raises(ZeroDivisionError):
        run_watched(lambda: 1 / 0, cpus=1, gpus=1, wait_s=1, nodes=lambda: [node(1, 1)], poll_s=0.01)

    stuck = threading.Event()
    lines = []
    t0 = time.monotonic()
    with pytest.raises(NoCapacity, match=r"no live node could host an inference replica \(1 GPU and 0.5 CPU\) "
                                         r"for 0.3 s \(inference.capacity_wait_s\)"):
        run_watched(stuck.wait, cpus=0.5, gpus=1, wait_s=0.3, emit=lines.append, poll_s=0.02,
                    nodes=lambda: [node(4)])
    stuck.set()
    assert 0.3 <= time.monotonic() - t0 < 5 and "waiting up to 0.3 s" in lines[0]

    # capacity that comes back within the wait resets it
    seen = iter([[node(4)]] * 5 + [[node(1, 1)]] * 1000)
    done = threading.Event()
    threading.Timer(0.5, done.set).start()
    run_watched(lambda: done.wait(5), cpus=1, gpus=1, wait_s=0.3, emit=lines.append, poll_s=0.02,
                nodes=lambda: next(seen))
    assert any("is back" in line for line in lines)


def _res(actors, lo, hi) -> Resources:
    return Resources(4, 2, 2, actors, 1.0, 0.25, "cpu", "fp32", 1, 0.5, None, False, lo, hi)


def test_actor_pool_fixed_by_default_elastic_with_bounds():
    fixed = actor_pool(_res(2, 2, 2))
    assert (fixed.min_size, fixed.max_size, fixed.initial_size) == (2, 2, 2)
    elastic = actor_pool(_res(2, 1, 4))
    assert (elastic.min_size, elastic.max_size, elastic.initial_size) == (1, 4, 2)


def test_elastic_bounds_from_the_config(ray_local, tmp_path):
    from ramplus_core.errors import ConfigError
    from ramplus_core.job.config import load_config
    from ramplus_core.job.pipeline import plan_resources

    from ..conftest import CHECKPOINT, job_config

    def plan(**inference):
        return plan_resources(load_config(str(job_config(tmp_path, inference={"num_cpus": 0.25, **inference})),
                                          inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"),
                                          checkpoint=str(CHECKPOINT)))

    r = plan()  # a fixed pool: one CPU replica per node here
    assert (r.actors, r.min_actors, r.max_actors) == (1, 1, 1)
    r = plan(max_actors=3)
    assert (r.actors, r.min_actors, r.max_actors) == (1, 1, 3)
    r = plan(actors=1, min_actors=2, max_actors=4)  # starts at the minimum
    assert (r.actors, r.min_actors, r.max_actors) == (2, 2, 4)
    with pytest.raises(ConfigError, match="inference.min_actors: 3 is more than inference.max_actors: 2"):
        plan(min_actors=3, max_actors=2)

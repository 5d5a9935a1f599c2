"""Which Ray the job uses when no address is given: a head recorded by an earlier `ray start`
that is no longer running is passed over (a plain ray.init() would wait for it and then end
the process with status 1 and no message), a live one is used as Ray would."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ramplus_core.job.pipeline import stale_head_address

from .conftest import REPO, free_ports


@pytest.fixture
def ray_tmp(monkeypatch):
    # short: Ray's socket paths under its temp dir have a length limit
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", d)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (Path(d) / "ray").mkdir()
    return d


def test_stale_head_is_named_live_or_absent_is_not(ray_tmp):
    addr_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
    assert stale_head_address() is None  # no file: Ray starts its own anyway

    (port,) = free_ports(1)
    addr_file.write_text(f"127.0.0.1:{port}")
    assert stale_head_address() == f"127.0.0.1:{port}"

    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        addr_file.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert stale_head_address() is None

    addr_file.write_text("garbage")
    assert stale_head_address() is None  # not an address: left to Ray


@pytest.mark.slow
def test_job_starts_its_own_ray_past_a_stale_head_file(ray_tmp):
    (port,) = free_ports(1)
    (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    code = ("import ray\n"
            "from ramplus_core.job.config import load_config\n"
            "from ramplus_core.job.pipeline import ensure_ray\n"
            "cfg = load_config(overrides=[('ray.num_cpus', 1)], require_uris=False)\n"
            "assert ensure_ray(cfg)\n"
            "print('cpus', ray.cluster_resources()['CPU'])\n"
            "ray.shutdown()\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"ray: the head at 127.0.0.1:{port} named by {ray_tmp}/ray/ray_current_cluster" in p.stdout
    assert "cpus 1.0" in p.stdout

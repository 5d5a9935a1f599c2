"""A test cluster leaves this test process's own Ray (ray_local) as it found it: Ray's Node
points the process-wide internal-KV client at every GCS it starts, and a client left
pointing at a stopped cluster ended the whole test session 60 s later (status 1, no
summary) at the next test that used Ray Data."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_cluster_leaves_the_sessions_ray_usable(ray_local, ray_cluster):
    import ray
    import ray.experimental.internal_kv as kv

    before = kv.internal_kv_get_gcs_client()
    assert before is not None  # ray_local's
    c = ray_cluster()
    c.add_worker()
    assert kv.internal_kv_get_gcs_client() is before
    c.shutdown()
    assert kv.internal_kv_get_gcs_client() is before
    kv._internal_kv_put(b"ramplus-isolation", b"ok", overwrite=True)
    assert kv._internal_kv_get(b"ramplus-isolation") == b"ok"
    assert ray.data.range(4).count() == 4

"""benchmarks/ceiling.py runs end to end at tiny sizes: the stand-in model's runs commit, the
decode-only references run, the table prints, and the job's own Tagger is back afterwards."""

from __future__ import annotations

import pytest

from .conftest import benchmark_module


@pytest.mark.slow
def test_ceiling_benchmark_smoke(ray_local, tmp_path, capsys):
    from ramplus_core.job import pipeline
    from ramplus_core.job.inference import Tagger

    with benchmark_module("ceiling") as ceiling:
        results = ceiling.main(["--small", "24", "--large", "2", "--repeats", "1", "--no-s3",
                                "--images-dir", str(tmp_path / "images")])
    out = capsys.readouterr().out
    assert "| 0.3 MP local | 24 |" in out and "| 12 MP local | 2 |" in out
    for label, r in results.items():
        job = r["job"][0]
        assert job["images"] == (24 if label.startswith("0.3") else 2) and job["errors"] == 0, label
        assert r["pool"][0] > 0 and r["raydata"][0] > 0 and job["stream_rate"] > 0, label
        assert "MapBatches(load_inputs)" in job["busy_by_stage"], label  # the manifest's pipeline_stages
    assert pipeline.TAGGER_CLASS is Tagger

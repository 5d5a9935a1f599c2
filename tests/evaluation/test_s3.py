"""The tools on a run and images in S3 (the job's SeaweedFS fixture: a real S3 server)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ramplus_core.evaluation.annotations import parse_annotations
from ramplus_core.evaluation.benchmark import evaluate_sample, load_labelled
from ramplus_core.evaluation.report import build_report
from ramplus_core.evaluation.results import open_run
from ramplus_core.job.storage import Storage

import job.conftest as job_conftest  # tests/job is the package "job" under rootdir
from .conftest import brute_force_ap, write_run
from .synthetic import make_bench

s3_server = job_conftest.s3_server  # the fixture


def test_evaluate_and_report_a_run_in_s3(s3_server, tmp_path):
    b = make_bench(seed=12, n=20)
    prefix = f"s3://{s3_server.bucket}/eval"
    rows = b.rows()
    for r in rows:  # the images live in the bucket too
        r["uri"] = r["uri"].replace("file:///photos/set", f"{prefix}/photos")
    local = tmp_path / "out"
    write_run(local, rows)
    fs = s3_server.fs()
    fs.put(str(local) + "/", f"{s3_server.bucket}/eval/out/", recursive=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(buf, format="JPEG")
    fs.pipe({f"{s3_server.bucket}/eval/photos/img_{i:03d}.jpg": buf.getvalue() for i in range(20)})
    storage = Storage(endpoint_url=s3_server.endpoint, access_key_id=s3_server.key,
                      secret_access_key=s3_server.secret, region="us-east-1")

    run = open_run(f"{prefix}/out/", storage=storage)
    result = evaluate_sample(load_labelled(run, parse_annotations(b.annotation_text(), "gt.csv")))
    aps = [brute_force_ap(b.scores[b.annotated, k], b.labels[:, k]) for k in range(5) if k != 3]  # 3: "tree", no positives
    assert result["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    html = build_report(f"{prefix}/out/", sample=5, storage=storage)
    assert html.count("data:image/jpeg;base64,") == 5
    assert s3_server.secret not in html and s3_server.secret not in json.dumps(result)

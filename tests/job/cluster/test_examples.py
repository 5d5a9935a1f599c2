"""The cluster examples of docs/job.md ("On a cluster") stay runnable as the job changes.

No cluster here: the files are parsed, and the RayJob's job command goes through the job's
own argument parser and config loader, so a renamed flag or key fails this test rather than a
user's first night on Kubernetes.
"""

from __future__ import annotations

import importlib.util
import shlex

import yaml

from ramplus_core.job.config import load_config, parse_set

from ..conftest import REPO

EXAMPLES = REPO / "docs" / "cluster"


def _tag_bucket():
    spec = importlib.util.spec_from_file_location("tag_bucket_cli", REPO / "jobs" / "tag_bucket.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rayjob_command_is_accepted_by_the_job():
    job = yaml.safe_load((EXAMPLES / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("jobs/tag_bucket.py")
    args = _tag_bucket().build_parser().parse_args(argv[2:])
    cfg = load_config(str(REPO / "conf" / args.config.rsplit("/conf/", 1)[1]), inputs=args.input,
                      output=args.output, checkpoint=args.checkpoint, overrides=parse_set(args.set))
    assert cfg.inference.gpus_per_actor == 1 and (cfg.inference.min_actors, cfg.inference.max_actors) == (1, 8)
    assert cfg.checkpoint.startswith("s3://"), "a URL: downloaded once per node into RAMPLUS_CACHE"


def test_rayjob_keeps_keys_out_of_the_job_spec():
    job = yaml.safe_load((EXAMPLES / "rayjob.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            assert all("SECRET" not in e["name"] and "ACCESS_KEY" not in e["name"] for e in c.get("env", []))
            assert any("secretRef" in e for e in c.get("envFrom", [])), "keys come from a Kubernetes Secret"
    assert "secret" not in job["spec"]["entrypoint"].lower()
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] >= 1, "the job sizes itself from the GPUs present when it starts"


def test_cluster_launcher_example_is_consistent():
    c = yaml.safe_load((EXAMPLES / "ray-cluster-aws.yaml").read_text())
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    assert types[c["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    gpu = types["gpu"]
    assert gpu["min_workers"] >= 1 and gpu["max_workers"] <= c["max_workers"]
    assert not any("AWS_SECRET" in line for line in (EXAMPLES / "ray-cluster-aws.yaml").read_text().splitlines())

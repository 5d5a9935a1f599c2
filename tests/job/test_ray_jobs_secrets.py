"""Keys on the cluster's nodes, none in the submission: the secret appears nowhere Ray shows jobs.

One real head whose environment (set for `ray start`, as a node's would be) holds both
ways docs/job.md gives: the keys as AWS_* variables, and AWS_PROFILE with a shared
credentials file the test writes "on the node". The first job runs with the variables; the
second empties them (empty is unset for every client) so its driver and workers must find
the profile. Both read images from and write the tables to the SeaweedFS bucket. Then the
secret is looked for in everything Ray and the job leave behind; a third, trivial job that
passes a canary the wrong way (runtime_env env_vars, --set) shows those places do hold what
a submission carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
import uuid

import pytest

from ramplus_core.job.storage import Storage

from .conftest import REPO, VENV_BIN, S3Server, WeedProcess, table_rows
from .ray_head import ray_head, submit, wait_job

pytestmark = pytest.mark.slow

PROFILE = "ramplus-node"
SAMPLES = sorted(p for p in (REPO / "ramplus_core" / "samples").iterdir() if p.suffix.lower() == ".jpg")


def _entrypoint(prefix: str, out: str) -> str:
    return ("python jobs/tag_bucket.py --config conf/sample.yaml --checkpoint tests/golden/tiny/ram_plus_checkpoint.pth "
            f"--input s3://{prefix}/in/ --output s3://{prefix}/{out}")


def _api_text(client, address: str, job_ids: list[str]) -> dict[str, str]:
    """Everything Ray's job API, CLI and dashboard say about the jobs, by where it came from."""
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    cli_env["RAY_AUTH_MODE"] = "disabled"

    def cli(*args: str) -> str:
        r = subprocess.run([str(VENV_BIN / "ray"), "job", *args, "--address", address], env=cli_env,
                           capture_output=True, text=True, timeout=120)
        return r.stdout + r.stderr

    def http(path: str) -> str:
        with urllib.request.urlopen(address + path, timeout=30) as r:
            return r.read().decode()

    texts = {"list_jobs": json.dumps([j.model_dump(mode="json") for j in client.list_jobs()]),
             "ray job list": cli("list"), "/api/jobs/": http("/api/jobs/")}
    for j in job_ids:
        texts[f"get_job_info {j}"] = json.dumps(client.get_job_info(j).model_dump(mode="json"))
        texts[f"get_job_logs {j}"] = client.get_job_logs(j)
        texts[f"ray job logs {j}"] = cli("logs", j)
        texts[f"ray job status {j}"] = cli("status", j)
        texts[f"/api/jobs/{j}"] = http(f"/api/jobs/{j}")
    return texts


def _files_holding(root, needle: bytes) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue  # sockets, pipes
            try:
                with open(p, "rb") as f:
                    if needle in f.read():
                        found.append(p)
            except OSError:
                continue
    return found


def _cat(fs, key: str) -> bytes:
    try:
        return fs.cat(key)
    except FileNotFoundError:  # listed, then gone (a write probe) or a folder marker
        return b""


@pytest.fixture
def store(tmp_path):
    """A SeaweedFS of its own whose secret is made now: no file anywhere holds it (the shared
    server's is in conftest.py, which the working_dir upload copies into Ray's temp dir)."""
    key, secret = "node-" + uuid.uuid4().hex[:8], "node-secret-" + uuid.uuid4().hex
    weed = WeedProcess(tmp_path / "weed", [(key, secret)]).start()
    weed.wait_writable(key, secret)
    yield S3Server(weed.endpoint, key, secret, weed.bucket)
    weed.stop()


def test_keys_on_the_node_stay_out_of_rays_job_api(store, tmp_path):
    from ray.job_submission import JobSubmissionClient

    s3_server, secret = store, store.secret
    prefix = f"{s3_server.bucket}/creds"
    fs = s3_server.fs()
    fs.pipe({f"{prefix}/in/{p.name}": p.read_bytes() for p in SAMPLES})
    node = tmp_path / "node-home"
    node.mkdir()
    (node / "credentials").write_text(f"[{PROFILE}]\naws_access_key_id = {s3_server.key}\n"
                                      f"aws_secret_access_key = {secret}\n")
    node_env = {**os.environ, "AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_PROFILE": PROFILE, "AWS_SHARED_CREDENTIALS_FILE": str(node / "credentials"),
                "AWS_CONFIG_FILE": str(node / "config"),  # absent: no ~/.aws/config of this machine
                "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}  # no instance role to fall back on
    canary = "canary-" + uuid.uuid4().hex
    with ray_head(node_env) as head:
        with open(f"/proc/{head.pid}/environ", "rb") as f:
            assert secret.encode() in f.read(), "the node holds the key"
        client = JobSubmissionClient(head.address)
        env_job = submit(client, entrypoint=_entrypoint(prefix, "out-env"), runtime_env={"working_dir": str(REPO)})
        env_info = wait_job(client, env_job)
        profile_job = submit(client, entrypoint=_entrypoint(prefix, "out-profile"),
                             runtime_env={"working_dir": str(REPO),
                                          "env_vars": {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}})
        profile_info = wait_job(client, profile_job)
        wrong_way = submit(client, entrypoint=f"python -c pass --set storage.secret_access_key={canary}-set",
                           runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": canary + "-env"}})
        wait_job(client, wrong_way, timeout_s=120)

        for info, job, how in ((env_info, env_job, "keys from config/env"),
                               (profile_info, profile_job, "default credential chain")):
            logs = client.get_job_logs(job)
            assert info.driver_exit_code == 0, logs[-4000:]
            assert how in logs and "committed" in logs, logs[-3000:]
            print(f"{job}: {(info.end_time - info.start_time) / 1000:.0f} s")

        texts = _api_text(client, head.address, [env_job, profile_job, wrong_way])
        leaks = [where for where, text in texts.items() if secret in text]
        assert leaks == [], f"the secret is in: {leaks}"
        shown = {where for where, text in texts.items() if canary in text}
        assert {"list_jobs", f"get_job_info {wrong_way}", "/api/jobs/", "ray job list"} <= shown, \
            "what a submission carries is shown by the job API: the docs' warning"
        logs_dir = head.temp_dir
        assert any(logs_dir.rglob("*.log")) or any(logs_dir.rglob("*.out")), "Ray's session logs are there"
        assert _files_holding(logs_dir, secret.encode()) == []

    storage = Storage(endpoint_url=s3_server.endpoint, access_key_id=s3_server.key, secret_access_key=secret,
                      region="us-east-1")
    for out in ("out-env", "out-profile"):
        uri = f"s3://{prefix}/{out}"
        objects = fs.find(f"{prefix}/{out}")
        assert any("/_delta_log/" in o for o in objects) and any("/_runs/" in o for o in objects)
        assert [o for o in objects if secret.encode() in _cat(fs, o)] == []  # manifest, Delta logs, data files
        manifest = json.loads(fs.cat([o for o in objects if "/_runs/" in o and o.endswith(".json")][0]))
        assert manifest["counts"]["tagged"] == len(SAMPLES) > 0, "the keys were used: every image was read"
        assert manifest["counts"]["errors"] == 0
        for kind in ("tags", "errors"):
            rows = table_rows(uri, kind, storage).to_pylist()
            assert secret not in json.dumps(rows, default=str)
        assert len(table_rows(uri, "tags", storage, ["uri"])) == len(SAMPLES)

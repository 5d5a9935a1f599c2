"""A node's AWS_PROFILE reaches all three clients (s3fs, pyarrow, delta-rs) with no keys configured.

delta-rs ignores profiles, so `credentials.delta_keys` resolves one through botocore; the
rest of the job must then work as with configured keys, and the resolved secret must be
scrubbed like one. Against the session's real SeaweedFS.
"""

from __future__ import annotations

from ramplus_core.job import table as tb
from ramplus_core.job.config import StorageConfig
from ramplus_core.job.credentials import delta_keys, resolved_secrets
from ramplus_core.job.scrub import Scrubber
from ramplus_core.job.storage import Storage

PROFILE = "ramplus-test-node"


def _node(monkeypatch, tmp_path, s3_server, with_profile: bool = True):
    creds = tmp_path / "credentials"
    creds.write_text(f"[{PROFILE}]\naws_access_key_id = {s3_server.key}\naws_secret_access_key = {s3_server.secret}\n")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    if with_profile:
        monkeypatch.setenv("AWS_PROFILE", PROFILE)
    else:
        monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds if with_profile else tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))  # absent
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role here


def test_a_profile_on_the_node_serves_listing_reading_and_the_delta_commit(monkeypatch, tmp_path, s3_server):
    _node(monkeypatch, tmp_path, s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")  # empty is unset, as for botocore and the AWS SDK
    storage = Storage.from_config(StorageConfig(endpoint_url=s3_server.endpoint))
    assert storage.secrets() == () and "default credential chain" in storage.describe()
    out = f"s3://{s3_server.bucket}/profile-{tmp_path.name}"
    fs, path = storage.fsspec(out + "/x")  # s3fs: botocore's chain
    fs.pipe(path, b"1")
    pa_fs, path = storage.pyarrow(out + "/x")  # pyarrow: the AWS SDK's chain
    assert pa_fs.get_file_info(path).size == 1
    opts = tb.delta_options(storage, out)  # delta-rs: given the keys botocore found
    assert opts["AWS_SECRET_ACCESS_KEY"] == s3_server.secret
    versions = tb.ensure_tables(storage, out)
    assert versions["tags"] == versions["errors"] == 0
    assert tb.open_table(storage, out, "tags").version() == 0  # read back through delta-rs
    assert s3_server.secret in resolved_secrets()
    assert Scrubber().text(f"delta-rs said: {s3_server.secret}") == "delta-rs said: ***"


def test_no_profile_and_no_keys_leaves_delta_rs_to_its_own_chain(monkeypatch, tmp_path, s3_server):
    _node(monkeypatch, tmp_path, s3_server, with_profile=False)
    assert delta_keys() == {}
    opts = tb.delta_options(Storage(endpoint_url=s3_server.endpoint), f"s3://{s3_server.bucket}/x")
    assert "AWS_ACCESS_KEY_ID" not in opts and opts["AWS_ENDPOINT_URL"] == s3_server.endpoint

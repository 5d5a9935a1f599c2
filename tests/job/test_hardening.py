"""Hostile input and secrets: keys never leave the process in text, config and vocabulary
files cannot run code, limits hold on the wire, and no URI can steer where output is written.

The keys are recognisable fakes that a real SeaweedFS (started here) accepts, so a leak
anywhere shows up as a plain substring search over everything the job printed or wrote.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ramplus_core.errors import ConfigError, VocabularyError
from ramplus_core.job import load_config, run
from ramplus_core.job.config import IMAGE_EXTENSIONS, FetchConfig, parse_set
from ramplus_core.job.listing import has_extension
from ramplus_core.job.reader import fetch_decode
from ramplus_core.job.storage import Storage

from .conftest import BUCKET, CHECKPOINT, GOLDEN, REPO, WeedProcess, job_config, run_tag_bucket, table_rows
from .http_tap import HttpTap

FAKE_KEY, FAKE_SECRET = "AKIA-RAMPLUS-TEST-KEY", "s3cr3t-ramplus-test"
SECRETS = (FAKE_KEY, FAKE_SECRET)
MAX_BYTES = 200_000


def _jpeg(seed: int, w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png_bomb() -> bytes:
    """A valid PNG header claiming 60000 x 60000 pixels, a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def leaks(text) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return [s for s in SECRETS if s in text]


def file_text(path_or_bytes, name: str = "") -> str:
    """What a reader of the file sees: Parquet decoded (its pages may be compressed), else raw."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    name = name or str(path_or_bytes)
    if data[:4] == b"PAR1":
        return json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str)
    return data.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def fake_s3(tmp_path_factory):
    """A SeaweedFS that knows only the fake key, behind a tap that records every request."""
    weed = WeedProcess(tmp_path_factory.mktemp("fakes3"), [(FAKE_KEY, FAKE_SECRET)]).start()
    weed.wait_writable(FAKE_KEY, FAKE_SECRET)
    tap = HttpTap(int(weed.endpoint.rsplit(":", 1)[1]))
    yield weed, tap
    tap.close()
    weed.kill()


def _s3fs(endpoint: str, key: str = FAKE_KEY, secret: str = FAKE_SECRET):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key=key, secret=secret, skip_instance_cache=True,
                             use_listings_cache=False)


# -- one run over hostile names, with limits, keys from the environment ------------------------------

LOCAL_NAMES = [
    "new\nline.jpg", "tab\there.jpg", "x=1.jpg", "..jpg", "%2F..%2F..%2Fescape.jpg", "-leading-dash.jpg",
    " spaced name .jpg", "quote'\"s.jpg", "back\\slash.jpg", "ünïcødé 画像.jpg", "a" * 240 + ".jpg",
    "shard=99/p.jpg", "run_date=1999-01-01/shard=00/p.jpg", "deep/../dots.jpg",
]
S3_KEYS = [
    "in/../../escape.jpg", "in/..%2F..%2Fescape2.jpg", "in//double/slash.jpg", "in/./dot/seg.jpg",
    "in/new\nline.jpg", "in/shard=7/run_date=1999-01-01/hive.jpg", "in/x=y=z.jpg", "in/q?x=1&y=2#frag.jpg",
    "in/ünïcødé 画像.jpg", "in/" + "k" * 900 + ".jpg", "in/%00nul.jpg", "in/../../../etc/passwd.jpg",
]
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_.=-]{1,200}$")


def _tree(root: Path, skip: tuple[str, ...]) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(skip)]
        for n in dirnames + filenames:
            out.add(os.path.join(dirpath, n))
    return out


@pytest.fixture(scope="module")
def hostile_run(ray_local, fake_s3, tmp_path_factory):
    weed, tap = fake_s3
    tmp = tmp_path_factory.mktemp("hostile")
    local = tmp / "in"
    written_local = []
    for i, name in enumerate(LOCAL_NAMES):
        p = local / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_jpeg(i))
        written_local.append(p)
    (local / "bomb.png").write_bytes(_png_bomb())
    fs = _s3fs(weed.endpoint)
    for i, key in enumerate(S3_KEYS):
        try:
            fs.pipe(f"{BUCKET}/{key}", _jpeg(100 + i))
        except Exception:  # noqa: BLE001 - a key the server or client refuses is simply not there
            pass
    fs.pipe({f"{BUCKET}/in/limits/huge.jpg": _jpeg(1) + b"\0" * (MAX_BYTES + 10),
             f"{BUCKET}/in/limits/grows.jpg": _jpeg(2)})
    keys_before = set(fs.find(BUCKET))
    out = tmp / "out"
    cfg = load_config(str(job_config(tmp, decode={"max_bytes": MAX_BYTES, "batch_size": 4},
                                     layout={"shards": 4})),
                      inputs=[str(local), f"s3://{BUCKET}/in/"], output=str(out), checkpoint=str(CHECKPOINT))
    base = tmp.parent  # escapes would land beside or above the run's folder
    tree_before = _tree(base, skip=("fakes3", "weed"))
    lines = []
    grown = b"\xff\xd8" + os.urandom(3 * MAX_BYTES)

    def emit(line: str) -> None:
        lines.append(line)
        if line.startswith("listed "):  # the object grows after the listing saw its size
            _s3fs(weed.endpoint).pipe(f"{BUCKET}/in/limits/grows.jpg", grown)

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    mp.setenv("AWS_ENDPOINT_URL", tap.endpoint)
    mp.setenv("AWS_REGION", "us-east-1")
    try:
        result = run(cfg, emit=emit)
    finally:
        mp.undo()
    listed_s3 = [k for k in fs.find(f"{BUCKET}/in/")]
    return {"result": result, "lines": lines, "out": out, "local": local, "tap": tap, "fs": fs, "base": base,
            "tree_before": tree_before, "keys_before": keys_before, "listed_s3": listed_s3,
            "local_files": [p for p in local.rglob("*") if p.is_file()]}


def _rows(out: Path, run_id: str):
    got = {kind: [r for r in table_rows(out, kind).to_pylist() if r["run_id"] == run_id] for kind in ("tags", "errors")}
    return got["tags"], got["errors"]


def test_hostile_names_each_tagged_once(hostile_run):
    m = hostile_run["result"].manifest
    assert m["status"] == "committed" and m["invariant"]["ok"], m["invariant"]
    tags, errors = _rows(hostile_run["out"], m["run_id"])
    uris = [r["uri"] for r in tags] + [r["uri"] for r in errors]
    assert len(uris) == len(set(uris)) == m["counts"]["listed"]
    candidates = {f"file://{p}" for p in hostile_run["local_files"]} | {f"s3://{k}" for k in hostile_run["listed_s3"]}
    expected = {u for u in candidates if has_extension(u, IMAGE_EXTENSIONS)}
    assert set(uris) == expected
    # "..jpg" is an image too (os.path.splitext would call it extension-less: hidden-file rule)
    assert any(u.endswith("/..jpg") for u in uris)
    assert m["counts"]["not_images"] == len(candidates - expected)
    assert len(hostile_run["local_files"]) == len(LOCAL_NAMES) + 1
    assert len(hostile_run["listed_s3"]) >= len(S3_KEYS) // 2, hostile_run["listed_s3"]  # most keys were accepted


def test_output_paths_stay_under_the_output_prefix(hostile_run):
    out, base = hostile_run["out"], hostile_run["base"]
    new = _tree(base, skip=("fakes3", "weed")) - hostile_run["tree_before"]
    outside = sorted(p for p in new if not (p == str(out) or p.startswith(str(out) + os.sep)))
    assert outside == [], f"written outside {out}: {outside[:5]}"
    for p in out.rglob("*"):
        for part in p.relative_to(out).parts:
            assert _SAFE_COMPONENT.match(part) and part not in (".", ".."), f"unsafe path component {part!r} in {p}"
    partitions = {part for p in out.rglob("*") for part in p.relative_to(out).parts if "=" in part}
    assert partitions and all(re.fullmatch(r"shard=\d+", x) for x in partitions), partitions
    # and nothing was written to the bucket the inputs came from
    assert set(hostile_run["fs"].find(BUCKET)) == hostile_run["keys_before"]


def test_byte_and_pixel_limits_hold_through_the_job(hostile_run):
    m = hostile_run["result"].manifest
    _, errors = _rows(hostile_run["out"], m["run_id"])
    by_name = {e["uri"].rsplit("/", 1)[-1]: e for e in errors}
    assert by_name["bomb.png"]["stage"] == "decode" and "pixels" in by_name["bomb.png"]["error"]
    assert by_name["huge.jpg"]["stage"] == "fetch" and "not fetched" in by_name["huge.jpg"]["error"]
    assert by_name["grows.jpg"]["stage"] == "fetch" and f"read stopped at {MAX_BYTES + 1}" in by_name["grows.jpg"]["error"]
    tap = hostile_run["tap"]
    # the object listed over the limit was never requested; the one that grew was read with
    # one ranged GET that the server answered with max_bytes + 1 bytes, not 600 KB
    assert tap.requests_for("in/limits/huge.jpg") == []
    gets = tap.requests_for("in/limits/grows.jpg")
    assert len(gets) == 1, gets
    assert gets[0].range == f"bytes=0-{MAX_BYTES}" and gets[0].body_bytes <= MAX_BYTES + 1, gets[0]


def test_keys_from_the_environment_appear_nowhere(hostile_run, ray_local):
    res = hostile_run["result"]
    assert not leaks("\n".join(hostile_run["lines"])), "keys in the job's printed lines"
    assert not leaks(json.dumps(res.manifest, default=str)) and not leaks(res.summary)
    for p in hostile_run["out"].rglob("*"):
        if p.is_file():
            assert not leaks(file_text(p)), f"keys in {p}"
    assert any("keys from config/env" in x for x in hostile_run["lines"])  # they were used
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    for p in logs.rglob("*"):
        if p.is_file():
            assert not leaks(p.read_bytes()), f"keys in Ray's log {p}"


# -- keys given on the command line, the job as a process with its own Ray -------------------------

@pytest.mark.slow
def test_keys_on_the_command_line_appear_nowhere(fake_s3, tmp_path):
    weed, _ = fake_s3
    fs = _s3fs(weed.endpoint)
    fs.pipe({f"{BUCKET}/cli/a.jpg": _jpeg(7), f"{BUCKET}/cli/b.jpg": _jpeg(8),
             f"{BUCKET}/cli/corrupt.jpg": _jpeg(9)[:300] + b"\0" * 500})
    ray_tmp = Path(os.path.realpath("/tmp")) / f"rk{os.getpid()}"  # short: Ray's socket paths are limited
    ray_tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    args = ["--input", f"s3://{BUCKET}/cli/", "--output", f"s3://{BUCKET}/cli-out/", "--checkpoint", str(CHECKPOINT),
            "--quiet", "--ray-address", "local",
            "--set", f"storage.endpoint_url={weed.endpoint}", "--set", f"storage.access_key_id={FAKE_KEY}",
            "--set", f"storage.secret_access_key={FAKE_SECRET}", "--set", "storage.region=us-east-1",
            "--set", "ray.num_cpus=2", "--set", "decode.batch_size=2", "--set", "inference.batch_size=2",
            "--set", "inference.driver_max_images=0"]  # through Ray's workers, whose logs are checked
    try:
        proc = run_tag_bucket(*args, env=env)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
        assert not leaks(proc.stdout) and not leaks(proc.stderr)
        objects = fs.find(f"{BUCKET}/cli-out/")
        manifests = [k for k in objects if k.endswith(".json") and "/_runs/" in k]
        assert manifests
        m = json.loads(fs.cat(manifests[0]))
        assert m["counts"]["errors"] == 1 and m["config"]["storage"]["secret_access_key"] == "***"
        assert "storage.secret_access_key=***" in m["argv"]
        checked = 0
        for key in objects:
            try:
                data = fs.cat(key)
            except FileNotFoundError:  # a folder entry of SeaweedFS's filer, not an object
                continue
            checked += 1
            assert not leaks(file_text(data, key)), f"keys in s3://{key}"
        assert checked >= 3  # the manifest, its marker, data files
        ray_files = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_socket()]
        assert any(p.name.startswith("worker-") for p in ray_files), "no Ray worker logs were found to check"
        for p in ray_files:
            try:
                data = p.read_bytes()
            except OSError:
                continue
            assert not leaks(data), f"keys in Ray's file {p}"
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


# -- failing S3 calls, keys in URIs, secrets in bad config values ----------------------------------

def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import tag_bucket
    finally:
        sys.path.pop(0)
    code = tag_bucket.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_a_refused_key_is_reported_without_the_secret(fake_s3, tmp_path, capsys):
    weed, _ = fake_s3
    wrong = "wrong-" + FAKE_SECRET
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"storage": {"endpoint_url": weed.endpoint, "access_key_id": FAKE_KEY,
                                           "secret_access_key": wrong, "region": "us-east-1"}}))
    code, out, err = _main(["--config", str(cfg), "--input", f"s3://{BUCKET}/in/", "--output", str(tmp_path / "o"),
                            "--checkpoint", str(CHECKPOINT)], capsys)
    assert code == 2 and "refused" in err and "SignatureDoesNotMatch" not in out
    assert not leaks(out + err) and wrong not in err, err
    assert len(err.strip().splitlines()) == 1

    # the same refusal inside the pipeline: an error row that names it, without the keys
    import pyarrow as pa
    from ramplus_core.preprocess import DecodeLimits

    storage = Storage(endpoint_url=weed.endpoint, access_key_id=FAKE_KEY, secret_access_key=wrong, region="us-east-1")
    batch = pa.table({"uri": [f"s3://{BUCKET}/in/limits/huge.jpg"], "size": [10], "etag": [None],
                      "mtime": pa.array([None], pa.timestamp("us", tz="UTC")),
                      "list_error": pa.array([None], pa.string())})
    rows = fetch_decode(batch, storage=storage, fetch=FetchConfig(retries=1, backoff_s=0.01),
                        limits=DecodeLimits(max_bytes=MAX_BYTES)).to_pylist()
    assert [r["stage"] for r in rows] == ["fetch"]
    assert "access denied" in rows[0]["error"] or "signature" in rows[0]["error"].lower(), rows[0]
    for r in rows:
        assert not leaks(r["error"]) and wrong not in r["error"], r["error"]


@pytest.mark.parametrize("where", ["input", "output", "checkpoint"])
def test_keys_in_a_uri_are_refused_without_echoing_them(tmp_path, capsys, where):
    uri = f"s3://{FAKE_KEY}:{FAKE_SECRET}@{BUCKET}/in/"
    args = {"input": f"s3://{BUCKET}/in/", "output": str(tmp_path / "o"), "checkpoint": str(CHECKPOINT)}
    args[where] = uri + ("model.pth" if where == "checkpoint" else "")
    code, out, err = _main([f"--{k}={v}" for k, v in args.items()], capsys)
    assert code == 2 and "keys in the URI are not supported" in err, err
    assert not leaks(out + err), err


def test_a_secret_of_the_wrong_type_is_not_echoed(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("storage:\n  secret_access_key: 123456789\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), require_uris=False)
    assert "storage.secret_access_key" in str(e.value) and "123456789" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, require_uris=False, overrides=parse_set(["storage.access_key_id=[s3cr3t-ramplus-test]"]))
    assert not leaks(str(e.value))


# -- config and vocabulary files cannot run code ---------------------------------------------------

def test_a_config_with_a_python_tag_is_refused(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"decode:\n  batch_size: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), require_uris=False)
    msg = str(e.value)
    assert "refused" in msg and "python/object/apply:os.system" in msg and "line 2" in msg, msg
    assert not marker.exists()
    code, _, err = _main(["--config", str(cfg), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                          "--checkpoint", str(CHECKPOINT)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refused" in err
    with pytest.raises(ConfigError, match="refused"):
        parse_set([f"decode.batch_size=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_a_vocabulary_file_with_a_python_tag_or_pickled_arrays_is_refused(tmp_path):
    from ramplus_core.vocab_file import load_vocabulary
    from ramplus_core.vocabulary import Vocabulary

    import torch

    builtin = Vocabulary(names=["cat"], thresholds=np.array([0.5], np.float32), zh=[None],
                         embeds=torch.ones((1, 512)) / 512 ** 0.5, offsets=torch.tensor([0, 1]))
    marker = tmp_path / "code_ran"
    vocab = tmp_path / "vocab.yaml"
    vocab.write_text(f"builtin: all\ntags:\n  - name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(VocabularyError, match="python/object/apply"):
        load_vocabulary(str(vocab), builtin)
    assert not marker.exists()

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    npy = tmp_path / "emb.npy"
    np.save(npy, np.array([RunsCode()], dtype=object), allow_pickle=True)
    vocab.write_text(f"builtin: none\ntags:\n  - name: logo\n    embeddings: {npy}\n")
    with pytest.raises(VocabularyError, match="logo.*Object arrays cannot be loaded"):
        load_vocabulary(str(vocab), builtin)
    assert not marker.exists()


def test_a_latin1_name_is_tagged_and_odd_objects_are_counted(ray_local, tmp_path):
    """One Latin-1 name used to stop the listing every night; links out and FIFOs vanished."""
    src = tmp_path / "in"
    src.mkdir()
    image = (GOLDEN / "images" / "rgb_640x480.jpg").read_bytes()
    with open(os.fsencode(src) + b"/caf\xe9.jpg", "wb") as f:
        f.write(image)
    (tmp_path / "elsewhere.jpg").write_bytes(image)
    os.symlink(tmp_path / "elsewhere.jpg", src / "link_out.jpg")
    os.mkfifo(src / "pipe.jpg")  # reading it would block the reader forever
    out = tmp_path / "out"
    cfg = load_config(str(job_config(tmp_path)), inputs=[str(src)], output=str(out), checkpoint=str(CHECKPOINT))
    lines: list[str] = []
    result = run(cfg, emit=lines.append)
    counts = result.manifest["counts"]
    assert (counts["listed"], counts["tagged"], counts["errors"], counts["not_regular"]) == (1, 1, 0, 2)
    assert len(result.manifest["not_regular_examples"]) == 2
    assert any("2 not regular files left out" in line for line in lines)
    uris = {r["uri"] for r in table_rows(out, "tags").to_pylist()}
    assert uris == {f"file://{src}/caf%E9.jpg"}


class _Same:
    def __call__(self, batch):
        return batch


def test_bounded_restarts_reach_ray_without_a_deprecation_notice(ray_local):
    """Every run printed Ray 2.60's `ray_remote_args` notice, caused by our max_restarts."""
    import warnings

    import ray.data
    from ray.data import ActorPoolStrategy

    from ramplus_core.job.pipeline import map_with_bounded_restarts

    kw = dict(batch_size=2, compute=ActorPoolStrategy(size=1), num_cpus=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = map_with_bounded_restarts(ray.data.range(4), _Same, max_restarts=5, max_task_retries=3, **kw)
    assert [str(w.message) for w in caught] == []
    assert ds._logical_plan.dag.ray_remote_args == {"max_restarts": 5, "max_task_retries": 3, "num_cpus": 1}
    with pytest.warns(DeprecationWarning, match="ray_remote_args"):  # fails once Ray names them: use those
        ray.data.range(4).map_batches(_Same, max_restarts=5, max_task_retries=3, **kw)

"""Checkpoint loading: every layout we promise to read, and a clear refusal for everything else.

Each variant is the golden checkpoint re-saved with one change, so a passing load can be
checked by comparing weights with the golden model exactly, without running it.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path

import fsspec
import pytest
import torch

from ramplus_core import CheckpointError, RamPlus
from ramplus_core.backbone import SWIN_BASE, SWIN_LARGE, SwinEncoder, infer_swin_config
from ramplus_core.checkpoint import GET_IT, RELEASED_URL, export_safetensors, official_name
from ramplus_core.head import HeadConfig

from conftest import with_golden_vocabulary

# fp16-rounded weights (as some released files are) computed in fp32 vs the fp32 weights,
# measured max |delta logit| 1.2e-3 on the image tested here (2.1e-3 over all six golden
# images, all 144 decisions equal).
FP16_MAX_ABS_LOGIT = 5e-3


def load(path, **kwargs) -> RamPlus:
    return RamPlus.from_checkpoint(str(path), device="cpu", **kwargs)


def assert_same_weights(a: RamPlus, b: RamPlus) -> None:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.vocabulary.embeds, b.vocabulary.embeds)


# -- layouts we accept ---------------------------------------------------------------------

def test_architecture_inferred_from_golden_shapes(tiny_model, golden):
    cfg = tiny_model.config
    swin, head = golden.expected["swin"], golden.expected["head"]
    assert cfg.swin.img_size == golden.expected["image_size"] == 384
    assert cfg.swin.embed_dim == swin["embed_dim"]
    assert list(cfg.swin.depths) == swin["depths"]
    assert list(cfg.swin.num_heads) == swin["num_heads"]
    assert cfg.swin.window_size == swin["window_size"]
    assert cfg.swin.out_width == swin["vision_width"]
    assert cfg.swin.patch_size == 4 and cfg.swin.mlp_ratio == 4.0
    assert cfg.head.hidden_size == head["hidden_size"]
    assert cfg.head.num_heads == head["num_attention_heads"]
    assert cfg.head.num_layers == head["num_hidden_layers"]
    assert cfg.head.intermediate_size == head["intermediate_size"]
    assert cfg.head.encoder_width == golden.expected["label_embed_dim"]
    assert cfg.descriptions_per_tag == golden.expected["descriptions_per_tag"]
    assert len(tiny_model.vocabulary) == len(golden.tags)


@pytest.mark.parametrize("swin", [SWIN_LARGE, SWIN_BASE], ids=["swin_l", "swin_b"])
def test_architecture_inferred_for_released_sizes(swin):
    with torch.device("meta"):  # shapes only, no memory
        ours = SwinEncoder(swin).state_dict()
    microsoft = {official_name("encoder." + k)[len("visual_encoder."):]: v for k, v in ours.items()}
    assert "layers.0.downsample.reduction.weight" in microsoft  # Microsoft layout: stage 0 ends with it
    assert infer_swin_config(microsoft) == swin


def test_explicit_config_override(golden, tiny_model):
    model = load(golden.checkpoint, config=tiny_model.config)
    assert model.config == tiny_model.config
    wrong = replace(tiny_model.config, head=HeadConfig())  # Swin-L's head on the tiny weights
    with pytest.raises(CheckpointError, match="wrong shape"):
        load(golden.checkpoint, config=wrong)


def test_vision_multi_head_names(write_checkpoint, tiny_model):
    path = write_checkpoint(rename=("tagging_head.", "vision_multi."))
    assert_same_weights(load(path), tiny_model)


def test_extra_top_level_entries_ignored(write_checkpoint, tiny_model):
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    path = write_checkpoint(extra={"optimizer": optimizer, "epoch": 5, "config": {"name": "ram_plus", "image_size": 384}})
    assert_same_weights(load(path), tiny_model)


def test_bare_state_dict(write_checkpoint, tiny_model):
    assert_same_weights(load(write_checkpoint(bare=True)), tiny_model)


def test_fp16_checkpoint(write_checkpoint, tiny_model, golden, golden_logits_ours):
    model = load(write_checkpoint(dtype=torch.float16))
    ref = tiny_model.net.state_dict()
    for k, v in model.net.state_dict().items():  # loaded as fp32, equal to the rounded weights
        assert v.dtype == ref[k].dtype
        assert torch.equal(v, ref[k].half().to(ref[k].dtype) if v.is_floating_point() else ref[k]), k
    with_golden_vocabulary(model, golden)
    logits = model.logits(golden.pixels()[:1])
    assert (logits[0] - golden_logits_ours[0]).abs().max().item() <= FP16_MAX_ABS_LOGIT
    probs, on = model.decide(logits)
    assert [golden.tags[i] for i in on[0].nonzero()[0]] == golden.expected_tags[0]


# -- safetensors export and URLs ------------------------------------------------------------

def test_safetensors_export_fp32_round_trip(tmp_path, tiny_model, golden):
    out = tmp_path / "sub" / "tiny.safetensors"  # parent folder created on demand
    export_safetensors(tiny_model, str(out))
    again = load(out)
    assert again.config == tiny_model.config
    assert_same_weights(again, tiny_model)
    assert again.model_id == tiny_model.model_id  # stable across .pth and export
    assert out.stat().st_size < golden.checkpoint.stat().st_size  # derived buffers not stored


def test_safetensors_export_fp16(tmp_path, tiny_model, write_checkpoint):
    out = tmp_path / "tiny16.safetensors"
    export_safetensors(tiny_model, str(out), dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() in ("F16", "I64") for k in f.keys())
    again = load(out)
    # an fp16 export is exactly the fp16-rounded model, the same as loading an fp16 .pth
    assert_same_weights(again, load(write_checkpoint(dtype=torch.float16)))
    assert again.model_id != tiny_model.model_id


def test_model_id_changes_with_weights(write_checkpoint, tiny_model):
    assert load(write_checkpoint(random=True)).model_id != tiny_model.model_id


def test_load_from_fsspec_urls(golden, tiny_model, tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/ramplus-test/ram_plus.pth", golden.checkpoint.read_bytes())
    try:
        assert_same_weights(load("memory://ramplus-test/ram_plus.pth"), tiny_model)
        export_safetensors(tiny_model, str(tmp_path / "t.safetensors"))
        fs.pipe("/ramplus-test/t.safetensors", (tmp_path / "t.safetensors").read_bytes())
        assert_same_weights(load("memory://ramplus-test/t.safetensors"), tiny_model)
        with pytest.raises(CheckpointError, match="not found") as e:
            load("memory://ramplus-test/missing.pth")
        assert RELEASED_URL in str(e.value)
    finally:
        fs.rm("/ramplus-test", recursive=True)
    assert_same_weights(load("file://" + str(golden.checkpoint.resolve())), tiny_model)


# -- what we refuse --------------------------------------------------------------------------

def test_missing_weights_named_as_in_the_file(write_checkpoint):
    gone = ["tagging_head.encoder.layer.1.output.dense.weight", "visual_encoder.layers.2.downsample.reduction.weight",
            "fc.bias"]
    path = write_checkpoint(edit=lambda sd: {k: v for k, v in sd.items() if k not in gone})
    with pytest.raises(CheckpointError) as e:
        load(path)
    msg = str(e.value)
    assert "3 missing weights" in msg and str(path) in msg
    for name in gone:
        assert name in msg


def test_missing_label_embed(write_checkpoint):
    with pytest.raises(CheckpointError, match="label_embed"):
        load(write_checkpoint(edit=lambda sd: {k: v for k, v in sd.items() if k != "label_embed"}))


@pytest.mark.parametrize("key,shape", [
    ("wordvec_proj.weight", (64, 511)),
    ("visual_encoder.layers.1.blocks.0.mlp.fc1.weight", (250, 64)),
])
def test_wrong_shape_named(write_checkpoint, key, shape):
    path = write_checkpoint(edit=lambda sd: {**sd, key: torch.zeros(shape)})
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        load(path)
    assert key in str(e.value) and str(shape) in str(e.value)


class _WritesAFile:
    """Unpickling this object opens (creates) a file: a stand-in for arbitrary code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_code_refused_and_not_run(write_checkpoint, tmp_path, zip_format):
    proof = tmp_path / "proof_payload_works"
    pickle.loads(pickle.dumps(_WritesAFile(proof)))  # plain unpickling does run it
    assert proof.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    sd = torch.load(write_checkpoint(), weights_only=True)["model"]
    torch.save({"model": sd, "hook": _WritesAFile(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refused") as e:
        load(path)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert "likely succeed" not in str(e.value)  # torch's advice to retry unsafely is not passed on


def _write(tmp_path, name, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("case", ["text", "truncated", "truncated_header", "empty", "json", "not_state_dict",
                                  "non_tensor_entries", "random_safetensors"])
def test_not_a_checkpoint(case, tmp_path, golden):
    if case == "text":
        path = _write(tmp_path, "notes.pth", b"this is not a checkpoint\n")
        expect = "not a checkpoint"
    elif case == "truncated":
        path = _write(tmp_path, "cut.pth", golden.checkpoint.read_bytes()[:3_000_000])
        expect = "truncated"
    elif case == "truncated_header":
        path = _write(tmp_path, "cut2.pth", golden.checkpoint.read_bytes()[:100])
        expect = "truncated"
    elif case == "empty":
        path = _write(tmp_path, "empty.pth", b"")
        expect = "empty"
    elif case == "json":
        path = golden.dir / "expected.json"
        expect = "not a checkpoint"
    elif case == "not_state_dict":
        path = tmp_path / "list.pth"
        torch.save([torch.zeros(2), torch.ones(2)], path)
        expect = "not a RAM\\+\\+ checkpoint"
    elif case == "non_tensor_entries":
        path = tmp_path / "mixed.pth"
        torch.save({"model": {"fc.weight": torch.zeros(1, 4), "note": "hello"}}, path)
        expect = "not tensors"
    else:
        from safetensors.torch import save_file

        path = tmp_path / "other.safetensors"
        save_file({"w": torch.zeros(3)}, str(path))
        expect = "label_embed"
    with pytest.raises(CheckpointError, match=expect) as e:
        load(path)
    assert "\n" not in str(e.value)  # one line for the CLI


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_missing_checkpoint_gives_the_download_hint(case, tmp_path):
    path = tmp_path / "ram_plus_swin_large_14m.pth" if case == "missing" else tmp_path
    with pytest.raises(CheckpointError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg and GET_IT in msg
    assert ("not found" if case == "missing" else "folder") in msg
    assert not os.path.exists(tmp_path / "ram_plus_swin_large_14m.pth")


def _spoil(sd: dict, key: str, value: float, dtype=None) -> dict:
    t = sd[key].clone().to(dtype or sd[key].dtype)
    t.view(-1)[t.numel() // 2] = value
    return {**sd, key: t}


@pytest.mark.parametrize("key,value,dtype", [
    ("tagging_head.encoder.layer.1.output.dense.weight", float("nan"), None),
    ("visual_encoder.layers.0.blocks.1.attn.qkv.bias", float("inf"), None),
    ("label_embed", float("-inf"), torch.float16),
])
def test_non_finite_weights_refused_at_load(write_checkpoint, key, value, dtype):
    path = write_checkpoint(edit=lambda sd: _spoil(sd, key, value, dtype))
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and "\n" not in msg


def test_non_finite_weights_refused_in_a_safetensors_export(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good.safetensors"
    export_safetensors(tiny_model, str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(good))
    bad = tmp_path / "bad.safetensors"
    save_file(_spoil(tensors, "head.fc.weight", float("nan")), str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="head.fc.weight holds NaN"):
        load(bad)


def test_truncated_safetensors_refused(tmp_path, tiny_model):
    good = tmp_path / "good.safetensors"
    export_safetensors(tiny_model, str(good))
    cut = _write(tmp_path, "cut.safetensors", good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        load(cut)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)

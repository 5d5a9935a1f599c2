"""Reading RAM++ checkpoints: the released .pth, our safetensors export, any fsspec URL.

A checkpoint is untrusted input: .pth files go through `torch.load(weights_only=True)`, so
a file with pickled code is refused, never run. The architecture is read from the tensor
shapes, so Swin-L, Swin-B and small test models load without a config file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .backbone import SwinConfig, infer_swin_config, microsoft_to_timm
from .errors import CheckpointError
from .head import HeadConfig
from .release import GET_IT, RELEASED_BYTES, RELEASED_URL

log = logging.getLogger(__name__)

SAFETENSORS_CONFIG_KEY = "ramplus_config"

# The paper's BERT-style names for one head layer -> our module's names.
_HEAD_NAMES = {
    "crossattention.self.query": "q",
    "crossattention.self.key": "k",
    "crossattention.self.value": "v",
    "crossattention.output.dense": "attn_out",
    "crossattention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_HEAD_KEY = re.compile(r"^tagging_head\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_OUR_HEAD_KEY = re.compile(r"^head\.layers\.(\d+)\.(\w+)\.(weight|bias)$")
_OUR_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


@dataclass(frozen=True)
class ModelConfig:
    swin: SwinConfig = field(default_factory=SwinConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    descriptions_per_tag: int = 51

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        swin = d["swin"]
        swin["depths"], swin["num_heads"] = tuple(swin["depths"]), tuple(swin["num_heads"])
        return cls(SwinConfig(**swin), HeadConfig(**d["head"]), d["descriptions_per_tag"])


@dataclass
class LoadedCheckpoint:
    """Weights in our module's names, the vocabulary embeddings, and the inferred config."""

    config: ModelConfig
    state: dict[str, torch.Tensor]  # keys of RamPlusNet.state_dict()
    label_embed: torch.Tensor  # [num_tags * descriptions_per_tag, 512]
    source: str
    official_names: bool = False  # the file uses the paper's names, so errors should too

    def file_name(self, key: str) -> str:
        """A weight's name as it appears in the file, for error messages the user can act on."""
        return official_name(key) if self.official_names else key


def official_name(key: str) -> str:
    """Inverse of `convert_official` for one key: our module's name -> the paper's name."""
    if key.startswith("encoder.swin."):
        k = _OUR_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key[len("encoder.swin."):])
        return "visual_encoder." + k
    if m := _OUR_HEAD_KEY.match(key):
        official = {v: k for k, v in _HEAD_NAMES.items()}.get(m.group(2))
        if official:
            return f"tagging_head.encoder.layer.{m.group(1)}.{official}.{m.group(3)}"
    if key.startswith("head."):
        return key[len("head."):]
    return key


def _read_bytes_or_path(uri: str) -> tuple[str | None, bytes | None]:
    """Local files stay paths (memory-mapped later); remote objects are read once."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint not found: {path}. {GET_IT}")
        if os.path.isdir(path):
            raise CheckpointError(f"checkpoint path is a folder, not a file: {path}. {GET_IT}")
        return path, None
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            return None, f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {uri}. {GET_IT}") from None
    except Exception as e:  # noqa: BLE001 - storage errors vary by backend
        raise CheckpointError(f"cannot read checkpoint {uri}: {type(e).__name__}: {e}") from None


def _is_safetensors(head: bytes) -> bool:
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def read_raw(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as stored in the file plus safetensors metadata ({} for .pth)."""
    path, data = _read_bytes_or_path(uri)
    if path is not None:
        with open(path, "rb") as f:
            head = f.read(16)
    else:
        head = data[:16]
    if _is_safetensors(head):
        from safetensors import safe_open
        from safetensors.torch import load as st_load

        try:
            if path is not None:
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                    return {k: f.get_tensor(k) for k in f.keys()}, meta
            meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
            return st_load(data), meta
        except Exception as e:  # noqa: BLE001
            detail = " ".join(str(e).split())[:300]
            raise CheckpointError(f"{uri} is a corrupt or truncated safetensors checkpoint ({detail}); "
                                  f"export or download it again.") from None
    if not head:
        raise CheckpointError(f"{uri} is empty (0 bytes), not a checkpoint. {GET_IT}")
    if not _is_zip(head) and head[:1] != b"\x80":
        # torch.save writes a zip or a protocol-2 pickle; anything else would only reach the
        # unpickler and be misreported as "holds pickled objects".
        raise CheckpointError(
            f"{uri} is not a checkpoint: neither a PyTorch file (.pth) nor safetensors "
            f"(it starts with {head[:8]!r}). {GET_IT}"
        )
    try:
        if path is not None:
            top = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(head))
        else:
            top = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {uri}: it holds pickled objects other than tensors "
            f"(loaded with weights_only=True, so no code in it ran). Use the released RAM++ "
            f"checkpoint or a ramplus safetensors export. Detail: {_unpickling_detail(e)}"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip, EOF, magic-number errors
        raise CheckpointError(
            f"{uri} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"It may be truncated: the released file is {RELEASED_BYTES:,} bytes."
        ) from None
    if isinstance(top, dict) and isinstance(top.get("model"), dict):
        state = top["model"]
    elif isinstance(top, dict) and top and all(isinstance(v, torch.Tensor) for v in top.values()):
        state = top
    else:
        raise CheckpointError(
            f"{uri} is not a RAM++ checkpoint: expected {{'model': state_dict}} "
            f"but found {type(top).__name__}"
            + (f" with keys {sorted(map(str, top))[:8]}" if isinstance(top, dict) else "")
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{uri}: entries that are not tensors: {bad[:8]}")
    return state, {}


def _unpickling_detail(e: Exception) -> str:
    """The line of torch's message that names what was refused.

    Its first line advises retrying with weights_only=False, the wrong advice for an
    untrusted file, so it is not what we show.
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith("Unsupported"):
            return ln
    return lines[0] if lines else type(e).__name__


def _is_zip(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04"


def _infer_head(state: dict[str, torch.Tensor], num_heads: int) -> HeadConfig:
    layers = {int(m.group(1)) for k in state if (m := _HEAD_KEY.match(k))}
    if not layers:
        raise CheckpointError("no tagging head weights (tagging_head.* or vision_multi.*) in the checkpoint")
    q = state["tagging_head.encoder.layer.0.crossattention.self.query.weight"]
    k = state["tagging_head.encoder.layer.0.crossattention.self.key.weight"]
    ffn = state["tagging_head.encoder.layer.0.intermediate.dense.weight"]
    return HeadConfig(
        hidden_size=q.shape[0],
        num_heads=num_heads,
        num_layers=max(layers) + 1,
        intermediate_size=ffn.shape[0],
        encoder_width=k.shape[1],
    )


def convert_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's names -> our module's names; derived buffers and unused entries dropped."""
    out: dict[str, torch.Tensor] = {}
    swin = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    for k, v in microsoft_to_timm(swin).items():
        if not k.startswith("head."):
            out["encoder.swin." + k] = v
    for k, v in state.items():
        k = "tagging_head." + k[len("vision_multi."):] if k.startswith("vision_multi.") else k
        if m := _HEAD_KEY.match(k):
            name = _HEAD_NAMES.get(m.group(2))
            if name:
                out[f"head.layers.{m.group(1)}.{name}.{m.group(3)}"] = v
        elif k.split(".")[0] in ("wordvec_proj", "fc"):
            out["head." + k] = v
        elif k == "reweight_scale":
            out["head.reweight_scale"] = v.reshape(())
        elif k.startswith("image_proj."):
            out[k] = v
    return out


def load(uri: str, *, num_heads: int = 4, descriptions_per_tag: int | None = None,
         img_size: int | None = None, config: ModelConfig | None = None) -> LoadedCheckpoint:
    """Read and convert a checkpoint; the shapes decide the architecture unless `config` is given."""
    raw, meta = read_raw(str(uri))
    if SAFETENSORS_CONFIG_KEY in meta:
        cfg = config or ModelConfig.from_json(meta[SAFETENSORS_CONFIG_KEY])
        label_embed = raw.pop("label_embed", None)
        state = raw
    else:
        if "label_embed" not in raw:
            raise CheckpointError(f"{uri}: no 'label_embed' tensor; this is not a RAM++ checkpoint")
        label_embed = raw["label_embed"]
        if config is None:
            swin_state = {k[len("visual_encoder."):]: v for k, v in raw.items() if k.startswith("visual_encoder.")}
            if "patch_embed.proj.weight" not in swin_state:
                raise CheckpointError(f"{uri}: no Swin weights (visual_encoder.*); this is not a RAM++ checkpoint")
            try:
                swin = infer_swin_config(swin_state, img_size)
            except KeyError as e:
                raise CheckpointError(f"{uri}: Swin weights incomplete, missing {e}") from None
            head = _infer_head(
                {("tagging_head." + k[len("vision_multi."):] if k.startswith("vision_multi.") else k): v
                 for k, v in raw.items()}, num_heads)
            cfg = ModelConfig(swin, head, descriptions_per_tag or 51)
        else:
            cfg = config
        state = convert_official(raw)
    if label_embed is None:
        raise CheckpointError(f"{uri}: no 'label_embed' tensor")
    official = SAFETENSORS_CONFIG_KEY not in meta
    check_finite({**state, "label_embed": label_embed}, str(uri), official_name if official else (lambda k: k))
    if descriptions_per_tag:
        cfg = replace(cfg, descriptions_per_tag=descriptions_per_tag)
    d = cfg.descriptions_per_tag
    if label_embed.ndim != 2 or label_embed.shape[0] % d or label_embed.shape[1] != cfg.head.encoder_width:
        raise CheckpointError(
            f"{uri}: label_embed has shape {tuple(label_embed.shape)}; expected [num_tags * {d}, "
            f"{cfg.head.encoder_width}] (set descriptions_per_tag if your model uses another count)"
        )
    return LoadedCheckpoint(cfg, state, label_embed, str(uri), official_names=official)


def check_finite(state: dict[str, torch.Tensor], source: str, name=lambda key: key) -> None:
    """Refuse weights with NaN or infinity before any image sees them.

    Such a model turns every image into an infer error that is retried every night; one
    pass over the weights at load (they are read then anyway) costs far less.
    """
    for key, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{source}: weight {name(key)} holds NaN or infinite values, so the file is damaged or "
                f"comes from a diverged training run; use the released checkpoint ({RELEASED_URL}).")


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str,
                name=lambda key: key) -> None:
    """One error that lists every missing or mis-shaped learned weight, by `name(key)`."""
    missing = [name(k) for k in expected if k not in state]
    shapes = [
        f"{name(k)}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if missing or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing weights: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if shapes:
            parts.append(f"{len(shapes)} with the wrong shape: {'; '.join(shapes[:10])}" + (" ..." if len(shapes) > 10 else ""))
        raise CheckpointError(f"{source} does not fit the RAM++ model: " + ". ".join(parts))
    extra = sorted(set(state) - set(expected))
    if extra:
        log.info("ignored %d checkpoint entries not used for inference (e.g. %s)", len(extra), extra[:3])


def export_safetensors(model, path: str, dtype: torch.dtype | None = None) -> None:
    """Weights only (no optimizer state) in our names, with the config in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach() for k, v in model.net.state_dict().items()}
    tensors["label_embed"] = model.label_embed
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={SAFETENSORS_CONFIG_KEY: model.config.to_json()})


def read_label_embed(uri: str) -> tuple[torch.Tensor, int]:
    """The vocabulary's description embeddings and descriptions per tag, nothing else.

    A run whose model id is cached (job/model_ids.py) still needs the id of a vocabulary it
    has not seen (tags removed, thresholds changed), and that id hashes these embeddings;
    the 200M backbone weights it does not need. A memory-mapped .pth or a safetensors file
    reads only this tensor's bytes, so this costs a fraction of `load`.
    """
    path, data = _read_bytes_or_path(str(uri))
    meta: dict = {}
    if path is not None:
        with open(path, "rb") as f:
            head = f.read(16)
    if path is not None and _is_safetensors(head):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                label_embed = f.get_tensor("label_embed") if "label_embed" in f.keys() else None
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{uri} is a corrupt or truncated safetensors checkpoint "
                                  f"({' '.join(str(e).split())[:300]}); export or download it again.") from None
    else:
        raw, meta = read_raw(str(uri))
        label_embed = raw.get("label_embed")
    if label_embed is None:
        raise CheckpointError(f"{uri}: no 'label_embed' tensor; this is not a RAM++ checkpoint")
    d = ModelConfig.from_json(meta[SAFETENSORS_CONFIG_KEY]).descriptions_per_tag if SAFETENSORS_CONFIG_KEY in meta \
        else ModelConfig().descriptions_per_tag
    check_finite({"label_embed": label_embed}, str(uri))
    if label_embed.ndim != 2 or label_embed.shape[0] % d:
        raise CheckpointError(f"{uri}: label_embed has shape {tuple(label_embed.shape)}; expected [num_tags * {d}, width]")
    return label_embed, d

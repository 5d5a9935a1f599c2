"""RAM++ as one module, and `RamPlus`, the public object other programs use.

`RamPlusNet` holds the learned weights; the vocabulary is kept outside it as a
`PreparedVocabulary` so a run can build it once and share it (a Ray object, say) among
every model replica instead of each one recomputing `wordvec_proj` over 233k descriptions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .backbone import SwinEncoder
from .checkpoint import LoadedCheckpoint, ModelConfig, check_state, load
from .errors import CheckpointError, ImageError, VocabularyError
from .head import PreparedVocabulary, TaggingHead
from .preprocess import DecodeLimits, ImageInput, decode_any, normalize
from .vocabulary import Vocabulary

DEFAULT_CHUNK = 1024


class RamPlusNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SwinEncoder(cfg.swin)
        self.image_proj = nn.Linear(cfg.swin.out_width, cfg.head.encoder_width)
        self.head = TaggingHead(cfg.head)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> projected image tokens [N, 145, 512]; independent of the vocabulary."""
        return self.image_proj(self.encoder(pixels))

    def forward(self, pixels: torch.Tensor, vocab: PreparedVocabulary, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
        return self.head(self.image_tokens(pixels), vocab, chunk_size)


@dataclass
class TagResult:
    tags: list[str]
    scores: list[float]
    zh: list[str | None]
    width: int
    height: int
    error: str | None = None  # set when this image could not be decoded; tags are then empty

    def as_dict(self, zh: bool = False) -> dict:
        d = {"tags": self.tags, "scores": [round(s, 4) for s in self.scores], "width": self.width, "height": self.height}
        if self.error:
            d["error"] = self.error
        if zh:
            d["tags_zh"] = self.zh
        return d


def resolve_device(device=None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if str(dtype) not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return names[str(dtype)]


class RamPlus:
    """A loaded RAM++ model with its vocabulary, ready to tag images."""

    def __init__(self, net: RamPlusNet, label_embed: torch.Tensor, vocabulary: Vocabulary,
                 device=None, dtype=None, chunk_size: int = DEFAULT_CHUNK,
                 prepared: PreparedVocabulary | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.net = net.to(device=self.device, dtype=self.dtype).eval()
        self.label_embed = label_embed
        self.vocabulary = vocabulary
        self.chunk_size = chunk_size
        self._prepared = prepared.to(self.device, self.dtype) if prepared is not None else None
        self._model_id: str | None = None

    @property
    def config(self) -> ModelConfig:
        return self.net.cfg

    @classmethod
    def from_checkpoint(cls, path_or_url: str, device=None, dtype=None, *, vocabulary: Vocabulary | None = None,
                        chunk_size: int = DEFAULT_CHUNK, config: ModelConfig | None = None,
                        num_heads: int = 4, descriptions_per_tag: int | None = None,
                        prepared: PreparedVocabulary | None = None) -> "RamPlus":
        """Load the released .pth or a ramplus safetensors export, local or any fsspec URL.

        The architecture is read from the tensor shapes; `config` overrides it. The head's
        attention-head count is not visible in shapes: RAM++ uses 4.
        """
        ck: LoadedCheckpoint = load(path_or_url, num_heads=num_heads,
                                    descriptions_per_tag=descriptions_per_tag, config=config)
        with torch.device("meta"):
            net = RamPlusNet(ck.config)
        expected = net.state_dict()
        check_state(expected, ck.state, ck.source, ck.file_name)
        state = {k: ck.state[k].to(torch.float32) if ck.state[k].is_floating_point() else ck.state[k] for k in expected}
        try:
            net.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{ck.source} does not fit the RAM++ model: {e}") from None
        _rebuild_buffers(net)
        if vocabulary is None:
            vocabulary = Vocabulary.from_label_embed(ck.label_embed, ck.config.descriptions_per_tag)
        return cls(net, ck.label_embed, vocabulary, device, dtype, chunk_size, prepared)

    # -- vocabulary -------------------------------------------------------------------
    def prepare_vocabulary(self, vocabulary: Vocabulary | None = None) -> PreparedVocabulary:
        """Project a vocabulary's descriptions once; shareable across model replicas."""
        v = vocabulary or self.vocabulary
        empty = (v.counts == 0).nonzero()
        if len(empty):
            raise VocabularyError(f"tag {v.names[int(empty[0])]!r} has no description embeddings")
        with torch.inference_mode():
            return self.net.head.prepare(v.embeds.to(self.device, self.dtype), v.offsets)

    def set_vocabulary(self, vocabulary: Vocabulary, prepared: PreparedVocabulary | None = None) -> None:
        self.vocabulary = vocabulary
        self._prepared = prepared.to(self.device, self.dtype) if prepared is not None else None

    @property
    def prepared(self) -> PreparedVocabulary:
        if self._prepared is None:
            self._prepared = self.prepare_vocabulary()
        return self._prepared

    @property
    def model_id(self) -> str:
        """Content hash of the learned weights (dtype as loaded), stable across file formats."""
        if self._model_id is None:
            h = hashlib.sha256()
            for k, v in sorted(self.net.state_dict().items()):
                if k.rsplit(".", 1)[-1] in ("relative_position_index", "attn_mask"):
                    continue
                h.update(k.encode() + b"\0")
                h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._model_id = h.hexdigest()[:16]
        return self._model_id

    # -- inference ----------------------------------------------------------------------
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net.image_tokens(pixels.to(self.device, self.dtype))

    def logits_from_tokens(self, tokens: torch.Tensor, prepared: PreparedVocabulary | None = None) -> torch.Tensor:
        with torch.inference_mode():
            out = self.net.head(tokens.to(self.device, self.dtype), prepared or self.prepared, self.chunk_size)
        return out.float()

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [N, 3, 384, 384] normalised pixels -> pre-sigmoid logits [N, num_tags]."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [N, 3, H, W], got {tuple(pixels.shape)}")
        return self.logits_from_tokens(self.image_tokens(pixels))

    def decide(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and on/off decisions against the per-tag thresholds."""
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        return probs, probs > self.vocabulary.thresholds[None, :]

    def tag(self, images: Iterable[ImageInput], batch_size: int = 8,
            limits: DecodeLimits = DecodeLimits()) -> list[TagResult]:
        """Bytes, paths or PIL images -> tags over threshold with scores, sorted by score.

        One result per input, in order; an image that cannot be decoded gets a result with
        `error` set instead of failing the others.
        """
        items = list(images)
        results: list[TagResult] = []
        for start in range(0, len(items), batch_size):
            decoded: list = []
            for x in items[start:start + batch_size]:
                try:
                    decoded.append(decode_any(x, limits))
                except ImageError as e:
                    decoded.append(e)
            good = [d for d in decoded if not isinstance(d, ImageError)]
            if good:
                probs, on = self.decide(self.logits(normalize(np.stack([d.array for d in good]))))
                scored = iter(zip(good, probs, on))
            for d in decoded:
                if isinstance(d, ImageError):
                    results.append(TagResult([], [], [], 0, 0, error=d.reason))
                else:
                    _, p, o = next(scored)
                    results.append(self._result(p, o, d.width, d.height))
        return results

    def _result(self, probs: np.ndarray, on: np.ndarray, width: int, height: int) -> TagResult:
        idx = np.flatnonzero(on)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        v = self.vocabulary
        return TagResult([v.names[i] for i in idx], [float(probs[i]) for i in idx],
                         [v.zh[i] for i in idx], width, height)


def _rebuild_buffers(net: RamPlusNet) -> None:
    """Derived buffers (window indices, shift masks) are not in the file: timm recomputes them.

    The net was built on the meta device so Swin-L's 200M parameters are never randomly
    initialised just to be overwritten; only these cheap buffers need real values.
    """
    for module in net.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device="cpu")
        if hasattr(module, "_init_buffers"):
            module._init_buffers()
    left = [n for n, b in net.named_buffers() if b.is_meta] + [n for n, p in net.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"internal: tensors left uninitialised after loading: {left[:5]}")

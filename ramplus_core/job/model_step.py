"""The model's side of a run: its ids (cached when the files are unchanged) and, when the
plan has work, the model itself loaded once in the driver.

Kept apart from runner.py because a night with nothing to do must get by on the ids alone
(model_ids.py holds the cache); only `ensure_model` pays for the weights.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import CheckpointError
from ..release import GET_IT
from . import model_ids as mi
from .config import JobConfig, redact_uri
from .inference import materialize_checkpoint
from .storage import Storage
from .vocab import build_vocabulary, descriptor, load_descriptor


def load_model_once(cfg: JobConfig, storage: Storage):
    """Load the checkpoint in the driver: fail fast, hash it, project the vocabulary once."""
    from ..model import RamPlus

    path = _checkpoint_path(cfg, storage)
    model = RamPlus.from_checkpoint(path, device="cpu", chunk_size=cfg.inference.chunk_size)
    vocab = build_vocabulary(cfg.vocabulary, model.vocabulary)
    prepared = model.prepare_vocabulary(vocab)
    vocab_id = vocab.content_id()
    return {
        "model_id": model.model_id,
        "vocab_id": vocab_id,
        "names": list(vocab.names),
        "thresholds": np.asarray(vocab.thresholds, dtype=np.float32),
        "arrays": prepared.to_numpy(),
        "descriptions_per_tag": vocab.max_descriptions,
        "descriptor": descriptor(vocab, vocab_id),
        "checkpoint_descriptions_per_tag": int(model.config.descriptions_per_tag),
        "model_loaded": True,
        "ids_from": "checkpoint",
    }


def model_ids(cfg: JobConfig, storage: Storage, emit) -> dict:
    """The run's model and vocabulary ids; from the id cache when the files are unchanged (model_ids.py).

    Cached ids and a descriptor in `_vocab/`: no checkpoint byte is read beyond 1 MiB. A
    cached model id with a vocabulary not seen before (tags removed, thresholds changed):
    only the checkpoint's label_embed is read. Otherwise the model is loaded as before, and
    its arrays are kept for the work. Without the arrays, `ensure_model` loads it if the
    plan has work.
    """
    ident = mi.checkpoint_identity(cfg.checkpoint, storage)
    vident = mi.vocabulary_identity(cfg.vocabulary, storage)
    ck_key, v_key = mi.IdCache.keys(ident, vident)
    cache = mi.IdCache.load(storage, cfg.output)
    hit, vhit = cache.model(ck_key), cache.vocab(v_key)
    if hit and vhit and vhit.get("model_id") == hit["model_id"]:
        desc = load_descriptor(storage, cfg.output, vhit["vocab_id"])
        if desc and desc.get("vocab_id") == vhit["vocab_id"]:
            return {"model_id": hit["model_id"], "vocab_id": vhit["vocab_id"], "names": list(desc["names"]),
                    "thresholds": np.asarray(desc["thresholds"], dtype=np.float32),
                    "descriptions_per_tag": int(vhit.get("descriptions_per_tag", hit["descriptions_per_tag"])),
                    "descriptor": desc, "model_loaded": False, "ids_from": "cache", "cache_keys": (ck_key, v_key)}
    if hit:
        from ..checkpoint import read_label_embed  # torch and timm: not for a night the cache answers
        from ..vocabulary import Vocabulary

        path = _checkpoint_path(cfg, storage)
        label_embed, d = read_label_embed(path)
        vocab = build_vocabulary(cfg.vocabulary, Vocabulary.from_label_embed(label_embed, d))
        vocab_id = vocab.content_id()
        cache.put(ck_key, v_key, hit["model_id"], d, vocab_id, vocab.max_descriptions, cfg.checkpoint)
        cache.save()
        return {"model_id": hit["model_id"], "vocab_id": vocab_id, "names": list(vocab.names),
                "thresholds": np.asarray(vocab.thresholds, dtype=np.float32),
                "descriptions_per_tag": vocab.max_descriptions, "descriptor": descriptor(vocab, vocab_id),
                "model_loaded": False, "ids_from": "cached model_id, vocabulary from label_embed",
                "cache_keys": (ck_key, v_key)}
    model = load_model_once(cfg, storage)
    cache.put(ck_key, v_key, model["model_id"], _checkpoint_d(model), model["vocab_id"],
              model["descriptions_per_tag"], cfg.checkpoint)
    cache.save()
    model["cache_keys"] = (ck_key, v_key)
    return model


def _checkpoint_d(model: dict) -> int:
    return int(model.pop("checkpoint_descriptions_per_tag", model["descriptions_per_tag"]))


def _checkpoint_path(cfg: JobConfig, storage: Storage) -> str:
    """The checkpoint as a local file (downloaded once per node), or one sentence saying why not."""
    try:
        return materialize_checkpoint(cfg.checkpoint, storage)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {redact_uri(cfg.checkpoint)} does not exist. {GET_IT}") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - download errors of any client
        raise CheckpointError(f"checkpoint: cannot download {redact_uri(cfg.checkpoint)}: {type(e).__name__}: {e}") from None


def ensure_model(cfg: JobConfig, storage: Storage, model: dict, emit) -> dict:
    """Load the model for work planned with cached ids, and check that the ids were right.

    A cached id can only be wrong if the checkpoint changed while its size, mtime and
    sampled bytes (or its ETag) did not; then the cache is corrected and the run stops
    before anything is written with the wrong id.
    """
    from .runner import JobFailed  # the run's failure type; runner imports this module

    if "arrays" in model:
        return model
    t = time.perf_counter()
    full = load_model_once(cfg, storage)
    if (full["model_id"], full["vocab_id"]) != (model["model_id"], model["vocab_id"]):
        ck_key, v_key = model["cache_keys"]
        cache = mi.IdCache.load(storage, cfg.output)
        cache.put(ck_key, v_key, full["model_id"], _checkpoint_d(full), full["vocab_id"],
                  full["descriptions_per_tag"], cfg.checkpoint)
        cache.save()
        raise JobFailed(f"checkpoint: {redact_uri(cfg.checkpoint)} changed without a change of size, mtime or ETag, "
                        f"so the cached ids were wrong; they are corrected now: start the job again")
    model.update(arrays=full["arrays"], model_loaded=True)
    emit(f"model loaded for the work ({time.perf_counter() - t:.1f}s)")
    return model

"""Description embeddings kept by (text-tower id, text), so a re-run encodes only new text.

Growing a vocabulary by ten tags should cost ten tags' worth of text encoding, not 233k
sentences again. Entries live as Parquet files under `<cache>/<tower_id>/`, one file per
run that added something; files are only ever added, so concurrent runs cannot corrupt
each other (at worst both encode the same new sentence once).
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    def __init__(self, uri: str, tower_id: str):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(uri)
        self.dir = f"{root.rstrip('/')}/{tower_id}"
        self._known: dict[str, np.ndarray] | None = None
        self.hits = 0
        self.misses = 0

    def _load(self) -> dict[str, np.ndarray]:
        if self._known is None:
            self._known = {}
            if self.fs.exists(self.dir):
                for path in sorted(self.fs.glob(f"{self.dir}/*.parquet")):
                    with self.fs.open(path, "rb") as f:
                        t = pq.read_table(f)
                    emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(), dtype=np.float32)
                    emb = emb.reshape(t.num_rows, -1)
                    for k, e in zip(t.column("key").to_pylist(), emb):
                        self._known[k] = e
        return self._known

    def get_or_encode(self, texts: list[str], encode) -> np.ndarray:
        """Embeddings for `texts` in order; `encode(list[str]) -> [n, d]` runs on the misses only."""
        known = self._load()
        keys = [text_key(t) for t in texts]
        todo = {k: t for k, t in zip(keys, texts) if k not in known}
        self.misses += len(todo)
        self.hits += len(texts) - len(todo)
        if todo:
            new_keys = list(todo)
            emb = np.asarray(encode([todo[k] for k in new_keys]), dtype=np.float32)
            self._write(new_keys, emb)
            known.update(zip(new_keys, emb))
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([known[k] for k in keys])

    def _write(self, keys: list[str], emb: np.ndarray) -> None:
        d = emb.shape[1]
        table = pa.table({
            "key": pa.array(keys, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), d),
        })
        self.fs.makedirs(self.dir, exist_ok=True)
        tmp = f"{self.dir}/.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, f"{self.dir}/{uuid.uuid4().hex}.parquet")

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

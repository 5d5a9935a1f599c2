"""A small synthetic benchmark: scores with ties, a class nobody has, a duplicated list line."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["cat", "dog", "car", "tree", "sky"]
VOCAB = CLASSES + ["extra_a", "extra_b"]  # the run's vocabulary is larger than the benchmark's
THRESHOLD = 0.5


@dataclass
class Bench:
    uris: list  # the run's tagged images
    scores: np.ndarray  # [images, vocab], rounded: many ties
    labels: np.ndarray  # [images, classes]
    annotated: list  # indexes of tagged images that are annotated
    errored_uri: str
    missing_id: str

    def rows(self, floor: float = 0.0) -> list[dict]:
        out = []
        for i, u in enumerate(self.uris):
            s = {t: float(self.scores[i, k]) for k, t in enumerate(VOCAB)}
            tags = [t for t in VOCAB if s[t] > THRESHOLD]
            kept = {t: v for t, v in s.items() if v >= floor or t in tags}
            out.append({"uri": u, "scores": kept, "tags": tags})
        return out

    def annotation_text(self) -> str:
        lines = []
        for r, i in enumerate(self.annotated):
            tags = [c for k, c in enumerate(CLASSES) if self.labels[r, k]]
            lines.append(",".join([Path(self.uris[i]).stem] + tags))
        lines.append("broken_one,cat")
        lines.append(f"{self.missing_id},dog")
        return "\n".join(lines) + "\n"


def make_bench(seed: int = 0, n: int = 40) -> Bench:
    rng = np.random.default_rng(seed)
    uris = [f"file:///photos/set/img_{i:03d}.jpg" for i in range(n)]
    scores = np.round(rng.random((n, len(VOCAB))), 1).astype(np.float32)  # tenths: ties everywhere
    annotated = [i for i in range(n) if i % 7 != 3]  # some tagged images are not annotated
    labels = np.zeros((len(annotated), len(CLASSES)), dtype=bool)
    for r, i in enumerate(annotated):
        for k in range(len(CLASSES)):
            if CLASSES[k] == "tree":
                continue  # a class with no positives
            # correlated with the score, so AP is far from both 0 and 1
            labels[r, k] = rng.random() < 0.15 + 0.7 * scores[i, k]
    labels[0, :] = False  # an image with no tags at all
    return Bench(uris, scores, labels, annotated, "file:///photos/set/broken_one.jpg", "never_listed")


def bench_errors(b: Bench) -> list[dict]:
    return [{"uri": b.errored_uri, "error": "cannot decode: not a JPEG file", "stage": "decode"}]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_jobs_{name}", REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

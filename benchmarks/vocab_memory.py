"""Peak driver memory while a run's vocabulary is built and held, in a fresh process.

    .venv/bin/python benchmarks/vocab_memory.py                     # 100,000 tags, one description each
    .venv/bin/python benchmarks/vocab_memory.py --builtin 4585      # ... next to 4585 tags of 51
    .venv/bin/python benchmarks/vocab_memory.py --tags 5000 --long 100000   # one tag with 100,000
    .venv/bin/python benchmarks/vocab_memory.py --code /other/checkout      # another version of the code

The vocabulary file gives each new tag its embeddings as an `.npy` ([1, 512], random unit
rows: the memory does not depend on the values); `--builtin K` keeps K tags of a random
checkpoint vocabulary with 51 descriptions each. The child process does what the driver does
with a vocabulary (job/model_step.py): `load_vocabulary`, the head's `prepare` with the
released head's sizes (hidden 768, random weights), the flat arrays `ray.put` would copy,
`content_id` and the descriptor. It reports its peak RSS (VmHWM) over the RSS it had before,
so interpreter, torch and the random built-in vocabulary are not counted, and its address
space peak (VmPeak) over its size before: a zero-filled padded tensor is mostly never touched,
so it shows there first, and an allocation past what the kernel allows fails there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, re, sys, time
import numpy as np, torch
from ramplus_core.head import HeadConfig, TaggingHead
from ramplus_core.job.vocab import descriptor
from ramplus_core.vocab_file import load_vocabulary
from ramplus_core.vocabulary import Vocabulary

def status():
    t = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", t).group(1)) * 1024 for k in ("VmRSS", "VmHWM", "VmSize", "VmPeak")}

uri, builtin_n = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
n = max(builtin_n, 2)
label_embed = torch.nn.functional.normalize(torch.randn(n * 51, 512), dim=-1)
builtin = Vocabulary.from_label_embed(label_embed, 51)
head = TaggingHead(HeadConfig()).eval()
open("/proc/self/clear_refs", "w").write("5")
start = status()
before = start["VmRSS"]
stages = {}
t = time.perf_counter()
try:
    vocab = load_vocabulary(uri, builtin).vocabulary
except Exception as e:  # what a vocabulary too large to pad did before
    print(json.dumps({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                      "peak": status()["VmHWM"] - before, "virtual": status()["VmPeak"] - start["VmSize"]}))
    sys.exit(0)
stages["load_vocabulary"] = status()["VmHWM"] - before
if hasattr(vocab, "offsets"):
    prepared = head.prepare(vocab.embeds, vocab.offsets)
else:  # the padded layout of earlier versions
    prepared = head.prepare(vocab.embeds, vocab.mask)
stages["prepare"] = status()["VmHWM"] - before
arrays = prepared.to_numpy()
stages["to_numpy"] = status()["VmHWM"] - before
desc = descriptor(vocab, vocab.content_id())
stages["descriptor"] = status()["VmHWM"] - before
seconds = time.perf_counter() - t
held = status()["VmRSS"] - before
print(json.dumps({"tags": len(vocab), "peak": status()["VmHWM"] - before, "held": held, "stages": stages,
                  "virtual": status()["VmPeak"] - start["VmSize"],
                  "array_bytes": int(sum(a.nbytes for a in arrays.values())), "seconds": seconds}))
"""


def write_vocabulary(folder: Path, tags: int, long: int, builtin: int) -> str:
    import numpy as np
    import yaml

    rng = np.random.default_rng(0)
    entries = []
    emb = rng.standard_normal((tags, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for i in range(tags):
        np.save(folder / f"t{i}.npy", emb[i:i + 1])
        entries.append({"name": f"new tag {i}", "embeddings": f"t{i}.npy"})
    if long:
        many = rng.standard_normal((long, 512)).astype(np.float32)
        np.save(folder / "long.npy", many / np.linalg.norm(many, axis=1, keepdims=True))
        entries.append({"name": "long tag", "embeddings": "long.npy"})
    doc = {"builtin": "all" if builtin else "none", "tags": entries}
    path = folder / "vocab.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tags", type=int, default=100_000, help="new tags with one description each")
    p.add_argument("--long", type=int, default=0, help="one more tag with this many descriptions")
    p.add_argument("--builtin", type=int, default=0, help="built-in tags (51 descriptions each) kept")
    p.add_argument("--code", default=str(REPO), help="checkout whose ramplus_core the child imports")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vocab-memory-"))
    try:
        t = time.perf_counter()
        uri = write_vocabulary(tmp, args.tags, args.long, args.builtin)
        made = time.perf_counter() - t
        env = dict(os.environ, PYTHONPATH=args.code)
        # cwd too: `python -c` puts the current directory first on sys.path
        r = subprocess.run([sys.executable, "-c", CHILD, uri, str(args.builtin)], env=env, cwd=args.code,
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        out = json.loads(r.stdout.strip().splitlines()[-1])
        mib = 1 << 20
        if "error" in out:
            print(f"code {args.code}: failed after a peak RSS of {out['peak'] / mib:,.0f} MiB "
                  f"(address space peak +{out['virtual'] / mib:,.0f} MiB): {out['error']}")
            print(f"load average {open('/proc/loadavg').read().split()[:3]}")
            return 1
        print(f"code {args.code}: {out['tags']:,} tags ({args.builtin} built-in x 51, {args.tags:,} x 1"
              f"{f', one x {args.long:,}' if args.long else ''}); files written in {made:.1f} s")
        print(f"peak RSS over the start {out['peak'] / mib:,.0f} MiB (address space +{out['virtual'] / mib:,.0f} MiB), "
              f"held after {out['held'] / mib:,.0f} MiB, "
              f"shared arrays {out['array_bytes'] / mib:,.0f} MiB, {out['seconds']:.1f} s")
        print("peak by stage (MiB): " + ", ".join(f"{k} {v / mib:,.0f}" for k, v in out["stages"].items()))
        print(f"load average {open('/proc/loadavg').read().split()[:3]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

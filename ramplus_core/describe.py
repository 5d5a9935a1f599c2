"""Describing new tags with a language model, the way RAM++'s built-in descriptions were made.

The paper asked an LLM several differently worded questions about each tag's appearance,
took several answers to each, and put the plain "a photo of a {tag}." first. We do the
same against any OpenAI-compatible chat endpoint, and write the paper's JSON format
(`[{tag: [sentences]}]`) that a vocabulary file `import`s.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

PROMPTS = (
    "Describe briefly what a {} looks like.",
    "In a short answer, how would you recognise a {} in a photo?",
    "What does a {} look like? Answer concisely.",
    "List the visual features that identify a {}, in one or two sentences.",
    "Give a concise description of the visual appearance of {}.",
)


class DescribeError(RuntimeError):
    pass


def _post(url: str, body: dict, api_key: str | None, timeout: float, retries: int) -> dict:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429 or attempt == retries:
                raise DescribeError(f"{url} answered HTTP {e.code}: {e.read()[:200]!r}") from None
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
            if attempt == retries:
                raise DescribeError(f"cannot reach {url}: {e}") from None
        time.sleep(min(2 ** attempt, 10))
    raise AssertionError("unreachable")


def describe_tags(tags: list[str], endpoint: str, model: str, answers_per_prompt: int = 10,
                  api_key: str | None = None, temperature: float = 0.99, max_tokens: int = 77,
                  timeout: float = 60.0, retries: int = 3) -> list[dict[str, list[str]]]:
    """One {tag: ["a photo of a {tag}.", answers...]} per tag, answers_per_prompt x len(PROMPTS) answers."""
    url = endpoint.rstrip("/") + "/chat/completions"
    out = []
    for tag in tags:
        sentences = [f"a photo of a {tag}."]
        for prompt in PROMPTS:
            got: list[str] = []
            while len(got) < answers_per_prompt:  # servers may ignore n and answer once
                resp = _post(url, {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt.format(tag)}],
                    "n": answers_per_prompt - len(got),
                    "temperature": temperature,
                    "max_tokens": max_tokens,
                }, api_key, timeout, retries)
                choices = resp.get("choices") or []
                texts = [" ".join(str(c.get("message", {}).get("content", "")).split()) for c in choices]
                texts = [t for t in texts if t]
                if not texts:
                    raise DescribeError(f"{url} returned no answer for tag {tag!r}")
                got.extend(texts)
            sentences.extend(got[:answers_per_prompt])
        out.append({tag: sentences})
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m ramplus_core describe",
        description="Write LLM descriptions of new tags in the paper's JSON format, for a vocabulary file's `import:`. "
                    "The API key is read from $OPENAI_API_KEY (never printed).")
    ap.add_argument("tags", nargs="+", help="tag names to describe")
    ap.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    ap.add_argument("--model", required=True, help="model name the endpoint serves")
    ap.add_argument("--answers", type=int, default=10, help="answers per prompt (paper: 10, so 51 sentences per tag)")
    ap.add_argument("--out", required=True, help="output JSON file")
    args = ap.parse_args(argv)
    try:
        data = describe_tags(args.tags, args.endpoint, args.model, args.answers, os.environ.get("OPENAI_API_KEY"))
    except DescribeError as e:
        print(f"error: {e}")
        return 2
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    print(f"wrote {sum(len(next(iter(d.values()))) for d in data)} descriptions of {len(data)} tags to {args.out}")
    return 0

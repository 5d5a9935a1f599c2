"""LLM descriptions against a small OpenAI-compatible server run by the test on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ramplus_core.describe import PROMPTS, DescribeError, describe_tags, main
from ramplus_core.vocab_file import read_llm_descriptions


@pytest.fixture
def chat_server():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            if "forbidden" in body["messages"][0]["content"]:
                self.send_response(400)
                self.end_headers()
                return
            n = min(body.get("n", 1), 3)  # answers fewer than asked, as some servers do
            q = body["messages"][0]["content"]
            choices = [{"message": {"role": "assistant", "content": f"answer {len(seen)}.{i} to: {q}\n"}} for i in range(n)]
            data = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", seen
    srv.shutdown()


def test_paper_style_descriptions(chat_server):
    url, seen = chat_server
    out = describe_tags(["red kite", "pier"], url, "m", answers_per_prompt=4, api_key="sk-test")
    assert [list(d) for d in out] == [["red kite"], ["pier"]]
    sentences = out[0]["red kite"]
    assert sentences[0] == "a photo of a red kite."
    assert len(sentences) == 1 + 4 * len(PROMPTS)
    assert all("\n" not in s for s in sentences)
    assert seen[0]["path"] == "/v1/chat/completions" and seen[0]["auth"] == "Bearer sk-test"
    assert {s["messages"][0]["content"] for s in seen} >= {p.format("pier") for p in PROMPTS}


def test_cli_writes_an_importable_file(chat_server, tmp_path, monkeypatch, capsys):
    url, _ = chat_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    out = tmp_path / "d.json"
    assert main(["kite", "--endpoint", url, "--model", "m", "--answers", "2", "--out", str(out)]) == 0
    specs = read_llm_descriptions(str(out))
    assert specs[0].name == "kite" and len(specs[0].descriptions) == 1 + 2 * len(PROMPTS)
    assert "sk-secret-value" not in capsys.readouterr().out


def test_client_errors_are_reported(chat_server):
    url, _ = chat_server
    with pytest.raises(DescribeError, match="HTTP 400"):
        describe_tags(["forbidden thing"], url, "m", answers_per_prompt=1, retries=0)


def test_unreachable_endpoint_is_reported():
    with pytest.raises(DescribeError, match="cannot reach"):
        describe_tags(["x"], "http://127.0.0.1:9/v1", "m", answers_per_prompt=1, retries=0, timeout=2)

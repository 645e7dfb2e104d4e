"""Answer regeneration: resumable output, errors file, torn lines, OpenAI-compatible endpoint."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import REPO


class FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """Answers /chat/completions by reversing the last user message; 'FAIL' -> HTTP 500."""
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.seen.append(body)
        text = body["messages"][-1]["content"]
        if "FAIL" in text:
            self.send_response(500)
            self.end_headers()
            return
        out = {"choices": [{"message": {"role": "assistant", "content": text[::-1]},
                            "finish_reason": "stop"}], "usage": {"completion_tokens": len(text)}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    FakeOpenAI.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def _prompts(path, texts, bad_line_at=None):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            if i == bad_line_at:
                f.write("{not json\n")
            f.write(json.dumps({"conversations": [{"role": "user", "content": t}]}) + "\n")


def _run(args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "deepspec_jax.data.regenerate", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_endpoint_regeneration_resumes_and_records_errors(tmp_path, server):
    prompts = tmp_path / "p.jsonl"
    _prompts(prompts, ["alpha", "beta", "FAIL me", "gamma", "delta"], bad_line_at=2)
    out = tmp_path / "answers.jsonl"
    args = [f"--prompts={prompts}", f"--output={out}", f"--endpoint={server}", "--model_name=m",
            "--temperature=0.7", "--top_p=0.8", "--batch_size=2"]
    r = _run(args + ["--max_samples=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["conversations"][-1]["content"] for x in _rows(out)] == ["ahpla", "ateb"]
    assert FakeOpenAI.seen[0]["temperature"] == 0.7 and FakeOpenAI.seen[0]["top_p"] == 0.8

    with open(out, "a") as f:          # a torn line from a killed run is dropped on restart
        f.write('{"id": "p.jsonl:9", "conv')
    r = _run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{prompts}:3" in r.stderr and "not valid JSON" in r.stderr   # file:line of the bad line
    rows = _rows(out)
    assert [x["id"] for x in rows] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:5", "p.jsonl:6"]
    errors = _rows(str(out) + ".errors.jsonl")
    assert [e["id"] for e in errors] == ["p.jsonl:4"] and "HTTPError" in errors[0]["error"]
    n_requests = len(FakeOpenAI.seen)
    r = _run(args)                      # everything done: nothing is requested again
    assert r.returncode == 0 and len(FakeOpenAI.seen) == n_requests and "0 to go" in r.stdout


def test_malformed_line_stops_with_on_error_raise(tmp_path, server):
    prompts = tmp_path / "p.jsonl"
    _prompts(prompts, ["a", "b"], bad_line_at=1)
    r = _run([f"--prompts={prompts}", f"--output={tmp_path / 'o.jsonl'}", f"--endpoint={server}",
              "--on_error=raise"])
    assert r.returncode != 0 and f"{prompts}:2" in r.stderr


def test_interleave_takes_one_prompt_from_each_file_in_turn(tmp_path, server):
    """--interleave: a run stopped early (here by --max_samples) holds a mix of every file;
    ids stay <file>:<line>, so a resumed run skips what is done in either order."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _prompts(a, ["a1", "a2", "a3"])
    _prompts(b, ["b1"])
    out = tmp_path / "answers.jsonl"
    args = [f"--prompts={a},{b}", f"--output={out}", f"--endpoint={server}", "--model_name=m",
            "--batch_size=1"]
    r = _run(args + ["--interleave"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["id"] for x in _rows(out)] == ["a.jsonl:1", "b.jsonl:1", "a.jsonl:2", "a.jsonl:3"]
    out2 = tmp_path / "answers2.jsonl"
    r = _run([f"--prompts={a},{b}", f"--output={out2}", f"--endpoint={server}", "--model_name=m"])
    assert [x["id"] for x in _rows(out2)] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "b.jsonl:1"]

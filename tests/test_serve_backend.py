"""`pocketlm serve --backend URL`: the same front (keys, RAG with citations, errors in OpenAI's
shape) over another OpenAI-compatible server, here a second `pocketlm serve` process on the
default model, started by the test."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from click.testing import CliRunner
from test_rag import DOCS
from test_serve import LiveServer

from pocketlm.cli import cli
from pocketlm.errors import PocketError
from pocketlm.models.registry import DEFAULT_MODEL
from pocketlm.rag.index import index_paths
from pocketlm.serve.app import create_app
from pocketlm.serve.backend import RemoteModel, remote_pool
from pocketlm.serve.engine import ContextPool
from pocketlm.serve.generation import Reported
from pocketlm.serve.knowledge import KnowledgeBase

FRONT_KEY, BACK_KEY = "front-key", "back-key"
pytestmark = pytest.mark.real_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def backend():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", DEFAULT_MODEL, "--port", str(port), "--ctx", "1024",
                             "--api-key", BACK_KEY], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "the backend exited"
            assert time.time() < deadline, "the backend did not start in 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def front(backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("front")
    (root / "docs").mkdir()
    for name, text in DOCS.items():
        (root / "docs" / name).write_text(text)
    index_paths([root / "docs"], root / "docs.db", progress=False)
    pool = remote_pool(backend, BACK_KEY, None, DEFAULT_MODEL, 1024, 4, 8)
    server = LiveServer(create_app(pool, DEFAULT_MODEL, KnowledgeBase(root / "docs.db", root / "uploads"),
                                   api_key=FRONT_KEY, max_upload_mb=1))
    yield server
    server.stop()


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_the_front_answers_what_the_backend_answers(front, backend):
    ask = dict(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=12,
               temperature=0, seed=0)
    direct = _client(backend, BACK_KEY).chat.completions.create(**ask)
    via = _client(front.url, FRONT_KEY).chat.completions.create(**ask)
    assert via.choices[0].message.content == direct.choices[0].message.content and direct.choices[0].message.content
    # counted locally from the same vocabulary and chat template: the same numbers
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens
    assert via.usage.completion_tokens == direct.usage.completion_tokens
    pieces = [c.choices[0].delta.content or "" for c in _client(front.url, FRONT_KEY).chat.completions.create(**ask, stream=True)
              if c.choices]
    assert "".join(pieces) == direct.choices[0].message.content
    done = _client(front.url, FRONT_KEY).completions.create(model="x", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0)
    assert done.choices[0].text.strip().startswith("5")


def test_the_fronts_key_rag_and_limits_hold(front, backend):
    with pytest.raises(openai.AuthenticationError):  # the backend's key is not the front's
        _client(front.url, BACK_KEY).models.list()
    reply = _client(front.url, FRONT_KEY).chat.completions.create(
        model=f"{DEFAULT_MODEL}+rag", max_tokens=40, temperature=0,
        messages=[{"role": "user", "content": "How long should bread dough rise?"}])
    assert reply.model_extra["citations"][0]["source"].endswith("bread.rst")
    with pytest.raises(openai.BadRequestError) as err:  # checked in front, with the model's own vocabulary
        _client(front.url, FRONT_KEY).chat.completions.create(model=DEFAULT_MODEL, max_tokens=10,
                                                             messages=[{"role": "user", "content": "word " * 1500}])
    assert err.value.code == "context_length_exceeded"


def test_a_backend_that_is_wrong_is_found_at_start(backend):
    with pytest.raises(PocketError, match="refused the key"):
        remote_pool(backend, "wrong", None, DEFAULT_MODEL, 1024, 1, 1)
    with pytest.raises(PocketError, match="no model 'nope'"):
        remote_pool(backend, BACK_KEY, "nope", DEFAULT_MODEL, 1024, 1, 1)
    with pytest.raises(PocketError, match="cannot reach the backend"):
        remote_pool(f"http://127.0.0.1:{free_port()}", None, None, DEFAULT_MODEL, 1024, 1, 1)
    r = CliRunner().invoke(cli, ["serve", "--backend-key", "k"])
    assert r.exit_code == 1 and "are for --backend" in r.stderr


def test_the_backends_own_token_count_is_passed_on(front, backend):
    """The front asks for usage in the stream and reports the backend's count, not its own recount;
    all of a pool's slots share one HTTP client."""
    # an answer that ends itself: llama-server counts its end token, a recount of the text would not.
    # The second request finds the prompt in llama-server's cache and evaluates only its last token
    # again, alone: the same answer only because setup's llama-server computes a token alone and in
    # a batch to the same bits (scripts/llama.cpp-patches/batched-matmul.patch; 24 tokens against
    # 25 when one sequence's decode went through llama.cpp's own dot product)
    ask = dict(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=60, temperature=0)
    direct = list(_client(backend, BACK_KEY).chat.completions.create(**ask, stream=True,
                                                                     stream_options={"include_usage": True}))
    via = list(_client(front.url, FRONT_KEY).chat.completions.create(**ask, stream=True,
                                                                    stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in via if c.choices][-1] == "stop"
    assert direct[-1].usage.completion_tokens == via[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in via if c.choices)
    assert via[-1].usage.completion_tokens == len(_tokenizer().tokenize(text)) + 1  # the decoded end token counted
    pool = remote_pool(backend, BACK_KEY, None, DEFAULT_MODEL, 1024, 3, 8)
    assert len({id(m.connection) for m in pool.models}) == 1

    class Pool:  # what Reported needs of a pool: blocking work run for it
        async def run(self, fn, *args):
            return fn(*args)

    class Model:
        def tokenize(self, text):
            return text.split()

    async def count(chunks):
        reported = Reported()
        kept = [c for c in chunks if not reported.saw(c)]
        return len(kept), await reported.completion_tokens(Pool(), Model(), "a b c")

    piece = {"choices": [{"delta": {"content": "a"}, "finish_reason": None}]}
    assert asyncio.run(count([piece, {"choices": [], "usage": {"completion_tokens": 7}}])) == (1, 7)
    assert asyncio.run(count([piece])) == (1, 3)  # no usage from the engine: counted from the vocabulary


def test_a_backend_that_goes_away_gives_502_in_openais_shape():
    dead = f"http://127.0.0.1:{free_port()}"
    pool = ContextPool(dead, n_ctx=1024, parallel=1, max_queue=1,
                       loader=lambda url, n_ctx, n_threads: RemoteModel(url, None, "m", _tokenizer(), n_ctx, timeout=5))
    server = LiveServer(create_app(pool, "m", None, api_key=None, max_upload_mb=1))
    try:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r.status_code == 502 and r.json()["error"]["type"] == "server_error", r.text
        assert "backend" in r.json()["error"]["message"]
    finally:
        server.stop()


def _tokenizer():
    from pocketlm.serve.backend import LocalTokenizer

    return LocalTokenizer(DEFAULT_MODEL)


class _Scripted:
    """A backend that answers every POST with one canned reply (status, content type, body)."""

    def __init__(self, status: int, body: bytes, content_type: str = "text/event-stream"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answers(self, stream: bool) -> httpx.Response:
        pool = ContextPool(self.url, n_ctx=1024, parallel=1, max_queue=1,
                           loader=lambda url, n_ctx, n_threads: RemoteModel(url, None, "m", _tokenizer(), n_ctx, timeout=5))
        server = LiveServer(create_app(pool, "m", None, api_key=None, max_upload_mb=1))
        try:
            return httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": stream})
        finally:
            server.stop()
            self.httpd.shutdown()


def test_the_backends_refusals_and_stream_errors_reach_the_client():
    busy = _Scripted(429, b'{"error": {"message": "all slots busy", "type": "server_error"}}', "application/json")
    r = busy.answers(stream=False)
    assert r.status_code == 429 and "all slots busy" in r.json()["error"]["message"], r.text

    piece = b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}\n\n'
    broken = _Scripted(200, piece + b'data: {"error": {"message": "the engine ran out of memory"}}\n\n')
    r = broken.answers(stream=True)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert '"Hel"' in events[1] and "ran out of memory" in events[-2] and events[-1] == "[DONE]", events

    # one chunk longer than the HTTP client's default line limit (128 KiB) still comes through whole
    long = "x" * 300_000
    r = _Scripted(200, b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": "stop"}]}\n\n'
                  % long.encode()).answers(stream=False)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == long, r.text[:300]
    r = _Scripted(200, b'data: {"choices": [{"index": 0, "delta": {"content": "Hel\n\n').answers(stream=False)
    assert r.status_code == 502 and "malformed stream" in r.json()["error"]["message"], r.text

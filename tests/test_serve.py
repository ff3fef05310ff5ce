"""`pocketlm serve` against the official openai client, on a live server on loopback, with the
bundled default model on llama.cpp and a small index built here."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from test_rag import DOCS  # noqa: E402

from pocketlm.errors import PocketError  # noqa: E402
from pocketlm.models.export_gguf import cached_gguf
from pocketlm.models.registry import DEFAULT_MODEL
from pocketlm.rag.index import index_paths
from pocketlm.serve.app import create_app
from pocketlm.serve.engine import ContextPool  # noqa: E402
from pocketlm.serve.http import HeaderDeadlineProtocol
from pocketlm.serve.knowledge import KnowledgeBase, safe_filename  # noqa: E402

KEY = "test-key"
pytestmark = pytest.mark.real_model


class LiveServer:
    """uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, app, protocol=HeaderDeadlineProtocol):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    http=protocol))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "docs").mkdir()
    for name, text in DOCS.items():
        (root / "docs" / name).write_text(text)
    index_paths([root / "docs"], root / "docs.db", progress=False)
    kb = KnowledgeBase(root / "docs.db", root / "uploads")
    pool = ContextPool(cached_gguf(DEFAULT_MODEL, "f16"), n_ctx=1024, parallel=1, max_queue=4)
    server = LiveServer(create_app(pool, DEFAULT_MODEL, kb, api_key=KEY, max_upload_mb=1))
    server.pool, server.uploads = pool, root / "uploads"
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_models_chat_and_streaming_agree(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [DEFAULT_MODEL, f"{DEFAULT_MODEL}+rag"]
    ask = dict(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Name three colours."}],
               max_tokens=12, temperature=0, seed=0)
    reply = client.chat.completions.create(**ask)
    text = reply.choices[0].message.content
    assert text and reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 12
    assert reply.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
              if c.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text  # greedy: same text, in pieces


def test_completions_stop_and_json_mode(client):
    out = client.completions.create(model="anything", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"])
    assert out.choices[0].text.strip().startswith("5") and "7" not in out.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="anything", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"], stream=True))
    assert streamed == out.choices[0].text
    js = client.chat.completions.create(model=DEFAULT_MODEL, temperature=0, max_tokens=120,
                                        response_format={"type": "json_object"},
                                        messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}])
    assert isinstance(json.loads(js.choices[0].message.content), dict)


def test_embeddings_are_the_index_embedders(client, live):
    out = client.embeddings.create(model="x", input=["basalt lava", "bread dough"])  # the client asks for base64
    vectors = [d.embedding for d in out.data]
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert abs(sum(v * v for v in vectors[0]) - 1) < 1e-3
    plain = httpx.post(f"{live.url}/v1/embeddings", headers=_auth(),
                       json={"input": "basalt lava", "encoding_format": "float"}).json()
    assert max(abs(a - b) for a, b in zip(plain["data"][0]["embedding"], vectors[0])) < 1e-6


def test_rag_answers_with_citations(client):
    question = [{"role": "user", "content": "How long should bread dough rise?"}]
    reply = client.chat.completions.create(model=f"{DEFAULT_MODEL}+rag", messages=question, max_tokens=40,
                                           temperature=0)
    citations = reply.model_extra["citations"]
    assert citations and citations[0]["source"].endswith("bread.rst") and "rise" in citations[0]["snippet"]
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=question, max_tokens=40, temperature=0,
                                                 stream=True, extra_body={"rag": True}))
    assert chunks[-1].model_extra["citations"][0]["source"].endswith("bread.rst")
    off_topic = client.chat.completions.create(model=f"{DEFAULT_MODEL}+rag", max_tokens=20,
                                               messages=[{"role": "user", "content": "Who won the 1998 world cup?"}])
    assert off_topic.choices[0].message.content.startswith("Not in your documents") and off_topic.model_extra["citations"] == []


def test_refusals_in_openais_error_format(client, live):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"  # the one open endpoint
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=10,
                                       messages=[{"role": "user", "content": "word " * 1500}])
    assert err.value.code == "context_length_exceeded" and "context of 1024" in err.value.message
    with pytest.raises(openai.BadRequestError, match="max_tokens 1000"):
        client.completions.create(model="x", prompt="Hello " * 100, max_tokens=1000)
    too_big = httpx.post(f"{live.url}/v1/chat/completions", headers=_auth(), content=b"x" * (2 * 1024 * 1024))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(f"{live.url}/v1/chat/completions", headers=_auth(), json={"messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_hostile_requests_get_4xx_in_openais_shape(live):
    def error_of(res, status):
        assert res.status_code == status, res.text
        err = res.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        return err

    url = live.url
    # a non-ASCII Authorization header is a wrong key, not a server error
    res = httpx.get(f"{url}/v1/models", headers=[(b"Authorization", "Bearer t\u00e9st-key".encode("latin-1"))])
    assert error_of(res, 401)["code"] == "invalid_api_key"
    assert error_of(httpx.get(f"{url}/v1/nothing-here", headers=_auth()), 404)["code"] == "not_found"
    assert error_of(httpx.delete(f"{url}/v1/models", headers=_auth()), 405)["code"] == "method_not_allowed"
    empty = httpx.post(f"{url}/v1/completions", headers=_auth(), json={"prompt": "", "max_tokens": 4})
    assert error_of(empty, 400)["param"] == "prompt"
    hacker = httpx.post(f"{url}/v1/chat/completions", headers=_auth(),
                        json={"messages": [{"role": "hacker", "content": "hi"}], "max_tokens": 4})
    assert "messages.0.role" in error_of(hacker, 400)["message"]
    many = httpx.post(f"{url}/v1/embeddings", headers=_auth(), json={"input": ["x"] * 2049})
    assert "at most 2048 inputs" in error_of(many, 400)["message"]
    for i in range(5):  # unknown paths share one metrics series instead of adding one each
        httpx.get(f"{url}/v1/probe-{i}", headers=_auth())
    metrics = httpx.get(f"{url}/metrics", headers=_auth()).text
    assert "probe-" not in metrics and 'endpoint="other"' in metrics


def test_a_client_that_leaves_stops_its_generation(live):
    body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 800, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", headers=_auth(), json=body) as res:
        assert res.status_code == 200
        next(res.iter_lines())
        t0 = time.time()
    # 800 tokens take ~8 s here; a stopped generation frees the context at once
    while live.pool.busy and time.time() - t0 < 3:
        time.sleep(0.05)
    assert live.pool.busy == 0, "the generation went on after its client left"


def test_uploads_are_sanitised_indexed_and_cited(client, live):
    fact = "# Kettleton\n\nThe zorblat festival in Kettleton happens every April, with lanterns on the river.\n"
    res = httpx.post(f"{live.url}/v1/documents", headers=_auth(), files={"file": ("../../notes about zorblat.md", fact)})
    assert res.status_code == 200, res.text
    assert res.json()["file"] == "notes_about_zorblat.md" and (live.uploads / "notes_about_zorblat.md").exists()
    reply = client.chat.completions.create(model=f"{DEFAULT_MODEL}+rag", max_tokens=30, temperature=0,
                                           messages=[{"role": "user", "content": "When is the zorblat festival?"}])
    assert reply.model_extra["citations"][0]["source"].endswith("notes_about_zorblat.md")
    refused = httpx.post(f"{live.url}/v1/documents", headers=_auth(), files={"file": ("run.sh", b"rm -rf /")})
    assert refused.status_code == 400 and "upload a .txt" in refused.json()["error"]["message"]
    huge = httpx.post(f"{live.url}/v1/documents", headers=_auth(), files={"file": ("big.txt", b"a " * 600_000)})
    assert huge.status_code == 413
    with pytest.raises(PocketError):
        safe_filename("..")


def test_load_sixteen_clients_get_answers_or_clean_429s(live):
    def one_client(i):
        c = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        outcomes = []
        for _ in range(5):
            try:
                r = c.chat.completions.create(model=DEFAULT_MODEL, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": f"Say hello to client {i}."}])
                outcomes.append("ok" if r.choices[0].message.content is not None else "empty")
            except openai.RateLimitError as exc:
                assert int(exc.response.headers["retry-after"]) >= 1
                outcomes.append("429")
        return outcomes

    with ThreadPoolExecutor(16) as ex:
        outcomes = [o for client_outcomes in ex.map(one_client, range(16)) for o in client_outcomes]
    assert len(outcomes) == 80 and set(outcomes) <= {"ok", "429"}
    assert outcomes.count("ok") >= 5 and outcomes.count("429") >= 1  # a queue of 4 behind 1 context must refuse some
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "ok" and health["busy"] == 0 and health["waiting"] == 0
    metrics = httpx.get(f"{live.url}/metrics", headers=_auth()).text
    assert 'pocketlm_requests_total{endpoint="/v1/chat/completions",status="429"}' in metrics
    assert "pocketlm_time_to_first_token_seconds_count" in metrics and "pocketlm_queue_depth 0.0" in metrics


def test_a_body_that_never_finishes_gets_408_and_frees_the_server():
    """A client that announces a body and sends only part of it is answered 408 once the next
    piece is late, instead of holding a worker for as long as it likes."""
    from types import SimpleNamespace

    pool = SimpleNamespace(models=[], busy=0, waiting=0)  # the body is refused before any model is needed
    server = LiveServer(create_app(pool, "stub", body_timeout_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            reply = b""
            while b"}}" not in reply:  # headers and the JSON error may come in separate packets
                piece = s.recv(65536)
                if not piece:
                    break
                reply += piece
            reply = reply.decode()
        status, _, rest = reply.partition("\r\n")
        assert " 408 " in status and '"code":"request_timeout"' in rest.replace(" ", ""), reply
        assert httpx.get(f"{server.url}/health").status_code == 200  # still serving
    finally:
        server.stop()


def test_headers_that_never_finish_are_cut_off_even_if_bytes_keep_coming():
    """uvicorn resets its only timer on every byte, so a client trickling header lines would hold
    its connection forever; pocketlm's protocol closes it once the headers are late."""
    import select
    from types import SimpleNamespace

    class Quick(HeaderDeadlineProtocol):
        header_timeout_s = 0.5

    server = LiveServer(create_app(SimpleNamespace(models=[], busy=0, waiting=0), "stub"), protocol=Quick)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            t0, closed = time.monotonic(), False
            while not closed and time.monotonic() - t0 < 5:
                time.sleep(0.1)
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                    readable, _, _ = select.select([s], [], [], 0)
                    closed = bool(readable) and s.recv(1024) == b""
                except OSError:
                    closed = True
            took = time.monotonic() - t0
        assert closed and 0.3 < took < 2.5, took
        # a whole request on a kept-alive connection is unaffected, and the server still serves
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/health").status_code == 200
            time.sleep(0.2)
            assert c.get("/health").status_code == 200
    finally:
        server.stop()

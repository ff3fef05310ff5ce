"""`serve --backend URL`: pocketlm's front (keys, limits and 429s, RAG with citations, uploads,
the page, metrics) over any OpenAI-compatible server: llama-server, vLLM, TGI, Ollama, or
replicas behind a load balancer.

A RemoteModel stands where a llama.cpp context stands in the pool (engine.py), so every
endpoint works unchanged: generation streams from the backend, while token counting (the
context checks, fitting RAG passages, usage) uses the model's own vocabulary, read locally
without its weights, because OpenAI's API has no tokenize call.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

from ..errors import PocketError
from .openai_api import APIError


def base_url(url: str) -> str:
    """OpenAI base URLs end in /v1; people also type the server's root."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise PocketError(f"--backend {url!r} is not an http(s) URL")
    return url if url.endswith("/v1") else url + "/v1"


class LocalTokenizer:
    """The served model's vocabulary and chat template, without its weights."""

    def __init__(self, model: str | Path):
        from ..models.source import resolve

        src = resolve(model)
        self.hf = None
        self.gguf = None
        if src.is_gguf:
            from ..runtime.llama_cpp_backend import LlamaCppModel

            self.gguf = LlamaCppModel(src.path, n_ctx=16, vocab_only=True)
        else:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(src.path)

    def tokenize(self, text: str) -> list[int]:
        if self.gguf is not None:
            return self.gguf.tokenize(text)
        assert self.hf is not None
        return list(self.hf.encode(text, add_special_tokens=False))

    def count_chat_tokens(self, messages: list[dict]) -> int:
        if self.gguf is not None:
            return self.gguf.count_chat_tokens(messages)
        assert self.hf is not None
        if getattr(self.hf, "chat_template", None):
            return len(self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        from ..runtime.llama_cpp_backend import estimate_chat_tokens

        return estimate_chat_tokens(self.tokenize, messages)


LONGEST_LINE = 16 * 2**20  # bytes of one streamed chunk from the backend


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Connection:
    """One HTTP client to the backend, shared by all of a pool's slots. Measured (py-spy on the
    front at 16 clients): with a client per slot, each slot's first request built its own TLS
    context (~35 ms of CPU, even for http://): 15% of the front's CPU in that run.

    aiohttp, not httpx, for the streams: its response parser is C (llhttp) and a streamed line
    passes through one reader, where httpx's goes through httpcore, h11 and anyio; measured over
    16 clients x 5 answers, over one llama-server, 4 rounds each (Intel Xeon, psutil): the front's CPU per
    streamed token 0.240-0.289 ms with httpx, 0.180-0.201 ms with aiohttp."""

    def __init__(self, key: str | None, timeout: float = 600.0):
        self.headers = auth_headers(key)
        self.timeout = timeout
        self._session: Any = None  # aiohttp.ClientSession of the event loop it was made in
        self._loop: Any = None

    def session(self):
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            # no connection limit: the pool's slots already bound the requests in flight. Idle
            # connections are dropped after 2 s, before the server's own keep-alive timeout (5 s
            # for llama-server and uvicorn) could close one just as a request is sent on it
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
            # sock_read: the longest the backend may go quiet between two streamed pieces
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self.timeout)
            # read_bufsize: aiohttp refuses a line over twice this (128 KiB by default); a streamed
            # chunk is one line, and httpx, before, took any length
            self._session = aiohttp.ClientSession(headers=self.headers, timeout=timeout, connector=connector,
                                                  read_bufsize=LONGEST_LINE // 2)
            self._loop = loop
        return self._session

    async def aclose(self) -> None:
        """Closes the session made in the running loop (one of another loop went with that loop)."""
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = self._loop = None


class RemoteModel:
    """One request at a time to the backend, in the shape engine.py's contexts have."""

    def __init__(self, url: str, key: str | None, model_name: str, tokenizer: LocalTokenizer, n_ctx: int,
                 timeout: float = 600.0, grammar: bool = False, connection: Connection | None = None):
        """grammar: the backend takes llama.cpp's GBNF `grammar` field (the supervised llama-server);
        connection: the client shared with the pool's other slots (else one of its own)."""
        self.url, self.model_name, self.tokenizer, self.n_ctx = base_url(url), model_name, tokenizer, n_ctx
        self.grammar = grammar
        self.connection = connection or Connection(key, timeout)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)

    def count_chat_tokens(self, messages: list[dict]) -> int:
        return self.tokenizer.count_chat_tokens(messages)

    # Chunks are relayed on the server's event loop, with no thread per request. Measured
    # (bench/results/serve_load.md): with a thread per request relaying the stream, 16 clients
    # through the front got 0.77x llama-server's own tokens/s on 2 cores; on the loop 0.83x.
    def astream_chat(self, messages: list[dict], max_tokens: int, **params) -> AsyncIterator[dict]:
        if not self.grammar:
            params.pop("grammar", None)
        return self._astream("/chat/completions", {"messages": messages, "max_tokens": max_tokens, **params})

    def astream_completion(self, prompt: str, max_tokens: int, **params) -> AsyncIterator[dict]:
        return self._astream("/completions", {"prompt": prompt, "max_tokens": max_tokens, **params})

    async def _astream(self, path: str, body: dict) -> AsyncIterator[dict]:
        import aiohttp

        # usage asked for: the backend's own count of the reply's tokens, so the front need not
        # tokenize every answer again (py-spy: ~9% of the front's CPU at 16 clients)
        body = {**{k: v for k, v in body.items() if v is not None}, "model": self.model_name, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            async with self.connection.session().post(self.url + path, json=body) as r:
                if r.status != 200:
                    raise _backend_error(r.status, await r.text(errors="replace"))
                done = False
                # read to the body's end even after [DONE]: a response left unread closes its
                # connection, and the next request would pay a new one (all 80 of a 16-client run did)
                async for line in r.content:
                    chunk = None if done else _chunk(line)
                    if chunk is _DONE:
                        done = True
                    elif chunk is not None:
                        yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise APIError(502, f"the backend at {self.url} failed: {type(exc).__name__}: {exc}", type="server_error") from None
        except ValueError as exc:  # a chunk that is not JSON, or a line over LONGEST_LINE
            raise APIError(502, f"the backend at {self.url} sent a malformed stream: {exc}", type="server_error") from None


_DONE: Any = object()


def _chunk(line: bytes) -> Any:
    """One SSE line of the backend's stream: a chunk with choices or usage, _DONE, or None
    (comments, keep-alives, empty chunks); an error chunk raises."""
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return _DONE
    chunk = json.loads(payload)
    if "error" in chunk:
        raise _backend_error(502, json.dumps(chunk))
    return chunk if chunk.get("choices") or chunk.get("usage") else None


def _backend_error(status: int, text: str) -> APIError:
    """The backend's refusal passed on: its 4xx stay the client's problem (429 keeps its meaning),
    anything else is a bad gateway."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:300]
    if status in (400, 404, 413, 422, 429):
        return APIError(status, f"the backend refused: {message}", type="server_error" if status == 429 else
                        "invalid_request_error")
    return APIError(502, f"the backend answered {status}: {message}", type="server_error")


def connect(url: str, key: str | None, model_name: str | None = None, timeout: float = 10.0) -> str:
    """The backend's model id (the one asked for, else the first it lists), or one clear error:
    a server that cannot be reached or refuses the key is found at start, not at the first request."""
    import httpx

    try:
        r = httpx.get(base_url(url) + "/models", headers=auth_headers(key),
                      timeout=timeout)
    except httpx.HTTPError as exc:
        raise PocketError(f"cannot reach the backend at {url}: {type(exc).__name__}: {exc}") from None
    if r.status_code in (401, 403):
        raise PocketError(f"the backend at {url} refused the key (HTTP {r.status_code}); give it with --backend-key")
    if r.status_code != 200:
        raise PocketError(f"the backend at {url} answered HTTP {r.status_code} to GET /v1/models: not an OpenAI-compatible server?")
    try:
        ids = [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise PocketError(f"the backend at {url} listed its models in an unknown shape") from None
    if model_name is not None:
        if model_name not in ids:
            raise PocketError(f"the backend at {url} has no model {model_name!r} (it has: {', '.join(ids) or 'none'})")
        return model_name
    if not ids:
        raise PocketError(f"the backend at {url} lists no models")
    return ids[0]


def remote_pool(url: str, key: str | None, model_name: str | None, tokenizer_source: str | Path, n_ctx: int,
                parallel: int, max_queue: int, grammar: bool = False):
    """engine.py's pool over the backend: `parallel` requests in flight, the rest in its fair line."""
    from .engine import ContextPool

    name = connect(url, key, model_name)
    tokenizer, connection = LocalTokenizer(tokenizer_source), Connection(key)
    return ContextPool(url, n_ctx=n_ctx, parallel=parallel, max_queue=max_queue,
                       loader=lambda u, n_ctx, n_threads: RemoteModel(u, key, name, tokenizer, n_ctx, grammar=grammar,
                                                                     connection=connection))

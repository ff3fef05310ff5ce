"""`pocketlm serve`: OpenAI-compatible endpoints, RAG with citations, metrics and a web page.

Apps written for the cloud API switch by changing the base URL: any model id is accepted (the
server has one model), and `MODEL+rag` or `"rag": true` answers from the index, with the
sources in an extra `citations` field that ordinary clients ignore.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import aclosing, asynccontextmanager
from importlib import resources

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import PocketError
from .engine import QueueFull
from .generation import End, Start, Text, chat_events, completion_events
from .metrics import Metrics
from .openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_chunk,
    chat_completion,
    completion_chunk,
    embeddings,
    error_response,
    new_id,
    usage,
)

MB = 1024 * 1024
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # the page is static; the API calls it makes need the key


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class Guard:
    """ASGI middleware: API key, request size limits, and per-endpoint request metrics (it sees
    a streamed response to its end, which a route handler does not)."""

    def __init__(self, app, *, api_key: str | None, max_body: int, max_upload: int, metrics: Metrics, known_paths,
                 body_timeout: float):
        self.app, self.max_body, self.max_upload, self.metrics = app, max_body, max_upload, metrics
        self.body_timeout = body_timeout
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.known_paths = known_paths  # metrics label only these: every unknown path would add a series

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        started, status = time.perf_counter(), [500]
        if self.expected and path not in PUBLIC_PATHS:
            # compared as bytes: a header in any encoding is just a wrong key, never a decoding error
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                            "authentication_error", "invalid_api_key")(scope, receive, send)
        limit = self.max_upload if path == "/v1/documents" else self.max_body
        if int(headers.get(b"content-length", b"0") or 0) > limit:
            return await _too_large(limit)(scope, receive, send)
        received, body_done = 0, False

        async def limited_receive():
            # A client that sends its body slowly (or never finishes it) would hold a worker: each
            # piece must come within body_timeout. Once the body is complete, receive() only waits
            # for the client to leave, which a long streamed answer must not time out.
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.body_timeout) from None
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
            body_done = message.get("type") != "http.request" or not message.get("more_body", False)
            return message

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        finally:
            endpoint = path if path in self.known_paths() else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body over the limit of {limit // MB} MB", code="request_too_large")


def create_app(pool, model_id: str, kb=None, *, api_key: str | None = None, max_body_mb: float = 1,
               max_upload_mb: float = 10, body_timeout_s: float = 30) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_):
        yield
        # the backend client's open connections, closed on the loop that made them
        for connection in {id(m.connection): m.connection for m in pool.models if hasattr(m, "connection")}.values():
            await connection.aclose()

    app = FastAPI(title="pocketlm", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = Metrics(pool)
    app.state.pool, app.state.kb, app.state.metrics = pool, kb, metrics
    app.add_middleware(Guard, api_key=api_key, max_body=int(max_body_mb * MB), max_upload=int(max_upload_mb * MB),
                       metrics=metrics, known_paths=lambda: {getattr(r, "path", None) for r in app.routes},
                       body_timeout=body_timeout_s)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):  # 404, 405 ... in OpenAI's error shape, like every other error
        # FastAPI turns any failure while reading a body into "400, error parsing the body"; the
        # limits above raise inside that read, so their own answers are restored here
        if isinstance(exc.__cause__, BodyTooSlow):
            return await _slow(request, exc.__cause__)
        if isinstance(exc.__cause__, BodyTooLarge):
            return _too_large(exc.__cause__.args[0])
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, str(exc.detail), code=codes.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(QueueFull)
    async def _busy(_, exc: QueueFull):
        return error_response(429, str(exc), "rate_limit_error", "server_busy",
                              headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(BodyTooLarge)
    async def _large(_, exc: BodyTooLarge):
        return _too_large(exc.args[0])

    @app.exception_handler(BodyTooSlow)
    async def _slow(_, exc: BodyTooSlow):
        return error_response(408, f"the request body did not arrive within {exc.args[0]:g} s", code="request_timeout")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(PocketError)
    async def _pocket(_, exc: PocketError):
        return error_response(400, str(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "contexts": len(pool.models), "busy": pool.busy,
                "waiting": pool.waiting, "rag": kb is not None}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("pocketlm.serve").joinpath("static/index.html").read_text()

    @app.get("/v1/models")
    async def models():
        ids = [model_id] + ([f"{model_id}+rag"] if kb is not None else [])
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "pocketlm"}
                                           for i in ids]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        req.check()
        return await _respond(request, chat_events(pool, kb, req), req, model_id, "chatcmpl", metrics)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        req.check()
        return await _respond(request, completion_events(pool, req), req, model_id, "cmpl", metrics)

    @app.post("/v1/embeddings")
    async def embed(req: EmbeddingRequest):
        if kb is None:
            raise APIError(400, "embeddings come from the index's embedder; start the server with --db", param="model")
        texts = req.texts()
        vectors = await kb.embed(texts)
        return embeddings(kb.embedder_name, vectors, req.encoding_format, sum(kb.count_tokens(t) for t in texts))

    @app.post("/v1/documents")
    async def upload(file: UploadFile = File(...)):
        """pocketlm's own: add a document to the index (the web page's upload)."""
        if kb is None:
            raise APIError(400, "this server has no knowledge base; start it with --db to upload documents")
        return await kb.add_upload(file.filename or "", await file.read())

    return app


async def _respond(request: Request, events, req, model_id: str, prefix: str, metrics: Metrics):
    t0 = time.perf_counter()
    start = await anext(events)  # refusals (queue full, too long, no index) surface here as HTTP errors
    assert isinstance(start, Start)
    metrics.tokens_in.inc(start.prompt_tokens)
    cid, model = new_id(prefix), req.model or model_id
    is_chat = prefix == "chatcmpl"

    first = True

    def observe(event):
        nonlocal first
        if isinstance(event, Text) and first:
            metrics.first_token.observe(time.perf_counter() - t0)
            first = False
        elif isinstance(event, End):
            metrics.tokens_out.inc(event.completion_tokens)

    if req.stream:
        return StreamingResponse(_sse(events, start, cid, model, is_chat, req.include_usage, observe),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    end, seen = None, 0
    async with aclosing(events):
        async for event in events:
            observe(event)
            if isinstance(event, End):
                end = event
            seen += 1
            if seen % 8 == 0 and await request.is_disconnected():
                return Response(status_code=499)  # closing the events stops the generation thread
    if end is None:
        raise RuntimeError("the generation ended without its End event")
    extra = {"citations": end.citations} if end.citations is not None else {}
    use = usage(start.prompt_tokens, end.completion_tokens)
    if is_chat:
        return chat_completion(cid, model, end.text, end.finish_reason, use, **extra)
    reply = completion_chunk(cid, model, end.text, end.finish_reason)
    return {**reply, "usage": use}


async def _sse(events, start: Start, cid: str, model: str, is_chat: bool, include_usage: bool, observe):
    def data(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async with aclosing(events):
        if is_chat:
            yield data(chat_chunk(cid, model, {"role": "assistant", "content": ""}))
        try:
            async for event in events:
                observe(event)
                if isinstance(event, Text):
                    yield data(chat_chunk(cid, model, {"content": event.piece}) if is_chat
                               else completion_chunk(cid, model, event.piece))
                elif isinstance(event, End):
                    extra = {"citations": event.citations} if event.citations is not None else {}
                    yield data(chat_chunk(cid, model, {}, event.finish_reason, **extra) if is_chat
                               else completion_chunk(cid, model, "", event.finish_reason))
                    if include_usage:
                        yield data({"id": cid, "object": "chat.completion.chunk" if is_chat else "text_completion",
                                    "model": model, "choices": [],
                                    "usage": usage(start.prompt_tokens, event.completion_tokens)})
        except Exception as exc:  # the stream has begun: an error can only be reported in it
            yield data({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

"""One request's generation as a stream of events: Start, then Text pieces, then End.

Everything that can refuse a request (a full queue, a prompt that does not fit, a RAG question
the index cannot serve) happens before Start, so the caller can still answer with an HTTP
error; after Start, the response has begun and only the stream itself can end it.
"""
from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..errors import PocketError
from ..rag.answer import NOTHING_FOUND, finish
from .openai_api import APIError, ChatRequest, CompletionRequest

RAG_MAX_TOKENS = 256  # a grounded answer's default length when the request sets none


@dataclass
class Start:
    prompt_tokens: int


@dataclass
class Text:
    piece: str


@dataclass
class End:
    finish_reason: str
    completion_tokens: int
    text: str  # the whole answer, citations checked (RAG) — what a non-streaming reply returns
    citations: list[dict] | None = field(default=None)


def check_fits(n_prompt: int, max_tokens: int | None, n_ctx: int, param: str) -> int:
    """The completion's token budget; a 400 that states the limits when the request cannot fit
    (never a silently truncated prompt)."""
    room = n_ctx - n_prompt
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        wanted = f" + max_tokens {max_tokens}" if max_tokens is not None else ""
        raise APIError(400, f"the prompt has {n_prompt} tokens{wanted}, more than the model's context of {n_ctx} "
                            "tokens; shorten the prompt or lower max_tokens", code="context_length_exceeded",
                       param=param)
    return max_tokens if max_tokens is not None else room


async def chat_events(pool, kb, req: ChatRequest) -> AsyncIterator[Start | Text | End]:
    use_rag = req.rag or req.model.endswith("+rag")
    if use_rag and kb is None:
        raise APIError(400, "this server has no knowledge base; start it with --db to use rag", param="rag")
    async with pool.context() as lease:
        model = lease.model
        messages = [m.as_dict() for m in req.messages]
        params = req.llama_params()
        max_tokens = req.limit
        prompt = None
        if use_rag:
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            max_tokens = max_tokens or RAG_MAX_TOKENS
            try:
                prompt = await kb.prepare(question, model, req.k, max_tokens)
            except PocketError as exc:
                raise APIError(400, str(exc), code="context_length_exceeded", param="messages") from None
            if not prompt.hits:  # nothing relevant: say so rather than let the model invent
                yield Start(0)
                yield Text(NOTHING_FOUND)
                yield End("stop", 0, NOTHING_FOUND, [])
                return
            messages = prompt.messages
            params.update(prompt.params())
        if (req.response_format or {}).get("type") == "json_object":
            params["response_format"] = {"type": "json_object"}
        n_prompt = await pool.run(model.count_chat_tokens, messages)
        max_tokens = check_fits(n_prompt, max_tokens, pool.n_ctx, "messages")
        await pool.reserve(lease, n_prompt + max_tokens)
        yield Start(n_prompt)
        pieces, finish_reason, reported = [], "stop", Reported()
        stream = _chunks(pool, lease, "stream_chat", messages, max_tokens=max_tokens, **params)
        async with aclosing(stream):
            async for chunk in stream:
                if reported.saw(chunk):
                    continue
                choice = chunk["choices"][0]
                piece = choice["delta"].get("content")
                if piece:
                    pieces.append(piece)
                    if prompt is None or prompt.grammar is None:
                        yield Text(piece)
                finish_reason = choice.get("finish_reason") or finish_reason
        raw = "".join(pieces)
        n_out = await reported.completion_tokens(pool, model, raw)
        if prompt is None:
            yield End(finish_reason, n_out, raw)
        else:
            text, citations, _ = finish(raw, prompt)
            if prompt.grammar is not None:  # an extracted span is checked against its quote before it is shown
                yield Text(text)
            yield End(finish_reason, n_out, text, citations)


async def completion_events(pool, req: CompletionRequest) -> AsyncIterator[Start | Text | End]:
    prompt = req.text()
    async with pool.context() as lease:
        model = lease.model
        n_prompt = len(await pool.run(model.tokenize, prompt)) + 1  # + BOS
        max_tokens = check_fits(n_prompt, req.max_tokens, pool.n_ctx, "prompt")
        await pool.reserve(lease, n_prompt + max_tokens)
        yield Start(n_prompt)
        pieces, finish_reason, reported = [], "stop", Reported()
        params = req.llama_params()
        stream = _chunks(pool, lease, "stream_completion", prompt, max_tokens=max_tokens, **params)
        async with aclosing(stream):
            async for chunk in stream:
                if reported.saw(chunk):
                    continue
                choice = chunk["choices"][0]
                if choice.get("text"):
                    pieces.append(choice["text"])
                    yield Text(choice["text"])
                finish_reason = choice.get("finish_reason") or finish_reason
        raw = "".join(pieces)
        yield End(finish_reason, await reported.completion_tokens(pool, model, raw), raw)


class Reported:
    """The reply's token count as the engine reports it (an OpenAI usage chunk: the backend's own
    count); counted here from the model's vocabulary only when no engine said."""

    def __init__(self) -> None:
        self.tokens: int | None = None

    def saw(self, chunk: dict) -> bool:
        """Takes a chunk's usage; True for a usage-only chunk (no choices: nothing else in it)."""
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.tokens = int(usage["completion_tokens"])
        return not chunk.get("choices")

    async def completion_tokens(self, pool, model, raw: str) -> int:
        if self.tokens is not None:
            return self.tokens
        return len(await pool.run(model.tokenize, raw)) if raw else 0


def _chunks(pool, lease, method: str, *args, **kwargs):
    """The model's chunks as an async iterator: a backend's own async stream (relayed on the event
    loop, backend.py), else the blocking llama.cpp stream run on the lease's thread."""
    model = lease.model
    if hasattr(model, "a" + method):
        return getattr(model, "a" + method)(*args, **kwargs)
    return pool.stream(lease, lambda: getattr(model, method)(*args, **kwargs))

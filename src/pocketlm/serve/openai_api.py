"""OpenAI's wire format: request bodies, response objects and error replies.

Request models accept unknown fields (clients send many we do not use) and reject what we
cannot honour (n > 1, several prompts) with OpenAI's error shape, so that the official
client raises the same exception types it would against the cloud API.
"""
from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.code, self.param, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):  # content parts: we read text only
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for the system role
        return {"role": role, "content": content or ""}


class Sampling(_Lenient):
    model: str = ""
    stream: bool = False
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream_options: dict | None = None

    def llama_params(self) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return {"temperature": self.temperature, "top_p": self.top_p, "stop": stop or [], "seed": self.seed}

    def check(self) -> None:
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict | None = None
    rag: bool = False  # pocketlm's extension: answer from the index, with citations
    k: int = Field(5, ge=1, le=20)

    def check(self) -> None:
        super().check()
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object"):
            raise APIError(400, f"response_format {kind!r} is not supported (use text or json_object)",
                           param="response_format")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, "send one prompt per request", param="prompt")
            text = self.prompt[0]
        else:
            text = self.prompt
        if not text:  # llama.cpp asserts on an empty prompt
            raise APIError(400, "prompt is empty", param="prompt")
        return text


MAX_EMBED_INPUTS = 2048


class EmbeddingRequest(_Lenient):
    input: str | list[str]
    model: str = ""
    encoding_format: Literal["float", "base64"] = "float"

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise APIError(400, "input must be a non-empty string or a list of them", param="input")
        if len(texts) > MAX_EMBED_INPUTS:  # OpenAI's own limit; 50,000 inputs held the server for 80 s
            raise APIError(400, f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(texts)}", param="input")
        return texts


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_chunk(cid: str, model: str, delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def chat_completion(cid: str, model: str, text: str, finish: str, usage: dict, **extra) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage, **extra}


def completion_chunk(cid: str, model: str, text: str, finish: str | None = None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def embeddings(model: str, vectors: np.ndarray, encoding: str, tokens: int) -> dict:
    def encode(v):
        v = np.asarray(v, dtype="<f4")
        return base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist()

    return {"object": "list", "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}

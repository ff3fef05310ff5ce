"""llama.cpp through llama-cpp-python: logits for evaluation, streaming text for chat."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import PocketError

DEFAULT_THREADS = int(os.environ.get("POCKETLM_THREADS", "2"))


class LlamaCppModel:
    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_threads: int = DEFAULT_THREADS,
                 logits_all: bool = False, n_batch: int = 512):
        from llama_cpp import Llama

        self.path = Path(path)
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx),
                             n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise PocketError(f"llama.cpp cannot load {path}: {exc}") from None
        self.n_ctx = n_ctx

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    @property
    def add_bos(self) -> bool:
        return self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"

    @property
    def bos_id(self) -> int:
        return self.llm.token_bos()

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Text to ids without BOS: callers place BOS where the evaluation scheme says."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Next-token logits at every position, shape (len(tokens), n_vocab), float32."""
        if len(tokens) > self.n_ctx:
            raise PocketError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def count_chat_tokens(self, messages: list[dict]) -> int:
        """Prompt tokens of a chat, with a few per message for the template's markers."""
        return sum(len(self.tokenize(m["content"])) + 8 for m in messages) + 8

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.7,
             seed: int | None = None, repeat_penalty: float = 1.0) -> Iterator[str]:
        stream = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature,
                                                 seed=seed, repeat_penalty=repeat_penalty, stream=True)
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def complete(self, prompt: str, *, max_tokens: int = 128, temperature: float = 0.0) -> Iterator[str]:
        for chunk in self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, stream=True):
            yield chunk["choices"][0]["text"]

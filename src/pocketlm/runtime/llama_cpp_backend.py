"""llama.cpp through llama-cpp-python: logits for evaluation, streaming text for chat."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, cast

import numpy as np

from ..errors import PocketError

DEFAULT_THREADS = int(os.environ.get("POCKETLM_THREADS", "2"))


def estimate_chat_tokens(tokenize, messages: list[dict]) -> int:
    """A chat's prompt tokens without its template: the contents plus a few per message for the markers."""
    return sum(len(tokenize(m["content"])) + 8 for m in messages) + 8


class LlamaCppModel:
    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_threads: int = DEFAULT_THREADS,
                 logits_all: bool = False, n_batch: int = 512, vocab_only: bool = False):
        """vocab_only: the tokenizer and chat template without the weights (counting tokens only)."""
        from llama_cpp import Llama

        self.path = Path(path)
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx),
                             n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all, verbose=False,
                             vocab_only=vocab_only)
        except (ValueError, RuntimeError) as exc:
            raise PocketError(f"llama.cpp cannot load {path}: {exc}") from None
        self.n_ctx = n_ctx
        self._formatter: Any = None  # the chat template, compiled when first needed; False: the model has none

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

    def continuation_scorer(self, messages: list[dict]):
        """`runs -> score_runs(prefix, runs, ends)` for the assistant's reply to this chat (its prompt through the
        model's template, ending where the reply begins; the reply ending at end-of-text or a
        stop token of the template), or None when the model has no chat template."""
        made = self.chat_prompt(messages)
        if made is None:
            return None
        prefix, stops = made
        if self.add_bos and prefix[:1] != [self.bos_id]:
            prefix = [self.bos_id, *prefix]
        ends = {self.llm.token_eos()}
        for stop in stops:
            ids = self.tokenize(stop, special=True)
            if len(ids) == 1:
                ends.add(ids[0])
        return lambda runs: self.score_runs(prefix, runs, sorted(ends))

    def score_runs(self, prefix: list[int], runs: list[list[int]], ends: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """How likely each run of tokens is as the continuation of `prefix`: per run, the log-prob
        of each of its tokens (len(run),) and the log-prob that the text ends there (any of
        `ends`) before each token and after the last (len(run) + 1,). The prefix is decoded
        once; each run is then decoded after it in one batch asking logits at every position
        (llama-cpp-python keeps all logits only with logits_all, a (n_ctx, n_vocab) array a chat
        model should not carry; so this talks to its context and batch directly)."""
        if not prefix or len(prefix) + max((len(r) for r in runs), default=0) > self.n_ctx:
            raise PocketError(f"the prompt and its continuations do not fit the context of {self.n_ctx}")
        from ..eval.metrics import log_softmax

        llm, ctx, batch = self.llm, self.llm._ctx, self.llm._batch
        n_vocab = llm.n_vocab()
        try:
            llm.reset()
            llm.eval(prefix)
            first = log_softmax(np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(n_vocab,))[None])[0]
            n0 = len(prefix)
            out = []
            for run in runs:
                if not run:
                    out.append((np.zeros(0), np.logaddexp.reduce(first[ends])[None]))
                    continue
                if len(run) > llm.n_batch:
                    raise PocketError(f"a continuation of {len(run)} tokens is longer than the batch ({llm.n_batch})")
                ctx.kv_cache_seq_rm(-1, n0, -1)
                batch.set_batch(batch=run, n_past=n0, logits_all=True)
                ctx.decode(batch)
                rows = log_softmax(np.ctypeslib.as_array(ctx.get_logits(), shape=(len(run) * n_vocab,)).reshape(len(run), n_vocab))
                lp = np.vstack([first[None], rows])  # row t: the distribution of the token after run[:t]
                tokens = lp[np.arange(len(run)), run]
                ending = np.logaddexp.reduce(lp[:, ends], axis=1)
                out.append((tokens, ending))
            return out
        finally:
            llm.reset()  # the context's tokens no longer match what llama-cpp-python thinks it holds

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], list[str]] | None:
        """(prompt tokens, stop strings) through the model's own chat template, as
        llama-cpp-python's chat completion makes them; None when the model has no template or it
        wants what the messages lack."""
        if self._formatter is None:  # assigned once made: threads asking at once must not see a half-made one
            template = self.llm.metadata.get("tokenizer.chat_template")
            formatter: Any = False
            if template:
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                vocab = self.llm._model
                formatter = Jinja2ChatFormatter(template, eos_token=vocab.token_get_text(self.llm.token_eos()),
                                                bos_token=vocab.token_get_text(self.llm.token_bos()))
            self._formatter = formatter
        if self._formatter:
            try:
                result = self._formatter(messages=messages)
            except Exception:  # a template that wants what the request lacks
                return None
            return self.tokenize(result.prompt, special=True), list(result.stop or [])
        return None

    def count_chat_tokens(self, messages: list[dict]) -> int:
        """Prompt tokens of a chat: exact through the model's own chat template when it has one,
        else the contents plus a few per message for the template's markers."""
        made = self.chat_prompt(messages)
        if made is not None:
            return len(made[0]) + 1
        return estimate_chat_tokens(self.tokenize, messages)

    def stream_chat(self, messages: list[dict], **params) -> Iterator[dict]:
        """llama-cpp-python's OpenAI-shaped chunks, for the server (params as OpenAI names them)."""
        self.llm.reset()  # see stream_completion
        return self._chat_chunks(messages, **params)

    def _chat_chunks(self, messages: list[dict], **params) -> Iterator[dict]:
        if isinstance(params.get("grammar"), str):  # GBNF text, as the batched engine and llama-server take it
            from llama_cpp import LlamaGrammar

            params["grammar"] = LlamaGrammar.from_string(params["grammar"], verbose=False)
        # llama-cpp-python types messages as TypedDicts and returns a union over `stream`; these are
        # plain dicts of the same shape, and stream=True gives the iterator
        return cast(Iterator[dict], self.llm.create_chat_completion(messages=cast(Any, messages), stream=True, **params))

    def stream_completion(self, prompt: str, **params) -> Iterator[dict]:
        # Without a reset llama-cpp-python reuses the cached prompt prefix and re-evaluates the
        # last prompt token alone; on AVX-512 builds a 1-token batch rounds differently from the
        # whole-prompt batch, so the same greedy request was answered differently the second time.
        self.llm.reset()
        return cast(Iterator[dict], self.llm.create_completion(prompt, stream=True, **params))

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.7,
             seed: int | None = None, repeat_penalty: float = 1.0, grammar: str | None = None) -> Iterator[str]:
        # no reset: a terminal chat reuses the cached prefix of its history, turn after turn
        stream = self._chat_chunks(messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   repeat_penalty=repeat_penalty, grammar=grammar)
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def complete(self, prompt: str, *, max_tokens: int = 128, temperature: float = 0.0) -> Iterator[str]:
        for chunk in cast(Iterator[dict], self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature,
                                                                      stream=True)):
            yield chunk["choices"][0]["text"]

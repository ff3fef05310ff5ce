"""Continuous batching on llama-cpp-python's batch API: many sequences, one context, one decode.

On a CPU, decoding one token reads every weight once, whatever the batch holds; so a step that
carries one token of each of 16 sequences costs little more than a step for one (memory-bound),
while 16 separate contexts each read the weights themselves. The engine thread runs a loop:
admit waiting requests into free sequence slots, put one token of every generating sequence and
the next prompt chunk of every new one into a single batch, decode, sample each sequence with its
own sampler chain (llama.cpp's: temperature, top-p, penalties, grammar), hand the text on.
A finished or abandoned sequence frees its slot and its part of the KV cache at once, so a new
request starts at the next step, not when the whole batch is done (continuous batching).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import PocketError
from .llama_cpp_backend import LlamaCppModel


@dataclass
class _Request:
    tokens: list[int]
    max_tokens: int
    stops: list[str]
    sampling: dict
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Seq:
    """A request in a slot: its prompt still to decode, its sampler, the text it has made."""

    def __init__(self, sid: int, req: _Request, sampler):
        self.sid, self.req, self.sampler = sid, req, sampler
        self.pending = list(req.tokens)  # prompt tokens not yet decoded
        self.pos = 0
        self.n_out = 0
        self.last: int | None = None
        self.raw = b""  # detokenized bytes not yet handed on (an unfinished UTF-8 character)
        self.held = ""  # text held back: it might be the start of a stop string

    def emit(self, text: str, final: str | None = None) -> None:
        self.req.out.put((text, final))


class BatchedEngine:
    """One model, `n_seq` sequences decoded together, each with up to `n_ctx` tokens."""

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_seq: int = 16, n_threads: int = 2, n_batch: int = 512):
        import llama_cpp as L

        self.base = LlamaCppModel(path, n_ctx=16, n_threads=n_threads)  # the model, its tokenizer and template
        self.L, self.n_ctx, self.n_seq, self.n_batch = L, n_ctx, n_seq, n_batch
        # the settings llama-cpp-python gives its own contexts (flash attention off among them), so a
        # sequence decoded alone here is computed as LlamaCppModel computes it
        params = L.llama_context_params.from_buffer_copy(self.base.llm.context_params)
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx * n_seq, n_batch, n_batch
        params.n_seq_max, params.kv_unified = n_seq, True
        params.n_threads = params.n_threads_batch = n_threads
        self.model = self.base.llm._model.model
        self.vocab = L.llama_model_get_vocab(self.model)
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise PocketError(f"llama.cpp could not make a context of {n_ctx} x {n_seq} tokens for {path}")
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="batched-decode", daemon=True)
        self.thread.start()

    # -- requests ----------------------------------------------------------------------------
    def submit(self, tokens: list[int], max_tokens: int, stops: list[str], **sampling) -> Iterator[tuple[str, str | None]]:
        """(text piece, finish reason or None) as they come; closing the iterator cancels."""
        if len(tokens) + max_tokens > self.n_ctx:
            raise PocketError(f"{len(tokens)} prompt tokens + {max_tokens} do not fit a sequence of {self.n_ctx}")
        req = _Request(tokens, max_tokens, [s for s in stops if s], sampling)
        self.inbox.put(req)
        return self._results(req)

    @staticmethod
    def _results(req: _Request) -> Iterator[tuple[str, str | None]]:
        try:
            while True:
                item = req.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[1] is not None:
                    return
        finally:
            req.cancelled.set()

    def close(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(30)
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)

    # -- the loop --------------------------------------------------------------------------------
    def _sampler(self, s: dict):
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.get("grammar"):
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_grammar(self.vocab, s["grammar"].encode(), b"root"))
        if s.get("repeat_penalty", 1.0) != 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(64, s["repeat_penalty"], 0.0, 0.0))
        temp = s.get("temperature")
        if temp is not None and temp <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        top_p = s.get("top_p")
        if top_p is not None and top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(top_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(0.8 if temp is None else temp))
        seed = s.get("seed")
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(0xFFFFFFFF if seed is None else seed))
        return chain

    def _loop(self) -> None:
        free = list(range(self.n_seq))
        active: dict[int, _Seq] = {}
        while not self._stop.is_set():
            try:  # wait for work only when there is none
                req = self.inbox.get(block=not active)
            except queue.Empty:
                req = None
            while req is not None:
                if free:
                    sid = free.pop(0)
                    active[sid] = _Seq(sid, req, self._sampler(req.sampling))
                else:  # every slot taken: the pool in front never hands out more, but be safe
                    req.out.put(PocketError("no free sequence slot"))
                try:
                    req = self.inbox.get_nowait()
                except queue.Empty:
                    req = None
            if self._stop.is_set():
                break
            for seq in [s for s in active.values() if s.req.cancelled.is_set()]:
                self._finish(seq, active, free, None)
            if not active:
                continue
            try:
                outputs = self._step(active)
            except Exception as exc:  # a failed decode fails its requests, not the server
                for seq in list(active.values()):
                    seq.req.out.put(exc)
                    self._finish(seq, active, free, None)
                continue
            for seq, idx in outputs:
                self._sample(seq, idx, active, free)

    def _step(self, active: dict[int, _Seq]) -> list[tuple[_Seq, int]]:
        """One decode over every active sequence; returns who gets a token, at which batch row."""
        b, n, outputs = self.batch, 0, []

        def add(token: int, seq: _Seq, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, seq.pos, 1, logits
            b.seq_id[n][0] = seq.sid
            seq.pos += 1
            if logits:
                outputs.append((seq, n))
            n += 1

        for seq in active.values():  # generating sequences first: one token each
            if not seq.pending and seq.last is not None and n < self.n_batch:
                add(seq.last, seq, True)
        for seq in active.values():  # then prompt chunks, as far as the batch has room
            while seq.pending and n < self.n_batch:
                token = seq.pending.pop(0)
                add(token, seq, not seq.pending)
        b.n_tokens = n
        if self.L.llama_decode(self.ctx, b) != 0:
            raise PocketError("llama.cpp failed to decode a batch (the KV cache is full?)")
        return outputs

    def _sample(self, seq: _Seq, idx: int, active: dict, free: list) -> None:
        L = self.L
        token = L.llama_sampler_sample(seq.sampler, self.ctx, idx)
        if L.llama_vocab_is_eog(self.vocab, token):
            return self._finish(seq, active, free, "stop")
        seq.last, seq.n_out = token, seq.n_out + 1
        buf = (L.ctypes.c_char * 64)()
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        seq.raw += bytes(buf[:max(n, 0)])
        try:
            text, seq.raw = seq.raw.decode("utf-8"), b""
        except UnicodeDecodeError as exc:  # an unfinished character: hand on what is whole
            text, seq.raw = seq.raw[:exc.start].decode("utf-8"), seq.raw[exc.start:]
        text = seq.held + text
        hit = min((text.find(s) for s in seq.req.stops if s in text), default=-1)
        if hit >= 0:
            if hit:
                seq.emit(text[:hit])
            return self._finish(seq, active, free, "stop", keep_held=False)
        keep = max((k for s in seq.req.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        seq.held = text[len(text) - keep:] if keep else ""
        if text[:len(text) - keep]:
            seq.emit(text[:len(text) - keep])
        if seq.n_out >= seq.req.max_tokens:
            self._finish(seq, active, free, "length")

    def _finish(self, seq: _Seq, active: dict, free: list, reason: str | None, keep_held: bool = True) -> None:
        if reason is not None:
            if keep_held and seq.held:
                seq.emit(seq.held)
            seq.emit("", reason)
        self.L.llama_sampler_free(seq.sampler)
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.ctx), seq.sid, -1, -1)
        del active[seq.sid]
        free.append(seq.sid)
        free.sort()


class BatchedSlot:
    """What the server's pool (serve/engine.py) hands a request in place of a whole llama.cpp
    context: one sequence of the shared engine, with a context's methods."""

    def __init__(self, engine: BatchedEngine):
        self.engine, self.n_ctx = engine, engine.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.engine.base.tokenize(text)

    def count_chat_tokens(self, messages: list[dict]) -> int:
        return self.engine.base.count_chat_tokens(messages)

    @staticmethod
    def _sampling(params: dict) -> tuple[dict, list[str]]:
        sampling = {k: params.get(k) for k in ("temperature", "top_p", "seed", "repeat_penalty") if params.get(k) is not None}
        if (params.get("response_format") or {}).get("type") == "json_object":
            from llama_cpp.llama_grammar import JSON_GBNF

            sampling["grammar"] = JSON_GBNF
        if params.get("grammar"):  # GBNF text: a grounded answer's spans (rag.extract)
            sampling["grammar"] = params["grammar"]
        return sampling, list(params.get("stop") or [])

    def stream_chat(self, messages: list[dict], max_tokens: int, **params) -> Iterator[dict]:
        made = self.engine.base.chat_prompt(messages)
        if made is None:
            raise PocketError("the model has no chat template pocketlm can apply; use /v1/completions")
        tokens, stops = made
        sampling, asked = self._sampling(params)
        for text, reason in self.engine.submit(tokens, max_tokens, stops + asked, **sampling):
            yield {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}]}

    def stream_completion(self, prompt: str, max_tokens: int, **params) -> Iterator[dict]:
        base = self.engine.base
        tokens = ([base.bos_id] if base.add_bos else []) + base.tokenize(prompt)
        sampling, asked = self._sampling(params)
        for text, reason in self.engine.submit(tokens, max_tokens, asked, **sampling):
            yield {"choices": [{"index": 0, "text": text, "finish_reason": reason}]}

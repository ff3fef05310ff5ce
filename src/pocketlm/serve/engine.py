"""Generation for the server: N llama.cpp contexts behind one fair, bounded queue.

A llama.cpp context serves one generation at a time (its KV cache is one sequence), so each
request holds a whole context while it generates. Requests that find every context busy wait
in strict arrival order; when the line is already `max_queue` long, the request is refused at
once (429 with Retry-After) instead of waiting without bound. asyncio.Queue is not used for
the line because a newcomer can take a freed context ahead of a woken waiter.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from ..errors import PocketError
from ..util.machine import usable_cores

# Tokens reserved beyond prompt + max_tokens: the front counts the prompt with its own copy of the
# chat template, which may differ from llama-server's by a few tokens.
KV_SLACK = 16


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class ContextPool:
    def __init__(self, path: str | Path, *, n_ctx: int = 2048, parallel: int = 1, max_queue: int = 8,
                 loader: Callable | None = None, threads: int | None = None):
        if parallel < 1 or max_queue < 0:
            raise ValueError("parallel must be >= 1 and max_queue >= 0")
        if loader is None:
            from ..runtime.llama_cpp_backend import LlamaCppModel

            loader = LlamaCppModel
        # Contexts share the cores rather than oversubscribe them. On 2 cores, two contexts of one
        # thread each doubled throughput under load (bench/results/serve_load.md).
        threads = max(1, (threads or usable_cores()) // parallel)
        self.models = [loader(path, n_ctx=n_ctx, n_threads=threads) for _ in range(parallel)]
        self.n_ctx = n_ctx
        self.max_queue = max_queue
        self.server: Any = None  # a supervised llama-server generating for this pool (supervise.py), if any
        self._free = list(self.models)
        self._line: collections.deque[asyncio.Future] = collections.deque()
        # one thread per context generating, plus two for token counting that must not wait behind them
        self._threads = ThreadPoolExecutor(max_workers=parallel + 2, thread_name_prefix="generate")
        self.seconds_per_request = 2.0  # running estimate, for Retry-After
        # With a KV cache the slots share (supervise.py), requests start only while the tokens they may
        # take (prompt + max_tokens) fit in it: llama-server, when its pool runs out, ends every
        # running request with an error rather than one (a 500 "Context size has been exceeded" to
        # four clients at once, tried). None: every slot has its own window, nothing to share.
        self.kv_budget: int | None = None
        self._kv_used = 0
        self._kv_line: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._line if not f.done())

    @property
    def busy(self) -> int:
        return len(self.models) - len(self._free)

    def tokenizer(self):
        """A model for counting tokens only (every context has the same vocabulary)."""
        return self.models[0]

    async def _acquire(self):
        if self._free and not self.waiting:
            return self._free.pop()
        if self.waiting >= self.max_queue:
            ahead = self.waiting + self.busy
            raise QueueFull(max(1, round(ahead * self.seconds_per_request / len(self.models))))
        future = asyncio.get_running_loop().create_future()
        self._line.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # handed a context just as we left
                self._release(future.result())
            raise
        finally:
            if future in self._line:
                self._line.remove(future)

    def _release(self, model) -> None:
        while self._line:
            future = self._line.popleft()
            if not future.done():
                future.set_result(model)
                return
        self._free.append(model)

    async def reserve(self, lease: "Lease", tokens: int) -> None:
        """Hold `tokens` of the shared KV cache for this lease (until it ends), waiting in arrival
        order while they do not fit; at once when the slots do not share one."""
        if self.kv_budget is None:
            return
        tokens = min(tokens + KV_SLACK, self.kv_budget)
        if not self._kv_line and self._kv_used + tokens <= self.kv_budget:
            self._kv_used += tokens
            lease.reserved = tokens
            return
        future = asyncio.get_running_loop().create_future()
        self._kv_line.append((tokens, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as we left: give it back
                self._kv_used -= tokens
                self._admit()
            raise
        finally:
            if (tokens, future) in self._kv_line:
                self._kv_line.remove((tokens, future))
        lease.reserved = tokens

    def _unreserve(self, lease: "Lease") -> None:
        if lease.reserved:
            self._kv_used -= lease.reserved
            lease.reserved = 0
            self._admit()

    def _admit(self) -> None:
        """Start the waiting requests, first come first served, while the first one fits."""
        budget = self.kv_budget or 0
        while self._kv_line:
            tokens, future = self._kv_line[0]
            if future.done():
                self._kv_line.popleft()
                continue
            if self._kv_used + tokens > budget:
                return
            self._kv_line.popleft()
            self._kv_used += tokens
            future.set_result(None)

    @asynccontextmanager
    async def context(self) -> AsyncIterator["Lease"]:
        lease = Lease(await self._acquire())
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            yield lease
        finally:
            self._unreserve(lease)
            self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * (loop.time() - started)
            if lease.worker is not None and not lease.worker.done():
                # A generation thread still holds the context (the request was cancelled under
                # it): hand the context on only when that thread has let go of it.
                lease.worker.add_done_callback(lambda _: self._release(lease.model))
            else:
                self._release(lease.model)

    async def run(self, fn: Callable, *args):
        """Run blocking work (tokenizing, a prompt check) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def stream(self, lease: "Lease", make_chunks: Callable[[], Iterator[dict]]) -> AsyncIterator[dict]:
        """Chunks from a blocking llama.cpp stream on the lease's context, made in a worker thread.
        Leaving the loop early (the client went away) stops the thread after its current token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                stop.set()

        def produce():
            chunks = None
            try:
                chunks = make_chunks()
                for chunk in chunks:
                    if stop.is_set():
                        break
                    put(("chunk", chunk))
            except Exception as exc:  # handed to the request, which turns it into an error reply
                put(("error", exc))
            finally:
                if chunks is not None and hasattr(chunks, "close"):
                    chunks.close()
                put(("end", None))

        lease.worker = loop.run_in_executor(self._threads, produce)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()


class Lease:
    """One request's hold on a context, and the thread generating on it, if any."""

    def __init__(self, model):
        self.model = model
        self.worker: asyncio.Future | None = None
        self.reserved = 0  # tokens of a shared KV cache held (ContextPool.reserve)


def make_pool(model, *, engine: str = "auto", backend: str | None = None, backend_key: str | None = None,
              backend_model: str | None = None, ctx: int = 2048, parallel: int | None = None, max_queue: int = 16,
              threads: int | None = None, kv_tokens: int | None = None, say: Callable[[str], None] = print) -> ContextPool:
    """The pool `serve` generates through: a supervised llama-server (supervise.py; auto: when
    built), llama.cpp contexts, one batched llama.cpp context (runtime/batched.py), or requests to
    an OpenAI-compatible backend (backend.py)."""
    if backend is not None:
        from .backend import remote_pool

        pool = remote_pool(backend, backend_key, backend_model, model, ctx, parallel or 16, max_queue)
        say(f"generating on {backend} (model {pool.models[0].model_name})")
        return pool
    from ..models.export_gguf import cached_gguf
    from .supervise import find_llama_server, kv_pool

    # the engine and its KV pool are settled before the model is exported (that can take minutes)
    auto = engine == "auto"
    if auto:
        engine = "server" if find_llama_server() else "batched"
    if kv_tokens is not None:
        kv_pool(ctx, parallel or 16, kv_tokens)
        if engine != "server":
            raise PocketError("--kv-tokens sizes llama-server's KV pool: for --engine server"
                              + (" (llama-server is not built here)" if auto else ""))
    if auto and engine == "batched":
        say("llama-server is not built here (make setup builds it): generating on the batched engine")
    path = cached_gguf(model, "f16")
    if engine == "server":
        from .backend import remote_pool
        from .supervise import LlamaServer

        n_seq = parallel or 16
        server = LlamaServer(path, ctx=ctx, parallel=n_seq, threads=threads or usable_cores(), kv_tokens=kv_tokens, say=say)
        pool = remote_pool(server.url, server.key, None, path, ctx, n_seq, max_queue, grammar=True)
        pool.server = server  # stopped with the front
        pool.kv_budget = server.kv_tokens if server.shared_kv else None
        kv = f"sharing {server.kv_tokens} KV tokens" if server.shared_kv else f"{server.kv_tokens} KV tokens, a window each"
        say(f"generating on llama-server ({n_seq} slots of up to {ctx} tokens, {kv}; pid "
            f"{server.proc.pid if server.proc else '?'})")
        return pool
    if engine == "batched":
        from ..runtime.batched import BatchedEngine, BatchedSlot

        n_seq = parallel or 16
        shared = BatchedEngine(path, n_ctx=ctx, n_seq=n_seq, n_threads=threads or usable_cores())
        return ContextPool(path, n_ctx=ctx, parallel=n_seq, max_queue=max_queue,
                           loader=lambda p, n_ctx, n_threads: BatchedSlot(shared))
    return ContextPool(path, n_ctx=ctx, parallel=parallel or 1, max_queue=max_queue, threads=threads)

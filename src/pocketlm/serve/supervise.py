"""llama.cpp's own server as `serve`'s engine: started, watched and stopped by pocketlm.

Measured on 2 cores (bench/results/serve_load.md): with 16 streaming clients llama-server's
slots (continuous batching) deliver ~1.6x the tokens/s of pocketlm's batched engine on
llama-cpp-python's batch API and start answering ~5x sooner, from the same llama.cpp source.
So it is the default engine where setup could build it; everything that is pocketlm's own (keys,
limits and 429s, RAG, uploads, the page, metrics, error shapes) stays in the front, which talks
to it as to any OpenAI-compatible backend (backend.py).

It listens on a free loopback port behind a random key only the front knows: another local
user cannot reach the model around the front's key and limits. A crash is noticed within a
second and the server is started again (requests in flight get a 502); `stop` ends it
with the front.
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import PocketError

BINARY = "llama-server"
START_TIMEOUT = 300.0  # seconds for the model to load and /health to answer 200
# The KV cache is one pool all slots share (llama-server's unified KV), this many full windows
# big whatever the number of slots: with a window per slot its memory grew with --parallel (16
# slots of 2048 tokens: 750 MB for SmolLM2, 4 GiB for an 8B model's 128 KB per token), although
# chat turns rarely fill a window. When the pool runs out llama-server first frees idle slots'
# cells, then ends every running request with an error (llama.cpp PR 16736), so the front starts
# a request only when its tokens fit (engine.ContextPool.reserve).
POOL_WINDOWS = 4


def kv_pool(ctx: int, parallel: int, kv_tokens: int | None) -> tuple[bool, int]:
    """(whether the slots share one KV cache, its size in tokens) for --kv-tokens: None the
    default pool, 0 a window per slot; a pool that cannot hold one window is refused."""
    shared = kv_tokens != 0
    tokens = (kv_tokens or POOL_WINDOWS * ctx) if shared else ctx * parallel
    if tokens < ctx:
        raise PocketError(f"--kv-tokens {tokens} cannot hold one window of --ctx {ctx} tokens")
    return shared, tokens


def find_llama_server() -> Path | None:
    """POCKETLM_LLAMA_SERVER, else the one setup built beside the environment's python, else PATH."""
    given = os.environ.get("POCKETLM_LLAMA_SERVER")
    if given:
        return Path(given) if Path(given).is_file() else None
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file():
        return beside
    found = shutil.which(BINARY)
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One supervised llama-server process: `parallel` slots of up to `ctx` tokens each, sharing
    a KV cache of `kv_tokens` (default POOL_WINDOWS windows; 0: a window per slot, unshared)."""

    def __init__(self, model_path: str | Path, *, ctx: int, parallel: int, threads: int, kv_tokens: int | None = None,
                 binary: Path | None = None, say=print):
        self.shared_kv, self.kv_tokens = kv_pool(ctx, parallel, kv_tokens)
        self.binary = binary or find_llama_server()
        if self.binary is None:
            raise PocketError("llama-server is not built here (make setup builds it; or set POCKETLM_LLAMA_SERVER); "
                              "use --engine batched or contexts")
        self.key = secrets.token_urlsafe(24)
        # in a file readable by this user alone: on the command line `ps` would show it to everyone
        fd, key_file = tempfile.mkstemp(prefix="pocketlm-llama-server-", suffix=".key")
        os.write(fd, self.key.encode() + b"\n")
        os.close(fd)
        self.key_file = Path(key_file)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.command = [str(self.binary), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(self.port),
                        "--api-key-file", str(self.key_file), "-np", str(parallel), "-t", str(threads), "-tb", str(threads),
                        "--no-webui", "-c", str(self.kv_tokens)]
        # llama-server keeps a host-RAM prompt cache by default (--cache-ram: up to 8 GiB, growing with distinct
        # prompts, whatever the pool's size): off, so serve's memory is the weights and the KV pool. With one
        # shared pool it also saves every idle slot there and clears it whenever any request starts, so a
        # slot's next turn was restored or re-evaluated instead of found in place (16 clients x 5 answers:
        # 558-765 prompt tokens evaluated instead of 80). Off, idle slots keep their cells until the pool
        # needs room (llama-server then purges idle slots); the tokens/s this buys did not show above the
        # bench's noise (bench/results/serve_load.md, 12-04).
        self.command += ["--cache-ram", "0"]
        self.command += (["-kvu", "--kv-unified-per-slot", str(ctx), "--no-cache-idle-slots"]
                         if self.shared_kv else ["--no-kv-unified"])
        self.say, self.restarts = say, 0
        self.log = Path(tempfile.mkstemp(prefix="pocketlm-llama-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._start()
        self._watch = threading.Thread(target=self._watchdog, daemon=True, name="llama-server-watchdog")
        self._watch.start()
        atexit.register(self.stop)

    def _start(self) -> None:
        import httpx

        # Its own process group: a Ctrl-C at the terminal reaches the front alone, which stops it. Not its
        # own session (start_new_session, before): where the kernel groups CPU time by session (Linux
        # autogroup, on by default) llama-server then competed as one group against the front and its
        # clients together, and whenever they ran, one of its two threads was descheduled while the other
        # spun at llama.cpp's per-op barrier: 16 clients x 5 answers took 27 CPU-seconds of llama-server
        # instead of 23, and serve got 0.71-0.84x the same server run bare (bench/results/serve_load.md, 12-04)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         process_group=0)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PocketError(f"llama-server exited with status {self.proc.returncode} at start: {self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self._kill()
        raise PocketError(f"llama-server did not answer /health within {START_TIMEOUT:.0f} s: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return " | ".join(text[-lines:]) or "(no output)"

    def _watchdog(self) -> None:
        while not self._stopping.wait(1.0):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            self.restarts += 1
            self.say(f"llama-server stopped (status {proc.returncode}); starting it again (restart {self.restarts})")
            try:
                self._start()
            except PocketError as exc:
                self.say(f"error: {exc}")
                time.sleep(5.0)

    def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        """Ends the server (and keeps it ended: the watchdog stops first)."""
        self._stopping.set()
        self._kill()
        self.log.unlink(missing_ok=True)
        self.key_file.unlink(missing_ok=True)

"""What running a GGUF on llama.cpp costs in memory: predicted before the file exists, measured after.

llama.cpp holds (its own log names each): the weights (the file, mapped), the KV cache (f16 K
and V for every layer, key/value head and context position, allocated and cleared at start, so
all of it is resident), and the compute buffer, reserved for the worst batch: a micro-batch's
logits over the vocabulary or its attention scores (and their softmax) over the whole context, whichever is larger
(the graph allocator reuses memory, so it is their maximum, not their sum). On top comes the
process itself. A budget in memory ("--target-memory 1GB", or a device profile) becomes a file
budget by taking the other three away; the measurement then fills the whole context and reads
the process's peak resident memory, so "fits" is a checked claim, not an estimate.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from ..errors import PocketError
from ..util.rss import peak_rss_bytes

UBATCH = 512  # llama.cpp's default micro-batch, which pocketlm's runtime also uses
# The process before any model memory (Python, llama.cpp, pocketlm's runtime): 52 MiB measured
# with a 5 MB model at a 256-token context (tests/test_memory.py), rounded up
PROCESS_BYTES = 64 * 2**20

# What one app may take on a device, not the device's RAM: mobile systems end apps well before
# all RAM is used (iOS leaves one app about half of it; Android's low-memory killer acts at a
# similar share), and a laptop keeps room for the browser and editor beside the model.
PROFILES = {
    "phone-4gb": 1_500_000_000,
    "phone-6gb": 2_500_000_000,
    "phone-8gb": 3_500_000_000,
    "pi-4gb": 2_500_000_000,
    "laptop-8gb": 4_000_000_000,
    "laptop-16gb": 10_000_000_000,
}


@dataclass(frozen=True)
class Geometry:
    """The model facts memory depends on."""
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, facts) -> "Geometry":
        return cls(facts.n_layers, facts.n_heads, facts.n_kv_heads, facts.head_dim, facts.vocab)


def parse_memory(text: str) -> tuple[int, str]:
    """'1GB' or a profile name -> (bytes, what to call it)."""
    from ..quantize.budget import parse_size

    key = str(text).strip().lower()
    if key in PROFILES:
        return PROFILES[key], f"{key} ({PROFILES[key] / 1e9:.1f} GB for the model)"
    try:
        size = parse_size(text)
    except PocketError:
        raise PocketError(f"cannot read the memory {text!r}: write e.g. 1GB or 800MB, or a device profile "
                          f"({', '.join(PROFILES)})") from None
    return size, f"{size / 1e6:.0f} MB"


def kv_bytes(g: Geometry, ctx: int) -> int:
    return 2 * g.layers * g.kv_heads * g.head_dim * ctx * 2  # K and V, f16


def compute_bytes(g: Geometry, ctx: int) -> int:
    """A micro-batch's logits, or its attention scores and their softmax (two f32 copies without
    flash attention) over the whole context: measured growth with the context matches the latter."""
    u = min(UBATCH, ctx)
    return u * max(g.vocab, 2 * ctx * g.heads) * 4


def runtime_bytes(file_bytes: int, g: Geometry, ctx: int) -> int:
    return file_bytes + kv_bytes(g, ctx) + compute_bytes(g, ctx) + PROCESS_BYTES


def file_budget(memory: int, g: Geometry, ctx: int, what: str = "") -> int:
    """The largest file that, run at `ctx`, is predicted to fit `memory`."""
    rest = kv_bytes(g, ctx) + compute_bytes(g, ctx) + PROCESS_BYTES
    if rest >= memory:
        raise PocketError(f"{what or f'{memory / 1e6:.0f} MB'} leaves no room for the weights at --ctx {ctx}: the KV "
                          f"cache ({kv_bytes(g, ctx) / 1e6:.0f} MB), llama.cpp's compute buffer "
                          f"({compute_bytes(g, ctx) / 1e6:.0f} MB) and the process ({PROCESS_BYTES / 1e6:.0f} MB) "
                          "take it all; choose a smaller --ctx or more memory")
    return memory - rest


def geometry_of(model) -> Geometry:
    from ..models.source import resolve
    from ..models.tensors import open_tensors

    return Geometry.of(open_tensors(resolve(model)).facts)


def model_file_budget(model, memory: int, ctx: int, what: str = "") -> int:
    """The file budget `memory` leaves a quantized copy of `model` (same shapes) at `ctx`."""
    return file_budget(memory, geometry_of(model), ctx, what)


def check(path, memory: int, label: str, ctx: int) -> dict:
    """The memory claim checked: the file run on llama.cpp with its whole context filled, beside
    the prediction; `verdict` says it in one line."""
    predicted = runtime_bytes(os.path.getsize(path), geometry_of(path), ctx)
    measured = measure(path, ctx)["peak_bytes"]
    return {"budget": memory, "label": label, "ctx": ctx, "measured": measured, "predicted": predicted,
            "fits": measured <= memory}


def verdict(m: dict) -> str:
    return (f"memory: {m['measured'] / 1e6:.0f} MB measured at --ctx {m['ctx']} with the context full (predicted "
            f"{m['predicted'] / 1e6:.0f} MB) for a budget of {m['label']}: "
            + ("fits" if m["fits"] else f"does NOT fit, {(m['measured'] - m['budget']) / 1e6:.0f} MB over"))


def measure(path, ctx: int, threads: int = 2, timeout: float = 1800) -> dict:
    """Peak resident memory of a fresh process that loads `path` with a context of `ctx`, fills
    all of it (prefill in micro-batches, the worst case for the compute buffer) and decodes."""
    cmd = [sys.executable, "-m", "pocketlm.runtime.memory", str(path), str(ctx), str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    except subprocess.TimeoutExpired:
        raise PocketError(f"the memory measurement of {path} ran past {timeout:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PocketError(f"memory measurement failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    from .llama_cpp_backend import LlamaCppModel

    path, ctx, threads = argv[0], int(argv[1]), int(argv[2])
    rt = LlamaCppModel(path, n_ctx=ctx, n_threads=threads)
    text = "The history of the city begins with a small settlement on the river, where traders met. "
    tokens = rt.tokenize(text * (ctx // 8 + 1))[: max(1, ctx - 8)]
    rt.llm.reset()
    rt.llm.eval(tokens)
    for _ in range(4):
        rt.llm.eval([rt.llm.sample(temp=0.0)])
    print(json.dumps({"peak_bytes": peak_rss_bytes(), "ctx": ctx, "file_bytes": os.path.getsize(path)}))


if __name__ == "__main__":
    _main(sys.argv[1:])

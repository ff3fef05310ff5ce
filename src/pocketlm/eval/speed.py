"""Prefill/decode speed and peak memory, measured in a fresh process.

A fresh process makes peak RSS mean "what running this model costs", not "what this
evaluation happened to have loaded before". Run as: python -m pocketlm.eval.speed MODEL.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ..errors import PocketError
from ..util.rss import peak_rss_bytes

PROMPT = ("The history of the city begins with a small settlement on the river, where traders "
          "met to exchange grain, salt and cloth. Over the centuries it grew into a market town. ")


def _measure_gguf(path: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    from ..runtime.llama_cpp_backend import LlamaCppModel

    rt = LlamaCppModel(path, n_ctx=n_prompt + n_gen + 8, n_threads=threads)
    tokens = (rt.tokenize(PROMPT * 40))[:n_prompt]
    rt.llm.reset()
    rt.llm.eval(tokens[:16])  # warm-up: first call pays for buffer allocation
    rt.llm.reset()
    t0 = time.perf_counter()
    rt.llm.eval(tokens)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_gen):
        nxt = rt.llm.sample(temp=0.0)
        rt.llm.eval([nxt])
    decode = time.perf_counter() - t0
    return {"prefill_tps": n_prompt / prefill, "decode_tps": n_gen / decode, "backend": "llama.cpp"}


def _measure_torch(path: str, threads: int, n_prompt: int, n_gen: int, dtype: str) -> dict:
    import torch

    from ..models.load import load

    torch.set_num_threads(threads)
    loaded = load(path, dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(PROMPT * 40, add_special_tokens=False, return_tensors="pt").input_ids[:, :n_prompt]
    with torch.inference_mode():
        model(ids[:, :16])
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n_gen):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t0
    return {"prefill_tps": n_prompt / prefill, "decode_tps": n_gen / decode, "backend": f"torch {dtype}"}


def measure(path: str, *, threads: int = 2, n_prompt: int = 256, n_gen: int = 64, torch_dtype: str = "float32") -> dict:
    """Run the measurement in a child process and return its JSON."""
    cmd = [sys.executable, "-m", "pocketlm.eval.speed", str(path), str(threads), str(n_prompt), str(n_gen), torch_dtype]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PocketError(f"speed measurement failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    from ..models.source import resolve

    path, threads, n_prompt, n_gen, dtype = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    src = resolve(path)
    if src.is_gguf:
        result = _measure_gguf(str(src.path), threads, n_prompt, n_gen)
    else:
        result = _measure_torch(str(src.path), threads, n_prompt, n_gen, dtype)
    result.update(threads=threads, prompt_tokens=n_prompt, gen_tokens=n_gen, peak_rss_mb=peak_rss_bytes() / 2**20)
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])

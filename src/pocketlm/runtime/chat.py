"""Terminal chat on llama.cpp. HF folders are exported to a cached GGUF first."""
from __future__ import annotations

import sys


def chat_loop(model, *, system=None, max_tokens=512, temperature=0.7, n_ctx=2048, n_threads=None,
              input_fn=None, out=None) -> None:
    from ..models.export_gguf import cached_gguf
    from .llama_cpp_backend import LlamaCppModel

    out = out or sys.stdout
    rt = LlamaCppModel(cached_gguf(model, "f16"), n_ctx=n_ctx, **({"n_threads": n_threads} if n_threads else {}))
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty() and input_fn is None
    read = input_fn or (lambda: input("you> ") if interactive else sys.stdin.readline())
    while True:
        try:
            line = read()
        except EOFError:
            break
        if line is None or not line.strip():
            if interactive or not line:
                break
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = []
        out.write("assistant> " if interactive else "")
        for piece in rt.chat(messages, max_tokens=max_tokens, temperature=temperature):
            reply.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})

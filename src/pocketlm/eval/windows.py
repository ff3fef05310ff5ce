"""Split evaluation text into non-overlapping context windows.

BOS handling: a model whose tokenizer adds BOS gets BOS as the first input of every window
and then ctx-1 text tokens, so every text token is scored; a model without BOS gets ctx text
tokens and the first one of each window is context only. Either way each window scores
ctx-1 tokens, all of them (llama.cpp's perplexity tool scores only the second half of each
window, so its numbers run a little lower than ours at the same ctx).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PocketError


def read_texts(paths) -> str:
    parts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise PocketError(f"text file not found: {p}")
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise PocketError(f"{p} is not UTF-8 text") from None
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Windows:
    inputs: np.ndarray  # (n_windows, ctx) token ids fed to the model
    ctx: int
    bos: bool

    @property
    def targets(self) -> np.ndarray:
        """(n_windows, ctx-1): logits at positions 0..ctx-2 predict inputs 1..ctx-1."""
        return self.inputs[:, 1:]

    @property
    def n_scored(self) -> int:
        return int(self.targets.size)


def make_windows(tokens: list[int], ctx: int, bos_id: int | None, max_tokens: int | None = None) -> Windows:
    if ctx < 2:
        raise PocketError("--ctx must be at least 2")
    ids = np.asarray(tokens, dtype=np.int64)
    if max_tokens:
        ids = ids[:max_tokens]
    per_window = ctx - 1 if bos_id is not None else ctx
    n = len(ids) // per_window
    if n == 0:
        raise PocketError(f"the text has {len(ids)} tokens, fewer than one window of {per_window}; give more text or a smaller --ctx")
    body = ids[: n * per_window].reshape(n, per_window)
    if bos_id is not None:
        body = np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), body], axis=1)
    return Windows(body, ctx, bos_id is not None)

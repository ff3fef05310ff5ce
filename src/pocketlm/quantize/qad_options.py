"""What `quantize --method qad` trains for: its own module so the CLI reads the defaults
without importing torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# what trains besides the block scales and offsets (fakequant.py): nothing more (frozen); the k-quants' integer
# sub-block scale codes (scales; the other formats have none, so there it is frozen); every weight's level (free)
CODES = {"frozen": "only scales and offsets train",
         "scales": "k-quants' integer sub-block scale codes train too",
         "free": "the weights move too (levels re-chosen)"}


@dataclass
class QadOptions:
    tokens: int = 100_000
    seq: int = 512
    batch: int = 4  # sequences per step: few tokens buy few steps, and the steps are what train
    micro_batch: int = 4  # the whole batch in one pass: the fake-quant decode then runs once per step
    # end-to-end phase: grid steps per optimizer step (fakequant.py's units, every format alike). Pilot on the
    # default model's Q4_0 after the layer phase: 0.01 took the KLD 0.094 -> 0.087 in 20 steps, still falling
    lr: float = 0.02
    # frozen: only scales and offsets train (EfficientQAT's end-to-end phase); free: the weights move and
    # re-choose their levels too. On the default model's Q4_0, layer by layer, frozen measured 0.74x the
    # gptq file's KLD, free 0.83-0.96x (moving weights fit the layer's few calibration tokens, not the model)
    codes: str = "frozen"
    # the file's float32 norms train too (a per-input-channel freedom no block scale has, free in bytes). Off: on
    # the default model's Q4_0 at 100k tokens it measured no gain (KLD 0.0839 with, 0.0822 without, bench/results/qad.md)
    norms: bool = False
    block_tokens: int = 8192  # the layer-by-layer phase first (qad_blocks.py), on this many tokens; 0: none
    block_epochs: int = 2
    block_lr: float = 0.05  # of 0.02 / 0.05 / 0.1 on the default model's Q4_0, 0.05 left the least KLD
    eval_every: int = 25
    save_every: int = 25
    bf16: bool = True
    seed: int = 0
    teacher: str | None = None  # train against this model instead of the one quantized (a student's original)
    resume: bool = False
    progress: bool = True
    say: Callable[[str], None] | None = None  # where to tell the user how training went

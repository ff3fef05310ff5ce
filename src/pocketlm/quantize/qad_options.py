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
    # sequences per step. Tokens train, not steps: on the off-grid student's Q2_K at 200k tokens, 2 a step
    # (196 steps) left the KLD where 4 did (0.2524 vs 0.2517; 100k at 4: 0.2826; bench/results/qad.md)
    batch: int = 4
    # passes over the --tokens of text. The scales are few against the teacher's full distribution at every
    # position, so text read again teaches them about as much as new text: 200k tokens twice took the default
    # model's Q4_0 from 0.607x to 0.584x gptq's KLD, three times the off-grid Q2_K from 0.708x to 0.658x
    # (bench/results/qad.md), and five no further than three (0.658x both). One pass by default: each pass costs
    # what the first did, and compress has 90 minutes
    epochs: int = 1
    micro_batch: int = 4  # the whole batch in one pass: the fake-quant decode then runs once per step
    # end-to-end phase: grid steps per optimizer step (fakequant.py's units, every format alike); None: by
    # format (learning_rate)
    lr: float | None = None
    # frozen: only scales and offsets train (EfficientQAT's end-to-end phase); free: the weights move and
    # re-choose their levels too. On the default model's Q4_0, layer by layer, frozen measured 0.74x the
    # gptq file's KLD, free 0.83-0.96x (moving weights fit the layer's few calibration tokens, not the model)
    codes: str = "frozen"
    # the file's float32 norms train too (a per-input-channel freedom no block scale has, free in bytes). Off: on
    # the default model's Q4_0 at 100k tokens it measured no gain (KLD 0.0839 with, 0.0822 without, bench/results/qad.md)
    norms: bool = False
    # the layer-by-layer phase first (qad_blocks.py), on this many tokens; 0: none; None: by format (layer_phase_tokens)
    block_tokens: int | None = None
    block_epochs: int = 2
    block_lr: float = 0.05  # of 0.02 / 0.05 / 0.1 on the default model's Q4_0, 0.05 left the least KLD
    eval_every: int = 25
    save_every: int = 25
    # float32 instead trained the off-grid Q3_K_M file no better (0.0809 against 0.0815 in llama.cpp) in 2.4x the time
    bf16: bool = True
    seed: int = 0
    teacher: str | None = None  # train against this model instead of the one quantized (a student's original)
    resume: bool = False
    progress: bool = True
    say: Callable[[str], None] | None = None  # where to tell the user how training went


LEGACY_BLOCK_TOKENS = 8192
# Legacy files (the default model's Q4_0, after the layer phase) were tuned at 0.02: a pilot at 0.01 took the
# KLD 0.094 -> 0.087 in 20 steps, 0.04 did worse on Q2_K. The k-quant files of the off-grid student measured
# 0.01 better in all four comparisons (bench/results/qad.md, llama.cpp's KLD): Q3_K_M one pass 0.0799 against
# 0.0815, three passes 0.0769 against 0.0775 (0.005: 0.0807); Q2_K one pass 0.701x gptq's against 0.708x, and
# the H200 screen's training measure 0.2227 against 0.2247. Small (1-2%), but always the same way.
LEGACY_LR, KQUANT_LR = 0.02, 0.01


def learning_rate(lr: float | None, kquant_share: float) -> float:
    """The end-to-end phase's learning rate when not given: by the share of the trained weights stored as k-quants."""
    if lr is not None:
        return lr
    return KQUANT_LR if kquant_share > 0.5 else LEGACY_LR


def layer_phase_tokens(block_tokens: int | None, kquant_share: float, weighted_start: bool = False) -> int:
    """The layer phase's tokens when not given: on for files whose trained weights are mostly legacy
    formats, off for mostly k-quants. Measured (bench/results/qad.md): on the default model's Q4_0 the
    phase takes training's KLD 0.128 -> 0.091 and the file ends at 0.60x gptq's; on the off-grid
    student's k-quants it makes the file worse before end-to-end training starts (Q3_K_M 0.082 ->
    0.097, Q2_K 0.297 -> 0.355), and the files end better without it (Q3_K_M 0.94x gptq's KLD
    against 1.00x, Q2_K 0.86x against 0.92x). k-quants train only two scales per 256 weights, and
    one layer's few calibration tokens overfit them. A start made by `--fisher` gptq skips it too: the
    phase fits each layer's output with every token alike and undoes the weighting (default model
    Q4_0 from the --fisher file: 0.0757 KLD with the phase, 0.0674 without, bench/results/qad.md)."""
    if block_tokens is not None:
        return block_tokens
    return 0 if kquant_share > 0.5 or weighted_start else LEGACY_BLOCK_TOKENS

"""What the student learns from: the teacher's next-token distribution, in one of three forms.

- Full: the whole vocabulary, computed on the fly by the teacher beside the student. Exact, and
  cheap when the teacher is small (SmolLM2-135M on a CPU costs one forward pass per step).
- Sampled: a few tokens per position drawn from the teacher's distribution, cached once. Their
  mean of -log q is an unbiased estimate of the cross-entropy to the teacher, so its gradient is
  forward KL's; ~12 draws per position match full-vocabulary KD (Sparse Logit Sampling, arXiv
  2503.16870). For teachers too big to run beside the student.
- TopK: the cached top-k with the rest as one bucket (losses.py). Kept as an option, but biased:
  the same paper shows cached top-k targets mis-train the tail, and Minitron (arXiv 2407.14679)
  measured top-k <= 100 hurting accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Teachers up to this many parameters run beside the student by default (bf16 weights: 2 GB).
# Above it a forward pass per training step costs more than the student's own step, and the
# sampled cache is computed once instead.
FULL_MAX_PARAMS = 1_000_000_000
# rows of a (batch, positions, vocabulary) tensor worked on at a time: 32 x 49152 float32 is 6 MB, so a
# chunk's few temporaries stay in the processor's cache instead of streaming the whole tensor through memory
FUSED_ROWS = 32


def row_chunks(shape: torch.Size):
    """Index tuples (b, positions) covering a (batch, positions, ...) tensor FUSED_ROWS positions at a time."""
    for b in range(shape[0]):
        for i in range(0, shape[1], FUSED_ROWS):
            yield b, slice(i, min(shape[1], i + FUSED_ROWS))


@dataclass
class TopK:
    idx: torch.Tensor  # (B, T, k) token ids
    logp: torch.Tensor  # (B, T, k) their log-probs
    tail: torch.Tensor  # (B, T) log of the mass outside the top k

    def to(self, device) -> "TopK":
        return TopK(self.idx.to(device), self.logp.to(device), self.tail.to(device))


@dataclass
class Full:
    logp: torch.Tensor  # (B, T, V) log-probs
    hidden: torch.Tensor | None = None  # (B, T, H) the final hidden state, on the student's channels

    def to(self, device) -> "Full":
        return Full(self.logp.to(device), None if self.hidden is None else self.hidden.to(device))


@dataclass
class Sampled:
    idx: torch.Tensor  # (B, T, K) draws from the teacher's distribution, with replacement
    logp: torch.Tensor  # (B, T, K) the teacher's log-prob of each draw: a constant for the gradient,
    # kept so the loss reads as a KL estimate (mean of log p - log q) rather than a cross-entropy

    def to(self, device) -> "Sampled":
        return Sampled(self.idx.to(device), self.logp.to(device))


Signal = TopK | Full | Sampled


class OnlineTeacher:
    """The teacher's full distribution for the batch being trained on, computed when asked; with
    `channels` (the teacher's hidden channels the pruned student kept, in its order) also its
    final hidden state on those channels, for the hidden-state loss (losses.hidden_loss)."""

    def __init__(self, model, channels: torch.Tensor | None = None):
        self.model, self.channels = model, channels

    def batch(self, rows: torch.Tensor, ids: torch.Tensor) -> Full:
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.model.device), use_cache=False,
                             output_hidden_states=self.channels is not None)
            hidden = None
            if self.channels is not None:
                # inference tensors cannot enter autograd's graph, even as constants: clone out
                hidden = out.hidden_states[-1][:, :-1, self.channels.to(out.logits.device)].float().clone()
        # one float32 copy made outside inference mode (an ordinary tensor), then normalized in place a few
        # rows at a time: two fewer passes over a (B, T, vocabulary) tensor than log_softmax + clone
        logp = out.logits[:, :-1].to(torch.float32, copy=True)
        with torch.no_grad():
            for rows in row_chunks(logp.shape):
                logp[rows] = torch.log_softmax(logp[rows], dim=-1)
        return Full(logp, hidden)


def choose(kind: str, teacher_params: int) -> str:
    if kind != "auto":
        return kind
    return "full" if teacher_params <= FULL_MAX_PARAMS else "sampled"

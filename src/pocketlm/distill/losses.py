"""Distillation losses on the teacher's cached top-k, with the tail as one explicit bucket.

Both distributions are folded onto the same k+1 outcomes (the teacher's top-k tokens, and
"anything else"). Every divergence here is an f-divergence, so folding can only lower it
(data processing inequality): it equals the full-vocabulary value when the two agree on how
the tail's mass is spread, and never overestimates. Dropping the tail instead would teach the
student that the teacher's top-k sum to one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import PocketError

LOSSES = ("fkl", "rkl", "jsd", "tvd", "ce")


def parse_loss(spec: str) -> tuple[str, float | None]:
    """'fkl' | 'rkl' | 'tvd' | 'ce' | 'jsd:BETA' (BETA in (0, 1); 'jsd' alone means 0.5)."""
    name, _, arg = spec.partition(":")
    name = name.lower()
    if name not in LOSSES:
        raise PocketError(f"unknown --loss {spec!r} (choose one of fkl, rkl, jsd:BETA, tvd, ce)")
    if name != "jsd":
        if arg:
            raise PocketError(f"--loss {name} takes no parameter")
        return name, None
    try:
        beta = float(arg) if arg else 0.5
    except ValueError:
        raise PocketError(f"--loss jsd:BETA wants a number, got {arg!r}") from None
    if not 0.0 < beta < 1.0:
        raise PocketError(f"--loss jsd:{beta} needs 0 < BETA < 1")
    return name, beta


def bucket_logprobs(student_logits: torch.Tensor, t_idx: torch.Tensor, t_logp: torch.Tensor,
                    t_tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probs over the k+1 buckets, shape (..., k+1)."""
    s_full = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = torch.gather(s_full, -1, t_idx)
    s_in = torch.logsumexp(s_top, dim=-1).clamp(max=-1e-7)  # log of the mass inside the top-k
    s_tail = torch.log(-torch.expm1(s_in))
    student = torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1)
    teacher = torch.log_softmax(torch.cat([t_logp, t_tail.clamp(min=-30.0).unsqueeze(-1)], dim=-1), dim=-1)
    return teacher, student


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence(name: str, teacher: torch.Tensor, student: torch.Tensor, beta: float | None = None) -> torch.Tensor:
    """Per-position divergence between bucketed log-prob tensors."""
    if name == "fkl":
        return _kl(teacher, student)
    if name == "rkl":
        return _kl(student, teacher)
    if name == "tvd":
        return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)
    if name == "jsd":
        mix = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1 - beta)]), dim=0)
        return beta * _kl(teacher, mix) + (1 - beta) * _kl(student, mix)
    raise PocketError(f"{name} is not a divergence")


def distill_loss(name: str, beta: float | None, student_logits: torch.Tensor, targets: torch.Tensor,
                 teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Mean loss over positions. student_logits (B, T, V); targets (B, T) next tokens."""
    if name == "ce":
        return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1))
    t, s = bucket_logprobs(student_logits, *teacher)
    return divergence(name, t, s, beta).mean()

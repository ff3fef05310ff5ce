"""Distillation losses against each form of the teacher's signal (signals.py).

With the full distribution every divergence is computed exactly; with draws from it, forward
KL is estimated without bias. With the cached top-k, both distributions are folded onto the
same k+1 outcomes (the teacher's top-k tokens, and "anything else"). Every divergence here is
an f-divergence, so folding can only lower it (data processing inequality): it equals the full-vocabulary value when the two agree on how
the tail's mass is spread, and never overestimates. Dropping the tail instead would teach the
student that the teacher's top-k sum to one.

The bucket says nothing about *which* tail token the student should favour, and on real text the
teacher leaves ~11% of its mass there (SmolLM2, k=64): the rare tokens that dominate perplexity.
tail="sample" fills that hole for forward KL. The full-vocabulary KL's missing part is the tail
mass times a cross-entropy over the tail, and the data's next token, when it falls in the tail,
is a sample from it (as far as the teacher models the data); so adding -log q(y | tail) at those
positions estimates the missing term, up to a constant, without storing the full vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import PocketError
from .loss_spec import LOSSES, TAILS, check_tail, parse_loss  # noqa: F401  (the losses' names live there)
from .signals import Full, Sampled, Signal, row_chunks


def bucket_logprobs(student_logits: torch.Tensor, t_idx: torch.Tensor, t_logp: torch.Tensor,
                    t_tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probs over the k+1 buckets, shape (..., k+1)."""
    return _bucket(torch.log_softmax(student_logits.float(), dim=-1), t_idx, t_logp, t_tail)


def _bucket(s_full: torch.Tensor, t_idx: torch.Tensor, t_logp: torch.Tensor,
            t_tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        if beta is None:
            raise PocketError("jsd needs its beta")
        mix = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1 - beta)]), dim=0)
        return beta * _kl(teacher, mix) + (1 - beta) * _kl(student, mix)
    raise PocketError(f"{name} is not a divergence")


def tail_sample_term(s_full: torch.Tensor, student_bucket: torch.Tensor, targets: torch.Tensor,
                     t_idx: torch.Tensor) -> torch.Tensor:
    """-log q(y | tail) where the next token y is outside the teacher's top-k, else 0; shape (B, T)."""
    in_top = (t_idx == targets.unsqueeze(-1)).any(-1)
    nll_in_tail = student_bucket[..., -1] - torch.gather(s_full, -1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(in_top, torch.zeros_like(nll_in_tail), nll_in_tail)


def sampled_fkl(s_full: torch.Tensor, teacher: Sampled) -> torch.Tensor:
    """Forward KL estimated from draws of the teacher: mean over the draws of log p - log q.
    Unbiased for KL(p || q), and its gradient for KL's (log p is a constant to the student).
    The definition, in tensor ops: training computes it fused (FusedForwardKL, tested against this)."""
    return (teacher.logp - torch.gather(s_full, -1, teacher.idx)).mean(-1)


def distill_loss(name: str, beta: float | None, student_logits: torch.Tensor, targets: torch.Tensor,
                 teacher: Signal | None, tail: str = "bucket", ce_weight: float = 0.0) -> torch.Tensor:
    """Mean loss over positions. student_logits (B, T, V); targets (B, T) next tokens; teacher:
    one of signals.py's forms (full log-probs, draws, or the bucketed top-k); ce_weight: how
    much of the data's cross-entropy is added to a divergence (a mixture the issue asks to try)."""
    check_tail(name, tail)
    if name == "ce":
        return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1))
    if teacher is None:
        raise PocketError(f"the {name} loss needs the teacher's distribution")
    if isinstance(teacher, Sampled) and name != "fkl":
        raise PocketError(f"sampled teacher targets estimate forward KL only, not {name}")
    if name == "fkl" and isinstance(teacher, Full):
        return FusedForwardKL.apply(student_logits, teacher.logp, None, None, targets, ce_weight)
    if isinstance(teacher, Sampled):
        return FusedForwardKL.apply(student_logits, None, teacher.idx, teacher.logp, targets, ce_weight)
    s_full = torch.log_softmax(student_logits.float(), dim=-1)
    if isinstance(teacher, Full):
        loss = divergence(name, teacher.logp, s_full, beta)
    else:
        t, s = _bucket(s_full, teacher.idx, teacher.logp, teacher.tail)
        loss = divergence(name, t, s, beta)
        if tail == "sample":
            loss = loss + tail_sample_term(s_full, s, targets, teacher.idx)
    if ce_weight:  # from the log-probs already at hand: a second log-softmax over the vocabulary costs as much
        loss = loss - ce_weight * torch.gather(s_full, -1, targets.unsqueeze(-1)).squeeze(-1)
    return loss.mean()


class FusedForwardKL(torch.autograd.Function):
    """mean over positions of forward KL(teacher || student) + ce_weight x the data's
    cross-entropy, and its gradient, in one pass over the vocabulary-wide rows; the teacher as its
    full log-probs (t_logp, exact) or as K draws with their log-probs (idx, d_logp: the unbiased
    estimate sampled_fkl computes).

    Why by hand: written with tensor ops, this loss makes five (B, T, V) float32 temporaries
    forward and as many backward; with SmolLM2's 49k-token vocabulary that traffic took ~30% of
    a distillation step on 2 cores (torch.profiler: log_softmax, its backward, mul, neg, copies).
    The gradient is known in closed form, (1 + w) softmax(s) - p_teacher - w onehot(y), with
    p_teacher the draws' frequencies when sampled, so it is computed with the loss, chunk by
    chunk, and kept in the logits' own dtype until backward."""

    @staticmethod
    def forward(ctx, logits, t_logp, idx, d_logp, targets, ce_weight):
        B, T, V = logits.shape
        n = B * T
        want_grad = ctx.needs_input_grad[0]  # not when evaluating: the logits then need no gradient
        grad = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device) if want_grad else None
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        w = float(ce_weight)
        for rows in row_chunks(logits.shape):
            ls = torch.log_softmax(logits[rows].float(), dim=-1)
            y = targets[rows].unsqueeze(-1)
            if t_logp is not None:
                lt = t_logp[rows].float()  # may be the teacher's own tensor: never written to
                pt = lt.exp()
                total += (pt * (lt - ls)).sum()
            else:
                draws = idx[rows].long()
                total += (d_logp[rows].float() - ls.gather(-1, draws)).sum() / draws.shape[-1]
            if w:
                total -= w * ls.gather(-1, y).sum()
            if grad is None:
                continue
            g = ls.exp_().mul_(1 + w) if w else ls.exp_()  # ls is this chunk's own: reused as the gradient
            if t_logp is not None:
                g.sub_(pt)
            else:
                g.scatter_add_(-1, draws, torch.full(draws.shape, -1.0 / draws.shape[-1], dtype=g.dtype, device=g.device))
            if w:
                g.scatter_add_(-1, y, torch.full(y.shape, -w, dtype=g.dtype, device=g.device))
            grad[rows] = g.div_(n)  # the mean's 1/n in float32, before any rounding to the logits' dtype
        ctx.save_for_backward(grad)
        return (total / n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def hidden_loss(student_hidden: torch.Tensor, teacher: Signal | None) -> torch.Tensor:
    """1 - cosine between the student's final hidden state and the teacher's on the channels the
    student kept, per position, averaged. Cosine, not MSE: the two RMS norms divide by different
    widths, so only directions are comparable (Minitron, arXiv 2407.14679, adds such a term
    when depth is cut)."""
    if not isinstance(teacher, Full) or teacher.hidden is None:
        raise PocketError("the hidden-state loss needs the teacher run beside the student (targets full)")
    return (1 - F.cosine_similarity(student_hidden.float(), teacher.hidden, dim=-1)).mean()

"""Per-position quality measures from logits. Pure array code, so tests can check it by hand.

KL-divergence uses the reference's top-k probabilities plus one "tail" bucket holding the rest
of its mass (and the candidate's mass outside those k tokens). Merging tokens can only lower
KL (log-sum inequality), so this is a lower bound of the full-vocabulary value; with k=256 it
is within a fraction of a percent on SmolLM2 (measured in tests). It lets a cached reference
take k*8 bytes per token instead of the full vocabulary (49k-262k floats).
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probs: over a 49k-262k vocabulary numpy float64 costs more than the model
    pass; float32 keeps KLD accurate to ~1e-6 absolute, far below anything reported."""
    import torch

    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=-1).numpy()


def nll(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target token; logp rows predict the targets."""
    return -logp[np.arange(len(targets)), targets].astype(np.float64)


def topk_reference(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens per position, most likely first: (log-probs float32, ids int32)."""
    import torch

    vals, idx = torch.topk(torch.from_numpy(logp), min(k, logp.shape[-1]), dim=-1, sorted=True)
    return vals.numpy().astype(np.float32), idx.numpy().astype(np.int32)


def kld_from_topk(ref_logp: np.ndarray, ref_idx: np.ndarray, cand_logp: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) per position over the reference's top-k tokens plus a tail bucket."""
    ref_logp = ref_logp.astype(np.float64)
    p = np.exp(ref_logp)
    q_logp = np.take_along_axis(cand_logp, ref_idx.astype(np.int64), axis=-1).astype(np.float64)
    kl = (p * (ref_logp - q_logp)).sum(axis=-1)
    p_tail = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_logp).sum(axis=-1), 1e-30, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 1e-12, p_tail * (np.log(np.maximum(p_tail, 1e-30)) - np.log(q_tail)), 0.0)
    return np.maximum(kl + tail, 0.0)


def kld_full(ref_logp: np.ndarray, cand_logp: np.ndarray) -> np.ndarray:
    ref_logp, cand_logp = ref_logp.astype(np.float64), cand_logp.astype(np.float64)
    return (np.exp(ref_logp) * (ref_logp - cand_logp)).sum(axis=-1)


def summarize(nll_all: np.ndarray, kld_all: np.ndarray | None, top1_all: np.ndarray | None) -> dict:
    out = {"tokens": int(nll_all.size), "ppl": float(np.exp(nll_all.mean()))}
    if kld_all is not None:
        out["kld_mean"] = float(kld_all.mean())
        out["kld_p99"] = float(np.percentile(kld_all, 99))
        out["top1"] = float(top1_all.mean())
    return out

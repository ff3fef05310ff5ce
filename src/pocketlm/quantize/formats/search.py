"""Importance-weighted scale search shared by the block formats.

Both searches try a spread of candidate scales around the obvious one (max value onto the
end of the grid), assign every value to its nearest level, re-fit the scale (and offset) by
weighted least squares for that assignment, and keep the candidate with the lowest weighted
squared error: the idea of llama.cpp's make_qx_quants / make_qkx2_quants, vectorised over all
rows at once. Rows are blocks or sub-blocks.
"""
from __future__ import annotations

import numpy as np


def _nearest(t: np.ndarray, levels: np.ndarray) -> np.ndarray:
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[np.searchsorted(mids, t)]


def fit_scale(x: np.ndarray, w: np.ndarray, levels: np.ndarray, steps: int = 9, spread: float = 0.5) -> np.ndarray:
    """Scale s per row minimising sum w (x - s * nearest_level(x / s))^2 over a symmetric grid.

    Candidates map the largest-magnitude value onto either end of the grid (the sign of s
    picks which end, so asymmetric grids like -8..7 use their longer side), nudged by up to
    `spread` levels, each refined by least squares.
    """
    levels = np.asarray(levels, dtype=np.float32)
    imax = np.abs(x).argmax(axis=-1)
    xmax = np.take_along_axis(x, imax[:, None], axis=-1)[:, 0]
    best_s = np.zeros(x.shape[0], np.float32)
    best_err = np.full(x.shape[0], np.inf, np.float32)
    ends = [levels[0], levels[-1]]
    for end in ends:
        for nudge in np.linspace(-spread, spread, steps):
            target = end + np.sign(end) * nudge
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.where(xmax != 0, xmax / target, 0.0).astype(np.float32)
                q = _nearest(np.where(s[:, None] != 0, x / np.where(s == 0, 1, s)[:, None], 0), levels)
                wq = w * q
                den = (wq * q).sum(-1)
                s_ls = np.where(den > 0, (wq * x).sum(-1) / np.where(den > 0, den, 1), 0.0).astype(np.float32)
            for cand in (s, s_ls):
                with np.errstate(divide="ignore", invalid="ignore"):
                    qc = _nearest(np.where(cand[:, None] != 0, x / np.where(cand == 0, 1, cand)[:, None], 0), levels)
                err = (w * (x - cand[:, None] * qc) ** 2).sum(-1)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_s = np.where(better, cand, best_s)
    return best_s


def fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, *, offset_le_zero: bool, steps: int = 12,
                  lo: float = -0.5, hi: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per row minimising sum w (x - (s*q + m))^2 with q in 0..nmax.

    offset_le_zero: k-quants store -offset as an unsigned code, so m must not be positive.
    """
    xmin = x.min(axis=-1)
    if offset_le_zero:
        xmin = np.minimum(xmin, 0)
    xmax = x.max(axis=-1)
    rng = np.maximum(xmax - xmin, 1e-30)
    best = (rng / nmax, xmin)
    best_err = _err_affine(x, w, best[0], best[1], nmax)
    sw = w.sum(-1)
    swx = (w * x).sum(-1)
    for k in np.linspace(lo, hi, steps):
        iscale = (nmax + k) / rng
        q = np.clip(np.rint((x - xmin[:, None]) * iscale[:, None]), 0, nmax)
        swq, swqq, swqx = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1)
        det = sw * swqq - swq * swq
        ok = det > 0
        safe = np.where(ok, det, 1)
        s = np.where(ok, (sw * swqx - swq * swx) / safe, best[0])
        m = np.where(ok, (swqq * swx - swq * swqx) / safe, xmin)
        if offset_le_zero:
            pos = m > 0
            s = np.where(pos, np.where(swqq > 0, swqx / np.where(swqq > 0, swqq, 1), s), s)
            m = np.where(pos, 0.0, m)
        s = np.maximum(s, 0)
        err = _err_affine(x, w, s, m, nmax)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (np.where(better, s, best[0]), np.where(better, m, best[1]))
    return best[0].astype(np.float32), best[1].astype(np.float32)


def _err_affine(x, w, s, m, nmax):
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(np.where(s[:, None] > 0, (x - m[:, None]) / np.where(s > 0, s, 1)[:, None], 0)), 0, nmax)
    return (w * (x - (s[:, None] * q + m[:, None])) ** 2).sum(-1)


def quantize_codes(values: np.ndarray, bits: int, *, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The second quantization level of k-quants: sub-block scales (n, k) -> (super scale (n,),
    rounded to float16 as stored, integer codes (n, k)) with super * code ~ value."""
    if signed:
        top = 2 ** (bits - 1)  # codes in [-top, top-1]: the largest magnitude maps onto -top
        imax = np.abs(values).argmax(axis=-1)
        d = np.take_along_axis(values, imax[:, None], axis=-1)[:, 0] / -top
        lo, hi = -top, top - 1
    else:
        d = values.max(axis=-1) / (2 ** bits - 1)
        lo, hi = 0, 2 ** bits - 1
    d = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(d[:, None] != 0, np.rint(values / np.where(d == 0, 1, d)[:, None]), 0)
    return d, np.clip(codes, lo, hi).astype(np.int64)

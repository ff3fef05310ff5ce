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
    if levels[-1] - levels[0] == len(levels) - 1:  # a uniform integer grid: plain rounding
        return np.clip(np.rint(t), levels[0], levels[-1])
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[np.searchsorted(mids, t)]


def fit_scale(x: np.ndarray, w: np.ndarray, levels: np.ndarray, steps: int = 5, spread: float = 0.5) -> np.ndarray:
    """Scale s per row minimising sum w (x - s * nearest_level(x / s))^2 over a symmetric grid.

    Candidates map the largest-magnitude value onto either end of the grid (the sign of s
    picks which end, so asymmetric grids like -8..7 use their longer side), nudged by up to
    `spread` levels. For each candidate's assignment q the best scale has a closed form,
    sum(wqx)/sum(wqq), and so does its error, sum(wxx) - sum(wqx)^2/sum(wqq).

    float64 throughout: that error is a difference of two nearly equal sums, and with importance
    spanning orders of magnitude float32 rounding alone (~1e-7 of sum wxx) outweighs the true error
    of a near miss, so the zero-error scale of values already on the grid could lose to it.
    """
    x, w = x.astype(np.float64), w.astype(np.float64)
    levels = np.asarray(levels, dtype=np.float32)
    imax = np.abs(x).argmax(axis=-1)
    xmax = np.take_along_axis(x, imax[:, None], axis=-1)[:, 0]
    zero = xmax == 0
    xmax = np.where(zero, 1.0, xmax)
    best_s = np.zeros(x.shape[0])
    best_err = np.full(x.shape[0], np.inf)
    swxx = (w * x * x).sum(-1)
    for end in (levels[0], levels[-1]):
        for nudge in np.linspace(-spread, spread, steps) if steps > 1 else (0.0,):
            inv = (end + np.sign(end) * nudge) / xmax
            q = _nearest(x * inv[:, None], levels)
            wq = w * q
            num, den = (wq * x).sum(-1), (wq * q).sum(-1)
            ok = den > 0
            safe = np.where(ok, den, 1)
            err = np.where(ok, swxx - num * num / safe, np.inf)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, np.where(ok, num / safe, 0), best_s)
    return np.where(zero, 0.0, best_s).astype(np.float32)


def fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, *, offset_le_zero: bool, steps: int = 8,
                  lo: float = -0.5, hi: float = 1.0, coarse_grid: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per row minimising sum w (x - (s*q + m))^2 with q in 0..nmax.

    Each candidate step size gives an assignment q; (s, m) then come from the 2x2 weighted
    least-squares normal equations, whose residual is sum(wxx) - s*sum(wqx) - m*sum(wx).
    offset_le_zero: k-quants store -offset as an unsigned code, so m must not be positive.
    coarse_grid: also try the grid of one bit fewer spanning the block's range. A block that was
    quantized before at that width (a Q4_1 model re-quantized to Q5_1) then comes back exactly,
    where the candidates near nmax land between its levels and cost a rounding error.
    float64 throughout, for the cancellation fit_scale describes.
    """
    x, w = x.astype(np.float64), w.astype(np.float64)
    xmin = x.min(axis=-1)
    if offset_le_zero:
        xmin = np.minimum(xmin, 0)
    rng = np.maximum(x.max(axis=-1) - xmin, 1e-30)
    sw, swx, swxx = w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)
    best_s, best_m = rng / nmax, xmin.copy()
    best_err = np.full(x.shape[0], np.inf)
    shifted = x - xmin[:, None]
    candidates = list(np.linspace(lo, hi, steps))
    if coarse_grid:
        candidates.append((nmax + 1) // 2 - 1 - nmax)
    for k in candidates:
        q = np.clip(np.rint(shifted * ((nmax + k) / rng)[:, None]), 0, nmax)
        wq = w * q
        swq, swqq, swqx = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)
        det = sw * swqq - swq * swq
        ok = det > 0
        safe = np.where(ok, det, 1)
        s = (sw * swqx - swq * swx) / safe
        m = (swqq * swx - swq * swqx) / safe
        if offset_le_zero:
            pos = m > 0
            s = np.where(pos, swqx / np.where(swqq > 0, swqq, 1), s)
            m = np.where(pos, 0.0, m)
        if coarse_grid:  # the closed form cancels badly when |m| >> s; an exact grid needs the true residual
            resid = (w * (x - (s[:, None] * q + m[:, None])) ** 2).sum(-1)
        else:
            resid = swxx - s * swqx - m * swx
        err = np.where(ok & (s > 0), resid, np.inf)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_m = np.where(better, s, best_s), np.where(better, m, best_m)
    return best_s.astype(np.float32), best_m.astype(np.float32)


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


def fit_unsigned_codes(values: np.ndarray, bits: int, weights: np.ndarray, steps: int = 17) -> tuple[np.ndarray, np.ndarray]:
    """Like quantize_codes(signed=False), but choosing the super scale for the weighted error
    sum weights * (value - super * code)^2 instead of fitting the largest value exactly.

    Rounding every sub-block scale against max/63 lets the largest one decide the grid for all
    eight; on the default model's ffn_down (Q5_K) that alone left 1.5x the importance-weighted
    error of llama.cpp with an imatrix. Candidate grids around max/nmax, each refitted by least
    squares and re-rounded with the float16 super scale as stored, bring it to ~0.95x.
    """
    nmax = 2 ** bits - 1
    top = np.maximum(values.max(axis=-1), 0)
    safe_top = np.where(top > 0, top, 1)
    best_d, best_codes = quantize_codes(values, bits, signed=False)  # the plain grid stays a candidate
    best_err = (weights * (values - best_d[:, None] * best_codes) ** 2).sum(-1)
    for k in np.linspace(-1.0, 1.0, steps):
        codes = np.clip(np.rint(values * ((nmax + k) / safe_top)[:, None]), 0, nmax)
        wc = weights * codes
        den = (wc * codes).sum(-1)
        d = np.where(den > 0, (wc * values).sum(-1) / np.where(den > 0, den, 1), 0)
        d = d.astype(np.float16).astype(np.float32)
        codes = np.where(d[:, None] > 0, np.clip(np.rint(values / np.where(d > 0, d, 1)[:, None]), 0, nmax), 0)
        err = (weights * (values - d[:, None] * codes) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
        best_codes = np.where(better[:, None], codes, best_codes)
    return best_d.astype(np.float32), best_codes.astype(np.int64)


def _rerounded_error(x: np.ndarray, w: np.ndarray, scale: np.ndarray, offset, lo: float, hi: float) -> np.ndarray:
    """Per sub-block, sum w (x - (scale*q + offset))^2 with q the nearest integer in [lo, hi]
    (a zero scale decodes to the offset). float32 throughout: the code searches call this
    dozens of times per tensor. x, w: (n, n_sub, sub); scale, offset: (n, n_sub) or scalars."""
    s, o = scale[..., None], np.asarray(offset, np.float32)[..., None]
    zero = s == 0
    q = np.where(zero, 0, np.clip(np.rint((x - o) / np.where(zero, 1, s)), lo, hi))
    return (w * (x - (s * q + o)) ** 2).sum(-1)


def refine_scale_min_codes(x: np.ndarray, w: np.ndarray, nmax: int, d: np.ndarray, sc: np.ndarray,
                           dmin: np.ndarray, mn: np.ndarray, code_max: int, reach: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Better integer codes (sc, mn) for value = d*sc*q - dmin*mn, judged by the final weighted
    error with every q re-rounded, searching each code within +-reach of the given one.

    x, w: (n, n_sub, sub). The codes from fitting (scale, min) first and rounding them after
    ignore how the rounded pair then fits the values. Weights that already lie on a coarser grid
    (the default model's Q4_1 weights going to Q4_K/Q5_K) are hit hardest: on its ffn_down this
    search cut the importance-weighted error to 0.4x of the fitted codes' (reach 2). The given
    codes stay a candidate, so no sub-block gets worse.
    """
    x, w = x.astype(np.float32), w.astype(np.float32)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]

    def error(sc_: np.ndarray, mn_: np.ndarray) -> np.ndarray:
        return _rerounded_error(x, w, d32 * sc_, -(dmin32 * mn_), 0, nmax)

    sc, mn = sc.astype(np.float32), mn.astype(np.float32)
    best_err, best_sc, best_mn = error(sc, mn), sc, mn
    for a in range(-reach, reach + 1):
        sc_try = np.clip(sc + a, 0, code_max)
        for b in range(-reach, reach + 1):
            if a == 0 and b == 0:
                continue
            mn_try = np.clip(mn + b, 0, code_max)
            err = error(sc_try, mn_try)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_sc, best_mn = np.where(better, sc_try, best_sc), np.where(better, mn_try, best_mn)
    return best_sc.astype(np.int64), best_mn.astype(np.int64)


def refine_signed_codes(x: np.ndarray, w: np.ndarray, levels: np.ndarray, d: np.ndarray, sc: np.ndarray,
                        code_bits: int, reach: int) -> np.ndarray:
    """Better signed sub-block codes sc for value = d*sc*level (Q3_K, Q6_K), judged by the final
    weighted error with every level re-chosen, trying each code within +-reach of the given one.

    x, w: (n, n_sub, sub). The least-squares scale of a sub-block is not where its values best
    meet the grid once rounded: on weights that lie on a Q4_1 grid (the bench models) a scale
    that lines the grids up wins by far. Trying every code (Q3_K's 64) cut the importance-weighted
    error of the aligned model's Q3_K to 0.42x; Q6_K's 256 codes cost too much to try all, and
    +-16 of them gave 0.64x. The given code stays a candidate, so no sub-block gets worse.
    """
    x, w = x.astype(np.float32), w.astype(np.float32)
    d32 = d.astype(np.float32)[:, None]
    lo, hi = float(levels[0]), float(levels[-1])
    top = 2 ** (code_bits - 1)

    def error(sc_: np.ndarray) -> np.ndarray:
        return _rerounded_error(x, w, d32 * sc_, 0.0, lo, hi)

    sc = sc.astype(np.float32)
    best_err, best_sc = error(sc), sc
    for a in range(-reach, reach + 1):
        if a == 0:
            continue
        sc_try = np.clip(sc + a, -top, top - 1)
        err = error(sc_try)
        better = err < best_err
        best_err, best_sc = np.where(better, err, best_err), np.where(better, sc_try, best_sc)
    return best_sc.astype(np.int64)


def assign_blocks(fmt, x: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Nearest level of every value of whole blocks x (n, block_size), from per-sub-block scale and offset."""
    return fmt.assign(x, fmt.expand(scale), fmt.expand(offset))

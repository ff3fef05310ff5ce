"""The scale and code searches of search.py, compiled: the same arithmetic, the same bytes.

Why by hand: search.py's numpy runs every candidate as a dozen passes over arrays of a million
values, each written to memory and read back; a 1B checkpoint's Q4_K_M rtn took 6x llama-quantize's
time, all of it there. These kernels run the identical candidates one sub-block at a time (32 values
stay in registers), ~10x faster, with no temporaries the size of the tensor.

Bit-identical to search.py, which stays the readable reference and the test oracle
(tests/test_codec_compiled.py compares every function and every format byte for byte). What that
takes: each value computed in the dtype numpy computes it in (float32 where numpy stays in float32,
float64 where a weak Python scalar or an int64 array promotes it); sums in numpy's pairwise order
(8 interleaved accumulators, then a tree: `_psum`); float16 rounding done once, to nearest-even,
from float64 as numpy does (`_half`); no fast-math, so no fused multiply-adds or reassociation.
"""
from __future__ import annotations

import math

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _psum(buf, n):
    """sum(buf[:n]) in the order numpy's pairwise summation adds a contiguous row of 8 to 128 values."""
    r0, r1, r2, r3 = buf[0], buf[1], buf[2], buf[3]
    r4, r5, r6, r7 = buf[4], buf[5], buf[6], buf[7]
    i = 8
    while i < n - n % 8:
        r0 += buf[i]
        r1 += buf[i + 1]
        r2 += buf[i + 2]
        r3 += buf[i + 3]
        r4 += buf[i + 4]
        r5 += buf[i + 5]
        r6 += buf[i + 6]
        r7 += buf[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += buf[i]
        i += 1
    return res


@_jit
def _half(v):
    """float64 -> nearest float16 (ties to even) -> float32: numpy's astype(float16).astype(float32)."""
    a = abs(v)
    if a != a:
        return np.float32(v)
    if a >= 65520.0:  # halfway between 65504 (largest half) and 2^16 rounds up to infinity
        out = np.inf
    elif a < 6.103515625e-05:  # below 2^-14: subnormal halves, a fixed step of 2^-24
        out = np.rint(a * 16777216.0) / 16777216.0
    else:
        _, e = math.frexp(a)  # a = m * 2^e, m in [0.5, 1): 11 significant bits keep steps of 2^(e-11)
        step = math.ldexp(1.0, e - 11)
        out = np.rint(a / step) * step
    return np.float32(-out if v < 0 or (v == 0 and math.copysign(1.0, v) < 0) else out)


@_jit
def fit_scale_kernel(x, w, levels, nudges, uniform, out):
    n, k = x.shape
    nl = levels.shape[0]
    lo, hi = np.float64(levels[0]), np.float64(levels[nl - 1])
    mids = np.empty(nl - 1, np.float64)
    for i in range(nl - 1):
        mids[i] = np.float64((levels[i + 1] + levels[i]) / np.float32(2))
    ends = (levels[0], levels[nl - 1])
    buf_a = np.empty(k, np.float64)
    buf_b = np.empty(k, np.float64)
    for r in range(n):
        xr, wr = x[r], w[r]
        imax = 0
        amax = abs(np.float64(xr[0]))
        for j in range(1, k):
            if abs(np.float64(xr[j])) > amax:
                amax, imax = abs(np.float64(xr[j])), j
        xmax = np.float64(xr[imax])
        zero = xmax == 0
        if zero:
            xmax = 1.0
        for j in range(k):
            xj = np.float64(xr[j])
            buf_a[j] = np.float64(wr[j]) * xj * xj
        swxx = _psum(buf_a, k)
        best_s, best_err = 0.0, np.inf
        for end in ends:
            sgn = np.float64(np.sign(end))
            for nudge in nudges:
                inv = (np.float64(end) + sgn * nudge) / xmax
                for j in range(k):
                    xj = np.float64(xr[j])
                    t = xj * inv
                    if uniform:
                        q = min(max(np.rint(t), lo), hi)
                    else:
                        idx = 0
                        while idx < nl - 1 and mids[idx] < t:
                            idx += 1
                        q = np.float64(levels[idx])
                    wq = np.float64(wr[j]) * q
                    buf_a[j] = wq * xj
                    buf_b[j] = wq * q
                num, den = _psum(buf_a, k), _psum(buf_b, k)
                if den > 0:
                    err = swxx - num * num / den
                    if err < best_err:
                        best_err, best_s = err, num / den
        out[r] = np.float32(0.0 if zero else best_s)


@_jit
def fit_scale_min_kernel(x, w, nmax, offset_le_zero, cands, coarse_grid, out_s, out_m):
    n, k = x.shape
    fmax = np.float64(nmax)
    b1 = np.empty(k, np.float64)
    b2 = np.empty(k, np.float64)
    b3 = np.empty(k, np.float64)
    q = np.empty(k, np.float64)
    for r in range(n):
        xr, wr = x[r], w[r]
        xmin, xmax = np.float64(xr[0]), np.float64(xr[0])
        for j in range(1, k):
            v = np.float64(xr[j])
            xmin, xmax = min(xmin, v), max(xmax, v)
        if offset_le_zero and not xmin <= 0:
            xmin = 0.0
        rng = max(xmax - xmin, 1e-30)
        for j in range(k):
            wj, xj = np.float64(wr[j]), np.float64(xr[j])
            b1[j], b2[j], b3[j] = wj, wj * xj, wj * xj * xj
        sw, swx, swxx = _psum(b1, k), _psum(b2, k), _psum(b3, k)
        best_s, best_m, best_err = rng / fmax, xmin, np.inf
        for c in cands:
            f = (fmax + c) / rng
            for j in range(k):
                xj = np.float64(xr[j])
                qj = min(max(np.rint((xj - xmin) * f), 0.0), fmax)
                wq = np.float64(wr[j]) * qj
                q[j], b1[j], b2[j], b3[j] = qj, wq, wq * qj, wq * xj
            swq, swqq, swqx = _psum(b1, k), _psum(b2, k), _psum(b3, k)
            det = sw * swqq - swq * swq
            if not det > 0:
                continue
            s = (sw * swqx - swq * swx) / det
            m = (swqq * swx - swq * swqx) / det
            if offset_le_zero and m > 0:
                s = swqx / (swqq if swqq > 0 else 1.0)
                m = 0.0
            if not s > 0:
                continue
            if coarse_grid:
                for j in range(k):
                    dv = np.float64(xr[j]) - (s * q[j] + m)
                    b1[j] = np.float64(wr[j]) * (dv * dv)
                err = _psum(b1, k)
            else:
                err = swxx - s * swqx - m * swx
            if err < best_err:
                best_err, best_s, best_m = err, s, m
        out_s[r], out_m[r] = np.float32(best_s), np.float32(best_m)


@_jit
def fit_unsigned_codes_kernel(values, weights, bits, ks, out_d, out_codes):
    n, k = values.shape
    nmax = 2 ** bits - 1
    fnmax = np.float32(nmax)
    b64 = np.empty(k, np.float64)
    b64b = np.empty(k, np.float64)
    b32 = np.empty(k, np.float32)
    codes = np.empty(k, np.float32)
    for r in range(n):
        vmax = values[r, 0]
        for j in range(1, k):
            vmax = max(vmax, values[r, j])
        top = max(vmax, np.float32(0))
        safe_top = top if top > 0 else np.float32(1)
        best_d = _half(np.float64(vmax / fnmax))
        for j in range(k):
            c = np.rint(values[r, j] / best_d) if best_d != 0 else np.float32(0)
            out_codes[r, j] = np.int64(min(max(c, np.float32(0)), fnmax))
            dv = np.float64(values[r, j]) - np.float64(best_d) * np.float64(out_codes[r, j])
            b64[j] = np.float64(weights[r, j]) * (dv * dv)
        best_err = _psum(b64, k)
        for kk in ks:
            f = (np.float64(nmax) + kk) / np.float64(safe_top)
            for j in range(k):
                cj = min(max(np.rint(np.float64(values[r, j]) * f), 0.0), np.float64(nmax))
                wc = np.float64(weights[r, j]) * cj
                b64[j] = wc * cj
                b64b[j] = wc * np.float64(values[r, j])
            den = _psum(b64, k)
            d = _half(_psum(b64b, k) / den if den > 0 else 0.0)
            for j in range(k):
                c = min(max(np.rint(values[r, j] / d), np.float32(0)), fnmax) if d > 0 else np.float32(0)
                codes[j] = c
                dv = values[r, j] - d * c
                b32[j] = weights[r, j] * (dv * dv)
            err = _psum(b32, k)
            if err < best_err:
                best_err, best_d = np.float64(err), d
                for j in range(k):
                    out_codes[r, j] = np.int64(codes[j])
        out_d[r] = best_d


@_jit
def _rerounded(xs, ws, s, o, lo, hi, buf):
    """search._rerounded_error for one sub-block (float32). Contiguous 1-D views and a branch-free
    loop let LLVM vectorise it (a branch on s == 0 around two loops made it 4x slower). With s == 0
    the reference takes q = 0; here q is finite and s * q is a zero, whose sign can differ, but
    x - (+-0 + o) squares to the same value, so every error is the same float."""
    sub = xs.shape[0]
    sdiv = s if s != 0 else np.float32(1)
    for j in range(sub):
        q = min(max(np.rint((xs[j] - o) / sdiv), lo), hi)
        dv = xs[j] - (s * q + o)
        buf[j] = ws[j] * (dv * dv)
    return _psum(buf, sub)


@_jit
def refine_scale_min_codes_kernel(x, w, nmax, d, sc, dmin, mn, code_max, reach, out_sc, out_mn):
    n, n_sub, sub = x.shape
    buf = np.empty(sub, np.float32)
    lo, hi, cmax = np.float32(0), np.float32(nmax), np.float32(code_max)
    for r in range(n):
        for b in range(n_sub):
            xs, ws = x[r, b], w[r, b]
            scf, mnf = np.float32(sc[r, b]), np.float32(mn[r, b])
            best = _rerounded(xs, ws, d[r] * scf, -(dmin[r] * mnf), lo, hi, buf)
            best_sc, best_mn = scf, mnf
            for a in range(-reach, reach + 1):
                sc_try = min(max(scf + np.float32(a), np.float32(0)), cmax)
                for c in range(-reach, reach + 1):
                    if a == 0 and c == 0:
                        continue
                    mn_try = min(max(mnf + np.float32(c), np.float32(0)), cmax)
                    err = _rerounded(xs, ws, d[r] * sc_try, -(dmin[r] * mn_try), lo, hi, buf)
                    if err < best:
                        best, best_sc, best_mn = err, sc_try, mn_try
            out_sc[r, b], out_mn[r, b] = np.int64(best_sc), np.int64(best_mn)


@_jit
def refine_signed_codes_kernel(x, w, lo, hi, d, sc, top, reach, out_sc):
    n, n_sub, sub = x.shape
    buf = np.empty(sub, np.float32)
    zero = np.float32(0)
    for r in range(n):
        for b in range(n_sub):
            xs, ws = x[r, b], w[r, b]
            scf = np.float32(sc[r, b])
            best = _rerounded(xs, ws, d[r] * scf, zero, lo, hi, buf)
            best_sc = scf
            for a in range(-reach, reach + 1):
                if a == 0:
                    continue
                sc_try = min(max(scf + np.float32(a), np.float32(-top)), np.float32(top - 1))
                err = _rerounded(xs, ws, d[r] * sc_try, zero, lo, hi, buf)
                if err < best:
                    best, best_sc = err, sc_try
            out_sc[r, b] = np.int64(best_sc)


@_jit
def quantize_signed_codes_kernel(values, bits, out_d, out_codes):
    n, k = values.shape
    top = 2 ** (bits - 1)
    lo, hi = np.float32(-top), np.float32(top - 1)
    for r in range(n):
        imax = 0
        for j in range(1, k):
            if abs(values[r, j]) > abs(values[r, imax]):
                imax = j
        d = _half(np.float64(values[r, imax] / np.float32(-top)))
        out_d[r] = d
        for j in range(k):
            c = np.rint(values[r, j] / d) if d != 0 else np.float32(0)
            out_codes[r, j] = np.int64(min(max(c, lo), hi))


@_jit
def assign_kernel(x, scale, offset, levels, uniform, unit, out):
    """BlockFormat.assign over whole blocks, from per-sub-block scale and offset. `unit` holds a 1 of
    the dtype numpy divides in (float64 when the scale is an int64 code times a float32 scale), so
    that t, its zero and t - levels[0] round exactly as there."""
    n, bs = x.shape
    n_sub = scale.shape[1]
    sub = bs // n_sub
    nl = levels.shape[0]
    one, zero = unit[0], unit[0] - unit[0]
    top = np.int64(nl - 1)
    mids = np.empty(nl - 1, np.float32)
    for i in range(nl - 1):
        mids[i] = (levels[i + 1] + levels[i]) / np.float32(2)
    for r in range(n):
        xr = x[r]
        for b in range(n_sub):
            s, o = scale[r, b], offset[r, b]
            sdiv = s if s != 0 else one
            for j in range(b * sub, (b + 1) * sub):
                t = (xr[j] - o) / sdiv if s != 0 else zero
                if uniform:
                    out[r, j] = np.int64(min(max(np.rint(t - levels[0]), zero), top))
                else:
                    idx = 0
                    while idx < nl - 1 and mids[idx] < t:
                        idx += 1
                    out[r, j] = idx


# -- search.py's signatures ----------------------------------------------------------------------

def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def fit_scale(x, w, levels, steps: int = 5, spread: float = 0.5):
    x, w, levels = _f32(x), _f32(w), _f32(levels)
    nudges = np.linspace(-spread, spread, steps) if steps > 1 else np.zeros(1)
    out = np.empty(x.shape[0], np.float32)
    fit_scale_kernel(x, w, levels, nudges, bool(levels[-1] - levels[0] == len(levels) - 1), out)
    return out


def fit_scale_min(x, w, nmax: int, *, offset_le_zero: bool, steps: int = 8, lo: float = -0.5, hi: float = 1.0,
                  coarse_grid: bool = False):
    x, w = _f32(x), _f32(w)
    cands = list(np.linspace(lo, hi, steps))
    if coarse_grid:
        cands.append((nmax + 1) // 2 - 1 - nmax)
    s, m = np.empty(x.shape[0], np.float32), np.empty(x.shape[0], np.float32)
    fit_scale_min_kernel(x, w, nmax, offset_le_zero, np.asarray(cands, np.float64), coarse_grid, s, m)
    return s, m


def quantize_codes(values, bits: int, *, signed: bool):
    if not signed:
        from .search import quantize_codes as reference  # eight values a block: not worth a kernel

        return reference(values, bits, signed=False)
    values = _f32(values)
    d, codes = np.empty(values.shape[0], np.float32), np.empty(values.shape, np.int64)
    quantize_signed_codes_kernel(values, bits, d, codes)
    return d, codes


def fit_unsigned_codes(values, bits: int, weights, steps: int = 17):
    values, weights = _f32(values), _f32(weights)
    d, codes = np.empty(values.shape[0], np.float32), np.empty(values.shape, np.int64)
    fit_unsigned_codes_kernel(values, weights, bits, np.linspace(-1.0, 1.0, steps), d, codes)
    return d, codes


def refine_scale_min_codes(x, w, nmax: int, d, sc, dmin, mn, code_max: int, reach: int = 2):
    out_sc, out_mn = np.empty(sc.shape, np.int64), np.empty(mn.shape, np.int64)
    refine_scale_min_codes_kernel(_f32(x), _f32(w), nmax, _f32(d), np.ascontiguousarray(sc, np.int64), _f32(dmin),
                                  np.ascontiguousarray(mn, np.int64), code_max, reach, out_sc, out_mn)
    return out_sc, out_mn


def refine_signed_codes(x, w, levels, d, sc, code_bits: int, reach: int):
    out = np.empty(sc.shape, np.int64)
    refine_signed_codes_kernel(_f32(x), _f32(w), np.float32(levels[0]), np.float32(levels[-1]), _f32(d),
                               np.ascontiguousarray(sc, np.int64), 2 ** (code_bits - 1), reach, out)
    return out


def assign_blocks(fmt, x, scale, offset):
    """fmt.assign(x, fmt.expand(scale), fmt.expand(offset)) for whole blocks x (n, block_size)."""
    x = _f32(x)
    unit = np.ones(1, np.result_type(x, scale, offset))
    out = np.empty(x.shape, np.int64)
    levels = _f32(fmt.levels)
    assign_kernel(x, np.ascontiguousarray(scale), np.ascontiguousarray(offset), levels,
                  bool(levels[-1] - levels[0] == len(levels) - 1), unit, out)
    return out

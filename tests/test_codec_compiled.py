"""The compiled searches (formats/compiled.py) against their numpy reference (formats/search.py):
the same bytes, not close ones. Files made before the kernels existed must come back byte for byte,
and caches keyed by codec_fingerprint() rely on it."""
import numpy as np
import pytest

from pocketlm.quantize.formats import REGISTRY, compiled, get, kquants, legacy, search, searches
from pocketlm.quantize.methods.rtn import quantize_rtn

SEARCHES = ["fit_scale", "fit_scale_min", "fit_unsigned_codes", "quantize_codes", "refine_scale_min_codes",
            "refine_signed_codes", "assign_blocks"]


def _rows(n: int, k: int, seed: int) -> dict[str, np.ndarray]:
    """Value rows of the kinds that have broken bit-exactness before or could: heavy channels,
    values on a coarser grid (exact ties between candidates), zeros of both signs, constants,
    magnitudes where float32 sums lose digits, one-signed rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float32)
    heavy = x.copy()
    heavy[:, ::7] *= 20
    grid = (rng.integers(0, 16, (n, k)) * 0.013 - 0.1).astype(np.float32)
    zeros = x.copy()
    zeros[: n // 4] = 0
    zeros[n // 4: n // 2, ::3] = -0.0
    const = np.full((n, k), 0.5, np.float32)
    const[::2] = -0.25
    return {"normal": x, "heavy": heavy, "grid": grid, "zeros": zeros, "tiny": x * np.float32(1e-6), "const": const,
            "positive": np.abs(x)}


def _weights(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"default": np.abs(x) + np.sqrt((x * x).mean(-1, keepdims=True)),
            "wide": np.exp(rng.normal(0, 3, x.shape)).astype(np.float32), "flat": np.ones_like(x)}


def _same(a, b) -> None:
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert u.dtype == v.dtype and u.shape == v.shape
        bad = np.nonzero(u.view(np.uint8).reshape(len(u), -1) != v.view(np.uint8).reshape(len(v), -1))[0]
        assert bad.size == 0, f"{np.unique(bad).size} of {len(u)} rows differ, first {bad[:3]}"


def _both(name: str, *args, **kwargs) -> None:
    _same(getattr(search, name)(*args, **kwargs), getattr(compiled, name)(*args, **kwargs))


@pytest.mark.parametrize("kind", ["normal", "heavy", "grid", "zeros", "tiny", "const", "positive"])
def test_scale_searches_match_reference(kind):
    x = _rows(600, 32, 1)[kind]
    for wkind, w in _weights(x, 2).items():
        _both("fit_scale_min", x, w, 15, offset_le_zero=True)
        _both("fit_scale_min", x, w, 31, offset_le_zero=False, coarse_grid=True)
        _both("fit_scale_min", x[:, :16], w[:, :16], 3, offset_le_zero=True)
        for fmt in ("Q4_0", "IQ4_NL"):
            _both("fit_scale", x, w, get(fmt).levels)
        _both("fit_scale", x, w, get("Q8_0").levels, steps=1)
        _both("fit_scale", x[:, :16], w[:, :16], get("Q6_K").levels)
        sub_scales = np.abs(x[:, :8])
        _both("fit_unsigned_codes", sub_scales, 6, w[:, :8])
        _both("fit_unsigned_codes", sub_scales, 4, w[:, :8])
        _both("quantize_codes", x[:, :16], 6, signed=True)
        _both("quantize_codes", x[:, :16], 8, signed=True)


@pytest.mark.parametrize("kind", ["normal", "grid", "zeros", "const"])
def test_code_searches_match_reference(kind):
    rng = np.random.default_rng(3)
    x = _rows(400, 256, 4)[kind] * np.float32(0.05)
    w = _weights(x, 5)["wide"]
    d, dmin = rng.uniform(2e-4, 6e-4, 400).astype(np.float32), rng.uniform(1e-3, 3e-3, 400).astype(np.float32)
    d[::50] = 0  # a zero super-scale decodes every value to the offset
    sc, mn = rng.integers(0, 64, (400, 8)), rng.integers(0, 64, (400, 8))
    _both("refine_scale_min_codes", x.reshape(400, 8, 32), w.reshape(400, 8, 32), 31, d, sc, dmin, mn, 63)
    _both("refine_scale_min_codes", x.reshape(400, 16, 16), w.reshape(400, 16, 16), 3, d, sc.repeat(2, 1) // 4,
          dmin, mn.repeat(2, 1) // 4, 15)
    signed = rng.integers(-32, 32, (400, 16))
    _both("refine_signed_codes", x.reshape(400, 16, 16), w.reshape(400, 16, 16), get("Q3_K").levels, d, signed, 6, 32)
    _both("refine_signed_codes", x.reshape(400, 16, 16), w.reshape(400, 16, 16), get("Q6_K").levels, d, signed * 4, 8, 16)


def test_half_rounding_matches_numpy():
    """float64 -> float16 once, ties to even, subnormals, overflow and signed zeros as numpy has them."""
    rng = np.random.default_rng(6)
    half = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = half[np.isfinite(half)].astype(np.float64)
    ties = (finite[:-1] + finite[1:]) / 2  # exactly between two halves (both directions of sign)
    values = np.concatenate([finite, ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf),
                             rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000), [65519.99, 65520.0, 1e9, -0.0]])
    got = np.array([compiled._half(v) for v in values], np.float32)
    with np.errstate(over="ignore"):  # 1e9 and 65520 become infinity, as they should
        want = values.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.fixture
def reference_codec(monkeypatch):
    """Every format on search.py's numpy searches, as before the kernels."""
    def use() -> None:
        for module in (kquants, legacy, searches):
            for name in SEARCHES:
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, getattr(search, name))
    return use


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_format_writes_the_reference_bytes(name, reference_codec):
    rows = _rows(48, 1024, 7)
    importance = np.exp(np.random.default_rng(8).normal(0, 2, 1024)).astype(np.float32)
    fmt = get(name)
    cases = [(rows[kind], imp) for kind in ("heavy", "grid", "zeros") for imp in (None, importance)]
    fast = [quantize_rtn(x, fmt, imp) for x, imp in cases]
    reference_codec()
    for got, (x, imp) in zip(fast, cases):
        _same(got, quantize_rtn(x, fmt, imp))

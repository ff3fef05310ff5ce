"""The scale and code searches the formats call: compiled.py's kernels, or search.py's numpy (the
reference they match byte for byte) where numba is not installed, as on a bare GPU image."""
try:
    from .compiled import (
        assign_blocks,
        fit_scale,
        fit_scale_min,
        fit_unsigned_codes,
        quantize_codes,
        refine_scale_min_codes,
        refine_signed_codes,
    )
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a partial install working, slower
    from .search import (
        assign_blocks,
        fit_scale,
        fit_scale_min,
        fit_unsigned_codes,
        quantize_codes,
        refine_scale_min_codes,
        refine_signed_codes,
    )

__all__ = ["assign_blocks", "fit_scale", "fit_scale_min", "fit_unsigned_codes", "quantize_codes",
           "refine_scale_min_codes", "refine_signed_codes"]

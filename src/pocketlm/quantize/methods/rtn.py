"""Round-to-nearest with a weighted scale search: no data (rtn) or importance-weighted (imatrix)."""
from __future__ import annotations

import numpy as np

from ..formats.base import BlockFormat, default_weights


def importance_weights(values: np.ndarray, importance: np.ndarray | None, block_size: int) -> np.ndarray:
    """Per-element weights for the scale search, shaped like `values` (rows, cols).

    With an importance vector (mean squared input activation per column), an element matters
    in proportion to how strongly its input channel is driven, tempered by its own size
    (llama.cpp's imatrix weighting: imp[col] * sqrt(sigma^2 + x^2)).
    """
    blocks = values.reshape(-1, block_size)
    if importance is None:
        return default_weights(blocks).reshape(values.shape)
    sigma2 = 2.0 * (blocks * blocks).mean(axis=-1, keepdims=True)
    imp = np.broadcast_to(importance.astype(np.float32), values.shape).reshape(-1, block_size)
    return (imp * np.sqrt(sigma2 + blocks * blocks)).reshape(values.shape)


def quantize_rtn(values: np.ndarray, fmt: BlockFormat, importance: np.ndarray | None = None) -> np.ndarray:
    """(rows, cols) float -> (rows, cols // block_size * type_size) uint8."""
    rows, cols = values.shape
    w = importance_weights(values, importance, fmt.block_size)
    data = fmt.quantize(values.reshape(-1, fmt.block_size), w.reshape(-1, fmt.block_size))
    return data.reshape(rows, -1)

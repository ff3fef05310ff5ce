"""GPTQ's sweep on a GPU against the same sweep on the CPU (bench/device_check.sh runs it first).

The CPU sweep's bytes are pinned by the tests; a GPU's matrix products round differently, so its
bytes may differ, but not its quality: on one weight and Hessian (heavy input channels, as the
scale bench's checkpoints have) both files' output error ||X (W - W_q)^T||^2 must agree within
2%. Prints one line per format (with the share of equal bytes) and exits 1 on a miss.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pocketlm.quantize.formats import get as get_format  # noqa: E402
from pocketlm.quantize.methods.gptq import quantize_gptq  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    rows, cols, tokens = 512, 2048, 4096
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    x[:, rng.choice(cols, 8, replace=False)] *= 20.0
    w = (rng.standard_normal((rows, cols)) * cols ** -0.5).astype(np.float32)
    h = x.T @ x / tokens
    bad = 0
    for type_name in ("Q4_K", "Q6_K", "Q4_0", "IQ4_NL"):
        fmt = get_format(type_name)
        t0 = time.time()
        cpu = quantize_gptq(w, fmt, [torch.from_numpy(h.copy())])
        t1 = time.time()
        gpu = quantize_gptq(w, fmt, [torch.from_numpy(h.copy()).cuda()])
        torch.cuda.synchronize()
        t2 = time.time()

        def out_err(data):
            deq = fmt.dequantize(data.reshape(-1, fmt.type_size)).reshape(rows, cols)
            return float(((x @ (w - deq).T) ** 2).mean())

        e_cpu, e_gpu = out_err(cpu), out_err(gpu)
        same = float((cpu == gpu).mean())
        ok = abs(e_gpu / e_cpu - 1) <= 0.02
        bad += not ok
        print(f"{type_name}: output error cpu {e_cpu:.4e} gpu {e_gpu:.4e} ({e_gpu / e_cpu:.4f}x), "
              f"{same:.1%} of bytes equal, cpu {t1 - t0:.1f}s gpu {t2 - t1:.1f}s: {'ok' if ok else 'MISS'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

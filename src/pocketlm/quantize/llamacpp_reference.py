"""llama.cpp's own quantizer, for side-by-side comparisons (benchmarks and tests)."""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from pathlib import Path

from ..errors import PocketError
from ..util.atomic import atomic_path


def llamacpp_quantize(src: str | Path, out: str | Path, preset: str, threads: int = 2,
                      imatrix: str | Path | None = None, tools_dir: str | Path | None = None,
                      allow_requantize: bool = False) -> Path:
    """Quantize a float GGUF with llama.cpp. With an imatrix, llama.cpp's `llama-quantize`
    binary is needed (tools_dir), since the library call cannot take one from Python."""
    out = Path(out)
    with atomic_path(out) as tmp:
        if imatrix is not None:
            if tools_dir is None:
                raise PocketError("an imatrix needs llama.cpp's llama-quantize binary (bench/build_llamacpp_tools.sh)")
            cmd = [str(Path(tools_dir) / "llama-quantize"), "--imatrix", str(imatrix), str(src), str(tmp), preset, str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise PocketError(f"llama-quantize failed: {proc.stderr.strip().splitlines()[-1:]}")
        else:
            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset.upper()}")
            params.nthread = threads
            params.allow_requantize = allow_requantize  # an already-quantized source, as llama.cpp users do
            with _quiet_native_stderr():  # llama.cpp prints a line per tensor from C
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise PocketError(f"llama.cpp could not quantize {src} to {preset}")
    return out


@contextlib.contextmanager
def _quiet_native_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llamacpp_imatrix(model: str | Path, text: str | Path, out: str | Path, tools_dir: str | Path, ctx: int = 512,
                     chunks: int | None = None, threads: int = 2) -> Path:
    """llama.cpp's importance matrix of `model` on `text`, with its own llama-imatrix tool."""
    out = Path(out)
    with atomic_path(out) as tmp:
        cmd = [str(Path(tools_dir) / "llama-imatrix"), "-m", str(model), "-f", str(text), "-o", str(tmp),
               "-c", str(ctx), "-t", str(threads), "--no-ppl"]
        if chunks:
            cmd += ["--chunks", str(chunks)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise PocketError(f"llama-imatrix failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out

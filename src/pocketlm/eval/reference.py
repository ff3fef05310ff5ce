"""Reference log-probs, computed once per (reference, tokens, backend) and cached on disk.

Comparing ten quantized files against one original then costs one reference pass. Every
position keeps the whole vocabulary's log-probs as uint16 codes over that position's range
(llama.cpp's KLD tool stores its reference the same way): 2 bytes a token-entry, ~0.1 GB
per 1k tokens for a 49k vocabulary, with a log-prob step of ~1e-3 that moves KLD by <1e-5.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.source import ModelSource
from ..util.atomic import atomic_path
from ..util.cache import cache_dir, code_version, drop_superseded, model_content_hash
from ..util.hashing import array_sha256

FLOOR = 40.0  # log-probs below (max - FLOOR) are stored as the floor: p < 5e-18 adds nothing
LEVELS = 65535


def encode_logp(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint16 (n, V), lo float32 (n,)); the step is FLOOR / LEVELS for every row."""
    hi = logp.max(axis=-1)
    lo = (hi - FLOOR).astype(np.float32)
    codes = np.rint((np.maximum(logp, lo[:, None]) - lo[:, None]) * (LEVELS / FLOOR))
    return codes.astype(np.uint16), lo


def decode_logp(codes: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Log-probs back from codes (float32), renormalized so each row is a distribution again."""
    import torch

    logp = torch.from_numpy(np.asarray(codes).astype(np.float32)) * (FLOOR / LEVELS) + torch.from_numpy(lo)[:, None]
    return torch.log_softmax(logp, dim=-1).numpy()


@dataclass
class ReferenceLogits:
    codes: np.ndarray  # (n_windows, ctx-1, V) uint16, memory-mapped
    lo: np.ndarray  # (n_windows, ctx-1) float32
    nll: np.ndarray  # (n_windows, ctx-1) the reference's own loss on the targets
    argmax: np.ndarray  # (n_windows, ctx-1) int32, the reference's top-1 token

    def logp(self, window: int) -> np.ndarray:
        return decode_logp(np.asarray(self.codes[window]), self.lo[window])


def reference_key(src: ModelSource, inputs: np.ndarray, backend: str) -> str:
    """"<what is scored>-<code>": the same model, backend and tokens scored by other code is
    the same entry superseded (removed when the new one is written, see drop_superseded)."""
    source = array_sha256(np.frombuffer(f"{model_content_hash(src)}|{backend}".encode(), dtype=np.uint8), inputs)[:32]
    return f"{source}-{code_version('eval/reference', 'runtime', 'models')}"


def _entry(key: str) -> Path:
    return cache_dir() / "reference" / key


def load_cached(key: str) -> ReferenceLogits | None:
    folder = _entry(key)
    try:
        side = np.load(folder / "side.npz")
        codes = np.load(folder / "codes.npy", mmap_mode="r")
        return ReferenceLogits(codes, side["lo"], side["nll"], side["argmax"])
    except (OSError, ValueError, KeyError):
        return None  # missing or damaged: recompute, never trust


class ReferenceWriter:
    """Fills a cache entry window by window; the entry appears only when complete."""

    def __init__(self, key: str, n_windows: int, width: int, n_vocab: int, about: dict):
        self.key, self.about = key, about
        self._ctx = atomic_path(_entry(key), is_dir=True)
        self.tmp = self._ctx.__enter__()
        self.codes = np.lib.format.open_memmap(self.tmp / "codes.npy", mode="w+", dtype=np.uint16,
                                               shape=(n_windows, width, n_vocab))
        self.lo = np.empty((n_windows, width), np.float32)
        self.nll = np.empty((n_windows, width), np.float64)
        self.argmax = np.empty((n_windows, width), np.int32)

    def add(self, i: int, logp: np.ndarray, nll: np.ndarray) -> None:
        self.codes[i], self.lo[i] = encode_logp(logp)
        self.nll[i], self.argmax[i] = nll, logp.argmax(-1)

    def finish(self) -> ReferenceLogits:
        self.codes.flush()
        del self.codes
        np.savez(self.tmp / "side.npz", lo=self.lo, nll=self.nll, argmax=self.argmax)
        (self.tmp / "about.json").write_text(json.dumps(self.about, indent=2))
        self._ctx.__exit__(None, None, None)
        drop_superseded(_entry(self.key))
        for old in _entry(self.key).parent.iterdir():  # keys from before "<source>-<code>": unreachable
            if "-" not in old.name and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        done = load_cached(self.key)
        if done is None:
            raise RuntimeError(f"the reference just written for {self.key} cannot be read back")
        return done

    def abort(self, exc) -> None:
        del self.codes
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)

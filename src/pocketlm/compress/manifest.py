"""Resumable steps: each writes its artifact atomically and records what it was made from.

A step's key hashes its inputs (content hashes of files, the parameters) and the code that makes
it (the source of the pocketlm parts it runs, the libraries' versions, and for the steps that
quantize, what the codecs write).
A rerun skips a step whose key and artifact are both still there, and redoes one whose inputs
changed, which in turn changes the keys of the steps that consume its artifact.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from ..util.atomic import write_json
from ..util.cache import code_version, library_versions
from ..util.rss import StepPeak

# What code each step runs: its key changes when that code does, and only then.
STEP_CODE = {
    "plan": ("quantize", "models", "compress"),
    "choose": ("distill", "quantize", "models", "compress"),
    "distill": ("distill", "models", "compress"),
    "quantize": ("quantize", "models", "compress"),
    "qad": ("quantize", "distill", "models", "compress"),
    "preset": ("quantize/llamacpp_reference", "models", "compress"),
    "evaluate": ("eval", "runtime", "models", "compress"),
}
CODEC_STEPS = ("plan", "choose", "quantize", "qad")  # steps whose results come from the codecs' output


def key_of(step: str, *parts) -> str:
    from ..quantize.formats.base import codec_fingerprint

    code = [code_version(*STEP_CODE[step])] + ([codec_fingerprint()] if step in CODEC_STEPS else [])
    return hashlib.sha256(json.dumps([step, *code, *parts], sort_keys=True, default=str).encode()).hexdigest()[:20]


class Manifest:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"steps": {}}

    def run(self, name: str, key: str, artifact: str, make: Callable[[Path], dict | None], *, params: dict,
            say: Callable[[str], None] = print) -> dict:
        """Run `make(artifact path)` unless this step is done with the same key; returns the
        step's record (its `result` is whatever `make` returned)."""
        record = self.data["steps"].get(name)
        target = self.folder / artifact
        if record and record["key"] == key and target.exists():
            say(f"[{name}] done earlier, kept ({artifact})")
            return record
        say(f"[{name}] running")
        t0 = time.perf_counter()
        # Per-step peaks say which step a laptop's memory must hold (the process's own high-water
        # mark only says the largest of all steps).
        with StepPeak() as memory:
            result = make(target)
        record = {"key": key, "artifact": artifact, "params": params, "seconds": round(time.perf_counter() - t0, 1),
                  "peak_rss_mb": round(memory.peak / 2**20) if memory.peak else None,
                  "versions": library_versions(("pocketlm", "torch", "transformers", "llama_cpp_python", "gguf")),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "result": result}
        self.data["steps"][name] = record
        write_json(self.path, self.data)
        peak = f", peak RSS {record['peak_rss_mb'] / 1024:.1f} GiB" if record["peak_rss_mb"] else ""
        say(f"[{name}] finished in {record['seconds']:.0f} s{peak}")
        return record


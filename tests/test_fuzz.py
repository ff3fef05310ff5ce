"""Damaged inputs never end in a traceback or a hang: a few hundred mutants per reader, fixed
seeds (bench/fuzz.py runs thousands and writes bench/results/fuzz.md)."""
from __future__ import annotations

import pytest
from fuzz_harness import document_seeds, file_placer, folder_placer, fuzz, read_document, read_gguf, read_hf_folder

from pocketlm.models.export_gguf import export_gguf

CASES = 150


def _check(tally):
    assert tally.cases == CASES and tally.bad == 0, tally.failures[:5]
    assert tally.outcomes["error"] > 0  # the mutants did damage: the readers were exercised, not bypassed


def test_gguf_reader(tiny_hf, tmp_path):
    seed = export_gguf(tiny_hf, tmp_path / "seed.gguf", "f16", progress=False).read_bytes()
    _check(fuzz({"m.gguf": seed}, file_placer(tmp_path), read_gguf, CASES, seed=1, focus=8192))


def test_safetensors_and_config_reader(tiny_hf, tmp_path):
    seeds = {n: (tiny_hf / n).read_bytes() for n in ("config.json", "model.safetensors")}
    _check(fuzz(seeds, folder_placer(tiny_hf, tmp_path / "work"), read_hf_folder, CASES, seed=2, focus=4096))


@pytest.mark.parametrize("kind", ["md", "html", "pdf", "docx"])
def test_document_loaders(kind, tmp_path):
    seeds = {n: b for n, b in document_seeds(tmp_path).items() if n.endswith(kind)}
    tally = fuzz(seeds, file_placer(tmp_path), read_document, CASES, seed=3)
    assert tally.cases == CASES and tally.bad == 0, tally.failures[:5]

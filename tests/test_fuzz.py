"""Damaged inputs never end in a traceback or a hang: a few hundred mutants per reader, fixed
seeds (bench/fuzz.py runs thousands and writes bench/results/fuzz.md)."""
from __future__ import annotations

import shutil

import pytest
from fuzz_harness import document_seeds, fuzz, read_document, read_gguf, read_hf_folder

from pocketlm.models.export_gguf import export_gguf

CASES = 150


def _check(tally):
    assert tally.cases == CASES and tally.bad == 0, tally.failures[:5]
    assert tally.outcomes["error"] > 0  # the mutants did damage: the readers were exercised, not bypassed


def test_gguf_reader(tiny_hf, tmp_path):
    seed = export_gguf(tiny_hf, tmp_path / "seed.gguf", "f16", progress=False).read_bytes()
    target = tmp_path / "m.gguf"

    def place(name, data):
        target.write_bytes(data)
        return target

    _check(fuzz({"m.gguf": seed}, place, read_gguf, CASES, seed=1, focus=8192))


def test_safetensors_and_config_reader(tiny_hf, tmp_path):
    seeds = {n: (tiny_hf / n).read_bytes() for n in ("config.json", "model.safetensors")}
    work = tmp_path / "work"

    def place(name, data):
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(tiny_hf, work)
        (work / name).write_bytes(data)
        return work

    _check(fuzz(seeds, place, read_hf_folder, CASES, seed=2, focus=4096))


@pytest.mark.parametrize("kind", ["md", "html", "pdf", "docx"])
def test_document_loaders(kind, tmp_path):
    seeds = {n: b for n, b in document_seeds(tmp_path).items() if n.endswith(kind)}

    def place(name, data):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    tally = fuzz(seeds, place, read_document, CASES, seed=3)
    assert tally.cases == CASES and tally.bad == 0, tally.failures[:5]

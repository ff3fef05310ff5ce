"""End to end: pocketlm's GGUF files load in llama.cpp and compute what their weights say."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pocketlm.cli import cli
from pocketlm.eval.runner import EvalOptions, evaluate
from pocketlm.models import inspect, load
from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model
from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q5_1", "Q4_K_M", "Q4_0", "Q4_1", "IQ4_NL", "Q3_K_M", "Q2_K"]


@pytest.fixture(scope="module")
def tokens(tiny_hf):
    from conftest import CORPUS

    return load(tiny_hf).tokenizer(CORPUS, add_special_tokens=False).input_ids[:96]


@pytest.mark.parametrize("preset", TYPES)
def test_llamacpp_runs_what_the_weights_say(tiny_hf, tmp_path, preset, tokens):
    out = quantize_model(str(tiny_hf), tmp_path / "q.gguf", QuantizeOptions(preset=preset, method="rtn", progress=False))
    path = tmp_path / "q.gguf"
    info = inspect(path)
    assert {t.name: t.type for t in info.tensors} == {r.name: r.type for r in out}
    # torch model built by transformers from the file's dequantized weights (gguf-py decodes them)
    with torch.inference_mode():
        ref = load(path).model(torch.tensor([tokens])).logits[0].numpy()
    got = LlamaCppModel(path, n_ctx=256, logits_all=True).logits(tokens)
    # llama.cpp rounds activations to 8 bits inside quantized matmuls, which on this random
    # model moves logits by 2-4% (Q8_0 included); a wrong byte layout would move them ~100%
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.06
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


def test_calibrated_methods_lower_kld(tiny_hf, tiny_gguf_f32, tmp_path, sample_text):
    opts = EvalOptions(texts=[sample_text], ctx=64, reference=str(tiny_gguf_f32), progress=False)
    kld = {}
    for method in ("rtn", "imatrix", "gptq"):
        path = tmp_path / f"{method}.gguf"
        quantize_model(str(tiny_hf), path, QuantizeOptions(preset="Q3_K_S", method=method, calib=[str(sample_text)],
                                                           calib_tokens=1024, calib_ctx=128, progress=False))
        kld[method] = evaluate(str(path), opts)["kld_mean"]
    assert kld["gptq"] < kld["rtn"] and kld["imatrix"] < kld["rtn"]


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_quantize_and_bad_inputs(tiny_hf, tmp_path, sample_text):
    out = tmp_path / "m.gguf"
    r = _run("quantize", tiny_hf, "-o", out, "--type", "q4_k_m", "--method", "rtn")
    assert r.exit_code == 0 and "blk.0.ffn_down.weight" in r.stdout and out.exists()
    for args, message in [
        (("--type", "Q7_X"), "unknown --type"),
        (("--type", "Q4_0"), "exists"),
        (("--type", "Q4_0", "--force", "--calib", sample_text, "--calib-tokens", 10**6), "fewer than --calib-tokens"),
        (("--type", "Q4_0", "--force", "--keep", "blk.0.attn_q.weight"), "PATTERN=TYPE"),
    ]:
        before = out.read_bytes()
        r = _run("quantize", tiny_hf, "-o", out, *args)
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert out.read_bytes() == before  # nothing half-written over the old file
    q2 = tmp_path / "q2.gguf"
    _run("quantize", tiny_hf, "-o", q2, "--type", "Q2_K", "--method", "rtn")
    r = _run("quantize", q2, "-o", tmp_path / "up.gguf", "--type", "Q6_K", "--method", "rtn")
    assert r.exit_code == 1 and "--allow-requant" in r.stderr
    r = _run("quantize", q2, "-o", tmp_path / "up.gguf", "--type", "Q6_K", "--method", "rtn", "--allow-requant")
    assert r.exit_code == 0

"""`quantize --method qad`: the trained student is the deployed file's model, training lowers its
divergence from the original, and the written file decodes to exactly what was trained."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import interrupt_once_started
from gguf.quants import dequantize

from pocketlm.cli import cli
from pocketlm.errors import PocketError
from pocketlm.models import load
from pocketlm.models.tensors import open_tensors
from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model
from pocketlm.quantize.qad import build_student, write_trained


@pytest.fixture(scope="module")
def start_file(tiny_hf, tmp_path_factory) -> Path:
    """Q4_K_M: k-quants and Q6_K/Q8_0 tensors in one file, rotary-permuted Q/K rows included."""
    out = tmp_path_factory.mktemp("qad-start") / "start.gguf"
    quantize_model(str(tiny_hf), out, QuantizeOptions(preset="Q4_K_M", method="rtn", progress=False))
    return out


def test_student_is_the_model_the_file_holds(tiny_hf, start_file):
    student, trained, _ = build_student(load(tiny_hf).model, start_file)
    assert {n.split(".", 2)[-1] for n in trained} >= {"attn_q.weight", "attn_k.weight", "ffn_down.weight"}
    ids = torch.tensor([[0, 5, 17, 33, 90, 120, 7, 300]])
    with torch.no_grad():
        got = student(ids).logits
        want = load(start_file).model(ids).logits  # transformers' model of the file's decoded weights
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_written_file_holds_the_trained_values(tiny_hf, start_file, tmp_path):
    student, trained, _ = build_student(load(tiny_hf).model, start_file)
    same = tmp_path / "same.gguf"
    assert write_trained(start_file, same, trained) == 0
    assert same.read_bytes() == start_file.read_bytes()  # nothing trained: nothing changed
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for fq in trained.values():
            fq.a.copy_(torch.randn(fq.a.shape, generator=g) * 0.5)
            fq.c.copy_(torch.randn(fq.c.shape, generator=g) * 5)
    moved = tmp_path / "moved.gguf"
    assert write_trained(start_file, moved, trained) == 0
    ts = open_tensors(moved)
    for name, fq in trained.items():
        entry = ts.entries[name]
        decoded = dequantize(ts.raw(name), ts._tensors[name].tensor_type).reshape(entry.shape)
        values = fq().detach().numpy()
        if fq.perm is not None:
            values = values[np.argsort(fq.perm)]
        assert np.abs(decoded - values).max() == 0, name
    assert moved.read_bytes() != start_file.read_bytes()


def test_trained_sub_block_codes_are_written_exactly(tiny_hf, start_file, tmp_path):
    """--qad-codes scales: the k-quants' integer sub-block codes move (pushed past their range
    here), the file holds the moved, clamped codes and decodes to the trained values."""
    student, trained, _ = build_student(load(tiny_hf).model, start_file, free_codes=False, sub_codes=True)
    kq = {n: fq for n, fq in trained.items() if fq.e is not None}
    assert kq and all(fq.kind in ("scale_min_k", "signed_k") for fq in kq.values())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for fq in kq.values():
            fq.e.copy_(torch.randn(fq.e.shape, generator=g) * 40)
            if fq.f is not None:
                fq.f.copy_(torch.randn(fq.f.shape, generator=g) * 40)
    moved = tmp_path / "moved.gguf"
    assert write_trained(start_file, moved, trained) == 0
    ts = open_tensors(moved)
    for name, fq in kq.items():
        codes = {k: v.detach() for k, v in fq.sub_codes().items()}
        lo, hi = fq.code_range
        assert all(bool(((c >= lo) & (c <= hi) & (c == c.round())).all()) for c in codes.values()), name
        assert bool((codes["sc"] != fq.sc).any()), name
        entry = ts.entries[name]
        decoded = dequantize(ts.raw(name), ts._tensors[name].tensor_type).reshape(entry.shape)
        values = fq.in_file_order(fq().detach().numpy())
        assert np.abs(decoded - values).max() == 0, name


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_trained_norms_are_written_as_the_model_uses_them(arch, tiny_hf, tmp_path):
    """Norms train beside the blocks; the file must hold what llama.cpp multiplies by (Gemma:
    1 + w), so the file's model is the student, logits and all."""
    from test_streaming import make_tiny_gemma

    source = tiny_hf if arch == "llama" else make_tiny_gemma(tmp_path / "gemma")
    start = tmp_path / "start.gguf"
    quantize_model(str(source), start, QuantizeOptions(preset="Q8_0", method="rtn", progress=False))
    student, trained, norms = build_student(load(source).model, start, free_codes=False, norms=True)
    assert {n.split(".", 2)[-1] for n in norms} >= {"attn_norm.weight", "ffn_norm.weight"}
    assert "output_norm.weight" in norms
    same = tmp_path / "same.gguf"
    assert write_trained(start, same, trained, norms) == 0
    assert same.read_bytes() == start.read_bytes()  # s = 0 is the start file exactly
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in norms.values():
            n.module.parametrizations.weight[0].s.copy_(torch.randn(n.stored().shape, generator=g))
    moved = tmp_path / "moved.gguf"
    assert write_trained(start, moved, trained, norms) == 0
    ts = open_tensors(moved)
    for name, n in norms.items():
        assert np.array_equal(ts.values(name), n.stored()), name
        assert not np.array_equal(ts.values(name), open_tensors(start).values(name)), name
    ids = torch.tensor([[0, 5, 17, 33, 90, 120, 7, 300]])
    with torch.no_grad():
        got = student(ids).logits
        want = load(moved).model(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_cli_qad_lowers_the_divergence(tiny_hf, sample_text, tmp_path):
    out = tmp_path / "qad.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(tiny_hf), "-o", str(out), "--type", "Q4_0", "--method", "qad",
                                   "--tokens", "20000", "--lr", "0.02", "--calib", str(sample_text), "--calib-tokens", "512",
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    line = next(s for s in res.output.splitlines() if s.startswith("qad:"))
    before, after = (float(v) for v in line.split("KLD to the original ")[1].split(";")[0].replace("(gptq)", "").split("->"))
    assert after < 0.9 * before, line
    assert "max difference 0" in line and out.exists() and not (tmp_path / "qad.gguf.ckpt").exists()
    gptq = tmp_path / "gptq.gguf"
    quantize_model(str(tiny_hf), gptq, QuantizeOptions(preset="Q4_0", method="gptq", calib=[str(sample_text)], calib_tokens=512,
                                                       progress=False))
    assert out.stat().st_size == gptq.stat().st_size


def test_cli_qad_trains_k_quant_sub_block_codes(tiny_hf, sample_text, tmp_path):
    """--qad-codes scales on Q2_K: the integer sub-block codes move, the divergence falls and the
    file decodes to what was trained."""
    from pocketlm.quantize.formats import get as get_format

    out, gptq = tmp_path / "qad.gguf", tmp_path / "gptq.gguf"
    common = ["--type", "Q2_K", "--calib", str(sample_text), "--calib-tokens", "512"]
    res = CliRunner().invoke(cli, ["quantize", str(tiny_hf), "-o", str(out), "--method", "qad", "--qad-codes", "scales",
                                   "--tokens", "40000", "--lr", "0.05", *common, "--quiet"])
    assert res.exit_code == 0, res.output
    line = next(s for s in res.output.splitlines() if s.startswith("qad:"))
    before, after = (float(v) for v in line.split("KLD to the original ")[1].split(";")[0].replace("(gptq)", "").split("->"))
    assert after < before and "max difference 0" in line, line
    assert CliRunner().invoke(cli, ["quantize", str(tiny_hf), "-o", str(gptq), "--method", "gptq", *common,
                                    "--quiet"]).exit_code == 0
    a, b = open_tensors(gptq), open_tensors(out)
    moved = 0
    for name, e in a.entries.items():
        if e.type == "Q2_K" and name.startswith("blk."):
            fmt = get_format("Q2_K")
            sc_a = fmt.unpack(a.raw(name).reshape(-1, fmt.type_size))[1].raw["sc"]
            sc_b = fmt.unpack(b.raw(name).reshape(-1, fmt.type_size))[1].raw["sc"]
            moved += int((sc_a != sc_b).sum())
    assert moved > 0
    assert out.stat().st_size == gptq.stat().st_size


def test_cli_qad_options_need_qad(tiny_hf, tmp_path):
    for extra in (["--tokens", "1000"], ["--resume"], ["--qad-codes", "frozen"], ["--qad-epochs", "2"], ["--teacher", str(tiny_hf)]):
        res = CliRunner().invoke(cli, ["quantize", str(tiny_hf), "-o", str(tmp_path / "x.gguf"), "--type", "Q4_0",
                                       "--method", "gptq", *extra])
        assert res.exit_code == 1 and "are for --method qad" in res.output, res.output
    assert not (tmp_path / "x.gguf").exists()
    from conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", vocab_size=300)
    res = CliRunner().invoke(cli, ["quantize", str(tiny_hf), "-o", str(tmp_path / "x.gguf"), "--type", "Q4_0",
                                   "--method", "qad", "--teacher", str(other)])
    assert res.exit_code == 1 and "vocabulary of 300 tokens" in res.output, res.output


def test_ctrl_c_keeps_a_checkpoint_that_resume_finishes(tiny_hf, sample_text, tmp_path):
    exe = Path(sys.executable).with_name("pocketlm")
    env = {**os.environ, "POCKETLM_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "qad.gguf"
    args = [str(exe), "quantize", str(tiny_hf), "-o", str(out), "--type", "Q4_0", "--method", "qad", "--tokens", "60000",
            "--calib", str(sample_text), "--calib-tokens", "512"]
    # pressed once the first step has reported (its tok_s): ~30 steps of ~0.1 s each remain to cut into
    code, rest = interrupt_once_started(args, env, "tok_s=", wait=0.2)
    assert code == 1 and "checkpoint saved" in rest and "--resume" in rest, rest[-1500:]
    assert "Traceback" not in rest and not out.exists()
    folder = tmp_path / "qad.gguf.ckpt"
    assert (folder / "start.gguf").exists() and (folder / "last.pt").exists()
    step = torch.load(folder / "last.pt", weights_only=False)["step"]
    res = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    assert "reusing the gptq file" in res.stdout  # gptq is not done twice
    assert step >= 1 and out.exists() and not folder.exists()


def test_a_student_trains_against_its_original(tiny_hf, sample_text, tmp_path):
    """--teacher: the file is a smaller model's (another shape, the same vocabulary)."""
    from conftest import make_tiny_llama

    student = make_tiny_llama(tmp_path / "student", seed=3, layers=1, ffn=256)
    out = tmp_path / "s.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(student), "-o", str(out), "--type", "Q4_0", "--method", "qad",
                                   "--teacher", str(tiny_hf), "--tokens", "4000", "--calib", str(sample_text),
                                   "--calib-tokens", "512", "--quiet"])
    assert res.exit_code == 0, res.output
    line = next(s for s in res.output.splitlines() if s.startswith("qad:"))
    before, after = (float(v) for v in line.split("KLD to the original ")[1].split(";")[0].replace("(gptq)", "").split("->"))
    assert after < before, line
    assert open_tensors(out).facts.n_layers == 1


def test_layer_phase_brings_each_layer_closer_to_the_original(tiny_hf, start_file):
    from pocketlm.quantize.qad_blocks import reconstruct_blocks

    teacher = load(tiny_hf).model
    windows = [torch.randint(2, 390, (96,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    untouched = reconstruct_blocks(build_student(teacher, start_file, free_codes=False)[0], teacher, windows, 0.05, 0,
                                   progress=False)
    trained = reconstruct_blocks(build_student(teacher, start_file, free_codes=False)[0], teacher, windows, 0.05, 3,
                                 progress=False)
    assert len(trained) == 2 and all(t < u for t, u in zip(trained, untouched)), (untouched, trained)


def test_layer_phase_and_rate_go_by_format(tiny_hf, start_file, tmp_path):
    """By default the layer phase trains Q4_0-like files and skips k-quant ones (qad_options:
    on the off-grid student's k-quants it measured worse than none), and k-quant files train at
    the lower rate they measured better at; a given value wins over both."""
    from pocketlm.quantize.qad import _kquant_share
    from pocketlm.quantize.qad_options import KQUANT_LR, LEGACY_BLOCK_TOKENS, LEGACY_LR, layer_phase_tokens, learning_rate

    teacher = load(tiny_hf).model
    legacy = tmp_path / "q4_0.gguf"
    quantize_model(str(tiny_hf), legacy, QuantizeOptions(preset="Q4_0", method="rtn", progress=False))
    k_share = _kquant_share(build_student(teacher, start_file, free_codes=False)[1])
    legacy_share = _kquant_share(build_student(teacher, legacy, free_codes=False)[1])
    assert k_share > 0.5 and legacy_share < 0.5
    assert layer_phase_tokens(None, k_share) == 0 and layer_phase_tokens(None, legacy_share) == LEGACY_BLOCK_TOKENS
    assert layer_phase_tokens(4096, k_share) == 4096
    assert layer_phase_tokens(None, legacy_share, weighted_start=True) == 0  # a --fisher start keeps its weighting
    assert learning_rate(None, k_share) == KQUANT_LR < LEGACY_LR == learning_rate(None, legacy_share)
    assert learning_rate(0.03, k_share) == 0.03


def test_a_file_training_made_worse_is_not_kept(tiny_hf, sample_text, start_file, tmp_path):
    """Training that ends with a higher held-out KLD than it started from (here a rate that throws
    the scales about) leaves the user the file it started from, byte for byte, and says so."""
    from pocketlm.quantize.qad import train_file
    from pocketlm.quantize.qad_options import QadOptions

    out, said = tmp_path / "worse.gguf", []
    r = train_file(str(tiny_hf), start_file, out, [str(sample_text)],
                   QadOptions(tokens=2000, lr=100.0, block_tokens=0, progress=False, say=said.append), tmp_path / "ckpt")
    assert r["end"]["kld"] > r["start"]["kld"] and r["kept_start"], (r["start"], r["end"])
    assert out.read_bytes() == start_file.read_bytes()
    assert any("is kept" in s for s in said), said


def test_a_second_pass_reads_the_same_text_again_and_trains_further(tiny_hf, sample_text, start_file, tmp_path):
    """epochs: the same --tokens of text, read twice (twice the steps), and the file ends closer to the
    original than after one pass; the tokens reported are the text's, not the steps'."""
    from pocketlm.quantize.qad import train_file
    from pocketlm.quantize.qad_options import QadOptions

    runs = [train_file(str(tiny_hf), start_file, tmp_path / f"e{n}.gguf", [str(sample_text)],
                       QadOptions(tokens=4000, epochs=n, block_tokens=0, progress=False), tmp_path / f"ckpt{n}")
            for n in (1, 2)]
    one, two = runs
    assert two["steps"] == 2 * one["steps"] and two["tokens"] == one["tokens"] and two["epochs"] == 2
    assert one["lr"] == 0.01  # a Q4_K_M file: the k-quants' rate, as no --lr was given
    assert two["settings"]["data"] == one["settings"]["data"]
    assert two["end"]["kld"] < one["end"]["kld"] < one["start"]["kld"], (one["start"], one["end"], two["end"])
    with pytest.raises(PocketError, match="at least 1"):
        train_file(str(tiny_hf), start_file, tmp_path / "e0.gguf", [str(sample_text)],
                   QadOptions(tokens=4000, epochs=0, progress=False), tmp_path / "ckpt0")

"""Budget-driven quantization: the knapsack, size parsing, and files that meet their budget."""
import itertools
import random

import pytest
from click.testing import CliRunner

from pocketlm.cli import cli
from pocketlm.errors import PocketError
from pocketlm.eval.runner import EvalOptions, evaluate
from pocketlm.quantize.budget import BudgetTooSmall, Option, allocate, parse_size, types_for_budget
from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model
from pocketlm.quantize.sensitivity import measure


def test_parse_size():
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5 MiB") == 1_572_864 and parse_size("123") == 123
    for bad in ("sixty", "60 parsecs", "-5MB", "0"):
        with pytest.raises(PocketError):
            parse_size(bad)


def _convex_instance(rng, n_tensors=4):
    """Options like real quantization: more bytes, less loss."""
    options = {}
    for t in range(n_tensors):
        size, scale = rng.randint(50, 200), rng.uniform(0.5, 5)
        options[f"t{t}"] = [Option(f"q{b}", size * b, scale * 2.0 ** (-1.3 * b)) for b in range(2, 7)]
    return options


def test_allocation_is_optimal_and_never_over_budget():
    rng = random.Random(0)
    for _ in range(20):
        options = _convex_instance(rng)
        names = list(options)
        smallest = sum(min(o.bytes for o in v) for v in options.values())
        largest = sum(max(o.bytes for o in v) for v in options.values())
        budget = rng.randint(smallest, largest)
        choice = allocate(options, budget)
        used = sum(o.bytes for o in choice.values())
        assert used <= budget
        best = min(sum(o.loss for o in combo) for combo in itertools.product(*(options[n] for n in names))
                   if sum(o.bytes for o in combo) <= budget)
        assert sum(o.loss for o in choice.values()) <= best + 1e-12
    with pytest.raises(BudgetTooSmall):
        allocate(options, smallest - 1)


@pytest.fixture(scope="module")
def sensitivity(tiny_hf, sample_text, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the per-test cache isolation is not on yet
        mp.setenv("POCKETLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        return measure(str(tiny_hf), [str(sample_text)], 1024, progress=False, calib_ctx=128)


def test_budgets_are_met_and_more_bytes_buy_less_kld(tiny_hf, tiny_gguf_f32, sample_text, sensitivity, tmp_path):
    assert set(sensitivity.gains) >= {"attn_q", "attn_v", "ffn_down", "token_embd"}
    # measured, not defaulted: the code clamps negative gains to 0, so only > 0 shows a measurement
    assert all(g > 0 for g in sensitivity.gains.values()), sensitivity.gains
    # every matmul's runtime rounding measured too (the tied embedding is the head: a matmul)
    assert set(sensitivity.act_gains) == set(sensitivity.gains) and all(g > 0 for g in sensitivity.act_gains.values())
    small = min(sum(min(o.bytes for o in opts) for opts in sensitivity.options().values()), 10**12)
    opts = EvalOptions(texts=[sample_text], ctx=64, reference=str(tiny_gguf_f32), progress=False)
    results = []
    for factor in (1.15, 1.8):
        target = int((small + sensitivity.overhead + sensitivity.fixed_bytes) * factor)
        types = types_for_budget(sensitivity, target)
        path = tmp_path / f"b{factor}.gguf"
        quantize_model(str(tiny_hf), path, QuantizeOptions(types=types, method="imatrix", calib=[str(sample_text)],
                                                           calib_tokens=1024, calib_ctx=128, progress=False))
        assert path.stat().st_size <= target, (path.stat().st_size, target)
        assert abs(path.stat().st_size - sensitivity.file_bytes(types)) < 4096  # the size model is right
        results.append((sensitivity.predicted_kld(types), evaluate(str(path), opts)["kld_mean"]))
    (pred_small, kld_small), (pred_big, kld_big) = results
    assert pred_big < pred_small and kld_big < kld_small


def test_cli_budget_and_its_refusals(tiny_hf, sample_text, tmp_path):
    run = CliRunner()
    base = ["--calib", str(sample_text), "--calib-tokens", "1024"]
    r = run.invoke(cli, ["plan", str(tiny_hf), "--target-bpw", "5", *base])
    assert r.exit_code == 0 and "predicted KLD" in r.output and "bits per weight" in r.output, r.output
    out = tmp_path / "m.gguf"
    r = run.invoke(cli, ["quantize", str(tiny_hf), "-o", str(out), "--target-size", "1KB", *base])
    assert r.exit_code == 1 and "smallest file this model quantizes to" in r.stderr and not out.exists()
    r = run.invoke(cli, ["quantize", str(tiny_hf), "-o", str(out), "--target-size", "1MB", "--type", "Q4_0"])
    assert r.exit_code == 1 and "not both" in r.stderr
    r = run.invoke(cli, ["quantize", str(tiny_hf), "-o", str(out), "--target-size", "lots"])
    assert r.exit_code == 1 and "cannot read the size" in r.stderr


def test_a_codec_whose_output_changes_never_meets_its_old_results(tiny_hf, sample_text, monkeypatch):
    """The sensitivity table and the compress steps built on the codecs are keyed by what the
    codecs write: patch Q4_K to write other bytes, and the cached table and those steps' keys
    no longer match (the distill step, which no codec feeds, keeps its key)."""
    import os

    from pocketlm.compress.manifest import key_of
    from pocketlm.quantize.formats import get as get_format
    from pocketlm.util.cache import cache_dir

    def entries():
        return sorted(os.listdir(cache_dir() / "sensitivity"))

    first = measure(str(tiny_hf), [str(sample_text)], 1024, progress=False, calib_ctx=128)
    again = measure(str(tiny_hf), [str(sample_text)], 1024, progress=False, calib_ctx=128)
    assert len(entries()) == 1 and again.tensors == first.tensors  # unchanged code: the cache serves
    keys = {step: key_of(step, "same inputs") for step in ("plan", "quantize", "distill")}

    q4k = get_format("Q4_K")
    choose = type(q4k).choose

    def coarser(self, x, w):  # every Q4_K scale 3% off: other bytes, a larger error
        p = choose(self, x, w)
        p.raw["d"] = (p.raw["d"] * 1.03).astype(p.raw["d"].dtype)
        p.scale = p.scale * 1.03
        return p

    monkeypatch.setattr(type(q4k), "choose", coarser)
    changed = measure(str(tiny_hf), [str(sample_text)], 1024, progress=False, calib_ctx=128)
    assert len(entries()) == 2  # measured afresh, not read back
    name = next(n for n in changed.tensors if n.startswith("blk."))
    assert changed.tensors[name]["errors"]["Q4_K"] != first.tensors[name]["errors"]["Q4_K"]
    assert key_of("plan", "same inputs") != keys["plan"] and key_of("quantize", "same inputs") != keys["quantize"]
    assert key_of("distill", "same inputs") == keys["distill"]


def test_activation_rounding_is_llamacpps_q8_0_and_counted_per_type(sensitivity):
    """The runtime term: a matmul's input rounded as llama.cpp's Q8_0 rounds it (gguf-py's
    reference, up to the f16 scale it stores), 256-value blocks rounding coarser than 32-value
    ones, and each type's loss counting the rounding of its own activation block."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    from pocketlm.quantize.calibrate import activation_rounding, round_activations
    from pocketlm.quantize.sensitivity import kind_of

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    x[:, 7] *= 40  # an outlier channel, as real activations have
    ours = round_activations(torch.from_numpy(x), 32).numpy()
    ref = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    d = np.abs(x.reshape(-1, 32)).max(1, keepdims=True) / 127
    assert np.all(np.abs(ours - ref).reshape(-1, 32) <= 127 * d * 2.0 ** -11)  # f16 d: 11 significant bits
    assert np.all(np.abs(ours - x).reshape(-1, 32) <= d / 2 * (1 + 1e-6))
    fine, coarse = (activation_rounding(torch.from_numpy(x), b).sum().item() for b in (32, 256))
    assert coarse > 4 * fine  # the outlier's scale spreads over 8x as many values
    name = next(n for n in sensitivity.tensors if n.startswith("blk.") and "Q4_K" in sensitivity.tensors[n]["errors"])
    info, kind = sensitivity.tensors[name], kind_of(name)
    for t, block in (("Q4_K", "256"), ("Q4_0", "32")):
        expected = sensitivity.gains[kind] * info["errors"][t] + sensitivity.act_gains[kind] * info["act_errors"][block]
        assert sensitivity.loss(name, t) == pytest.approx(expected, rel=1e-12)
    assert info["act_errors"]["256"] > info["act_errors"]["32"] > 0

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
    assert all(g >= 0 for g in sensitivity.gains.values())
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

"""--fisher: gptq's calibration tokens weighted by the logits' Fisher energy at each layer's output."""
from __future__ import annotations

import torch
from click.testing import CliRunner

from pocketlm.cli import cli
from pocketlm.models import load
from pocketlm.quantize import fisher
from pocketlm.quantize.pipeline import QuantizeOptions, calibration_windows, quantize_model


def _windows(tiny_hf, sample_text):
    lm = load(tiny_hf)
    return calibration_windows(lm.tokenizer, lm.add_bos, [str(sample_text)], 256, 64)


def test_weights_are_each_tokens_gradient_energy(tiny_hf, sample_text):
    """Against a second computation by another route (module backward hooks, the same sampled
    targets): a lone Linear's weights are its output gradient's squared norm per token, scaled
    to mean 1; Linears fed one input (q/k/v, gate/up) share one weight."""
    windows = _windows(tiny_hf, sample_text)
    weights = fisher.token_weights(tiny_hf, windows, progress=False)
    assert set(weights) == {0, 1}
    w = weights[1]
    assert set(w) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert w["self_attn.q_proj"] is w["self_attn.k_proj"] is w["self_attn.v_proj"] and w["mlp.gate_proj"] is w["mlp.up_proj"]
    for t in w.values():
        assert t.shape == (len(windows), 64) and abs(float(t.mean()) - 1) < 1e-5
    assert all(float(t.std()) > 0.1 for t in w.values())  # not uniform: the point of weighing

    model = load(tiny_hf).model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []
    model.model.layers[1].mlp.down_proj.register_full_backward_hook(
        lambda m, gi, go: seen.append((go[0][0].double() ** 2).sum(-1)))
    gen = torch.Generator().manual_seed(fisher.SEED)
    for ids in windows:
        x = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, use_cache=False).logits[0].float()
        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
        torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    ref = torch.stack(seen)
    torch.testing.assert_close(w["mlp.down_proj"].double(), ref / ref.mean(), rtol=1e-4, atol=1e-6)


def test_equal_weights_make_plain_gptqs_file_and_fisher_weights_another(tiny_hf, sample_text, tmp_path, monkeypatch):
    opts = dict(preset="Q3_K_M", method="gptq", calib=[str(sample_text)], calib_tokens=256, progress=False)
    plain, weighted, ones = tmp_path / "plain.gguf", tmp_path / "fisher.gguf", tmp_path / "ones.gguf"
    quantize_model(str(tiny_hf), plain, QuantizeOptions(**opts))
    quantize_model(str(tiny_hf), weighted, QuantizeOptions(**opts, fisher=True))
    real = fisher.token_weights
    monkeypatch.setattr(fisher, "token_weights", lambda *a, **k: {i: {n: torch.ones_like(t) for n, t in layer.items()}
                                                                  for i, layer in real(*a, **k).items()})
    quantize_model(str(tiny_hf), ones, QuantizeOptions(**opts, fisher=True))
    assert ones.read_bytes() == plain.read_bytes()  # the weights enter the Hessian and nothing else
    assert weighted.read_bytes() != plain.read_bytes() and weighted.stat().st_size == plain.stat().st_size


def test_cli_refuses_fisher_without_gptq(tiny_hf, tmp_path):
    res = CliRunner().invoke(cli, ["quantize", str(tiny_hf), "-o", str(tmp_path / "x.gguf"), "--type", "Q4_0",
                                   "--method", "rtn", "--fisher", "--quiet"])
    assert res.exit_code == 1 and res.output.startswith("error: --fisher weighs gptq's calibration tokens"), res.output
    assert not (tmp_path / "x.gguf").exists()


def test_qad_from_a_fisher_start_skips_the_layer_phase(tiny_hf, sample_text, tmp_path, monkeypatch):
    """A Q4_0 file would take the layer phase by default; made by --fisher it trains end to end only
    (the phase fits every token alike and undid the weighting, bench/results/qad.md), and says so
    in its result; without --fisher the same command runs the phase."""
    from pocketlm.quantize import qad, qad_blocks
    from pocketlm.quantize.qad_options import QadOptions

    phases = []
    monkeypatch.setattr(qad_blocks, "reconstruct_blocks", lambda *a, **k: phases.append(len(a[2])) or [0.0])
    trained = []
    real = qad.train_file
    monkeypatch.setattr(qad, "train_file", lambda *a, **k: trained.append(k) or real(*a, **k))
    for weighted in (True, False):
        opts = QuantizeOptions(preset="Q4_0", method="qad", calib=[str(sample_text)], calib_tokens=256, progress=False,
                               fisher=weighted, qad=QadOptions(tokens=2000, progress=False))
        quantize_model(str(tiny_hf), tmp_path / f"{weighted}.gguf", opts)
    assert [k["weighted_start"] for k in trained] == [True, False]
    assert len(phases) == 1  # the plain start's run only

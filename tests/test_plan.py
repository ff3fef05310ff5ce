"""Presets choose the same type for every tensor as llama.cpp's own quantizer does."""
import pytest
from conftest import make_tiny_llama

from pocketlm.errors import PocketError
from pocketlm.models import inspect
from pocketlm.models.export_gguf import export_gguf
from pocketlm.quantize.llamacpp_reference import llamacpp_quantize
from pocketlm.quantize.plan import PRESETS, more_bits, parse_keep, plan

SHAPES = {
    # 256-aligned, GQA 4 (k-quants apply everywhere; llama.cpp's n_gqa >= 4 rules fire)
    "aligned": dict(layers=16, hidden=256, heads=4, kv_heads=1, ffn=512, vocab_size=512),
    # 320-wide rows: k-quants fall back the way they do on SmolLM2's 576
    "unaligned": dict(layers=16, hidden=320, heads=5, kv_heads=5, ffn=768, vocab_size=512),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def float_gguf(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_llama(folder / "hf", tied=request.param == "aligned", **SHAPES[request.param])
    return export_gguf(hf, folder / "f32.gguf", "f32"), SHAPES[request.param]


@pytest.mark.parametrize("preset", PRESETS)
def test_plan_matches_llamacpp(float_gguf, preset, tmp_path):
    src, shape = float_gguf
    theirs = {t.name: t.type for t in inspect(llamacpp_quantize(src, tmp_path / "q.gguf", preset)).tensors}
    tensors = [(t.name, t.shape) for t in inspect(src).tensors]
    ours = {p.name: p.type for p in plan(tensors, preset, shape["layers"], shape["heads"] // shape["kv_heads"])}
    assert ours == theirs


def test_more_bits_layers():
    assert [i for i in range(30) if more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_keep_overrides_and_checks_fit():
    tensors = [("blk.0.ffn_down.weight", (256, 512)), ("blk.0.attn_q.weight", (576, 576))]
    p = {x.name: x.type for x in plan(tensors, "Q4_0", 1, keep=parse_keep(["blk.*.ffn_down.weight=q6_k"]))}
    assert p["blk.0.ffn_down.weight"] == "Q6_K" and p["blk.0.attn_q.weight"] == "Q4_0"
    with pytest.raises(PocketError, match="multiple of 256"):
        plan(tensors, "Q4_0", 1, keep={"blk.0.attn_q.weight": "Q4_K"})
    with pytest.raises(PocketError, match="unknown GGUF block type"):
        parse_keep(["x=Q7_Z"])
    with pytest.raises(PocketError, match="unknown --type"):
        plan(tensors, "Q4_K_XL", 1)

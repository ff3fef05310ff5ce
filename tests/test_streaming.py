"""Streaming a model (lazy tensors, one layer at a time, a GGUF written tensor by tensor) changes
no byte of what pocketlm writes: the files below were made by the whole-model code before
streaming (commit 9ccd30a) from the same inputs, and their sha256 is pinned here. The quantized
pins were re-made when the scale searches moved to float64 sums (#20), by 9ccd30a with only that
change applied to quantize/formats/search.py: today's code still writes the same bytes.

gptq and the sensitivity measure do their float32 arithmetic in torch, whose kernels (MKL's
among them) round differently by vector width and by CPU maker (this project's host has come
three ways), so their pins come in one set per kind of host, each made by that whole-model code
on such a host (scripts/whole_model_pins.sh): AMD with AVX2 on 2026-11-30, AMD with AVX-512 on
2026-12-01, Intel with AVX-512 on 2026-12-03. On each, today's code matched it. A host of
another kind fails these tests with the command that makes its set."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gemma, make_tiny_llama, make_tiny_qwen, umask

from pocketlm.models.export_gguf import export_gguf
from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model
from pocketlm.util.machine import cpu_name

# sha256 of the files the pre-streaming code wrote from these inputs (tiny models below, CORPUS
# calibration text, 1024 tokens in windows of 128; the default model with its bundled calibration text)
PINNED = {
    "llama/export-f16": "910429b8aef154d3e3e77e2f53aefa163b6aac5276324348061f1a74179d6434",
    "llama/export-bf16": "4659f30ad27ad2b7a6e85d9e00b7828d5084dc1c251efc68b0a2e8ceb67d2b48",
    "llama/Q4_K_M-rtn": "d550787c8b4262832d6765cae0bcb7bdb92986c865867ce0274ea2aa7f2970b0",
    "llama/Q4_K_M-imatrix": "053544f27fca45f10dfa1515a7e90b2367a7747718c45d26168aa19e2be65796",
    "llama/Q8_0-rtn": "65812f5fc80f586c4b48aa870390cb9480fd6a8f7f7d82b9971f0bc724530189",
    "llama_untied/export-f32": "5d5eae076139ffa34c0a28324cf3ec8d57bb036ef44fbf5ef3a346d8c2e80f81",
    "llama_untied/Q4_K_M-imatrix": "2877ade17f1e9c11eceffa8a803c82612b20c848f1b78a75c05bba7b1318d323",
    "gemma3/export-f16": "c4636f243396b7991bf4af39422ec12d9bff5cf40794f527bffc4a9f5780e316",
    "qwen2/export-bf16": "06cecee96a9c566e87691b4556106173c701dfddeda87ede70ab28aeaa04dd01",
    "default/Q4_K_M-rtn": "98d0fcf0c0410ffa5a33f258bc557d6fcf535a89b67f5967a641f659c59a1f68",
}


def float_host() -> str:
    """Which pin set this host's float kernels reproduce (see the module's docstring)."""
    name = cpu_name()
    maker = "Intel" if "Intel" in name else "AMD" if "AMD" in name else name.split(" (")[0]
    return f"{maker} {'AVX-512' if 'AVX-512' in name else 'AVX2'}"


FLOAT_PINS = {  # the gptq files, per kind of host (see the module's docstring)
    "AMD AVX2": {
        "llama/Q4_K_M-gptq": "a5715907c56d26f131c84075be13b129afeada2019f5528a1b65cd302b40d7e3",
        "llama_untied/Q3_K_S-gptq": "69eca799aa68bffa891b3bd363df41d9d330056482682b0a0b56e6ee3d887ba3",
        "gemma3/Q4_K_M-gptq": "00f18c20709ffecb063caa0b648fc7361511202f93ee0742c4ede5214d2e3a1a",
        "qwen2/Q4_K_M-gptq": "737f439d56ec7402513db711359c6caf64469908d5efb93c9c9a131fc1a6301d",
    },
    "AMD AVX-512": {
        "llama/Q4_K_M-gptq": "2be73f5cf1aa1249ee240115d20dde3a7d2341c098c0fc5694e14a1c86862135",
        "llama_untied/Q3_K_S-gptq": "d7aad50660c27e1347d58216be3fa8593b34ab37db42d993305195b9d079a010",
        "gemma3/Q4_K_M-gptq": "8176a1129432c40ffea1435a11b1621d9d3603bc32909b1242eb55b49f3fb814",
        "qwen2/Q4_K_M-gptq": "c221a9c771944cd53454830d006bd91c7752b676eb221317d0bf91f0214e55cf",
    },
    "Intel AVX-512": {
        "llama/Q4_K_M-gptq": "d53f23a1cd0349fd0680263ad83ab7ff4fec629e631d4782333b8108fd1f4e4f",
        "llama_untied/Q3_K_S-gptq": "daad86167c9d93b53e7aff6893aeb5caf63b739766c94028bc7e7d16555245da",
        "gemma3/Q4_K_M-gptq": "ff021b8110b847f4f2347918f9832880fb7f65390507030143e81c7202a0ea78",
        "qwen2/Q4_K_M-gptq": "0227ce35a48d94e83177403727ade329a4f29bc9e748c09074e1c985d478b440",
    },
}
WHOLE_MODEL_GAINS = {  # the sensitivity table of tiny-untied (see test_streamed_sensitivity_equals_the_whole_model_measure)
    "AMD AVX2": {
        "attn_k": 0.008851021706288665, "attn_output": 0.010733327581762818, "attn_q": 0.004400836821399353,
        "attn_v": 0.007089467603528401, "ffn_down": 0.0009048664970824799, "ffn_gate": 0.0010302064374996677,
        "ffn_up": 0.0009810911148814736, "output": 0.0012213319790832463, "token_embd": 0.015476352668655243},
    "AMD AVX-512": {
        "attn_k": 0.008851021862027336, "attn_output": 0.010733325129826377, "attn_q": 0.0044008366077815135,
        "attn_v": 0.00708946781601172, "ffn_down": 0.0009050828969318241, "ffn_gate": 0.0010302061966743906,
        "ffn_up": 0.0009810905528924148, "output": 0.0012213315362762328, "token_embd": 0.015476352668655243},
    "Intel AVX-512": {
        "attn_k": 0.00885102016492322, "attn_output": 0.010733323799758016, "attn_q": 0.004400837248635033,
        "attn_v": 0.0070894668598367825, "ffn_down": 0.0009048665246888273, "ffn_gate": 0.001030206009365842,
        "ffn_up": 0.00098109065993795, "output": 0.001221331502214155, "token_embd": 0.015476353205394781},
}
FLOAT_JOBS = tuple(FLOAT_PINS["AMD AVX2"])  # every host kind's set pins these


def require_float_pins() -> str:
    """This kind of host, which has pins; fails (never skips) on a kind that has none yet."""
    host = float_host()
    if host not in FLOAT_PINS or host not in WHOLE_MODEL_GAINS:
        pytest.fail(f"no pins for a host of kind {host!r}: make them with scripts/whole_model_pins.sh and add its set here")
    return host


def float_pin(key: str) -> str:
    return FLOAT_PINS[require_float_pins()][key]

def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pinned")
    return {"llama": make_tiny_llama(root / "tiny-llama"), "llama_untied": make_tiny_llama(root / "tiny-untied", seed=1, tied=False),
            "gemma3": make_tiny_gemma(root / "tiny-gemma"), "qwen2": make_tiny_qwen(root / "tiny-qwen")}


def make(models: dict, model: str, job: str, out: Path, text: Path) -> Path:
    if job.startswith("export-"):
        return export_gguf(models[model], out, job.removeprefix("export-"), progress=False)
    preset, method = job.split("-")
    quantize_model(str(models[model]), out, QuantizeOptions(preset=preset, method=method, calib=[str(text)], calib_tokens=1024,
                                                            calib_ctx=128, progress=False, allow_requant=True))
    return out


@pytest.mark.parametrize("model,job", [tuple(k.split("/")) for k in [*PINNED, *FLOAT_JOBS] if not k.startswith("default/")])
def test_tiny_files_are_byte_identical_to_the_whole_model_code(models, tmp_path, sample_text, model, job):
    key = f"{model}/{job}"
    assert sha(make(models, model, job, tmp_path / "out.gguf", sample_text)) == (float_pin(key) if key in FLOAT_JOBS else PINNED[key])


def test_row_blocks_and_codec_threads_change_no_byte(models, tmp_path, sample_text, monkeypatch):
    import pocketlm.models.gguf_stream as stream
    import pocketlm.quantize.workers as workers

    monkeypatch.setattr(stream, "ROW_BLOCK", 5000)  # 19-row blocks on these 256-wide tensors (no multiple of 8)
    monkeypatch.setattr(workers, "CODEC_VALUES", 1800)  # each split again in 7-row parts, on three codec threads
    monkeypatch.setattr(workers, "n_workers", lambda: 3)
    assert sha(make(models, "llama_untied", "Q4_K_M-imatrix", tmp_path / "q.gguf", sample_text)) == PINNED["llama_untied/Q4_K_M-imatrix"]
    assert sha(make(models, "llama", "export-bf16", tmp_path / "e.gguf", sample_text)) == PINNED["llama/export-bf16"]
    # gptq's scale choice and packing also go by row blocks
    assert sha(make(models, "qwen2", "Q4_K_M-gptq", tmp_path / "g.gguf", sample_text)) == float_pin("qwen2/Q4_K_M-gptq")



def test_hidden_states_spilled_to_disk_come_back_bit_exact(monkeypatch):
    from pocketlm.errors import PocketError
    from pocketlm.quantize.hidden import HiddenStates, memory_limit

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1, 7 + i, 16, generator=gen) for i in range(5)]
    tensors.append(torch.randn(1, 3, 16, generator=gen).to(torch.bfloat16))
    store = HiddenStates.of(tensors, limit=7 * 16 * 4)  # the first window fits, the rest spill
    assert store.spilled_bytes == sum(t.numel() * t.element_size() for t in tensors[1:])
    assert len(store) == 6 and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(store, tensors))
    assert [t.shape for t in store[2:4]] == [t.shape for t in tensors[2:4]]
    monkeypatch.setenv("POCKETLM_CALIB_MEMORY", "lots")
    with pytest.raises(PocketError, match="POCKETLM_CALIB_MEMORY"):
        memory_limit()


def test_spilling_hidden_states_changes_no_byte(models, tmp_path, sample_text, monkeypatch):
    """gptq and imatrix with every calibration window's hidden states in the temporary file."""
    import pocketlm.quantize.hidden as hidden

    spilled = []
    real = hidden.HiddenStates.append

    def append(self, t):
        real(self, t)
        spilled.append(self.spilled_bytes)

    monkeypatch.setattr(hidden.HiddenStates, "append", append)
    monkeypatch.setenv("POCKETLM_CALIB_MEMORY", "1B")
    assert sha(make(models, "qwen2", "Q4_K_M-gptq", tmp_path / "g.gguf", sample_text)) == float_pin("qwen2/Q4_K_M-gptq")
    assert sha(make(models, "llama_untied", "Q4_K_M-imatrix", tmp_path / "q.gguf", sample_text)) == PINNED["llama_untied/Q4_K_M-imatrix"]
    assert spilled and max(spilled) > 0

@pytest.mark.real_model
def test_default_model_q4_k_m_is_byte_identical(tmp_path):
    """rtn: the calibrated paths are pinned on the tiny models above (and were checked on this
    model by hand: imatrix Q4_K_M and a 75 MB budget's allocation came out identical)."""
    out = tmp_path / "q.gguf"
    quantize_model("smollm2-135m", out, QuantizeOptions(preset="Q4_K_M", method="rtn", progress=False, allow_requant=True))
    assert sha(out) == PINNED["default/Q4_K_M-rtn"]


def test_one_decoder_layer_in_memory_at_a_time(models, tmp_path, sample_text, monkeypatch):
    from pocketlm.models.layers import LayerStream
    from pocketlm.quantize import pipeline

    live, most, real_params, streams, held = set(), [0], [], [], []
    load, unload, quantize_tensor = LayerStream.load, LayerStream.unload, pipeline.quantize_tensor

    def counting_load(self, module, given=None):
        load(self, module, given)
        streams.append(self)
        if module in list(self.layers):
            live.add(id(module))
            most[0] = max(most[0], len(live))
            real_params.append(sum(p.numel() for p in self.model.parameters() if p.device.type != "meta"))

    def counting_unload(module):
        live.discard(id(module))
        unload(module)

    def watched_quantize(*args, **kwargs):  # what of the decoder layers is real while a tensor is quantized
        if streams:
            held.append(sum(p.numel() for p in streams[0].layers.parameters() if p.device.type != "meta"))
        return quantize_tensor(*args, **kwargs)

    monkeypatch.setattr(LayerStream, "load", counting_load)
    monkeypatch.setattr(LayerStream, "unload", staticmethod(counting_unload))
    monkeypatch.setattr(pipeline, "quantize_tensor", watched_quantize)
    make(models, "llama_untied", "Q4_K_M-gptq", tmp_path / "q.gguf", sample_text)
    # each layer is loaded to calibrate, dropped while its tensors are quantized, then rebuilt from them
    assert most[0] == 1 and len(real_params) == 4
    assert held and max(held) == 0
    # what is real while a layer works: that layer plus the calibration tokens' embedding rows
    layer_params = 4 * 256 * 256 // 2 * 2 + 256 * 128 * 2 + 3 * 256 * 512 + 2 * 256  # q,o + k,v + mlp + norms
    assert max(real_params) < layer_params + 400 * 256


def _sharded(models: dict, root: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / "sharded"
    AutoModelForCausalLM.from_pretrained(models["llama_untied"]).save_pretrained(folder, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(models["llama_untied"]).save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def test_sharded_checkpoint_gives_the_same_tensors(models, tmp_path, sample_text):
    from gguf.quants import dequantize

    from pocketlm.models.gguf_file import open_gguf

    folder = _sharded(models, tmp_path)
    a = make(models, "llama_untied", "Q4_K_M-gptq", tmp_path / "a.gguf", sample_text)
    b = make({"s": folder}, "s", "Q4_K_M-gptq", tmp_path / "b.gguf", sample_text)
    ta = {t.name: t for t in open_gguf(a).tensors}
    tb = {t.name: t for t in open_gguf(b).tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type
        assert (dequantize(t.data, t.tensor_type) == dequantize(tb[name].data, tb[name].tensor_type)).all(), name


def _cli(*args):
    from click.testing import CliRunner

    from pocketlm.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_bad_checkpoints_fail_before_work_with_one_line(models, tmp_path):
    folder = _sharded(models, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    count = sum(1 for v in index["weight_map"].values() if v == victim)
    (folder / victim).unlink()
    for cmd in (("quantize", folder, "-o", tmp_path / "q.gguf", "--type", "Q4_0", "--method", "rtn"),
                ("export", folder, "-o", tmp_path / "e.gguf")):
        r = _cli(*cmd)
        assert r.exit_code == 1 and r.stderr == f"error: {folder}: shard {victim} is missing (the index places {count} tensors in it)\n"
    assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "e.gguf").exists()

    bad = tmp_path / "mismatch"
    bad.mkdir()
    for f in models["llama"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 768
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _cli("quantize", bad, "-o", tmp_path / "q.gguf", "--type", "Q4_0", "--method", "rtn")
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: {bad}: tensor blk.0.ffn_gate.weight (model.layers.0.mlp.gate_proj.weight) has shape "
                                "(512, 256), the config implies (768, 256)")


def test_output_that_cannot_fit_is_refused_up_front(models, tmp_path, monkeypatch):
    import shutil

    import pocketlm.models.gguf_stream as stream
    from pocketlm.quantize import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "quantize_tensor", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(stream.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    r = _cli("quantize", models["llama"], "-o", out / "q.gguf", "--type", "Q4_0", "--method", "rtn")
    assert r.exit_code == 1 and "needs 0.00" in r.stderr and "has 0.00 GB free" in r.stderr
    assert calls == [] and list(out.iterdir()) == []


def test_interrupted_quantize_leaves_nothing(models, tmp_path, monkeypatch):
    from pocketlm.quantize import pipeline

    real, seen = pipeline.quantize_tensor, []

    def interrupt(*a, **k):
        seen.append(1)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "quantize_tensor", interrupt)
    out = tmp_path / "out"
    r = _cli("quantize", models["llama"], "-o", out / "q.gguf", "--type", "Q4_K_M", "--method", "rtn")
    assert r.exit_code == 130 and len(seen) == 5
    assert list(out.iterdir()) == []


def test_streamed_sensitivity_equals_the_whole_model_measure(models, sample_text):
    """The budget's costs, measured a layer at a time, equal what the whole-model code measured."""
    from pocketlm.quantize.sensitivity import measure

    sens = measure(str(models["llama_untied"]), [str(sample_text)], 1024, progress=False, calib_ctx=128)
    assert sens.gains == pytest.approx(WHOLE_MODEL_GAINS[require_float_pins()], rel=1e-12)
    assert sens.overhead == 12000 and sens.n_params == sum(
        int(torch.tensor(s).prod()) for s in [i["shape"] for i in sens.tensors.values()] + list(sens.fixed.values()))


@pytest.mark.parametrize("model", ["llama", "llama_untied"])
def test_a_head_too_big_to_hold_whole_measures_as_a_whole_one(models, sample_text, tmp_path, monkeypatch, model):
    """Past HEAD_BLOCK the head is examined in row blocks, keeps only a bf16 probe, reads its
    weights again for each use and takes the KLD in one pass over its blocks; an untied embedding
    keeps only the calibration tokens' probe rows (blocks of 37 rows here, so those rows fall in
    every block). Errors equal the whole head's up to float32 summation order; so do the gains of
    the layers' kinds (measured 2e-7 apart; a KLD pass that forgot to rescale its sums as the
    maximum grows was 50% off); the vocabulary kinds' gains differ by the bf16 probe (1e-3)."""
    from pocketlm.quantize import sensitivity

    whole = sensitivity.measure(str(models[model]), [str(sample_text)], 1024, progress=False, calib_ctx=128)
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "another-cache"))  # the key does not name the block sizes
    monkeypatch.setattr(sensitivity, "HEAD_BLOCK", 1000)
    monkeypatch.setattr(sensitivity, "EXAMINE_BLOCK", 256 * 37)
    blocked = sensitivity.measure(str(models[model]), [str(sample_text)], 1024, progress=False, calib_ctx=128)
    assert blocked.tensors.keys() == whole.tensors.keys()
    for name, info in whole.tensors.items():
        assert blocked.tensors[name]["errors"] == pytest.approx(info["errors"], rel=1e-5), name
        assert blocked.tensors[name].get("act_errors", {}) == pytest.approx(info.get("act_errors", {}), rel=1e-5), name
    # the same, up to the blocked KLD pass's summation order: these KLDs are ~100x smaller than
    # the weight probes', so that order shows at ~1e-4 (measured up to 1.3e-4)
    assert blocked.act_gains == pytest.approx(whole.act_gains, rel=1e-3)
    vocab = {"output", "token_embd"}
    assert {k: v for k, v in blocked.gains.items() if k not in vocab} == pytest.approx(
        {k: v for k, v in whole.gains.items() if k not in vocab}, rel=1e-5)
    assert {k: blocked.gains[k] for k in vocab & set(whole.gains)} == pytest.approx(
        {k: whole.gains[k] for k in vocab & set(whole.gains)}, rel=0.01)


def test_a_blocked_head_keeps_the_rows_asked_for(models, monkeypatch):
    """The kept probe rows of a blocked embedding are the whole one's, rounded to bf16, whichever
    block they fall in."""
    from pocketlm.models.layers import LayerStream
    from pocketlm.models.source import resolve
    from pocketlm.quantize import sensitivity

    layers = LayerStream(resolve(str(models["llama_untied"])))
    whole = sensitivity._HeadRows(layers, "token_embd.weight", None, 99.0)
    ids = torch.tensor([0, 5, 36, 37, 38, 150, 399])  # both sides of block edges (37 rows a block), the last row
    monkeypatch.setattr(sensitivity, "HEAD_BLOCK", 1000)
    monkeypatch.setattr(sensitivity, "EXAMINE_BLOCK", 256 * 37)
    blocked = sensitivity._HeadRows(layers, "token_embd.weight", None, 99.0, keep=ids)
    assert blocked.errors == pytest.approx(whole.errors, rel=1e-5)
    assert torch.equal(blocked.rows_of(ids), whole.rows_of(ids).bfloat16().float())


@pytest.mark.real_model
def test_sigterm_cleans_up_like_ctrl_c_and_a_rerun_sweeps_a_killed_writers_file(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).with_name("pocketlm")
    out = tmp_path / "out"
    out.mkdir()
    args = [str(exe), "quantize", "smollm2-135m", "-o", str(out / "q.gguf"), "--type", "Q4_K_M", "--method", "rtn",
            "--allow-requant", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(out.iterdir()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the output's temporary file appears once writing starts
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert "tensor/s" not in err and "it/s" not in err, "--quiet still drew a progress bar"
    assert list(out.iterdir()) == []
    # a writer killed outright (SIGKILL) leaves its temporary file; the next write of that target removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = out / f".q.gguf.tmp-{dead.pid}-x1y2"
    left.write_bytes(b"partial")
    from pocketlm.util.atomic import write_text

    write_text(out / "q.gguf", "done")
    assert sorted(p.name for p in out.iterdir()) == ["q.gguf"]
    assert (out / "q.gguf").stat().st_mode & 0o777 == 0o666 & ~umask()

"""The CLI: happy paths, and every bad input ending in one line on stderr and exit status 1."""
import json
import shutil

from click.testing import CliRunner
from conftest import umask

from pocketlm.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_info_json(tiny_gguf_f32):
    r = run("info", tiny_gguf_f32, "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["architecture"] == "llama" and d["n_embedding_params"] == 400 * 256
    assert d["n_params"] == d["n_embedding_params"] + d["n_non_embedding_params"]
    per_layer = 256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512 + 2 * 256  # q,o; k,v (2 kv heads); mlp; norms
    assert d["n_non_embedding_params"] == 2 * per_layer + 256


def test_eval_writes_json_schema(tiny_gguf_f32, tiny_hf, sample_text, tmp_path):
    out = tmp_path / "r.json"
    r = run("eval", tiny_gguf_f32, "--reference", tiny_hf, "--text", sample_text, "--ctx", 64, "-o", out)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()  # the user's umask, not a temporary file's 0600
    again = run("eval", tiny_gguf_f32, "--text", sample_text, "--ctx", 64, "-o", out)
    assert_one_line_error(again, "exists; pass --force")
    assert json.loads(out.read_text()) == d  # not replaced
    printed = run("eval", tiny_gguf_f32, "--text", sample_text, "--ctx", 64, "--json")
    assert printed.exit_code == 0 and json.loads(printed.stdout)["tokens"] == d["tokens"]
    old = run("eval", tiny_gguf_f32, "--text", sample_text, "--ctx", 64, "--max-tokens", 100,
              "--json", tmp_path / "old.json")  # the old spellings still work, and say they will go
    assert old.exit_code == 0 and "deprecated" in old.stderr and (tmp_path / "old.json").exists()
    assert json.loads((tmp_path / "old.json").read_text())["tokens"] <= 100
    # the schema's keys are always there (the runner fills them); what they hold is the test
    assert d["size_bytes"] == tiny_gguf_f32.stat().st_size and d["backend"] == "llama.cpp" and d["ctx"] == 64
    assert d["mmlu_acc"] is None and d["prefill_tps"] is None and d["decode_tps"] is None  # not asked for
    # the model is the f32 GGUF of its reference: llama.cpp and torch must agree almost exactly
    assert d["tokens"] > 0 and d["ppl"] > 1 and d["kld_mean"] < 1e-3 and d["top1"] > 0.98, d
    assert "PPL" in r.stdout


def test_export_both_ways(tiny_gguf_f32, tmp_path):
    assert run("export", tiny_gguf_f32, "-o", tmp_path / "m.gguf", "--type", "f16").exit_code == 0
    assert run("export", tiny_gguf_f32, "-o", tmp_path / "hf").exit_code == 0
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()


# --- bad input ---------------------------------------------------------------------------

def test_missing_model():
    assert_one_line_error(run("info", "/nope/model.gguf"), "no such file")


def test_not_a_model(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world")
    assert_one_line_error(run("info", p), "neither a GGUF")
    assert_one_line_error(run("info", tmp_path), "without config.json")


def test_truncated_gguf(tiny_gguf_f32, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny_gguf_f32.read_bytes()[: tiny_gguf_f32.stat().st_size // 2])
    assert_one_line_error(run("info", p), "truncated")
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("export", p, "-o", out), "truncated")
    assert not out.exists() and not list(tmp_path.glob(".out.gguf.tmp*"))


def test_corrupt_gguf_header(tiny_gguf_f32, tmp_path):
    data = bytearray(tiny_gguf_f32.read_bytes())
    data[8:24] = b"\xff" * 16  # tensor and key counts become absurd
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    assert_one_line_error(run("eval", p, "--text", p), "not a readable GGUF")


def test_unsupported_architecture(tiny_hf, tmp_path):
    folder = tmp_path / "weird"
    shutil.copytree(tiny_hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("eval", folder, "--text", folder / "config.json"), "unsupported architecture")
    assert_one_line_error(run("export", folder, "-o", tmp_path / "w.gguf"), "unsupported architecture")
    assert not (tmp_path / "w.gguf").exists()


def test_text_shorter_than_a_window(tiny_gguf_f32, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("The river runs.")
    assert_one_line_error(run("eval", tiny_gguf_f32, "--text", short), "fewer than one window")


def test_missing_text_file(tiny_gguf_f32, tmp_path):
    assert_one_line_error(run("eval", tiny_gguf_f32, "--text", tmp_path / "none.txt"), "text file not found")


def test_reference_with_other_vocabulary(tiny_gguf_f32, sample_text, tmp_path):
    from conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", vocab_size=400, seed_text="zebra quartz vexing jumbled fox " * 30)
    out = tmp_path / "r.json"
    r = run("eval", tiny_gguf_f32, "--reference", other, "--text", sample_text, "--ctx", 64, "-o", out)
    assert_one_line_error(r, "another vocabulary")
    assert not out.exists()


def test_export_refuses_to_overwrite(tiny_gguf_f32, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    assert_one_line_error(run("export", tiny_gguf_f32, "-o", out), "exists")
    assert out.read_bytes() == b"precious"
    assert run("export", tiny_gguf_f32, "-o", out, "--force").exit_code == 0


def test_bad_options_are_refused_before_any_work(tiny_hf, tmp_path, monkeypatch):
    """Each is one `error:` line and exit 1, decided from the command line and the tensors'
    shapes: the measurement, the calibration and every model load would fail the test."""
    import pocketlm.models.layers as layers
    import pocketlm.quantize.pipeline as pipeline
    import pocketlm.quantize.sensitivity as sensitivity

    def no_work(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(sensitivity, "measure", no_work)
    monkeypatch.setattr(pipeline, "quantize_model", no_work)
    monkeypatch.setattr(layers, "LayerStream", no_work)
    out = tmp_path / "q.gguf"
    text = tmp_path / "t.txt"
    text.write_text("some text")
    cases = [
        (["quantize", tiny_hf, "-o", out, "--target-size", "1KB"], "below the smallest file this model quantizes to"),
        (["quantize", tiny_hf, "-o", out, "--target-size", "sixty"], "cannot read the size 'sixty'"),
        (["quantize", tiny_hf, "-o", out, "--target-bpw", "0.5"], "'--target-bpw'"),
        (["quantize", tiny_hf, "-o", out, "--target-bpw", "1.01"], "below the smallest file"),
        (["quantize", tiny_hf, "-o", out, "--type", "Q9_K"], "unknown --type 'Q9_K'"),
        (["quantize", tiny_hf, "-o", out, "--type", "Q4_K_M", "--target-size", "1MB"], "not both"),
        (["quantize", tiny_hf, "-o", out, "--type", "Q4_K_M", "--calib-tokens", "0"], "'--calib-tokens'"),
        (["quantize", tiny_hf, "-o", out, "--type", "Q4_K_M", "--method", "gtpq"], "'gtpq' is not one of"),
        (["quantize", tiny_hf, "-o", out, "--type", "Q4_K_M", "--keep", "blk.*=Q9"], "unknown GGUF block type"),
        (["quantize", tiny_hf, "-o", out, "--type", "Q4_K_M", "--calib", tmp_path / "nope.txt"], "no such file"),
        (["quantize", tiny_hf, "-o", out, "--target-size", "10MB", "--calib", tmp_path / "nope.txt"], "no such file"),
        (["quantize", tiny_hf, "-o", out, "--tpye", "Q4_K_M"], "No such option '--tpye'. Did you mean '--type'?"),
        (["plan", tiny_hf], "give one of --target-size, --target-bpw or --target-memory"),
        (["plan", tiny_hf, "--target-size", "-5MB"], "cannot read the size"),
        (["index", text, "--db", tmp_path / "i.db", "--chunk-tokens", "-1"], "'--chunk-tokens'"),
        (["search", "river", "--db", tmp_path / "i.db", "--k", "0"], "'--k'"),
        (["eval", tiny_hf, "--ctx", "1"], "'--ctx'"),
        (["serve", "--port", "70000"], "'--port'"),
        (["serve", "--kv-tokens", "1000", "--ctx", "2048"], "cannot hold one window of --ctx 2048"),
        (["serve", "--engine", "batched", "--kv-tokens", "8192"], "for --engine server"),
        (["quantize", tiny_hf, "-o", out, "--type", "Q2_K", "--method", "qad", "--qad-codes", "levels"], "'levels' is not one of"),
        (["distill", tiny_hf, "-o", tmp_path / "s", "--data", text, "--lr", "0"], "'--lr'"),
        (["distill", tiny_hf, "-o", tmp_path / "s", "--data", text, "--drop-layers", "3,x"], "'--drop-layers'"),
        (["distill", tiny_hf, "-o", tmp_path / "s", "--data", text, "--loss", "kl"], "unknown --loss 'kl'"),
        (["distill", tiny_hf, "-o", tmp_path / "s", "--data", tmp_path / "nope"], "--data"),
        (["compress", "--target-size", "lots", "-o", tmp_path / "c"], "cannot read the size 'lots'"),
    ]
    for args, pattern in cases:
        assert_one_line_error(run(*args), pattern)
    assert not out.exists()

"""`pocketlm compress` on a tiny model: a file within budget, a report, resumable steps, and
clear refusals that leave earlier artifacts intact."""
import errno
import json
import re

import pytest
from click.testing import CliRunner
from test_handoff import check_handoff

from pocketlm.cli import cli
from pocketlm.compress.recipe import load_recipe
from pocketlm.errors import PocketError


@pytest.fixture
def job(tiny_hf, sample_text, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "mill.md").write_text("# The mill\n\nThe old mill by the river grinds wheat every Tuesday.\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"quantize:\n  calib: [{sample_text}]\n  calib_tokens: 1024\n  qad: never\n"  # qad: its own test
                      f"evaluate:\n  texts: [{sample_text}]\n  max_tokens: 512\n  ctx: 64\n  speed: false\n")  # speed: its own test
    return {"model": str(tiny_hf), "recipe": recipe, "docs": docs, "out": tmp_path / "out"}


def _compress(job, *extra, size="0.6MB"):
    budget = ["--target-size", size] if size else []
    return CliRunner().invoke(cli, ["compress", job["model"], *budget, "-o", str(job["out"]),
                                    "--recipe", str(job["recipe"]), *map(str, extra)])


def test_compress_meets_the_budget_reports_and_resumes(job):
    r = _compress(job, "--domain", job["docs"])
    assert r.exit_code == 0, r.output
    out = job["out"]
    assert (out / "model.gguf").stat().st_size <= 600_000
    rows = json.loads((out / "eval.json").read_text())
    preset = json.loads((out / "manifest.json").read_text())["steps"]["preset"]["result"]["preset"]
    assert set(rows) == {"original", "pocketlm", f"llama.cpp {preset}"}
    assert rows["pocketlm"]["kld_mean"] > 0 and rows["pocketlm"]["size_bytes"] < rows["original"]["size_bytes"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "× smaller" in md.splitlines()[2] and "distillation was skipped" in md
    assert page.count("data:image/png;base64,") >= 2 and "<table>" in page  # plots embedded: one file is the report
    linked = re.findall(r"!\[[^]]*\]\((plots/[^)]+\.png)\)", md)  # Markdown links its plots, no base64 text
    assert len(linked) >= 2 and "base64" not in md
    assert all((out / p).read_bytes().startswith(b"\x89PNG") for p in linked)
    check_handoff(out / "Modelfile", out / "README.md", out / "model.gguf", rows)
    assert (out / "docs.db").exists()
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert {"plan", "quantize", "preset", "evaluate"} <= set(steps)
    assert all(s["versions"]["pocketlm"] and s["key"] for s in steps.values())

    again = _compress(job)
    assert again.exit_code == 0 and again.output.count("done earlier") == 4, again.output
    before = (out / "model.gguf").read_bytes()
    changed = _compress(job, size="0.8MB")  # a new budget: plan and quantize rerun, so does what follows
    assert changed.exit_code == 0 and "[quantize] running" in changed.output and "[evaluate] running" in changed.output
    assert (out / "model.gguf").read_bytes() != before and (out / "model.gguf").stat().st_size <= 800_000


def test_bad_inputs_are_refused_clearly(job, tmp_path, monkeypatch):
    r = _compress(job, size="1KB")
    assert r.exit_code == 1 and "cannot hold even the smallest student" in r.stderr, r.stderr
    assert "[plan]" not in r.output  # refused from the shapes alone, before any measuring
    job["recipe"].write_text("quantize:\n  calib_tokns: 10\n")
    r = _compress(job)
    assert r.exit_code == 1 and "unknown key quantize.calib_tokns" in r.stderr
    with pytest.raises(PocketError, match="distill.when"):
        load_recipe(None, **{"distill.when": "sometimes"})
    with pytest.raises(PocketError, match="forward KL only"):
        load_recipe(None, **{"distill.loss": "rkl", "distill.targets": "sampled"})
    with pytest.raises(PocketError, match="fisher weighs gptq's calibration tokens: it needs method gptq, not rtn"):
        load_recipe(None, **{"quantize.fisher": True, "quantize.method": "rtn"})
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "photo.jpg").write_bytes(b"\xff\xd8")
    job["recipe"].write_text("")
    r = _compress(job, "--domain", empty)
    assert r.exit_code == 1 and "no documents pocketlm can read" in r.stderr


def test_a_full_disk_fails_cleanly_and_keeps_what_was_done(job, monkeypatch):
    assert _compress(job).exit_code == 0
    model = (job["out"] / "model.gguf").read_bytes()
    import pocketlm.eval.report as report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(job["out"] / "report.md"))

    monkeypatch.setattr(report, "write_text", full)
    r = _compress(job)
    assert r.exit_code == 1 and r.stderr.startswith("error: No space left on device"), r.stderr
    assert (job["out"] / "model.gguf").read_bytes() == model and (job["out"] / "eval.json").exists()


def test_compress_can_distill_first(job, sample_text):
    job["recipe"].write_text(f"distill:\n  when: always\n  tokens: 3000\n  pilot_tokens: 1000\n  data: [{sample_text}]\n"
                             f"quantize:\n  calib: [{sample_text}]\n  calib_tokens: 1024\n  method: imatrix\n"
                             f"evaluate:\n  texts: [{sample_text}]\n  max_tokens: 256\n  ctx: 64\n  speed: false\n"
                             "  compare_preset: false\n")
    r = _compress(job, size="0.5MB")
    assert r.exit_code == 0, r.output
    out = job["out"]
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert steps["distill"]["result"]["tokens"] >= 3000 and (out / "student" / "config.json").exists()
    assert (out / "model.gguf").stat().st_size <= 500_000
    md = (out / "report.md").read_text()
    assert "the recipe asks for distillation" in md
    rows = json.loads((out / "eval.json").read_text())
    student, final = rows["distilled student, unquantized"], rows["pocketlm"]
    assert student["size_bytes"] > 4 * final["size_bytes"] and student["backend"] != final["backend"], (student, final)
    assert 0 < student["kld_mean"] and student["tokens"] == final["tokens"]  # the same windows as the file's
    assert f"distillation left {student['kld_mean']:.4f}" in md and f"({final['kld_mean']:.4f})" in md
    choice = steps["choose"]["result"]
    assert len(choice["pilots"]) >= 2 and all(p["pilot_kld"] > 0 and p["quant_kld"] > 0 for p in choice["pilots"])
    first = choice["pilots"][0]  # quantized and measured: its file's KLD is its healing's plus its quantization's
    assert first["quant_measured"] and first["file_kld"] > first["pilot_kld"], first
    assert first["float_kld"] == first["pilot_kld"]  # distill's own measure, exact with the full-vocabulary teacher
    assert first["quant_kld"] >= first["file_kld"] - first["pilot_kld"] and not any((out / "choose").glob("*.gguf"))
    best = min(choice["pilots"], key=lambda p: p["pilot_kld"] + p["quant_kld"])
    assert choice["chosen"] == best["label"] and steps["distill"]["result"]["shape"]["ffn"] == best["ffn"]
    assert "## Student shapes weighed" in md and f"| {best['label']} |" in md and "| chosen |" in md
    assert not any((out / "choose").glob("L*/config.json"))  # the pilots' float students are not kept
    again = _compress(job, size="0.5MB")
    assert again.exit_code == 0 and "[choose] done earlier" in again.output, again.output


def test_compress_trains_the_file_when_the_budget_is_tight(job, sample_text, monkeypatch):
    from pocketlm.compress.pipeline import qad_applies

    assert qad_applies("auto", job["model"], 600_000)[0]  # ~3.7 bits per weight
    assert not qad_applies("auto", job["model"], 1_200_000)[0]
    job["recipe"].write_text(f"quantize:\n  calib: [{sample_text}]\n  calib_tokens: 1024\n  qad_tokens: 4000\n  qad_epochs: 2\n"
                             f"distill:\n  data: [{sample_text}]\n"
                             f"evaluate:\n  texts: [{sample_text}]\n  max_tokens: 256\n  ctx: 64\n  speed: false\n"
                             "  compare_preset: false\n")
    r = _compress(job)
    assert r.exit_code == 0, r.output
    out = job["out"]
    assert "qad: the budget leaves" in r.output
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    q = steps["qad"]["result"]
    assert q["tokens"] >= 4000 and q["epochs"] == 2 and q["max_difference"] == 0 and q["kld_after"] < q["kld_before"]
    gptq, final = out / "model-gptq.gguf", out / "model.gguf"
    assert gptq.stat().st_size == final.stat().st_size and gptq.read_bytes() != final.read_bytes()
    rows = json.loads((out / "eval.json").read_text())
    assert set(rows) == {"original", "pocketlm", "pocketlm before qad"}
    md = (out / "report.md").read_text()
    assert "| pocketlm before qad |" in md and "the gptq file the final one was trained from" in md and "tokens read 2 times" in md
    assert not (out / "qad.ckpt").exists()
    again = _compress(job)
    assert again.exit_code == 0 and "[qad] done earlier" in again.output, again.output

    # quantize.fisher: a Fisher-weighted gptq file (a new start: quantize and qad rerun), trained end to end only
    from pocketlm.quantize import qad

    starts = []
    real = qad.train_file
    monkeypatch.setattr(qad, "train_file", lambda *a, **k: starts.append(k["weighted_start"]) or real(*a, **k))
    plain = gptq.read_bytes()
    job["recipe"].write_text(job["recipe"].read_text().replace("  qad_epochs: 2\n", "  qad_epochs: 2\n  fisher: true\n"))
    weighted = _compress(job)
    assert weighted.exit_code == 0 and "[quantize] running" in weighted.output, weighted.output
    assert starts == [True] and gptq.read_bytes() != plain and gptq.stat().st_size == len(plain)
    assert json.loads((out / "manifest.json").read_text())["steps"]["qad"]["result"]["max_difference"] == 0


def test_report_shows_measured_speed():
    """The compress jobs above skip the speed pass (seconds of child processes each; the measure itself
    is tested in test_eval): the report's speed plot and headline are checked on known rows here."""
    from pocketlm.eval.report import _plots, _table, headline

    rows = {"original": {"size_bytes": 4e6, "decode_tps": 50.0, "prefill_tps": 400.0, "ppl": 10.0},
            "pocketlm": {"size_bytes": 1e6, "decode_tps": 125.0, "prefill_tps": 900.0, "ppl": 11.0, "top1": 0.9}}
    top = headline(rows)
    assert top.startswith("4.0× smaller (4.00 MB → 1.00 MB); 2.5× the decoding speed;") and "90%" in top
    assert "speed" in _plots(rows, {})
    assert _table(rows)[2][6:8] == ["900", "125"]


def test_compress_to_a_memory_budget_measures_the_claim(job):
    r = _compress(job, "--target-memory", "70MB", "--ctx", "256", size=None)
    assert r.exit_code == 0, r.output
    out = job["out"]
    mem = json.loads((out / "manifest.json").read_text())["steps"]["quantize"]["result"]["memory"]
    assert mem["fits"] and mem["measured"] <= 70_000_000 <= mem["predicted"] + (out / "model.gguf").stat().st_size
    assert mem["measured"] <= mem["predicted"]  # the prediction is conservative
    md = (out / "report.md").read_text()
    assert f"Memory budget 70 MB at a context of 256 tokens: measured {mem['measured'] / 1e6:.0f} MB" in md and "fits." in md
    r = _compress(job, "--target-memory", "70MB", size="1MB")
    assert r.exit_code == 1 and "one of --target-size or --target-memory" in r.stderr


def test_each_step_records_its_own_peak_memory(tmp_path):
    """A step after the largest one must not inherit its peak, or the manifest could not say
    which step a laptop's memory must hold; and the process's own peak must stay whole, since
    `/usr/bin/time` and a parent's getrusage read it."""
    import time

    import numpy as np

    from pocketlm.compress.manifest import Manifest
    from pocketlm.util.rss import peak_rss_bytes

    def big(target):
        a = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
        time.sleep(0.3)  # held for several of the sampler's intervals
        target.write_text(str(a.sum()))

    def small(target):
        target.write_text("x")

    m = Manifest(tmp_path)
    logged: list[str] = []
    first = m.run("big", "k1", "big.txt", big, params={}, say=logged.append)
    second = m.run("small", "k2", "small.txt", small, params={}, say=logged.append)
    assert first["peak_rss_mb"] >= second["peak_rss_mb"] + 350
    assert peak_rss_bytes() / 2**20 >= first["peak_rss_mb"] - 5  # the kernel's high-water mark kept
    assert "peak RSS" in logged[1]
    saved = json.loads((tmp_path / "manifest.json").read_text())["steps"]
    assert saved["small"]["peak_rss_mb"] == second["peak_rss_mb"]

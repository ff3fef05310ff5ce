"""Memory budgets (runtime/memory.py): a memory becomes a file budget, and the claim is checked
by running the file with its whole context filled."""
import json

import pytest
from click.testing import CliRunner

from pocketlm.cli import cli
from pocketlm.errors import PocketError
from pocketlm.runtime.memory import (
    PROFILES,
    Geometry,
    compute_bytes,
    file_budget,
    kv_bytes,
    measure,
    parse_memory,
    runtime_bytes,
)


def test_memory_is_a_size_or_a_profile():
    assert parse_memory("1GB") == (10**9, "1000 MB")
    assert parse_memory("Phone-4GB")[0] == PROFILES["phone-4gb"]
    with pytest.raises(PocketError, match="phone-4gb"):
        parse_memory("a phone")


def test_kv_cache_is_llama_cpps():
    # SmolLM2-135M at 4096: llama.cpp's log says "KV buffer size = 90.00 MiB" (30 layers, 3 kv heads of 64, f16)
    assert kv_bytes(Geometry(30, 9, 3, 64, 49152), 4096) == 90 * 2**20


def test_a_context_too_long_for_the_memory_is_refused():
    g = Geometry(30, 9, 3, 64, 49152)
    with pytest.raises(PocketError, match="leaves no room for the weights at --ctx 65536"):
        file_budget(500 * 10**6, g, 65536)
    assert file_budget(10**9, g, 4096) == 10**9 - runtime_bytes(0, g, 4096)


def test_measured_memory_grows_by_the_kv_cache_and_stays_under_the_prediction(tiny_gguf_f32):
    from pocketlm.models.source import resolve
    from pocketlm.models.tensors import open_tensors

    g = Geometry.of(open_tensors(resolve(tiny_gguf_f32)).facts)
    small, large = measure(tiny_gguf_f32, 256), measure(tiny_gguf_f32, 4096)
    grew = large["peak_bytes"] - small["peak_bytes"]
    kv = kv_bytes(g, 4096) - kv_bytes(g, 256)
    scores = compute_bytes(g, 4096) - compute_bytes(g, 256)  # attention scores over the longer context
    assert kv + scores / 2 <= grew <= kv + scores + 4 * 2**20, (grew, kv, scores)
    for m in (small, large):
        assert m["peak_bytes"] <= runtime_bytes(m["file_bytes"], g, m["ctx"]), m  # the prediction is conservative


def test_quantize_to_a_memory_budget_checks_it(tiny_hf, tmp_path):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(cli, ["quantize", str(tiny_hf), "-o", str(out), "--target-memory", "150MB", "--ctx", "512",
                                 "--method", "rtn", "--quiet"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("memory:"))
    measured = float(line.split()[1])
    assert line.endswith("fits") and 0 < measured <= 150, line
    r = CliRunner().invoke(cli, ["quantize", str(tiny_hf), "-o", str(out), "--target-memory", "1GB", "--target-size",
                                 "1MB", "--force"])
    assert r.exit_code == 1 and "one budget" in r.stderr and "not both" in r.stderr
    r = CliRunner().invoke(cli, ["plan", str(tiny_hf), "--target-memory", "a lot", "--json"])
    assert r.exit_code == 1 and "device profile" in r.stderr
    r = CliRunner().invoke(cli, ["plan", str(tiny_hf), "--target-memory", "60MB", "--ctx", "100000", "--json"])
    assert r.exit_code == 1 and "leaves no room for the weights" in r.stderr
    r = CliRunner().invoke(cli, ["plan", str(tiny_hf), "--target-memory", "150MB", "--ctx", "512", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)

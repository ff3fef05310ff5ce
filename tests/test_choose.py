"""Choosing a student shape and its bits for a budget below the quantization floor
(distill/choose.py): sizes that real files have, finalists that span the trade, the pilots'
verdict, and `plan`'s table."""
import json

import pytest
from click.testing import CliRunner
from conftest import make_tiny_llama

from pocketlm.cli import cli
from pocketlm.distill.choose import LEVELS, Candidate, candidates, choose, finalists, student_candidates
from pocketlm.distill.shapes import TeacherDims
from pocketlm.errors import PocketError

SMOLLM2 = TeacherDims(30, 576, 9, 3, 64, 1536, 49152, True)
HEADER = 1_800_000  # SmolLM2's GGUF header and tokenizer, about


def test_the_smallest_file_of_a_candidate_is_the_file_quantize_writes(tmp_path):
    from pocketlm.compress.student import teacher_facts
    from pocketlm.distill.run import DistillOptions, distill
    from pocketlm.models.source import resolve
    from pocketlm.models.tensors import open_tensors
    from pocketlm.quantize.budget import candidates as types_for_row
    from pocketlm.quantize.pipeline import QuantizeOptions, quantize_model
    from pocketlm.quantize.plan import tensor_bytes

    teacher = make_tiny_llama(tmp_path / "t", hidden=512, heads=8, kv_heads=2, ffn=768, layers=3)
    t, overhead = teacher_facts(resolve(teacher))
    c = next(c for c in candidates(t, 10**9, overhead) if (c.layers, c.hidden, c.ffn) == (2, 512, 512))
    text = tmp_path / "text.txt"
    text.write_text("the mill grinds wheat by the river every tuesday. " * 200)
    distill(teacher, tmp_path / "s", DistillOptions(data=[text], tokens=0, seq=64, progress=False,
                                                    **c.shape_options()))  # tokens 0: prune only
    ts = open_tensors(resolve(tmp_path / "s"))
    types = {n: min(types_for_row(ts.shape(n)[-1], 99.0), key=lambda ty: tensor_bytes(ty, ts.shape(n)))
             for n in ts.names if len(ts.shape(n)) == 2}
    quantize_model(str(tmp_path / "s"), tmp_path / "s.gguf", QuantizeOptions(types=types, method="rtn", progress=False))
    size = (tmp_path / "s.gguf").stat().st_size
    # the predicted size pads every tensor to 32 bytes and counts the teacher's metadata: exact to
    # that padding and a few hundred bytes of names
    assert c.smallest - 32 * len(ts.names) - 512 <= size <= c.smallest, (size, c.smallest)
    assert c.bpw == pytest.approx(8 * (10**9 - (c.smallest - sum(tensor_bytes(types[n], ts.shape(n)) for n in types)))
                                  / c.matrix_params)


def test_smollm2_at_60mb_weighs_512_wide_rows_against_the_teachers_own():
    cands, finals = student_candidates(SMOLLM2, HEADER, 60_000_000)
    assert all(c.smallest <= 60_000_000 for c in cands)
    by_level, whole = finals[:len(LEVELS)], finals[len(LEVELS):]
    # the arithmetic: 512-wide rows take k-quants, so at 60 MB the largest finalist keeps
    # every layer, and none of the bit levels' drops more than two
    assert all(c.hidden == 512 and c.layers >= 28 for c in by_level) and by_level[0].layers == 30
    assert [c.bpw for c in by_level] == sorted(c.bpw for c in by_level)  # more bits ...
    assert [c.non_embedding for c in by_level] == sorted((c.non_embedding for c in by_level), reverse=True)  # ... fewer parameters
    for level, c in zip(LEVELS, by_level):
        assert c.bpw >= level and not any(o.bpw >= level and o.non_embedding > c.non_embedding for o in cands)
    # and the largest that keeps the teacher's 576-wide rows and 9 heads, which neither level
    # picks: it affords fewer bits than the 4.5-bit one and has fewer parameters than the other
    assert [c.label for c in whole] == ["L26-h576-a9x3-f1280"]
    assert LEVELS[0] <= whole[0].bpw < LEVELS[1] and whole[0].non_embedding < by_level[0].non_embedding
    assert not any(c.hidden == 576 and c.non_embedding > whole[0].non_embedding for c in cands)
    # the teacher's own 576-wide rows take only the legacy types: with its whole MLP, 22 layers fit
    assert max(c.layers for c in cands if c.hidden == 576 and c.ffn == 1536) == 22


def test_a_budget_no_student_fits_is_refused_with_the_smallest():
    with pytest.raises(PocketError, match=r"cannot hold even the smallest student .* MB file at its smallest types"):
        student_candidates(SMOLLM2, HEADER, 12_000_000)


def _cand(params, bpw):
    return Candidate(30, 512, 8, 8, params, params, params, 1, bpw)  # ffn = params: labels differ


def test_finalists_and_the_pilots_verdict():
    a, b, c = _cand(100, 3.6), _cand(80, 4.6), _cand(60, 5.6)
    assert finalists([c, a, b, _cand(90, 3.0)]) == [a, b]  # the largest at each of 3.5 and 4.5 bits
    wide, wider = Candidate(26, 576, 9, 3, 1280, 70, 70, 1, 4.2), Candidate(20, 576, 9, 3, 1536, 65, 65, 1, 4.4)
    assert finalists([c, a, wider, b, wide], keep=(576, 9)) == [a, b, wide]  # and the largest keeping the width
    assert finalists([c, a, b], keep=(512, 8)) == [a, b]  # already a finalist: not piloted twice
    scores = {a.non_embedding: (0.9, 0.30), b.non_embedding: (0.95, 0.10), c.non_embedding: (1.2, 0.05)}
    bests = []

    def pilot(x, best):
        bests.append(best)  # the best score so far: a finalist whose healing alone is worse need not be quantized
        return dict(zip(("pilot_kld", "quant_kld"), scores[x.non_embedding]))

    result = choose([a, b, c], pilot, say=lambda _line: None)
    assert bests == [None, pytest.approx(1.2), pytest.approx(1.05)]
    assert result["shape"] == b.shape_options() and [p["score"] for p in result["pilots"]] == pytest.approx([1.2, 1.05, 1.25])
    assert result["why"].startswith(b.label) and "1.050" in result["why"] and "1.250" in result["why"]
    assert finalists([_cand(10, 2.9)]) == [_cand(10, 2.9)]  # none reaches a level: the one with most bits


def test_plan_below_the_floor_lists_the_students(tiny_hf, tmp_path):
    r = CliRunner().invoke(cli, ["plan", str(tiny_hf), "--target-size", "0.2MB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["budget"] == 200_000 and d["smallest_quantized"] > 200_000 and d["finalists"]
    assert all(c["smallest"] <= 200_000 for c in d["candidates"])
    assert {c["label"] for c in d["candidates"]} >= set(d["finalists"])
    table = CliRunner().invoke(cli, ["plan", str(tiny_hf), "--target-size", "0.2MB"])
    assert table.exit_code == 0 and "student shapes fit 0.2 MB" in table.output and "✓" in table.output
    r = CliRunner().invoke(cli, ["plan", str(tiny_hf), "--target-size", "1KB"])
    assert r.exit_code == 1 and "cannot hold even the smallest student" in r.stderr

"""Evaluation numbers against hand computations, the reference cache, and path agreement."""
import json

import numpy as np
import pytest
import torch

from pocketlm.eval import runner
from pocketlm.eval.runner import EvalOptions, evaluate
from pocketlm.models import load


def hand_perplexity(folder, text_path, ctx, max_tokens=None):
    """PPL the slow obvious way: torch, fp64 softmax, non-overlapping windows, no BOS."""
    lm = load(folder)
    ids = lm.tokenizer(text_path.read_text(), add_special_tokens=False).input_ids
    if max_tokens:
        ids = ids[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids) - ctx + 1, ctx):
        window = torch.tensor([ids[start:start + ctx]])
        with torch.inference_mode():
            logp = torch.log_softmax(lm.model(window).logits[0].double(), -1)
        total -= logp[:-1].gather(1, window[0, 1:, None]).sum().item()
        count += ctx - 1
    return float(np.exp(total / count)), count


def test_torch_path_matches_hand_computation(tiny_hf, sample_text):
    res = evaluate(str(tiny_hf), EvalOptions(texts=[sample_text], ctx=64, progress=False))
    ppl, count = hand_perplexity(tiny_hf, sample_text, 64)
    assert res["tokens"] == count
    assert res["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert res["backend"] == "torch float32" and res["bos"] is False


def test_gguf_and_torch_paths_agree(tiny_hf, tiny_gguf_f32, sample_text):
    opts = EvalOptions(texts=[sample_text], ctx=64, progress=False)
    a, b = evaluate(str(tiny_hf), opts), evaluate(str(tiny_gguf_f32), opts)
    assert b["backend"] == "llama.cpp" and a["tokens"] == b["tokens"]
    assert abs(a["ppl"] / b["ppl"] - 1) < 0.005
    # the GGUF through transformers (what a GPU machine without llama.cpp uses) is the HF model exactly
    c = evaluate(str(tiny_gguf_f32), EvalOptions(texts=[sample_text], ctx=64, progress=False, backend="torch"))
    assert c["backend"] == "torch float32" and c["ppl"] == pytest.approx(a["ppl"], rel=1e-5)


def test_self_reference_is_zero_kld(tiny_gguf_f32, sample_text):
    res = evaluate(str(tiny_gguf_f32), EvalOptions(texts=[sample_text], ctx=64, reference=str(tiny_gguf_f32), progress=False))
    assert res["kld_mean"] < 1e-6 and res["top1"] == 1.0
    assert res["reference_ppl"] == pytest.approx(res["ppl"], rel=1e-6)


def test_kld_against_torch_reference_by_hand(tiny_hf, tmp_path, sample_text):
    from pocketlm.models.export_gguf import export_gguf
    from pocketlm.models.export_hf import save_hf

    noisy = load(tiny_hf)  # a perturbed copy: KLD large enough that float noise cannot hide it
    torch.manual_seed(1)
    with torch.no_grad():
        for p in noisy.model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.05 * p.std())
    f16 = export_gguf(save_hf(noisy, tmp_path / "noisy"), tmp_path / "f16.gguf", "f16")
    res = evaluate(str(f16), EvalOptions(texts=[sample_text], ctx=64, reference=str(tiny_hf), progress=False))
    # hand: full-vocabulary KL between torch fp32 and llama.cpp f16 over the same windows
    from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

    lm, rt = load(tiny_hf), LlamaCppModel(f16, n_ctx=512, logits_all=True)
    ids = rt.tokenize(sample_text.read_text())
    kls, agree = [], []
    for start in range(0, len(ids) - 63, 64):
        w = ids[start:start + 64]
        with torch.inference_mode():
            p = torch.log_softmax(lm.model(torch.tensor([w])).logits[0, :-1].double(), -1)
        q = torch.log_softmax(torch.from_numpy(rt.logits(w)[:-1]).double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
        agree.append(p.argmax(-1) == q.argmax(-1))
    kl, top1 = torch.cat(kls), torch.cat(agree).double().mean().item()
    assert res["kld_mean"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert res["kld_p99"] == pytest.approx(np.percentile(kl.numpy(), 99), rel=0.05)
    assert res["top1"] == pytest.approx(top1, abs=1e-9)
    assert 0.001 < res["kld_mean"] < 0.5


def test_reference_pass_is_cached(tiny_gguf_f32, tiny_hf, sample_text, monkeypatch, tmp_path):
    calls = []
    real = runner._compute_reference
    monkeypatch.setattr(runner, "_compute_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    opts = EvalOptions(texts=[sample_text], ctx=64, reference=str(tiny_hf), progress=False)
    first = evaluate(str(tiny_gguf_f32), opts)
    copy = tmp_path / "renamed-copy"  # same bytes under another name: still a cache hit
    import shutil

    shutil.copytree(tiny_hf, copy)
    second = evaluate(str(tiny_gguf_f32), EvalOptions(texts=[sample_text], ctx=64, reference=str(copy), progress=False))
    assert len(calls) == 1
    assert second["kld_mean"] == first["kld_mean"]
    evaluate(str(tiny_gguf_f32), EvalOptions(texts=[sample_text], ctx=32, reference=str(tiny_hf), progress=False))
    assert len(calls) == 2  # other windows: another entry



def test_reference_from_other_code_is_replaced_not_kept(tiny_gguf_f32, tiny_hf, sample_text, monkeypatch):
    """An entry keyed by older code can never be read again: the new one takes its place on
    disk (each is the whole vocabulary per token, 4 GB for the default model's bench), while
    the entry for other windows of the same model stays."""
    from pocketlm.eval import reference
    from pocketlm.util.cache import cache_dir

    def run(ctx):
        evaluate(str(tiny_gguf_f32), EvalOptions(texts=[sample_text], ctx=ctx, reference=str(tiny_hf), progress=False))
        return sorted(p.name for p in (cache_dir() / "reference").iterdir())

    legacy = cache_dir() / "reference" / ("0" * 32)  # the key before it named its code
    legacy.mkdir(parents=True)
    first = run(64)
    assert not legacy.exists()
    both = run(32)
    assert len(first) == 1 and len(both) == 2 and first[0] in both
    monkeypatch.setattr(reference, "code_version", lambda *parts: "0123456789abcdef")
    after = run(64)
    assert len(after) == 2 and first[0] not in after
    assert [n for n in after if n.endswith("-0123456789abcdef")] == [first[0].split("-")[0] + "-0123456789abcdef"]


def test_mmlu_scoring_by_hand(tiny_gguf_f32, tmp_path):
    from pocketlm.eval.mmlu import LETTERS, letter_ids, prompt_for
    from pocketlm.runtime.llama_cpp_backend import LlamaCppModel

    rows = [{"question": f"What is {i} plus {i}?", "answer_a": str(2 * i), "answer_b": "7", "answer_c": "the river",
             "answer_d": "1887", "correct_answer": "ABCD"[i % 4], "topic": ["math", "history"][i % 2]} for i in range(8)]
    rows.insert(0, {"question": "question", "correct_answer": "answer", "topic": "topic"})  # stray header row
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    res = evaluate(str(tiny_gguf_f32), EvalOptions(mmlu=str(path), progress=False))
    rt = LlamaCppModel(tiny_gguf_f32, n_ctx=1024, logits_all=True)
    ids = letter_ids(rt)
    correct = sum(LETTERS[int(np.argmax(rt.logits(rt.tokenize(prompt_for(r)))[-1][ids]))] == r["correct_answer"]
                  for r in rows[1:])
    assert res["mmlu_n"] == 8 and res["mmlu_acc"] == pytest.approx(correct / 8)


def test_mmlu_stratification(tmp_path):
    from pocketlm.eval.mmlu import load_questions

    rows = [{"question": f"q{i}", "correct_answer": "A", "topic": t} for t in ("b", "a", "c") for i in range(5)]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    picked = load_questions(path, 7)
    assert [q["topic"] for q in picked] == ["a", "b", "c", "a", "b", "c", "a"]
    assert [q["question"] for q in picked[:3]] == ["q0", "q0", "q0"]


def test_speed_in_child_process(tiny_gguf_f32):
    res = evaluate(str(tiny_gguf_f32), EvalOptions(speed=True, progress=False))
    # a fresh child holding a 3 MB model: far below the evaluating process (torch, logits buffers)
    assert res["prefill_tps"] > 0 and res["decode_tps"] > 0 and 10 < res["peak_rss_mb"] < 500
    assert res["size_bytes"] == tiny_gguf_f32.stat().st_size and res["bpw"] == pytest.approx(32, rel=0.01)

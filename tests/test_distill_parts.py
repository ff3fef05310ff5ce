"""Distillation building blocks: losses, shapes, importance, pruning, teacher cache."""
import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from pocketlm.distill.importance import measure
from pocketlm.distill.loss_spec import check_targets, resolve_ce_weight
from pocketlm.distill.losses import bucket_logprobs, distill_loss, divergence, parse_loss, tail_sample_term
from pocketlm.distill.prune import prune
from pocketlm.distill.shapes import StudentShape, TeacherDims, default_shape, non_embedding_params, predicted_sizes, validate
from pocketlm.distill.signals import Full, OnlineTeacher, Sampled, TopK, choose
from pocketlm.distill.teacher_cache import teacher_targets
from pocketlm.errors import PocketError
from pocketlm.eval.metrics import kld as reference_kld
from pocketlm.models import load

SMOLLM2 = TeacherDims(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=49152, tied=True)


def _teacher_topk(t_logits, k):
    logp = torch.log_softmax(t_logits, -1)
    values, idx = torch.topk(logp, k, -1)
    tail = torch.log1p(-values.exp().sum(-1).clamp(max=1.0))
    return idx, values, tail


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd", "jsd"])
def test_folded_divergence_is_a_lower_bound_and_exact_with_full_vocab(name):
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(3, 7, 50) * 2, torch.randn(3, 7, 50) * 2
    full_t, full_s = bucket_logprobs(s_logits, *_teacher_topk(t_logits, 50))
    full = divergence(name, full_t, full_s[..., :], 0.5)
    if name == "fkl":  # every token its own bucket: the folded KL is the plain KL
        exact = torch.as_tensor(reference_kld(torch.log_softmax(t_logits, -1).numpy(), torch.log_softmax(s_logits, -1).numpy()))
        assert torch.allclose(full, exact.reshape(full.shape).float(), atol=1e-4)
    t8, s8 = bucket_logprobs(s_logits, *_teacher_topk(t_logits, 8))
    folded = divergence(name, t8, s8, 0.5)
    assert (folded <= full + 1e-5).all() and (folded > 0).all()
    same_t, same_s = bucket_logprobs(t_logits, *_teacher_topk(t_logits, 8))
    assert divergence(name, same_t, same_s, 0.5).abs().max() < 1e-4


def test_tail_sample_gives_the_full_vocabulary_kl_gradient_in_expectation():
    # Averaged over next tokens drawn from the teacher, bucketed fkl + the tail term differs from the
    # full-vocabulary KL only by a constant (the teacher's entropy inside its tail), so it trains the
    # student exactly as full KL would, while the bucket alone leaves the tail's shape untrained.
    torch.manual_seed(0)
    vocab, k = 40, 6
    t_logits = torch.randn(1, 1, vocab) * 2
    p = torch.softmax(t_logits, -1)[0, 0]
    idx, values, tail = _teacher_topk(t_logits, k)

    def expected(student):
        s_full = torch.log_softmax(student, -1)
        t_b, s_b = bucket_logprobs(student, idx, values, tail)
        bucket = divergence("fkl", t_b, s_b)[0, 0]
        terms = torch.stack([tail_sample_term(s_full, s_b, torch.tensor([[y]]), idx)[0, 0] for y in range(vocab)])
        return bucket + (p * terms).sum(), bucket

    s = (torch.randn(1, 1, vocab) * 2).requires_grad_()
    full = (p * (torch.log(p) - torch.log_softmax(s, -1)[0, 0])).sum()
    g_full, = torch.autograd.grad(full, s)
    est, bucket = expected(s)
    g_est, = torch.autograd.grad(est, s, retain_graph=True)
    g_bucket, = torch.autograd.grad(bucket, s)
    assert torch.allclose(g_est, g_full, atol=1e-5)
    assert not torch.allclose(g_bucket, g_full, atol=1e-3)
    tail_p = p[~torch.isin(torch.arange(vocab), idx[0, 0])]
    tail_entropy = -(tail_p * torch.log(tail_p / tail_p.sum())).sum()
    assert torch.allclose(est, full + tail_entropy, atol=1e-5)
    with pytest.raises(PocketError):
        distill_loss("rkl", None, s, torch.zeros(1, 1, dtype=torch.long), TopK(idx, values, tail), tail="sample")


def test_losses_train_towards_the_teacher():
    torch.manual_seed(0)
    t_logits = torch.randn(2, 5, 40) * 3
    teacher = TopK(*_teacher_topk(t_logits, 6))
    targets = t_logits.argmax(-1)
    for spec in ("fkl", "fkl+sample", "rkl", "jsd:0.3", "tvd", "ce"):
        name, beta = parse_loss(spec.split("+")[0])
        tail = "sample" if spec.endswith("+sample") else "bucket"
        s = torch.zeros(2, 5, 40, requires_grad=True)
        opt = torch.optim.Adam([s], lr=0.1)
        first = None
        for _ in range(60):
            loss = distill_loss(name, beta, s, targets, teacher, tail)
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.5 * first, spec


def test_parse_loss_rejects_bad_specs():
    for bad in ("kl", "jsd:1.5", "jsd:x", "fkl:0.2"):
        with pytest.raises(PocketError):
            parse_loss(bad)
    assert parse_loss("jsd") == ("jsd", 0.5)


def test_default_student_of_smollm2_is_aligned_and_about_half():
    shape = default_shape(SMOLLM2, list(range(30)))
    assert shape.hidden % 256 == 0 and (shape.heads * 64) % 256 == 0 and shape.ffn % 256 == 0
    ratio = non_embedding_params(SMOLLM2, len(shape.keep_layers), shape.hidden, shape.heads, shape.kv_heads, shape.ffn) / \
        non_embedding_params(SMOLLM2, 30, 576, 9, 3, 1536)
    assert 0.4 < ratio <= 0.5
    sizes = predicted_sizes(SMOLLM2, shape)
    assert sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["F16"]
    validate(SMOLLM2, shape)


def test_impossible_shapes_are_refused():
    keep = tuple(range(30))
    for shape, words in ((StudentShape(keep, 640, 8, 8, 1024), "--hidden"),
                         (StudentShape(keep, 512, 8, 3, 1024), "whole groups"),
                         (StudentShape(keep, 512, 8, 2, 1024), "whole groups"),
                         (StudentShape((0, 30), 512, 8, 8, 1024), "layer indices")):
        with pytest.raises(PocketError, match=words):
            validate(SMOLLM2, shape)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load(make_tiny_llama(tmp_path_factory.mktemp("t") / "t", hidden=256, heads=4, kv_heads=2, ffn=512, layers=3))


def test_keeping_whole_kv_groups_is_exact(teacher):
    student = prune(teacher, StudentShape((0, 1, 2), 256, 4, 2, 512))
    assert student.model.config.num_key_value_heads == 2
    ids = torch.arange(3, 50)[None]
    with torch.inference_mode():
        assert torch.allclose(teacher.model(ids).logits, student.model(ids).logits, atol=1e-5)


def test_a_layer_that_does_nothing_is_ranked_last_and_dropped(tmp_path):
    loaded = load(make_tiny_llama(tmp_path / "m", hidden=256, heads=4, kv_heads=2, ffn=512, layers=3, seed=1))
    with torch.no_grad():  # block 1 adds nothing to the residual stream: output == input
        loaded.model.model.layers[1].self_attn.o_proj.weight.zero_()
        loaded.model.model.layers[1].mlp.down_proj.weight.zero_()
    seqs = torch.randint(2, 300, (4, 32))
    imp = measure(loaded.model, seqs, progress=False)
    assert imp.layer_order()[-1] == 1 and imp.layer[1] < 1e-6
    student = prune(loaded, StudentShape(tuple(sorted(imp.layer_order()[:2])), 256, 4, 2, 512), imp)
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        assert torch.allclose(loaded.model(ids).logits, student.model(ids).logits, atol=1e-4)


def test_teacher_cache_matches_the_model_and_resumes(teacher, tmp_path):
    seqs = torch.randint(2, 300, (5, 24))
    targets = teacher_targets(teacher.model, seqs, 8, "tiny", batch=2, progress=False, bf16=False)
    with torch.inference_mode():
        logp = torch.log_softmax(teacher.model(seqs).logits[:, :-1], -1)
    values, idx = torch.topk(logp, 8, -1)
    assert np.array_equal(targets.idx.astype(np.int64), idx.numpy())
    assert np.allclose(targets.logp.astype(np.float32), values.numpy(), atol=2e-3)
    assert np.allclose(np.exp(targets.tail), 1 - values.exp().sum(-1).numpy(), atol=1e-4)

    class Exploding(torch.nn.Module):  # a second call must read the cache, not run the model
        config = teacher.model.config

        def forward(self, **_):
            raise AssertionError("teacher ran again")

    again = teacher_targets(Exploding(), seqs, 8, "tiny", progress=False, bf16=False)
    assert np.array_equal(again.idx, targets.idx)


def test_full_and_sampled_signals_give_forward_kl_and_its_gradient():
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(2, 3, 30) * 2, (torch.randn(2, 3, 30) * 2).requires_grad_()
    t_logp = torch.log_softmax(t_logits, -1)
    exact = torch.as_tensor(reference_kld(t_logp.numpy(), torch.log_softmax(s_logits, -1).detach().numpy())).mean()
    full = distill_loss("fkl", None, s_logits, t_logits.argmax(-1), Full(t_logp))
    assert torch.allclose(full, exact.float(), atol=1e-5)
    g_full, = torch.autograd.grad(full, s_logits)
    # many draws per position: the estimate and its gradient converge to the exact ones (unbiased)
    draws = torch.multinomial(t_logp.exp().reshape(-1, 30), 40000, replacement=True,
                              generator=torch.Generator().manual_seed(1)).reshape(2, 3, -1)
    sampled = distill_loss("fkl", None, s_logits, t_logits.argmax(-1), Sampled(draws, torch.gather(t_logp, -1, draws)))
    g_sampled, = torch.autograd.grad(sampled, s_logits)
    assert abs(sampled.item() - full.item()) < 0.03 * full.item()
    assert torch.allclose(g_sampled, g_full, atol=2e-3)
    # and few draws are not a top-k: each draw counts once, so the estimate is noisy, not biased low
    few = Sampled(draws[..., :12], torch.gather(t_logp, -1, draws[..., :12]))
    assert distill_loss("fkl", None, s_logits, t_logits.argmax(-1), few).item() != pytest.approx(full.item(), abs=1e-6)
    with pytest.raises(PocketError, match="forward KL only"):
        distill_loss("rkl", None, s_logits, t_logits.argmax(-1), few)


def test_target_rules_are_checked_without_torch_work():
    check_targets("fkl", "bucket", "sampled")
    check_targets("ce", "bucket", "sampled")
    for args, words in ((("rkl", "bucket", "sampled"), "forward KL only"), (("fkl", "sample", "full"), "--targets topk"),
                        (("fkl", "bucket", "all"), "unknown --targets")):
        with pytest.raises(PocketError, match=words):
            check_targets(*args)
    assert choose("auto", 135_000_000) == "full" and choose("auto", 8_000_000_000) == "sampled"
    assert choose("topk", 135_000_000) == "topk"


def test_sampled_cache_draws_from_the_teacher_and_is_seeded(teacher, tmp_path, monkeypatch):
    seqs = torch.randint(2, 300, (3, 40))
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "a"))
    a = teacher_targets(teacher.model, seqs, 64, "tiny", batch=2, progress=False, bf16=False, form="sampled", seed=5)
    with torch.inference_mode():
        logp = torch.log_softmax(teacher.model(seqs).logits[:, :-1], -1)
    assert a.idx.shape == (3, 39, 64)
    assert np.allclose(a.logp.astype(np.float32), torch.gather(logp, -1, torch.from_numpy(a.idx.astype(np.int64))).numpy(),
                       rtol=1e-3, atol=1e-3)  # float16: 11 significant bits
    # the draws follow the teacher: their mean log-prob is the teacher's negative entropy, up to sampling noise
    neg_entropy = (logp.exp() * logp).sum(-1).mean().item()
    assert abs(a.logp.astype(np.float64).mean() - neg_entropy) < 0.1 * abs(neg_entropy)
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "b"))
    again = teacher_targets(teacher.model, seqs, 64, "tiny", batch=2, progress=False, bf16=False, form="sampled", seed=5)
    other = teacher_targets(teacher.model, seqs, 64, "tiny", batch=2, progress=False, bf16=False, form="sampled", seed=6)
    assert np.array_equal(a.idx, again.idx) and not np.array_equal(a.idx, other.idx)
    batch = again.batch(torch.tensor([2, 0]))
    assert isinstance(batch, Sampled) and torch.equal(batch.idx[1], torch.from_numpy(a.idx[0].astype(np.int64)))


def test_online_teacher_is_the_models_full_distribution(teacher):
    ids = torch.randint(2, 300, (2, 17))
    got = OnlineTeacher(teacher.model).batch(torch.tensor([0, 1]), ids)
    with torch.inference_mode():
        want = torch.log_softmax(teacher.model(ids).logits[:, :-1].float(), -1)
    assert torch.equal(got.logp, want)
    s = torch.zeros(2, 16, got.logp.shape[-1], requires_grad=True)
    distill_loss("fkl", None, s, ids[:, 1:], got).backward()  # usable as a constant in autograd
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_the_bundled_general_text_never_holds_the_held_out_text():
    from conftest import WIKI_HELDOUT

    from pocketlm.data import general_text

    files = general_text()
    assert [p.rsplit("/", 1)[-1] for p in files] == ["c4.txt", "wiki-first80.txt"]
    text = "".join(open(p, encoding="utf-8").read() for p in files)
    assert len(text) > 1_500_000 and text.rstrip().endswith("</doc>")
    held = [line for line in WIKI_HELDOUT.read_text().splitlines() if len(line) > 80]
    assert len(held) > 20 and not any(line in text for line in held)


@pytest.mark.parametrize("signal", ["full", "sampled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
def test_fused_forward_kl_equals_the_tensor_op_loss_and_gradient(signal, dtype, ce_weight):
    """The fused forward KL (+ ce), full or sampled: loss and gradient as autograd computes them
    from log_softmax, over chunk boundaries, on the sliced logits view the trainer passes; the
    teacher's tensors are left as they were."""
    from pocketlm.distill.losses import _kl, sampled_fkl
    from pocketlm.distill.signals import FUSED_ROWS

    torch.manual_seed(0)
    T, V = 2 * FUSED_ROWS + 7, 300
    t_logp = torch.log_softmax(torch.randn(2, T, V) * 3, -1)
    draws = torch.multinomial(t_logp.exp().reshape(-1, V), 12, replacement=True).reshape(2, T, 12)
    teacher = Full(t_logp.clone()) if signal == "full" else Sampled(draws, torch.gather(t_logp, -1, draws).half())
    kept = [t.clone() for t in (teacher.logp, getattr(teacher, "idx", teacher.logp))]
    y = torch.randint(0, V, (2, T))
    raw = (torch.randn(2, T + 1, V) * 3).to(dtype).requires_grad_()
    fused = distill_loss("fkl", None, raw[:, :-1], y, teacher, ce_weight=ce_weight)
    (g_fused,) = torch.autograd.grad(fused, raw)
    ls = torch.log_softmax(raw[:, :-1].float(), -1)
    div = _kl(t_logp, ls) if signal == "full" else sampled_fkl(ls, Sampled(draws, teacher.logp.float()))
    want = (div - ce_weight * ls.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean()
    (g_want,) = torch.autograd.grad(want, raw)
    assert torch.allclose(fused, want, rtol=1e-5, atol=1e-6)
    assert g_fused.dtype == dtype and bool((g_fused[:, -1] == 0).all())
    tol = 1e-6 if dtype == torch.float32 else 1e-2 * float(g_want.abs().max())
    assert float((g_fused.float() - g_want.float()).abs().max()) <= tol
    assert all(torch.equal(a, b) for a, b in zip(kept, (teacher.logp, getattr(teacher, "idx", teacher.logp))))
    with torch.no_grad():  # evaluation: no gradient is made, the value is the same
        assert torch.equal(distill_loss("fkl", None, raw.detach()[:, :-1], y, teacher, ce_weight=ce_weight), fused.detach())


def test_ce_weight_adds_the_datas_cross_entropy_to_a_divergence():
    torch.manual_seed(0)
    t_logp, s = torch.log_softmax(torch.randn(2, 4, 30), -1), torch.randn(2, 4, 30)
    y = torch.randint(0, 30, (2, 4))
    mixed = distill_loss("fkl", None, s, y, Full(t_logp), ce_weight=0.3)
    want = distill_loss("fkl", None, s, y, Full(t_logp)) + 0.3 * distill_loss("ce", None, s, y, None)
    assert torch.allclose(mixed, want) and not torch.allclose(mixed, distill_loss("fkl", None, s, y, Full(t_logp)))
    for loss, weight in (("ce", 0.2), ("fkl", -1.0)):
        with pytest.raises(PocketError, match="--ce-weight"):
            check_targets(loss, "bucket", "full", weight)
    # not given: 1 with fkl (what measured best), 0 with the rest; given, even as 0, it is kept
    assert resolve_ce_weight("fkl", None) == 1.0 and resolve_ce_weight("fkl", 0.0) == 0.0
    assert resolve_ce_weight("rkl", None) == resolve_ce_weight("ce", None) == 0.0


def test_hidden_loss_is_the_cosine_distance_on_the_kept_channels(teacher):
    from pocketlm.distill.losses import hidden_loss

    h = torch.randn(2, 5, 8)
    assert hidden_loss(h, Full(torch.zeros(2, 5, 3), 3.0 * h)).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    flipped = torch.cat([h[..., :4], -h[..., 4:]], dim=-1)
    expected = 1 - torch.nn.functional.cosine_similarity(h, flipped, dim=-1).mean()
    assert hidden_loss(h, Full(torch.zeros(2, 5, 3), flipped)).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(PocketError, match="targets full"):
        hidden_loss(h, Full(torch.zeros(2, 5, 3)))
    channels = torch.tensor([3, 17, 200])
    ids = torch.arange(3, 40)[None]
    full = OnlineTeacher(teacher.model, channels).batch(torch.tensor([0]), ids)
    with torch.inference_mode():
        ref = teacher.model(ids, output_hidden_states=True).hidden_states[-1][:, :-1, channels]
    assert torch.equal(full.hidden, ref.float())
    with pytest.raises(PocketError, match="--hidden-weight 1.0: .* needs --targets full"):
        check_targets("fkl", "bucket", "sampled", 0.0, 1.0)
    check_targets("fkl", "bucket", "auto", 0.0, 1.0)  # auto becomes full for a small teacher


def test_a_token_budget_takes_windows_from_every_document(teacher, tmp_path):
    """--tokens below the data's size samples all documents, not the first file alone (the bundled
    text's c4.txt sorts before its Wikipedia), and never reaches into the held-out windows."""
    from pocketlm.distill.data import load_sequences

    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 400)
    (tmp_path / "b.txt").write_text("a dog ran in the park! " * 400)
    tok = teacher.tokenizer
    a_ids = set(tok("the cat sat on the mat.", add_special_tokens=False).input_ids)
    b_ids = set(tok("a dog ran in the park!", add_special_tokens=False).input_ids)
    every = load_sequences(tok, [str(tmp_path)], 32, teacher.add_bos)
    some = load_sequences(tok, [str(tmp_path)], 32, teacher.add_bos, max_train_tokens=4 * 31)
    assert len(some.train) == 4 and len(every.train) > 20
    seen = set(some.train.flatten().tolist())
    assert seen & (a_ids - b_ids) and seen & (b_ids - a_ids)
    assert torch.equal(some.held_out, every.held_out)
    rows = {tuple(r) for r in every.train.tolist()}
    assert all(tuple(r) in rows for r in some.train.tolist())

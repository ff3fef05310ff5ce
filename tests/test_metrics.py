import numpy as np
import pytest

from pocketlm.errors import PocketError
from pocketlm.eval import metrics
from pocketlm.eval.windows import make_windows


def test_log_softmax_and_nll_by_hand():
    logits = np.array([[0.0, np.log(3.0)]], dtype=np.float32)  # probabilities 1/4, 3/4
    logp = metrics.log_softmax(logits)
    assert np.allclose(np.exp(logp), [[0.25, 0.75]], atol=1e-6)
    assert metrics.nll(logp, np.array([0]))[0] == pytest.approx(np.log(4.0), rel=1e-6)


def test_kld_by_hand():
    p = np.log(np.array([[0.5, 0.25, 0.25]]))
    q = np.log(np.array([[0.25, 0.5, 0.25]]))
    expected = 0.5 * np.log(2) + 0.25 * np.log(0.5)
    assert metrics.kld(p, q)[0] == pytest.approx(expected, rel=1e-6)  # float32 by design
    assert metrics.kld(p, p)[0] == 0.0


def test_stored_reference_keeps_kld():
    """uint16 log-prob codes must not move KLD measurably, even at Q8-level divergence."""
    from pocketlm.eval.reference import decode_logp, encode_logp

    rng = np.random.default_rng(0)
    ranks = np.arange(1, 20001)
    ref = metrics.log_softmax((-1.2 * np.log(ranks) + rng.normal(0, 1, (64, ranks.size))).astype(np.float32))
    for noise in (0.01, 0.1):
        cand = metrics.log_softmax((ref + rng.normal(0, noise, ref.shape)).astype(np.float32))
        exact = metrics.kld(ref, cand).mean()
        codes, lo = encode_logp(ref)
        assert codes.dtype == np.uint16
        assert metrics.kld(decode_logp(codes, lo), cand).mean() == pytest.approx(exact, rel=2e-3)


def test_summary_values():
    s = metrics.summarize(np.array([np.log(2.0)] * 4), np.array([0.0, 0.0, 0.0, 1.0]), np.array([1, 1, 0, 1]))
    assert s["ppl"] == pytest.approx(2.0)
    assert s["kld_mean"] == pytest.approx(0.25)
    assert s["top1"] == pytest.approx(0.75)
    assert s["tokens"] == 4


def test_windows_with_and_without_bos():
    toks = list(range(10, 30))
    w = make_windows(toks, ctx=5, bos_id=None)
    assert w.inputs.shape == (4, 5) and w.inputs[1, 0] == 15
    assert w.targets.shape == (4, 4) and w.n_scored == 16
    b = make_windows(toks, ctx=5, bos_id=1)
    assert b.inputs.shape == (5, 5) and (b.inputs[:, 0] == 1).all() and b.inputs[0, 1] == 10
    assert b.targets[0].tolist() == [10, 11, 12, 13]  # every text token is scored
    with pytest.raises(PocketError, match="fewer than one window"):
        make_windows(toks[:3], ctx=5, bos_id=None)

"""Known-answer tests of the harness's quality metrics (pure numpy, no subprocess)."""
import numpy as np
import pytest

from benchmarks import metrics
from benchmarks.plots import pareto_front

V = 50


def _score_stream(logits_fn, tokens, window, stride, k=None, ref=None):
    """Score `tokens` the way the worker does, with `logits_fn(ids) -> [T, V]`."""
    parts, offset = [], 0
    for b, e, first in metrics.ppl_windows(len(tokens), window, stride):
        n = e - first
        r = (ref.topk_idx[offset:offset + n], ref.topk_logp[offset:offset + n]) if ref is not None else None
        parts.append(metrics.score_window(logits_fn(tokens[b:e]), tokens, b, e, first, k, r))
        offset += n
    return metrics.concat_scores(parts)


def test_windows_score_every_target_once_with_overlap():
    wins = metrics.ppl_windows(100, window=32, stride=16)
    targets = [t for _, e, f in wins for t in range(f, e)]
    assert targets == list(range(1, 100))  # every token but the first, once, in order
    assert all(e - b <= 32 for b, e, _ in wins) and wins[-1][1] == 100


def test_windows_without_overlap_skip_each_window_start():
    wins = metrics.ppl_windows(100, window=25, stride=25)
    targets = [t for _, e, f in wins for t in range(f, e)]
    assert len(wins) == 4 and len(targets) == 96
    assert not {0, 25, 50, 75} & set(targets)


def test_perfect_model_has_perplexity_one_and_full_agreement():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, 300)

    parts = []
    for b, e, first in metrics.ppl_windows(len(tokens), 64, 32):
        logits = np.full((e - b, V), -30.0, dtype=np.float32)
        nxt = tokens[b + 1: e]
        logits[np.arange(len(nxt)), nxt] = 30.0
        parts.append(metrics.score_window(logits, tokens, b, e, first, k=5))
    s = metrics.concat_scores(parts)
    assert metrics.perplexity(s.nll) == pytest.approx(1.0, abs=1e-6)
    assert metrics.agreement(s.top1, tokens[1:]) == 1.0  # argmax is the true next token everywhere
    assert metrics.agreement(s.top1, s.top1) == 1.0
    # KL of the model against its own top-k reference is 0
    kl = metrics.topk_kl(s.topk_idx, s.topk_logp, np.stack([np.where(np.arange(V) == t, 30.0, -30.0)
                                                            for t in tokens[1:]]).astype(np.float32))
    assert kl.max() < 1e-6


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    tokens = np.random.default_rng(1).integers(0, V, 200)
    s = _score_stream(lambda ids: np.zeros((len(ids), V), np.float32), tokens, 50, 50)
    assert metrics.perplexity(s.nll) == pytest.approx(V, rel=1e-6)


def test_topk_kl_is_exact_with_full_vocab_and_a_lower_bound_otherwise():
    rng = np.random.default_rng(2)
    p_logits, q_logits = rng.normal(size=(40, V)) * 2, rng.normal(size=(40, V)) * 2
    logp, logq = metrics.log_softmax(p_logits).astype(np.float64), metrics.log_softmax(q_logits).astype(np.float64)
    full = (np.exp(logp) * (logp - logq)).sum(-1)
    idx, lp = metrics.top_k(p_logits, V)
    assert np.allclose(metrics.topk_kl(idx, lp, q_logits), full, atol=1e-5)
    idx, lp = metrics.top_k(p_logits, 5)
    approx = metrics.topk_kl(idx, lp, q_logits)
    assert np.all(approx <= full + 1e-6) and approx.mean() > 0.2 * full.mean()
    assert np.all(np.diff(lp, axis=-1) <= 0)  # most likely first


def test_accuracy_and_macro_f1_known_values():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    acc, f1 = metrics.accuracy_f1(pred, labels, 3)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert acc == pytest.approx(4 / 6)
    assert f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics.accuracy_f1(labels, labels, 3) == (1.0, 1.0)
    assert metrics.agreement(pred, labels) == pytest.approx(4 / 6)


def test_embedding_cosine_and_neighbours():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(10, 8))
    assert np.allclose(metrics.cosine(emb, 3 * emb), 1.0)
    assert np.allclose(metrics.cosine(emb, -emb), -1.0)
    nn = metrics.nearest_neighbours(emb)
    assert np.all(nn != np.arange(10))
    assert metrics.agreement(nn, metrics.nearest_neighbours(emb * 2)) == 1.0
    hidden = np.stack([np.ones((4, 3)), 2 * np.ones((4, 3))])
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    assert np.allclose(metrics.mean_pool(hidden, mask), [[1, 1, 1], [2, 2, 2]])


def test_pareto_front():
    # (cost, perplexity): lower is better on both
    pts = [(1.0, 30.0), (2.0, 20.0), (3.0, 25.0), (0.5, 40.0), (2.0, 21.0)]
    assert pareto_front(pts, higher_is_better=False) == [3, 0, 1]
    assert pareto_front([(1.0, 0.9), (2.0, 0.8)], higher_is_better=True) == [0]

"""The sampled-targets logits loss (pipeline/losses/sampled.py): an unbiased estimate of the full-vocabulary
KL gradient, checked against the dense fp64 gradient over many sampling seeds; its power to detect the bias
of dropped importance weights and of top-k targets; the chunked path against the dense one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.head import HeadSpec
from pipeline.losses.chunked import VocabTerms, chunked_head_loss
from pipeline.losses.logits import logits_loss
from pipeline.losses.sampled import check_sampled_divergence, sampled_logits_loss
from pipeline.targets import SampledTargets
from pipeline.teacher.sampling import draw

V, K, SEEDS = 1000, 32, 2000
Z_MAX = 5.0  # |mean - dense| / standard error, per gradient component (a normal exceeds 5 w.p. 6e-7)
MIN_EXPECTED_DRAWS = 30  # ids drawn fewer times over all seeds are judged pooled (their mean is far from normal)


def _problem():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(V, generator=g, dtype=torch.float64) * 2.0  # [V] raw teacher logits
    student = torch.randn(V, generator=g, dtype=torch.float64) * 1.5  # [V] raw student logits
    return teacher, student


def _dense_gradient(teacher, student, T):
    """d/ds of T^2 KL(p_T || softmax(s / T)), fp64 from the definition."""
    s = student.clone().requires_grad_(True)
    p = torch.softmax(teacher / T, -1)
    (T * T * (p * (p.log() - torch.log_softmax(s / T, -1))).sum()).backward()
    return s.grad


def _per_seed_gradients(teacher, student, T, Tp, weights=True):
    """[SEEDS, V]: each seed's estimator gradient (the cache's draw, the training loss), fp32 as in training."""
    z = teacher.float().expand(SEEDS, V).contiguous()  # the same teacher position under every seed
    uniforms = torch.from_numpy(np.stack([np.random.default_rng([7, i]).random(K, dtype=np.float32)
                                          for i in range(SEEDS)]))
    ids, counts, logits = draw(z, uniforms, Tp)
    assert (counts.sum(-1) == K).all()
    lse = torch.logsumexp(z / T, -1)
    lse_p = torch.logsumexp(z / Tp, -1)
    s = student.float().expand(SEEDS, V).clone().requires_grad_(True)
    mask = torch.ones(SEEDS, dtype=torch.bool)
    # weights=False: the same draws read as if they came from p_T (no importance weights) -- a biased estimate
    loss = sampled_logits_loss("kl", s, ids, logits, counts, lse, lse if not weights else lse_p, mask, T,
                               Tp if weights else T)
    loss.backward()
    return s.grad.double() * SEEDS  # the loss is the mean over seeds


def _exact(teacher, student, T, Tp):
    """One seed's gradient is grad_i = T a_i . (c / K) with c ~ Multinomial(K, pi) and a_i = q_i r - r_i e_i,
    r = p_T / pi (q the student's softmax at T): returns (A [V, V] with rows a_i, pi [V])."""
    p = torch.softmax(teacher / T, -1)
    pi = torch.softmax(teacher / Tp, -1)
    q = torch.softmax(student / T, -1)
    r = p / pi
    return q[:, None] * r[None, :] - torch.diag(r), pi


def _variance(a, pi, T):
    """Exact variance of T a . (c / K) for rows of a [n, V]: T^2 / K (sum_j pi_j a_j^2 - (sum_j pi_j a_j)^2)."""
    return T * T / K * ((a * a * pi).sum(-1) - (a * pi).sum(-1) ** 2)


def _z_scores(mean, dense, teacher, student, T, Tp):
    """(|z| per gradient component for ids with >= MIN_EXPECTED_DRAWS expected draws over all seeds, |z| of
    the sum of the other components), with the exact standard errors of the mean over SEEDS seeds."""
    a, pi = _exact(teacher, student, T, Tp)
    common = pi * K * SEEDS >= MIN_EXPECTED_DRAWS
    se = (_variance(a, pi, T) / SEEDS).sqrt()
    z = ((mean - dense) / se)[common].abs()
    rare = ~common
    pooled = 0.0
    if rare.any():
        pooled_se = (_variance(a[rare].sum(0, keepdim=True), pi, T)[0] / SEEDS).sqrt()
        pooled = float(((mean - dense)[rare].sum() / pooled_se).abs())
    return z, pooled, int(common.sum())


@pytest.mark.parametrize("T,Tp", [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0), (1.0, 2.0)])
def test_gradient_is_unbiased(T, Tp):
    teacher, student = _problem()
    dense = _dense_gradient(teacher, student, T)
    grads = _per_seed_gradients(teacher, student, T, Tp)
    a, pi = _exact(teacher, student, T, Tp)
    var = _variance(a, pi, T)
    # the empirical spread agrees with the exact variance (the standard errors below are the real ones)
    big = var > var.max() * 1e-2
    ratio = (grads.var(0)[big] / var[big]).median()
    assert 0.9 < ratio < 1.1, ratio
    z, pooled, n_common = _z_scores(grads.mean(0), dense, teacher, student, T, Tp)
    assert n_common > 200  # most of the vocabulary is judged per component
    assert z.max() < Z_MAX, (z.max(), z.argmax())
    assert pooled < Z_MAX


def test_dropped_importance_weights_are_detected():
    """The power check: at T != Tp the same draws without importance weights estimate the gradient toward
    p_Tp, not p_T, and the per-component test flags it by a wide margin."""
    teacher, student = _problem()
    T, Tp = 2.0, 1.0
    dense = _dense_gradient(teacher, student, T)
    grads = _per_seed_gradients(teacher, student, T, Tp, weights=False)
    z, _, _ = _z_scores(grads.mean(0), dense, teacher, student, T, Tp)
    assert z.max() > 4 * Z_MAX


def test_topk_bias_is_detected():
    """Top-k targets (k = 64, tail bucket, exact lse) give a deterministic gradient whose distance to the dense
    one is many standard errors of the sampled estimate: the bias this test would catch."""
    teacher, student = _problem()
    T = 2.0
    dense = _dense_gradient(teacher, student, T)
    vals, ids = teacher.float().topk(64)
    s = student.float()[None].clone().requires_grad_(True)
    lse = torch.logsumexp(teacher.float() / T, -1)[None]
    logits_loss("kl", s, ids[None], vals[None], lse, torch.ones(1, dtype=torch.bool), T, tail="bucket").backward()
    z, _, _ = _z_scores(s.grad[0].double(), dense, teacher, student, T, T)
    assert z.max() > 4 * Z_MAX


def test_loss_value_is_unbiased():
    """The mean over seeds of the loss value estimates T^2 KL(p_T || q_T) (T != Tp)."""
    teacher, student = _problem()
    T, Tp = 2.0, 1.0
    p = torch.softmax(teacher / T, -1)
    exact = float(T * T * (p * (p.log() - torch.log_softmax(student / T, -1))).sum())
    z = teacher.float().expand(SEEDS, V).contiguous()
    uniforms = torch.from_numpy(np.random.default_rng(3).random((SEEDS, K), dtype=np.float32))
    ids, counts, logits = draw(z, uniforms, Tp)
    lse, lse_p = torch.logsumexp(z / T, -1), torch.logsumexp(z / Tp, -1)
    s = student.float().expand(SEEDS, V)
    per_seed = torch.stack([
        sampled_logits_loss("kl", s[i:i + 1], ids[i:i + 1], logits[i:i + 1], counts[i:i + 1], lse[i:i + 1],
                            lse_p[i:i + 1], torch.ones(1, dtype=torch.bool), T, Tp)
        for i in range(0, SEEDS, 4)]).double()
    se = per_seed.std() / len(per_seed) ** 0.5
    assert abs(per_seed.mean() - exact) < Z_MAX * se, (per_seed.mean(), exact, se)


@pytest.mark.parametrize("name,args", [("kl", {}), ("skew_kl", {"lambda": 0.3})])
@pytest.mark.parametrize("T,Tp", [(2.0, 2.0), (2.0, 1.0)])
def test_chunked_equals_dense(name, args, T, Tp):
    """The chunked head loss on sampled targets equals the dense estimate: value and gradients (h, W)."""
    M, D, Vs, Ks = 13, 16, 300, 8
    g = torch.Generator().manual_seed(1)
    h = torch.randn(M, D, generator=g, requires_grad=True)
    w = (torch.randn(Vs, D, generator=g) * 0.5).requires_grad_(True)
    teacher = torch.randn(M, Vs, generator=g) * 3
    ids, counts, logits = draw(teacher, torch.rand(M, Ks, generator=g), Tp)
    lse, lse_p = torch.logsumexp(teacher / T, -1), torch.logsumexp(teacher / Tp, -1)
    terms = VocabTerms(alpha=0.0, beta=0.7, targets=None, divergence=name, args=args, temperature=T,
                       teacher=SampledTargets(ids, counts, logits, lse, lse_p, Tp))
    loss, parts = chunked_head_loss(h, HeadSpec(w), terms, chunk=5)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h2, w2 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = 0.7 * sampled_logits_loss(name, h2 @ w2.T, ids, logits.double(), counts, lse.double(), lse_p.double(),
                                    torch.ones(M, dtype=torch.bool), T, Tp, args)
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    assert abs(float(loss.detach()) - float(ref.detach())) <= 5e-6 * abs(float(ref.detach()))
    assert abs(float(parts["loss_kl"]) * 0.7 - float(ref.detach())) <= 5e-6 * abs(float(ref.detach()))
    torch.testing.assert_close(gh.double(), rh, rtol=1e-5, atol=3e-6 * float(rh.abs().max()))
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=3e-6 * float(rw.abs().max()))


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "gjsd", "skew_reverse_kl"])
def test_divergences_without_an_estimate_refused(name):
    with pytest.raises(PipelineError, match=f"loss.logits {name} has no unbiased estimate"):
        check_sampled_divergence(name)

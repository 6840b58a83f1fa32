"""Logit losses vs independent dense references (torch float64 full-vocab, numpy float64 bucket formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.losses.logits import LOGIT_LOSSES, check_logits_args, cross_entropy, logits_loss, topk_tail_mass

DIVERGENCES = ["kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd", "gjsd"]
PARAM = {"skew_kl": "lambda", "skew_reverse_kl": "lambda", "gjsd": "beta"}  # each divergence's one parameter


def args_for(name: str, x: float) -> dict:
    """The divergence's parameter set to x (skew lambda or gjsd beta); {} for parameter-free ones."""
    return {PARAM[name]: x} if name in PARAM else {}


def _kl64(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum a (log a - log m) per row, 0 log 0 = 0."""
    return F.kl_div(m.log(), a, reduction="none").sum(-1)


def _gjsd64(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL GKD generalized JSD from its definition: beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q."""
    m = beta * p + (1 - beta) * q
    return beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)


def make_case(seed: int, n: int = 12, v: int = 40, k: int = 8, temperature: float = 1.0, scale: float = 3.0):
    """Full teacher logits [N, V] + its top-k cache at T, student logits [N, V], a mixed mask [N]."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    student = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).float()
    top_vals, top_ids = teacher.topk(k, dim=-1)
    lse = torch.logsumexp(teacher / temperature, dim=-1).float()  # fp32 like the cache
    mask = torch.rand(n, generator=g) > 0.3
    mask[0] = True
    return teacher, student, top_ids, top_vals.float(), lse, mask


def dense_divergence(name: str, teacher: torch.Tensor, student: torch.Tensor, temperature: float, lam: float):
    """Per-row full-vocab divergence [N] in float64 from the definitions (docs/architecture.md, section 12)."""
    log_p = F.log_softmax(teacher.double() / temperature, dim=-1)
    log_q = F.log_softmax(student.double() / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if name == "kl":  # kl_div(input=log q, target=log p) = sum p (log p - log q)
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if name == "reverse_kl":
        return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    if name == "skew_kl":
        return F.kl_div((lam * p + (1 - lam) * q).log(), p, reduction="none").sum(-1)
    if name == "skew_reverse_kl":
        return F.kl_div(((1 - lam) * p + lam * q).log(), q, reduction="none").sum(-1)
    if name == "jsd":
        return _gjsd64(p, q, 0.5)
    if name == "gjsd":
        return _gjsd64(p, q, lam)
    raise AssertionError(name)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].mean())


def numpy_bucket(name, teacher_topk, top_ids, lse, student, temperature, lam):
    """Per-row bucket divergence [N] in numpy float64; the student tail is summed over the non-top-k ids."""
    z = teacher_topk.numpy().astype(np.float64)
    ids = top_ids.numpy()
    s = student.numpy().astype(np.float64) / temperature
    p_in = np.exp(z / temperature - lse.numpy().astype(np.float64)[:, None])
    p = np.concatenate([p_in, np.clip(1 - p_in.sum(-1, keepdims=True), 0, None)], axis=-1)
    q_full = np.exp(s - s.max(-1, keepdims=True))
    q_full /= q_full.sum(-1, keepdims=True)
    q_in = np.take_along_axis(q_full, ids, axis=-1)
    outside = np.ones_like(q_full, dtype=bool)
    np.put_along_axis(outside, ids, False, axis=-1)
    q = np.concatenate([q_in, (q_full * outside).sum(-1, keepdims=True)], axis=-1)

    def kl(a, b):
        return np.where(a > 0, a * (np.log(np.where(a > 0, a, 1)) - np.log(b)), 0.0).sum(-1)

    if name == "kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "skew_kl":
        return kl(p, lam * p + (1 - lam) * q)
    if name == "skew_reverse_kl":
        return kl(q, (1 - lam) * p + lam * q)
    if name in ("jsd", "gjsd"):
        b = 0.5 if name == "jsd" else lam
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    raise AssertionError(name)


def test_registry_names():
    assert LOGIT_LOSSES.names() == sorted(DIVERGENCES)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_with_full_topk_equals_dense(name, temperature):
    v = 48
    teacher, student, ids, vals, lse, mask = make_case(0, v=v, k=v, temperature=temperature)
    lam = 0.3
    got = logits_loss(name, student, ids, vals, lse, mask, temperature, tail="bucket", args=args_for(name, lam))
    want = temperature**2 * masked_mean(dense_divergence(name, teacher.float(), student, temperature, lam), mask)
    assert got.dtype == torch.float32
    assert abs(float(got.detach()) - want) / want < 1e-5


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bucket_gradient_with_full_topk_matches_dense(name):
    v, temperature, lam = 32, 2.0, 0.2
    teacher, student, ids, vals, lse, mask = make_case(1, v=v, k=v, temperature=temperature)
    s1 = student.clone().requires_grad_(True)
    logits_loss(name, s1, ids, vals, lse, mask, temperature, args=args_for(name, lam)).backward()
    s2 = student.double().requires_grad_(True)
    d = dense_divergence(name, teacher.float().double(), s2, temperature, lam)
    (temperature**2 * d[mask].mean()).backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bucket_never_exceeds_dense_full_divergence(name):
    # data-processing inequality: coarsening both distributions cannot increase an f-divergence
    for seed in range(6):
        for temperature in (0.7, 1.0, 2.0, 4.0):
            teacher, student, ids, vals, lse, mask = make_case(seed, v=64, k=6, temperature=temperature)
            got = float(logits_loss(name, student, ids, vals, lse, mask, temperature, args=args_for(name, 0.25)))
            full = temperature**2 * masked_mean(dense_divergence(name, teacher, student, temperature, 0.25), mask)
            assert got <= full + 1e-6, (seed, temperature, got, full)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_equals_numpy_bucket_formula(name, temperature):
    for seed in range(3):
        teacher, student, ids, vals, lse, mask = make_case(seed + 10, v=50, k=5, temperature=temperature)
        got = float(logits_loss(name, student, ids, vals, lse, mask, temperature, args=args_for(name, 0.1)))
        per_row = numpy_bucket(name, vals, ids, lse, student, temperature, 0.1)
        want = temperature**2 * per_row[mask.numpy()].mean()
        assert abs(got - want) / want < 1e-5


@pytest.mark.parametrize("name", DIVERGENCES)
def test_renormalize_equals_dense_on_renormalised_distributions(name):
    temperature, lam = 2.0, 0.4
    teacher, student, ids, vals, lse, mask = make_case(3, v=30, k=7, temperature=temperature)
    # reference: full softmaxes restricted to the top-k ids and divided by their in-top-k mass
    p_full = F.softmax(teacher / temperature, dim=-1)
    q_full = F.softmax(student.double() / temperature, dim=-1)
    p = p_full.gather(-1, ids)
    q = q_full.gather(-1, ids)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    ref = {
        "kl": lambda: _kl64(p, q),
        "reverse_kl": lambda: _kl64(q, p),
        "skew_kl": lambda: _kl64(p, lam * p + (1 - lam) * q),
        "skew_reverse_kl": lambda: _kl64(q, (1 - lam) * p + lam * q),
        "jsd": lambda: _gjsd64(p, q, 0.5),
        "gjsd": lambda: _gjsd64(p, q, lam),
    }[name]()
    got = float(logits_loss(name, student, ids, vals, lse, mask, temperature, tail="renormalize", args=args_for(name, lam)))
    want = temperature**2 * masked_mean(ref, mask)
    assert abs(got - want) / want < 1e-5


def test_temperature_squared_scaling():
    for temperature in (1.0, 2.0, 3.0):
        teacher, student, ids, vals, lse, mask = make_case(4, v=40, k=40, temperature=temperature)
        got = float(logits_loss("kl", student, ids, vals, lse, mask, temperature))
        unscaled = masked_mean(dense_divergence("kl", teacher, student, temperature, 0.0), mask)
        assert got == pytest.approx(temperature**2 * unscaled, rel=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_positions_do_not_matter(name, tail):
    temperature = 2.0
    teacher, student, ids, vals, lse, mask = make_case(5, v=40, k=6, temperature=temperature)
    base = logits_loss(name, student, ids, vals, lse, mask, temperature, tail=tail)

    off = ~mask
    student2, ids2, vals2, lse2 = student.clone(), ids.clone(), vals.clone(), lse.clone()
    student2[off] = torch.tensor([float("nan"), float("inf"), -1e30, 1e4]).repeat(10)[: student.shape[1]]
    ids2[off] = 10**6  # out of range: must never be gathered
    vals2[off] = float("nan")
    lse2[off] = float("-inf")
    student2.requires_grad_(True)
    got = logits_loss(name, student2, ids2, vals2, lse2, mask, temperature, tail=tail)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(base), rel=1e-6)
    assert torch.isfinite(student2.grad).all()
    assert (student2.grad[off] == 0).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_all_false_mask_gives_zero(name):
    teacher, student, ids, vals, lse, mask = make_case(6)
    student = student.clone().requires_grad_(True)
    got = logits_loss(name, student, ids, vals, lse, torch.zeros_like(mask), 2.0)
    got.backward()
    assert float(got.detach()) == 0.0
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_skew_with_lambda_zero_is_plain(tail):
    teacher, student, ids, vals, lse, mask = make_case(7, temperature=2.0)
    args = (student, ids, vals, lse, mask, 2.0)
    kl = logits_loss("kl", *args, tail=tail)
    rkl = logits_loss("reverse_kl", *args, tail=tail)
    assert float(logits_loss("skew_kl", *args, tail=tail, args={"lambda": 0.0})) == pytest.approx(float(kl), rel=1e-6)
    assert float(logits_loss("skew_reverse_kl", *args, tail=tail, args={"lambda": 0.0})) == pytest.approx(
        float(rkl), rel=1e-6
    )
    # lambda = 1 would compare p with itself (a loss identically 0): refused, for both skews
    for name in ("skew_kl", "skew_reverse_kl"):
        with pytest.raises(PipelineError, match=r"lambda: 1.0 for .* must be in \[0, 1\) \(lambda = 1 compares"):
            logits_loss(name, *args, tail=tail, args={"lambda": 1.0})


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("student_peaked", [True, False])
def test_gradients_finite_when_topk_holds_all_mass(name, student_peaked):
    n, v, k = 6, 30, 4
    g = torch.Generator().manual_seed(8)
    teacher = torch.full((n, v), -40.0)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    teacher.scatter_(-1, ids, 40.0 + torch.randn(n, k, generator=g))
    vals = teacher.gather(-1, ids)
    lse = torch.logsumexp(teacher.double(), dim=-1).float()
    student = torch.randn(n, v, generator=g)
    if student_peaked:  # q_tail ~ 0 too
        student = student.scatter(-1, ids, 60.0)
    student.requires_grad_(True)
    loss = logits_loss(name, student, ids, vals, lse, torch.ones(n, dtype=torch.bool), 1.0, args=args_for(name, 0.1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # true tail ~e^-76; what remains is fp32 rounding of lse ~ 41 (ulp 4e-6)
    assert float(topk_tail_mass(vals, lse, 1.0).max()) < 1e-5


def test_student_logits_not_modified_in_place():
    teacher, student, ids, vals, lse, mask = make_case(9)
    before = student.clone()
    for tail in ("bucket", "renormalize"):
        logits_loss("kl", student, ids, vals, lse, torch.ones_like(mask), 2.0, tail=tail)
        logits_loss("kl", student, ids, vals, lse, mask, 2.0, tail=tail)
    assert torch.equal(student, before)


def test_bf16_student_logits():
    teacher, student, ids, vals, lse, mask = make_case(10, temperature=2.0)
    s16 = student.bfloat16().requires_grad_(True)
    got = logits_loss("kl", s16, ids, vals, lse, mask, 2.0)
    got.backward()
    want = logits_loss("kl", s16.detach().float(), ids, vals, lse, mask, 2.0)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-6)
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()


def test_unknown_names_raise():
    teacher, student, ids, vals, lse, mask = make_case(11)
    with pytest.raises(PipelineError, match="gjsd, jsd, kl, reverse_kl, skew_kl, skew_reverse_kl"):
        logits_loss("js", student, ids, vals, lse, mask, 1.0)
    with pytest.raises(PipelineError, match="bucket, renormalize"):
        logits_loss("kl", student, ids, vals, lse, mask, 1.0, tail="drop")
    with pytest.raises(PipelineError, match=r"lambda: 1.5 for skew_kl must be in \[0, 1\)"):
        logits_loss("skew_kl", student, ids, vals, lse, mask, 1.0, args={"lambda": 1.5})
    with pytest.raises(PipelineError, match="temperature"):
        logits_loss("kl", student, ids, vals, lse, mask, 0.0)


def test_topk_tail_mass_matches_dense():
    temperature = 2.0
    teacher, student, ids, vals, lse, mask = make_case(12, v=40, k=5, temperature=temperature)
    p = F.softmax(teacher / temperature, dim=-1)
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    want = (p * outside).sum(-1)
    torch.testing.assert_close(topk_tail_mass(vals, lse, temperature).double(), want, rtol=1e-5, atol=1e-6)


def test_cross_entropy_matches_numpy():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(10, 25, generator=g) * 3
    targets = torch.randint(0, 25, (10,), generator=g)
    mask = torch.rand(10, generator=g) > 0.4
    mask[0] = True
    x = logits.numpy().astype(np.float64)
    log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    nll = log_z - x[np.arange(10), targets.numpy()]
    want = nll[mask.numpy()].mean()

    garbage_targets = targets.clone()
    garbage_targets[~mask] = -100  # masked targets are never read
    assert float(cross_entropy(logits, garbage_targets, mask)) == pytest.approx(want, rel=1e-6)
    assert float(cross_entropy(logits.bfloat16(), targets, mask)) == pytest.approx(want, rel=2e-2)
    assert float(cross_entropy(logits, targets, torch.zeros_like(mask))) == 0.0


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bucket_gradient_matches_float64_reference(name):
    # reference: bucket formula in float64 with the student tail summed over the non-top-k ids
    temperature, lam = 2.0, 0.3
    teacher, student, ids, vals, lse, mask = make_case(14, v=40, k=5, temperature=temperature)
    s1 = student.clone().requires_grad_(True)
    logits_loss(name, s1, ids, vals, lse, mask, temperature, args=args_for(name, lam)).backward()

    s2 = student.double().requires_grad_(True)
    p_in = (vals.double() / temperature - lse.double()[:, None]).exp()
    p = torch.cat([p_in, 1 - p_in.sum(-1, keepdim=True)], dim=-1)
    q_full = F.softmax(s2 / temperature, dim=-1)
    outside = torch.ones_like(q_full, dtype=torch.bool).scatter(-1, ids, False)
    q = torch.cat([q_full.gather(-1, ids), (q_full * outside).sum(-1, keepdim=True)], dim=-1)
    ref = {
        "kl": lambda: F.kl_div(q.log(), p, reduction="none"),
        "reverse_kl": lambda: F.kl_div(p.log(), q, reduction="none"),
        "skew_kl": lambda: F.kl_div((lam * p + (1 - lam) * q).log(), p, reduction="none"),
        "skew_reverse_kl": lambda: F.kl_div(((1 - lam) * p + lam * q).log(), q, reduction="none"),
        "jsd": lambda: _gjsd64(p, q, 0.5)[:, None],
        "gjsd": lambda: _gjsd64(p, q, lam)[:, None],
    }[name]().sum(-1)
    (temperature**2 * ref[mask].mean()).backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


# ---- parameters and the JSD family ------------------------------------------------------------------


def test_declared_parameters_and_defaults():
    assert check_logits_args("kl") == {} and check_logits_args("jsd") == {}
    assert check_logits_args("skew_kl") == {"lambda": 0.1}
    assert check_logits_args("skew_reverse_kl", {"lambda": 0}) == {"lambda": 0.0}
    assert check_logits_args("gjsd") == {"beta": 0.5}
    assert check_logits_args("gjsd", {"beta": 0.9}) == {"beta": 0.9}


@pytest.mark.parametrize("name,args,needle", [
    ("kl", {"lambda": 0.5}, "kl takes no parameter 'lambda' (it takes: none)"),
    ("skew_kl", {"beta": 0.5}, "skew_kl takes no parameter 'beta' (it takes: lambda)"),
    ("gjsd", {"beta": 0.0}, "beta: 0.0 for gjsd must be in (0, 1)"),
    ("gjsd", {"beta": 1}, "beta: 1 for gjsd must be in (0, 1)"),
    ("skew_kl", {"lambda": -0.1}, "lambda: -0.1 for skew_kl must be in [0, 1)"),
    ("gjsd", {"beta": "half"}, "expected a number"),
    ("jsd2", {}, "unknown logits loss 'jsd2'; valid: gjsd, jsd, kl"),
])
def test_bad_parameters_are_one_line_errors(name, args, needle):
    with pytest.raises(PipelineError) as e:
        check_logits_args(name, args)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gjsd_half_equals_jsd(tail):
    teacher, student, ids, vals, lse, mask = make_case(15, v=40, k=6, temperature=2.0)
    case = (student, ids, vals, lse, mask, 2.0)
    a = float(logits_loss("gjsd", *case, tail=tail, args={"beta": 0.5}))
    b = float(logits_loss("jsd", *case, tail=tail))
    assert a > 0.01 and a == b  # the same arithmetic: equal to the bit


@pytest.mark.parametrize("beta", [0.05, 0.3, 0.5, 0.9])
def test_gjsd_full_topk_equals_dense_float64(beta):
    # k = V: the k+1 buckets are the whole vocabulary (plus an empty tail), so the dense fp64 JSD is exact
    temperature, v = 2.0, 48
    teacher, student, ids, vals, lse, mask = make_case(16, v=v, k=v, temperature=temperature)
    s1 = student.clone().requires_grad_(True)
    got = logits_loss("gjsd", s1, ids, vals, lse, mask, temperature, args={"beta": beta})
    got.backward()
    s2 = student.double().requires_grad_(True)
    p = F.softmax(teacher.float().double() / temperature, dim=-1)  # the teacher as cached (fp32 logits)
    q = F.softmax(s2 / temperature, dim=-1)
    want = temperature**2 * _gjsd64(p, q, beta)[mask].mean()
    want.backward()
    assert abs(float(got.detach()) - float(want.detach())) <= 2e-6 * float(want.detach())
    assert torch.isfinite(s1.grad).all()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)


def test_jsd_is_symmetric_and_bounded():
    # JSD(p, q) = JSD(q, p) <= log 2, and gjsd(beta) of (p, q) = gjsd(1 - beta) of (q, p): swap the roles
    temperature, v = 1.0, 32
    teacher, student, ids, vals, lse, mask = make_case(17, v=v, k=v, temperature=temperature, scale=8.0)
    full_ids = torch.arange(v).expand(len(mask), v)
    swap = (teacher.float(), full_ids, student, torch.logsumexp(student.double(), -1).float(), mask, temperature)
    fwd = (student, full_ids, teacher.float(), lse, mask, temperature)
    assert float(logits_loss("jsd", *fwd)) == pytest.approx(float(logits_loss("jsd", *swap)), rel=1e-5)
    assert 0.05 < float(logits_loss("jsd", *fwd)) <= math.log(2)
    assert float(logits_loss("gjsd", *fwd, args={"beta": 0.2})) == pytest.approx(
        float(logits_loss("gjsd", *swap, args={"beta": 0.8})), rel=1e-5)

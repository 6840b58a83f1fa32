"""The chunked head + vocabulary loss against an independent dense fp64 computation: values and gradients
(hidden states and output embedding), every divergence, both tail modes, uneven chunks, logit transforms."""

from __future__ import annotations

import pytest
import torch

from pipeline.head import HeadSpec
from pipeline.losses.chunked import VocabTerms, chunked_head_loss
from pipeline.losses.logits import LOGIT_LOSSES
from pipeline.targets import TopkTargets
from tests.losses.rounding import HeadLossBounds, head_loss_bounds
from tests.numerics import assert_within

M, D, V, K, T = 11, 16, 300, 8, 2.0
ARGS = {"kl": {}, "reverse_kl": {}, "skew_kl": {"lambda": 0.3}, "skew_reverse_kl": {"lambda": 0.3}, "jsd": {},
        "gjsd": {"beta": 0.2}}


def _case(seed: int = 0, T: float = T):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    teacher = torch.randn(M, V, generator=g, dtype=torch.float64) * 3  # full teacher logits
    topk_logits, topk_ids = teacher.topk(K, dim=-1)
    lse = torch.logsumexp(teacher / T, dim=-1)
    targets = torch.randint(0, V, (M,), generator=g)
    return h, w, targets, topk_ids, topk_logits.float(), lse.float()


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def _reference_divergence(name: str, p: torch.Tensor, q: torch.Tensor, args: dict) -> torch.Tensor:
    if name == "kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "skew_kl":
        lam = args["lambda"]
        return _kl(p, lam * p + (1 - lam) * q)
    if name == "skew_reverse_kl":
        lam = args["lambda"]
        return _kl(q, (1 - lam) * p + lam * q)
    beta = 0.5 if name == "jsd" else args["beta"]
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _reference(h, w, targets, ids, tl, lse, name, tail, alpha, beta, transform=None, T=T):
    """fp64, dense [M, V], written from the definitions: alpha * CE + beta * T^2 * divergence, row means."""
    z = h @ w.T
    if transform is not None:
        z = transform(z)
    ce = -torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)
    tl, lse = tl.double(), lse.double()
    if tail == "bucket":
        p_in = torch.exp(tl / T - lse[:, None])
        q_in = torch.softmax(z / T, -1).gather(-1, ids)
        p = torch.cat([p_in, 1 - p_in.sum(-1, keepdim=True)], -1)
        q = torch.cat([q_in, 1 - q_in.sum(-1, keepdim=True)], -1)
    else:
        p = torch.softmax(tl / T, -1)
        q = torch.softmax(z.gather(-1, ids) / T, -1)
    div = _reference_divergence(name, p, q, ARGS[name])
    return alpha * ce.mean() + beta * T**2 * div.mean(), ce.mean(), T**2 * div.mean()


def _grads(fn, h, w):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss, *parts = fn(h, w)
    loss.backward()
    return loss.detach(), [p.detach() for p in parts], h.grad, w.grad


def _within(got, ref, bounds: HeadLossBounds, parts: tuple[str, ...] = ("ce", "kl")) -> None:
    """The chunked (loss, [parts], d/d hidden, d/d output embedding) against the fp64 reference's, each within
    the fp32 rounding bound derived for this case from the operations the chunked loss performs
    (tests/losses/rounding.py): elementwise for the gradients."""
    assert_within("loss", got[0], ref[0], bounds.loss)
    for name, g, r in zip(parts, got[1], ref[1]):
        assert_within(f"loss_{name}", g, r, getattr(bounds, name))
    assert_within("d loss / d hidden", got[2], ref[2], bounds.grad_h)
    assert_within("d loss / d output embedding", got[3], ref[3], bounds.grad_w)


def test_registry_covered():
    assert set(LOGIT_LOSSES.names()) == set(ARGS)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", sorted(ARGS))
def test_matches_dense_fp64(name, tail):
    h, w, targets, ids, tl, lse = _case()
    alpha, beta = 0.3, 0.7
    terms = VocabTerms(alpha=alpha, beta=beta, targets=targets, divergence=name, tail=tail, args=ARGS[name],
                       temperature=T, teacher=TopkTargets(ids, tl, lse))

    def chunked(hh, ww):
        loss, parts = chunked_head_loss(hh, HeadSpec(ww), terms, chunk=4)  # 11 rows: chunks of 4, 4, 3
        return loss, parts["loss_ce"], parts["loss_kl"]

    def reference(hh, ww):
        return _reference(hh, ww, targets, ids, tl, lse, name, tail, alpha, beta)

    got = _grads(chunked, h, w)
    ref = _grads(reference, h.double(), w.double())
    _within(got, ref, head_loss_bounds(h, w, targets, ids, tl, lse, name, ARGS[name], tail, alpha, beta, T, chunk=4))
    assert got[2].abs().max() > 0 and got[3].abs().max() > 0


# the softmax at T from exp(z - max): shared at T = 1, a square root at 2, a power at 3.5 (exact for V = 300 up to
# T = 3.79), both in column blocks, the direct exp((z - max) / T) at 10; with and without CE (whose buffer the
# T = 1 path shares)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5, 10.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_every_softmax_path_matches_dense_fp64(temperature, alpha, monkeypatch):
    from pipeline.losses import chunked
    from pipeline.losses.chunked import _power_is_exact

    monkeypatch.setattr(chunked, "CPU_COLUMN_BLOCK", 64)  # the power in column blocks: 64 x 4 + a partial 44
    assert _power_is_exact(3.5, V) and not _power_is_exact(10.0, V)
    h, w, targets, ids, tl, lse = _case(2, temperature)
    terms = VocabTerms(alpha=alpha, beta=0.7, targets=targets if alpha else None, divergence="kl", tail="bucket",
                       temperature=temperature, teacher=TopkTargets(ids, tl, lse))

    def chunked(hh, ww):
        loss, parts = chunked_head_loss(hh, HeadSpec(ww), terms, chunk=4)
        return loss, parts["loss_kl"]

    def reference(hh, ww):
        loss, _, kl = _reference(hh, ww, targets, ids, tl, lse, "kl", "bucket", alpha, 0.7, T=temperature)
        return loss, kl

    got = _grads(chunked, h, w)
    ref = _grads(reference, h.double(), w.double())
    bounds = head_loss_bounds(h, w, targets if alpha else None, ids, tl, lse, "kl", {}, "bucket", alpha, 0.7,
                              temperature, chunk=4)
    _within(got, ref, bounds, parts=("kl",))


@pytest.mark.parametrize("transform", ["softcap", "scale"])
def test_final_logit_transforms(transform):
    h, w, targets, ids, tl, lse = _case(1)
    if transform == "softcap":
        head_of = lambda ww: HeadSpec(ww, softcap=5.0)  # noqa: E731
        fn = lambda z: torch.tanh(z / 5.0) * 5.0  # noqa: E731
        spec = ("softcap", 5.0)
    else:
        head_of = lambda ww: HeadSpec(ww, scale=0.25)  # noqa: E731
        fn = lambda z: z * 0.25  # noqa: E731
        spec = ("scale", 0.25)
    terms = VocabTerms(alpha=0.5, beta=0.5, targets=targets, temperature=T, teacher=TopkTargets(ids, tl, lse))
    got = _grads(lambda hh, ww: (chunked_head_loss(hh, head_of(ww), terms, chunk=5)[0],), h, w)
    ref = _grads(lambda hh, ww: _reference(hh, ww, targets, ids, tl, lse, "kl", "bucket", 0.5, 0.5, fn)[:1],
                 h.double(), w.double())
    _within(got, ref, head_loss_bounds(h, w, targets, ids, tl, lse, "kl", {}, "bucket", 0.5, 0.5, T, chunk=5,
                                       transform=spec))


def test_one_term_off_is_not_computed():
    h, w, targets, ids, tl, lse = _case(2)
    ce_only = VocabTerms(alpha=1.0, beta=0.0, targets=targets)
    loss, parts = chunked_head_loss(h, HeadSpec(w), ce_only, chunk=3)
    assert set(parts) == {"loss_ce"}
    ref = _reference(h.double(), w.double(), targets, ids, tl, lse, "kl", "bucket", 1.0, 0.0)[0]
    assert_within("CE only", loss, ref, head_loss_bounds(h, w, targets, None, None, None, "kl", {}, "bucket", 1.0,
                                                         0.0, T, chunk=3).loss)
    kl_only = VocabTerms(alpha=0.0, beta=1.0, targets=None, temperature=T, teacher=TopkTargets(ids, tl, lse))
    loss, parts = chunked_head_loss(h, HeadSpec(w), kl_only, chunk=3)
    assert set(parts) == {"loss_kl"}
    ref = _reference(h.double(), w.double(), targets, ids, tl, lse, "kl", "bucket", 0.0, 1.0)[0]
    assert_within("KL only", loss, ref, head_loss_bounds(h, w, None, ids, tl, lse, "kl", {}, "bucket", 0.0, 1.0, T,
                                                         chunk=3).loss)


def test_chunk_size_does_not_change_the_result_beyond_rounding_and_is_deterministic():
    h, w, targets, ids, tl, lse = _case(3)
    terms = VocabTerms(alpha=0.4, beta=0.6, targets=targets, temperature=T, teacher=TopkTargets(ids, tl, lse))
    runs = [_grads(lambda hh, ww: (chunked_head_loss(hh, HeadSpec(ww), terms, chunk=c)[0],), h, w)
            for c in (1, 4, 4, 64)]
    a, b = runs[1], runs[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])  # run to run: bitwise
    # each run within its bound of the exact value, so within the sum of the two bounds of each other
    bounds = {c: head_loss_bounds(h, w, targets, ids, tl, lse, "kl", {}, "bucket", 0.4, 0.6, T, chunk=c)
              for c in (1, 4, 64)}
    for c, other in ((1, runs[0]), (64, runs[3])):
        assert_within(f"loss, chunk {c} against 4", other[0], runs[1][0], bounds[c].loss + bounds[4].loss)
        assert_within(f"d loss / d output embedding, chunk {c} against 4", other[3], runs[1][3],
                      bounds[c].grad_w + bounds[4].grad_w)


def test_the_bounds_catch_an_error_just_above_them():
    """The derived bounds are tight enough to fail: the worst-conditioned case (T = 10, a KL of close
    distributions) passes, and the same results moved by twice their bound, in the loss, the divergence part
    or a single gradient entry, do not."""
    h, w, targets, ids, tl, lse = _case(2, 10.0)
    terms = VocabTerms(alpha=0.0, beta=0.7, targets=None, divergence="kl", tail="bucket", temperature=10.0,
                       teacher=TopkTargets(ids, tl, lse))

    def chunked(hh, ww):
        loss, parts = chunked_head_loss(hh, HeadSpec(ww), terms, chunk=4)
        return loss, parts["loss_kl"]

    got = _grads(chunked, h, w)
    ref = _grads(lambda hh, ww: _reference(hh, ww, targets, ids, tl, lse, "kl", "bucket", 0.0, 0.7, T=10.0)[::2],
                 h.double(), w.double())
    bounds = head_loss_bounds(h, w, None, ids, tl, lse, "kl", {}, "bucket", 0.0, 0.7, 10.0, chunk=4)
    _within(got, ref, bounds, parts=("kl",))
    loss, (kl,), gh, gw = got
    for planted in ((loss + 2 * bounds.loss, [kl], gh, gw), (loss, [kl + 2 * bounds.kl], gh, gw),
                    (loss, [kl], gh + 2 * bounds.grad_h * (bounds.grad_h == bounds.grad_h.min()), gw),
                    (loss, [kl], gh, gw - 2 * bounds.grad_w * (bounds.grad_w == bounds.grad_w.max()))):
        with pytest.raises(AssertionError):
            _within(planted, ref, bounds, parts=("kl",))


def test_no_grad_gives_the_same_value():
    h, w, targets, ids, tl, lse = _case(4)
    terms = VocabTerms(alpha=0.4, beta=0.6, targets=targets, temperature=T, teacher=TopkTargets(ids, tl, lse))
    with_grad = chunked_head_loss(h.clone().requires_grad_(True), HeadSpec(w), terms, chunk=4)[0]
    with torch.no_grad():
        without = chunked_head_loss(h, HeadSpec(w), terms, chunk=4)[0]
    assert torch.equal(with_grad.detach(), without)


def test_bad_chunk():
    h, w, targets, *_ = _case(5)
    with pytest.raises(ValueError, match="chunk"):
        chunked_head_loss(h, HeadSpec(w), VocabTerms(alpha=1.0, beta=0.0, targets=targets), chunk=0)


# ---- bf16 mixed precision (training.bf16: the head matmuls under torch.autocast) ----------------------------

BF16_U, FP32_U = 2.0**-8, 2.0**-24  # unit roundoffs (8 and 24 significand bits)
BF16_CHUNK = 4


def _autocast_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The bf16 logits autocast gives the chunked loss (the same matmul on the same chunks), as fp64."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = [torch.nn.functional.linear(h[a:a + BF16_CHUNK], w) for a in range(0, h.shape[0], BF16_CHUNK)]
    assert z[0].dtype == torch.bfloat16
    return torch.cat(z).double()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", sorted(ARGS))
def test_bf16_autocast_rounds_only_the_head_matmul(name, tail):
    """Under bf16 autocast the head matmuls run in bf16 and everything over the vocabulary stays fp32. So the
    loss equals the fp64 loss of autocast's own bf16 logits within the fp32 rounding of everything after the
    matmul (tests/losses/rounding.py, with those logits exact); computing the
    softmax work in bf16 would be ~2^16 times off. The gradient with respect to the hidden states is one more
    bf16 matmul (d loss / d logits rounded to bf16, W rounded to bf16, V products summed in fp32, the result
    rounded to bf16): within (2u + u^2 + V 2^-24) |G| |W| + u |grad| elementwise of the fp64 one. And the
    loss does differ from the fp64 loss of the exact logits by more than fp32 rounding: bf16 really ran."""
    h, w, targets, ids, tl, lse = _case(6)
    alpha, beta = 0.3, 0.7
    terms = VocabTerms(alpha=alpha, beta=beta, targets=targets, divergence=name, tail=tail, args=ARGS[name],
                       temperature=T, teacher=TopkTargets(ids, tl, lse))
    hh = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_head_loss(hh, HeadSpec(w.clone().requires_grad_(True)), terms, chunk=BF16_CHUNK)
    loss.backward()
    z = _autocast_logits(h, w).requires_grad_(True)
    ref = _reference(h.double(), w.double(), targets, ids, tl, lse, name, tail, alpha, beta, transform=lambda _: z)[0]
    (g,) = torch.autograd.grad(ref, z)  # [M, V]
    after_matmul = head_loss_bounds(h, w, targets, ids, tl, lse, name, ARGS[name], tail, alpha, beta, T, BF16_CHUNK,
                                    logits=z.detach())
    assert_within("loss of autocast's logits", loss.detach(), ref.detach(), after_matmul.loss)
    w64 = w.double()
    bound = (2 * BF16_U + BF16_U**2 + V * FP32_U) * (g.abs() @ w64.abs()) + BF16_U * (g @ w64).abs()
    err = (hh.grad.double() - g @ w64).abs()
    assert (err <= bound).all(), (err / bound).max()
    exact = _reference(h.double(), w64, targets, ids, tl, lse, name, tail, alpha, beta)[0]
    fp32 = head_loss_bounds(h, w, targets, ids, tl, lse, name, ARGS[name], tail, alpha, beta, T, BF16_CHUNK)
    assert abs(float(loss.detach()) - float(exact)) > fp32.loss  # more than fp32 logits could be off by


def test_chunk_rows_by_device():
    from pipeline.losses.chunked import CPU_CHUNK_TOKENS, chunk_rows

    assert chunk_rows(64, 262144, "cpu") == 64 and chunk_rows(0, 262144, "cuda") == 0  # a number is kept
    assert chunk_rows("auto", 262144, "cpu") == CPU_CHUNK_TOKENS == 512
    gib = 2**30
    # one [rows, V] fp32 buffer = 1/64 of the device's memory, in multiples of 128 rows, never under 512
    assert chunk_rows("auto", 262144, "cuda", total_memory=80 * gib) == 1280  # 80 GiB / 64 / (4 x 262,144)
    assert chunk_rows("auto", 49152, "cuda", total_memory=80 * gib) == 6784  # 6,826 rounded down to 128s
    assert chunk_rows("auto", 262144, "cuda", total_memory=16 * gib) == 512
    # exact targets: the share divided among their ~10 [chunk, V] tensors (6,826 / 10 -> 640), floored at 512
    assert chunk_rows("auto", 49152, "cuda", total_memory=80 * gib, buffers=10) == 640
    assert chunk_rows("auto", 262144, "cuda", total_memory=80 * gib, buffers=10) == 512


def test_chunk_tokens_setting():
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    assert load_config(None).loss.chunk_tokens == "auto"
    assert load_config(None, ["loss.chunk_tokens=256"]).loss.chunk_tokens == 256
    for bad in ("loss.chunk_tokens=-1", "loss.chunk_tokens=big"):
        with pytest.raises(PipelineError, match="loss.chunk_tokens"):
            load_config(None, [bad])

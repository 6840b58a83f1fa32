"""Logit-distillation losses against a top-k teacher cache (docs/architecture.md, section 12).

The teacher side of every position is (ids I [k], raw logits z_I [k] as stored, lse at T: the normaliser
of those stored logits that leaves the true full-vocabulary tail, logsumexp(z / T) over the full vocab when
nothing is rounded; docs/architecture.md, section 6), so p_i = exp(z_i / T - lse) for i in I and
p_tail = 1 - sum_I p_i is the teacher's full-vocabulary tail.

Tail modes build a pair of discrete distributions over the same support, each as (weights, logs):
- `bucket`: the (k+1)-bucket coarsening, I plus one tail bucket; equals the full-vocab divergence at k = V.
- `renormalize`: the top-k ids only, both sides renormalised (biased at T > 1; kept for comparison).
Divergences act on such a pair, row by row; each declares the parameters it takes (name, default, range),
so a config's `loss.logits_args` is checked before any model loads (`check_logits_args`):
- `kl` KL(p || q); `reverse_kl` KL(q || p);
- `skew_kl` (DistiLLM) KL(p || lam p + (1 - lam) q), `skew_reverse_kl` KL(q || (1 - lam) p + lam q),
  lam in [0, 1): lam = 0 is the plain KL, lam = 1 compares a distribution with itself (identically 0);
- `jsd` 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2;
- `gjsd` (TRL's GKD generalized JSD) beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q,
  beta in (0, 1); beta = 1/2 is `jsd`.

Everything is computed in fp32. Memory: the bucket mode builds exactly one [M, V] fp32 scaled copy of the
student rows and its log-softmax (M = valid positions); everything after that is [M, k+1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.registry import Registry

# Tail masses below this are below what fp32 can resolve from 1 - sum_I (an fp32 lse of ~10 alone carries
# ~5e-7 absolute error into every p_i). Used only inside logs, so a tail of ~0 gives a finite log
# (no NaN/inf in values or gradients) and two ~0 tails cancel instead of adding rounding noise.
TAIL_LOG_FLOOR = 1e-6


class Pair(NamedTuple):
    """Teacher p and student q over one support, per row: weights [M, K] and their logs [M, K]."""

    p: torch.Tensor
    log_p: torch.Tensor
    q: torch.Tensor
    log_q: torch.Tensor


DivergenceFn = Callable[[Pair, Mapping[str, float]], torch.Tensor]  # (pair, resolved args) -> [M]
TailMode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], Pair]


@dataclass(frozen=True)
class Param:
    """One divergence parameter: its default and its allowed interval (open or closed at each end)."""

    default: float
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  # said when a value is refused

    def contains(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def interval(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


@dataclass(frozen=True)
class Divergence:
    fn: DivergenceFn
    params: Mapping[str, Param] = field(default_factory=dict)


LOGIT_LOSSES: Registry[Divergence] = Registry("logits loss")
TAIL_MODES: Registry[TailMode] = Registry("logits tail mode")


def register_divergence(name: str, **params: Param) -> Callable[[DivergenceFn], DivergenceFn]:
    """Register `fn(pair, args) -> [M]` under `name`, taking exactly the parameters `params`."""

    def deco(fn: DivergenceFn) -> DivergenceFn:
        LOGIT_LOSSES.register(name)(Divergence(fn, dict(params)))
        return fn

    return deco


def check_logits_args(name: str, args: Mapping[str, float] | None = None) -> dict[str, float]:
    """The parameters of divergence `name`: `args` checked (names, ranges) over the declared defaults.

    Unknown divergence, unknown parameter or a value out of range -> one-line PipelineError.
    """
    divergence = LOGIT_LOSSES.get(name)
    args = dict(args or {})
    unknown = sorted(set(args) - set(divergence.params))
    if unknown:
        takes = ", ".join(divergence.params) or "none"
        raise PipelineError(f"loss.logits_args: {name} takes no parameter {unknown[0]!r} (it takes: {takes})")
    resolved = {}
    for key, param in divergence.params.items():
        value = args.get(key, param.default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"loss.logits_args.{key}: expected a number, got {value!r}")
        if not param.contains(float(value)):
            why = f" ({param.why})" if param.why else ""
            raise PipelineError(f"loss.logits_args.{key}: {value!r} for {name} must be in {param.interval()}{why}")
        resolved[key] = float(value)
    return resolved


# ---- divergences over a Pair -------------------------------------------------------------------------

_SKEW = Param(0.1, 0.0, 1.0, hi_open=True, why="lambda = 1 compares a distribution with itself: the loss is identically 0")
_BETA = Param(0.5, 0.0, 1.0, lo_open=True, hi_open=True, why="beta = 0 or 1 makes the mixture equal one side")


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w_a: float) -> torch.Tensor:
    """log(w_a * a + (1 - w_a) * b), stable; w_a in [0, 1] (a zero weight drops that side exactly)."""
    la = math.log(w_a) if w_a > 0 else -math.inf
    lb = math.log1p(-w_a) if w_a < 1 else -math.inf
    return torch.logaddexp(log_a + la, log_b + lb)


def _kl_rows(w: torch.Tensor, log_w: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """sum_i w_i (log w_i - log m_i) per row [M]."""
    return (w * (log_w - log_m)).sum(-1)


@register_divergence("kl")
def forward_kl(pair: Pair, args: Mapping[str, float]) -> torch.Tensor:
    """KL(p || q) per row [M]."""
    return _kl_rows(pair.p, pair.log_p, pair.log_q)


@register_divergence("reverse_kl")
def reverse_kl(pair: Pair, args: Mapping[str, float]) -> torch.Tensor:
    """KL(q || p) per row [M]."""
    return _kl_rows(pair.q, pair.log_q, pair.log_p)


@register_divergence("skew_kl", **{"lambda": _SKEW})
def skew_kl(pair: Pair, args: Mapping[str, float]) -> torch.Tensor:
    """DistiLLM skew KL: KL(p || lam p + (1 - lam) q) per row [M]; lam = 0 is forward KL."""
    return _kl_rows(pair.p, pair.log_p, _log_mix(pair.log_p, pair.log_q, args["lambda"]))


@register_divergence("skew_reverse_kl", **{"lambda": _SKEW})
def skew_reverse_kl(pair: Pair, args: Mapping[str, float]) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(q || (1 - lam) p + lam q) per row [M]; lam = 0 is reverse KL."""
    return _kl_rows(pair.q, pair.log_q, _log_mix(pair.log_p, pair.log_q, 1.0 - args["lambda"]))


def _generalized_jsd(pair: Pair, beta: float) -> torch.Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, per row [M]."""
    log_m = _log_mix(pair.log_p, pair.log_q, beta)  # [M, K]
    return beta * _kl_rows(pair.p, pair.log_p, log_m) + (1.0 - beta) * _kl_rows(pair.q, pair.log_q, log_m)


@register_divergence("jsd")
def jsd(pair: Pair, args: Mapping[str, float]) -> torch.Tensor:
    """Jensen-Shannon divergence per row [M]: symmetric, bounded by log 2."""
    return _generalized_jsd(pair, 0.5)


@register_divergence("gjsd", beta=_BETA)
def gjsd(pair: Pair, args: Mapping[str, float]) -> torch.Tensor:
    """Generalized JSD of TRL's GKD per row [M]; small beta ~ beta * KL(p || q), beta near 1 ~ (1 - beta) * KL(q || p)."""
    return _generalized_jsd(pair, args["beta"])


# ---- teacher / student sides -------------------------------------------------------------------------


def _teacher_log_probs(topk_logits: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """[M, k] exact log p_i = z_i / T - lse_T for the cached top-k ids."""
    return topk_logits.float() / temperature - lse.float().unsqueeze(-1)


def _tail_from_logs(log_mass_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From log sum_I (a [M] log-mass inside I) -> (tail weight [M] >= 0, floored log tail [M]).

    tail = 1 - exp(log_mass_in) = -expm1(log_mass_in): no cancellation when the tail is large; when the
    rounding makes log_mass_in >= 0 the clamps give weight 0 and log TAIL_LOG_FLOOR (zero gradient)
    instead of log of a non-positive number.
    """
    tail = -torch.expm1(log_mass_in)
    return tail.clamp(min=0.0), tail.clamp(min=TAIL_LOG_FLOOR).log()


def topk_tail_mass(topk_logits: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_tail [N] = clamp(1 - sum_I p_i, min 0) from [N, k] raw top-k logits and [N] lse at T."""
    log_p = _teacher_log_probs(topk_logits, lse, temperature)
    return _tail_from_logs(torch.logsumexp(log_p, dim=-1))[0]


def _student_log_softmax(student_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """[M, V] fp32 log_softmax(s / T). `student_rows` must be a tensor this module owns (scaled in place)."""
    x = student_rows.to(torch.float32)  # bf16 -> new fp32 tensor; fp32 -> the same owned tensor
    return torch.log_softmax(x.div_(temperature), dim=-1)


@TAIL_MODES.register("bucket")
def bucket_pair(
    student_rows: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
) -> Pair:
    """(k+1)-bucket coarsening: columns 0..k-1 are the top-k ids, column k is the tail."""
    log_p_in = _teacher_log_probs(topk_logits, lse, temperature)  # [M, k]
    p_tail, log_p_tail = _tail_from_logs(torch.logsumexp(log_p_in, dim=-1))  # [M], [M]

    log_q_in = _student_log_softmax(student_rows, temperature).gather(-1, topk_ids)  # [M, k]
    return _bucket(log_p_in, p_tail, log_p_tail, log_q_in)


def _bucket(log_p_in: torch.Tensor, p_tail: torch.Tensor, log_p_tail: torch.Tensor, log_q_in: torch.Tensor) -> Pair:
    q_tail, log_q_tail = _tail_from_logs(torch.logsumexp(log_q_in, dim=-1))  # [M], [M]
    return Pair(
        p=torch.cat([log_p_in.exp(), p_tail.unsqueeze(-1)], dim=-1),
        log_p=torch.cat([log_p_in, log_p_tail.unsqueeze(-1)], dim=-1),
        q=torch.cat([log_q_in.exp(), q_tail.unsqueeze(-1)], dim=-1),
        log_q=torch.cat([log_q_in, log_q_tail.unsqueeze(-1)], dim=-1),
    )


@TAIL_MODES.register("renormalize")
def renormalized_pair(
    student_rows: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
) -> Pair:
    """Top-k support only, both sides renormalised over I; needs no [M, V] softmax at all."""
    return _renormalized(student_rows.gather(-1, topk_ids).float(), topk_logits, temperature)


def _renormalized(student_in: torch.Tensor, topk_logits: torch.Tensor, temperature: float) -> Pair:
    log_p = torch.log_softmax(topk_logits.float() / temperature, dim=-1)  # [M, k]
    log_q = torch.log_softmax(student_in / temperature, dim=-1)  # [M, k]
    return Pair(p=log_p.exp(), log_p=log_p, q=log_q.exp(), log_q=log_q)


def gathered_pair(tail: str, student_in: torch.Tensor, student_lse: torch.Tensor | None, topk_logits: torch.Tensor,
                  lse: torch.Tensor, temperature: float) -> Pair:
    """The tail mode's pair from the student's side already reduced: its raw logits at the top-k ids
    `student_in` [M, k] (fp32) and, for `bucket`, `student_lse` [M] = logsumexp(s / T) over its whole
    vocabulary. Mathematically the same pair as TAIL_MODES[tail] builds from the full rows."""
    TAIL_MODES.get(tail)
    if tail == "renormalize":
        return _renormalized(student_in, topk_logits, temperature)
    log_p_in = _teacher_log_probs(topk_logits, lse, temperature)  # [M, k]
    p_tail, log_p_tail = _tail_from_logs(torch.logsumexp(log_p_in, dim=-1))
    return _bucket(log_p_in, p_tail, log_p_tail, student_in / temperature - student_lse.unsqueeze(-1))


GATHERED_NEEDS_LSE = {"bucket": True, "renormalize": False}  # which tail modes read the student's full lse


def exact_pair(student_rows: torch.Tensor, teacher_rows: torch.Tensor, temperature: float) -> Pair:
    """Exact full-distribution targets: both sides over the whole vocabulary, from the student's logits
    [M, V] and the teacher's [M, V] (cache.logits exact rebuilds them); no top-k, no tail, no truncation."""
    log_p = torch.log_softmax(teacher_rows.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_rows.float() / temperature, dim=-1)
    return Pair(p=log_p.exp(), log_p=log_p, q=log_q.exp(), log_q=log_q)


def exact_logits_loss(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      args: Mapping[str, float] | None = None) -> torch.Tensor:
    """T^2 * mean over the rows of divergence `name` between the full distributions (scalar, fp32):
    student_logits and teacher_logits [M, V], every row scored."""
    with torch.profiler.record_function("distill/exact_logits_loss"):
        if not temperature > 0:
            raise PipelineError(f"temperature must be > 0, got {temperature}")
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} must be the same [M, V]")
        pair = exact_pair(student_logits, teacher_logits, float(temperature))
        total = LOGIT_LOSSES.get(name).fn(pair, check_logits_args(name, args)).sum()
        return total * (temperature**2 / max(student_logits.shape[0], 1))


# ---- entry points ------------------------------------------------------------------------------------


def _check_rows(name: str, tensor: torch.Tensor, n: int, ndim: int) -> None:
    if tensor.dim() != ndim or tensor.shape[0] != n:
        raise ValueError(f"{name}: expected {ndim}-d with {n} rows, got shape {tuple(tensor.shape)}")


def logits_loss(
    name: str,
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    tail: str = "bucket",
    args: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """T^2 * mean over masked positions of divergence `name` (scalar, fp32).

    student_logits [N, V] (any float dtype), topk_ids [N, k] (integer ids into V), topk_logits [N, k] raw
    teacher logits, lse [N] = logsumexp(z / T) over the full teacher vocab, mask [N] bool.
    Rows where mask is False are never read into the computation (their values may be anything);
    an all-False mask gives 0 (still attached to the graph). `args`: the divergence's parameters
    (e.g. {"lambda": 0.1} for skew_kl, {"beta": 0.5} for gjsd); missing ones take their declared defaults.
    """
    with torch.profiler.record_function("distill/logits_loss"):
        divergence = LOGIT_LOSSES.get(name)
        resolved = check_logits_args(name, args)
        build_pair = TAIL_MODES.get(tail)
        if not temperature > 0:
            raise PipelineError(f"temperature must be > 0, got {temperature}")
        n = student_logits.shape[0]
        _check_rows("student_logits", student_logits, n, 2)
        _check_rows("topk_ids", topk_ids, n, 2)
        _check_rows("topk_logits", topk_logits, n, 2)
        _check_rows("lse", lse, n, 1)
        _check_rows("mask", mask, n, 1)
        if topk_ids.shape != topk_logits.shape:
            raise ValueError(f"topk_ids {tuple(topk_ids.shape)} != topk_logits {tuple(topk_logits.shape)}")

        rows = mask.to(torch.bool).nonzero(as_tuple=True)[0]  # [M]
        total = divergence_sum(
            divergence, build_pair, resolved,
            student_logits.index_select(0, rows),  # [M, V], a fresh copy owned by the tail mode
            topk_ids.long().index_select(0, rows),  # cache ids may be uint16/uint32
            topk_logits.index_select(0, rows),
            lse.index_select(0, rows),
            float(temperature),
        )
        return total * (temperature**2 / max(rows.numel(), 1))


def divergence_sum(divergence: Divergence, build_pair: TailMode, args: Mapping[str, float], student_rows: torch.Tensor,
                   topk_ids: torch.Tensor, topk_logits: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of the divergence (no T^2, no mean): the part the dense and the chunked paths share.
    `student_rows` [M, V] must be a tensor the caller gives away (the tail mode may scale it in place);
    topk_ids [M, k] long, topk_logits [M, k], lse [M] at T; `args` resolved (check_logits_args)."""
    return divergence.fn(build_pair(student_rows, topk_ids, topk_logits, lse, temperature), args).sum()


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over masked positions; [N, V], [N] long, [N] bool -> scalar."""
    with torch.profiler.record_function("distill/cross_entropy"):
        n = student_logits.shape[0]
        _check_rows("student_logits", student_logits, n, 2)
        _check_rows("targets", targets, n, 1)
        _check_rows("mask", mask, n, 1)
        rows = mask.to(torch.bool).nonzero(as_tuple=True)[0]  # [M]
        logits = student_logits.index_select(0, rows).float()  # [M, V]
        total = F.cross_entropy(logits, targets.index_select(0, rows).long(), reduction="sum")
        return total / max(rows.numel(), 1)

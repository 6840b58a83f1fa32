"""Logit-distillation losses against a top-k teacher cache (DESIGN.md section 3).

The teacher side of every position is (ids I [k], raw logits z_I [k], lse = logsumexp(z / T) over the
full teacher vocab), so p_i = exp(z_i / T - lse) is exact for i in I and p_tail = 1 - sum_I p_i.

Tail modes build a pair of discrete distributions over the same support, each as (weights, logs):
- `bucket`: the (k+1)-bucket coarsening, I plus one tail bucket; equals the full-vocab divergence at k = V.
- `renormalize`: the top-k ids only, both sides renormalised (biased at T > 1; kept for comparison).
Divergences (`kl`, `reverse_kl`, `skew_kl`, `skew_reverse_kl`) act on such a pair, row by row.

Everything is computed in fp32. Memory: the bucket mode builds exactly one [M, V] fp32 scaled copy of the
student rows and its log-softmax (M = valid positions); everything after that is [M, k+1].
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

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


Divergence = Callable[[Pair, float], torch.Tensor]  # (pair, skew_lambda) -> [M]
TailMode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], Pair]

LOGIT_LOSSES: Registry[Divergence] = Registry("logits loss")
TAIL_MODES: Registry[TailMode] = Registry("logits tail mode")


# ---- divergences over a Pair -------------------------------------------------------------------------


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w_a: float) -> torch.Tensor:
    """log(w_a * a + (1 - w_a) * b), stable; w_a in [0, 1] (a zero weight drops that side exactly)."""
    la = math.log(w_a) if w_a > 0 else -math.inf
    lb = math.log1p(-w_a) if w_a < 1 else -math.inf
    return torch.logaddexp(log_a + la, log_b + lb)


@LOGIT_LOSSES.register("kl")
def forward_kl(pair: Pair, skew_lambda: float = 0.0) -> torch.Tensor:
    """KL(p || q) per row [M]."""
    return (pair.p * (pair.log_p - pair.log_q)).sum(-1)


@LOGIT_LOSSES.register("reverse_kl")
def reverse_kl(pair: Pair, skew_lambda: float = 0.0) -> torch.Tensor:
    """KL(q || p) per row [M]."""
    return (pair.q * (pair.log_q - pair.log_p)).sum(-1)


@LOGIT_LOSSES.register("skew_kl")
def skew_kl(pair: Pair, skew_lambda: float) -> torch.Tensor:
    """DistiLLM skew KL: KL(p || lam p + (1 - lam) q) per row [M]; lam = 0 is forward KL."""
    log_m = _log_mix(pair.log_p, pair.log_q, skew_lambda)
    return (pair.p * (pair.log_p - log_m)).sum(-1)


@LOGIT_LOSSES.register("skew_reverse_kl")
def skew_reverse_kl(pair: Pair, skew_lambda: float) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(q || (1 - lam) p + lam q) per row [M]; lam = 0 is reverse KL."""
    log_m = _log_mix(pair.log_p, pair.log_q, 1.0 - skew_lambda)
    return (pair.q * (pair.log_q - log_m)).sum(-1)


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
    log_p = torch.log_softmax(topk_logits.float() / temperature, dim=-1)  # [M, k]
    student_in = student_rows.gather(-1, topk_ids).float()  # [M, k]
    log_q = torch.log_softmax(student_in / temperature, dim=-1)  # [M, k]
    return Pair(p=log_p.exp(), log_p=log_p, q=log_q.exp(), log_q=log_q)


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
    skew_lambda: float = 0.1,
) -> torch.Tensor:
    """T^2 * mean over masked positions of divergence `name` (scalar, fp32).

    student_logits [N, V] (any float dtype), topk_ids [N, k] (integer ids into V), topk_logits [N, k] raw
    teacher logits, lse [N] = logsumexp(z / T) over the full teacher vocab, mask [N] bool.
    Rows where mask is False are never read into the computation (their values may be anything);
    an all-False mask gives 0 (still attached to the graph).
    """
    divergence = LOGIT_LOSSES.get(name)
    build_pair = TAIL_MODES.get(tail)
    if not temperature > 0:
        raise PipelineError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= skew_lambda <= 1.0:
        raise PipelineError(f"skew_lambda must be in [0, 1], got {skew_lambda}")
    n = student_logits.shape[0]
    _check_rows("student_logits", student_logits, n, 2)
    _check_rows("topk_ids", topk_ids, n, 2)
    _check_rows("topk_logits", topk_logits, n, 2)
    _check_rows("lse", lse, n, 1)
    _check_rows("mask", mask, n, 1)
    if topk_ids.shape != topk_logits.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} != topk_logits {tuple(topk_logits.shape)}")

    rows = mask.to(torch.bool).nonzero(as_tuple=True)[0]  # [M]
    pair = build_pair(
        student_logits.index_select(0, rows),  # [M, V], a fresh copy owned by the tail mode
        topk_ids.long().index_select(0, rows),  # cache ids may be uint16/uint32
        topk_logits.index_select(0, rows),
        lse.index_select(0, rows),
        float(temperature),
    )
    per_row = divergence(pair, float(skew_lambda))  # [M]
    return per_row.sum() * (temperature**2 / max(rows.numel(), 1))


def cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over masked positions; [N, V], [N] long, [N] bool -> scalar."""
    n = student_logits.shape[0]
    _check_rows("student_logits", student_logits, n, 2)
    _check_rows("targets", targets, n, 1)
    _check_rows("mask", mask, n, 1)
    rows = mask.to(torch.bool).nonzero(as_tuple=True)[0]  # [M]
    logits = student_logits.index_select(0, rows).float()  # [M, V]
    total = F.cross_entropy(logits, targets.index_select(0, rows).long(), reduction="sum")
    return total / max(rows.numel(), 1)

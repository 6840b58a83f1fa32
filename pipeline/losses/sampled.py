"""The logits loss from sampled teacher targets (Sparse Logit Sampling, Anshumann et al., ACL 2025).

Per position the cache holds the distinct ids i drawn K times from p_Tp = softmax(z / Tp) (Tp = the proposal
temperature), their counts c_i (sum K) and raw logits z_i, and lse at every cached temperature, so at the
loss temperature T

    p_T(i) = exp(z_i / T - lse_T)                             exact
    w_i    = (c_i / K) * p_T(i) / p_Tp(i)                     (= c_i / K when T = Tp)

and E[w_i] = p_T(i) for every id of the vocabulary (ids never drawn have w = 0). So for any per-id f,
sum_i w_i f(i) is an unbiased estimate of sum_{all ids} p_T(i) f(i). The divergences that are such an
expectation under the teacher take sampled targets:

    kl       sum_i w_i (log p_T(i) - log q_T(i))                          estimates KL(p_T || q_T)
    skew_kl  sum_i w_i (log p_T(i) - log(lam p_T(i) + (1 - lam) q_T(i)))  estimates KL(p_T || lam p_T + (1 - lam) q_T)

with q_T = softmax(s / T) of the student over its whole vocabulary (log q_T(i) = s_i / T - logsumexp(s / T)).
Their gradients with respect to the student logits are unbiased too (the weights do not depend on the
student). The weights are not renormalised: a self-normalised estimate would be biased when T != Tp.
The other divergences (reverse_kl, jsd, gjsd, skew_reverse_kl) weigh ids by the student's probabilities,
which the draws do not estimate: refused with sampled targets.

The pair handed to the divergence carries the weights w in place of p (`Pair.p`), the exact log p_T in
`log_p`: kl and skew_kl read p only as the weight of each term. Empty slots (count 0) weigh 0.
"""

from __future__ import annotations

from typing import Mapping

import torch

from pipeline.errors import PipelineError
from pipeline.losses.logits import LOGIT_LOSSES, Pair, check_logits_args

SAMPLED_DIVERGENCES = ("kl", "skew_kl")


def check_sampled_divergence(name: str) -> None:
    if name not in SAMPLED_DIVERGENCES:
        raise PipelineError(
            f"loss.logits {name} has no unbiased estimate from sampled teacher targets (it weighs ids by the "
            f"student's probabilities); use {' or '.join(SAMPLED_DIVERGENCES)}, or loss.logits_source=topk")


def importance_weights(sample_logits: torch.Tensor, sample_counts: torch.Tensor, lse: torch.Tensor,
                       lse_proposal: torch.Tensor, temperature: float, proposal_temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [M, K], log p_T [M, K]) from the drawn ids' raw logits, counts (0 = empty slot), lse [M] at T and
    lse_proposal [M] at Tp. K is each row's count total (the draws per position)."""
    z = sample_logits.float()
    log_p = z / temperature - lse.float().unsqueeze(-1)  # [M, K] exact log p_T
    counts = sample_counts.float()
    frac = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)  # c_i / K
    if temperature == proposal_temperature:
        return frac, log_p
    log_p_prop = z / proposal_temperature - lse_proposal.float().unsqueeze(-1)  # [M, K] log p_Tp
    return frac * (log_p - log_p_prop).exp(), log_p


def sampled_pair(student_in: torch.Tensor, student_lse: torch.Tensor, sample_logits: torch.Tensor,
                 sample_counts: torch.Tensor, lse: torch.Tensor, lse_proposal: torch.Tensor, temperature: float,
                 proposal_temperature: float) -> Pair:
    """The weighted pair: student_in [M, K] fp32 raw student logits at the drawn ids, student_lse [M] =
    logsumexp(s / T) over the student's whole vocabulary."""
    w, log_p = importance_weights(sample_logits, sample_counts, lse, lse_proposal, temperature, proposal_temperature)
    log_q = student_in / temperature - student_lse.unsqueeze(-1)
    return Pair(p=w, log_p=log_p, q=log_q.exp(), log_q=log_q)


def sampled_logits_loss(
    name: str,
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_logits: torch.Tensor,
    sample_counts: torch.Tensor,
    lse: torch.Tensor,
    lse_proposal: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    proposal_temperature: float,
    args: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """T^2 * mean over masked positions of the divergence's estimate (scalar, fp32): the dense reference.

    student_logits [N, V], sample_ids/sample_logits/sample_counts [N, K], lse/lse_proposal [N] (teacher, at T
    and Tp), mask [N] bool."""
    with torch.profiler.record_function("distill/sampled_logits_loss"):
        check_sampled_divergence(name)
        divergence = LOGIT_LOSSES.get(name)
        resolved = check_logits_args(name, args)
        rows = mask.to(torch.bool).nonzero(as_tuple=True)[0]  # [M]
        log_q_all = torch.log_softmax(student_logits.index_select(0, rows).float() / temperature, dim=-1)  # [M, V]
        ids = sample_ids.long().index_select(0, rows)
        log_q = log_q_all.gather(-1, ids)
        w, log_p = importance_weights(sample_logits.index_select(0, rows), sample_counts.index_select(0, rows),
                                      lse.index_select(0, rows), lse_proposal.index_select(0, rows), temperature,
                                      proposal_temperature)
        total = divergence.fn(Pair(p=w, log_p=log_p, q=log_q.exp(), log_q=log_q), resolved).sum()
        return total * (temperature**2 / max(rows.numel(), 1))

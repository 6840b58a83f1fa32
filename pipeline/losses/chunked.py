"""The vocabulary losses through the output head, chunk by chunk: the full [tokens, vocab] logits never exist.

The student's forward stops at the final (normed) hidden states h [M, d] of the valid next-token
positions; `chunked_head_loss` walks them `chunk` rows at a time. Per chunk it computes the logits from
the output embedding (`HeadSpec` from pipeline/head.py: the weight [V, d], tied or not, and any final-logit
scaling or soft-capping), then

    alpha * sum CE(next token) + beta * T^2 * sum divergence(teacher top-k + tail || student at T)

and at once the gradient with respect to the chunk's logits (`_chunk`: softmax terms by hand on the
[c, V] buffers, the divergence through autograd on [c, k] only, with the same divergence functions and
tail modes as the dense path), which two matmuls turn into the gradients with respect to h and the
weight. Those ([M, d], and [V, d] fp32) are kept and scaled by the incoming gradient in backward, so the
logits are computed once and no tensor larger than [chunk, V] lives at any time, forward or backward.
Without gradients (evaluation, no_grad) the same loop runs without them.

The result is divided by M (the number of valid next-token positions), as the dense path's means are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from pipeline.head import HeadSpec, final_hidden, head_spec, verify_head
from pipeline.losses.logits import GATHERED_NEEDS_LSE, LOGIT_LOSSES, gathered_pair
from pipeline.losses.sampled import sampled_pair

DEFAULT_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class VocabTerms:
    """What the chunked loss computes per row: CE against `targets` (weight alpha; None = not computed)
    and the divergence against the cached top-k (weight beta; None = not computed)."""

    alpha: float
    beta: float
    targets: torch.Tensor | None  # [M] long
    divergence: str = "kl"
    tail: str = "bucket"
    args: Mapping[str, float] | None = None
    temperature: float = 1.0
    topk_ids: torch.Tensor | None = None  # [M, k] long
    topk_logits: torch.Tensor | None = None  # [M, k]
    lse: torch.Tensor | None = None  # [M] at the temperature
    # sampled targets (pipeline/losses/sampled.py): topk_ids / topk_logits then hold the drawn ids and their
    # logits [M, K], these their counts and the teacher's lse at the proposal temperature
    sample_counts: torch.Tensor | None = None  # [M, K]
    lse_proposal: torch.Tensor | None = None  # [M]
    proposal_temperature: float = 1.0


def _chunk(head: HeadSpec, terms: VocabTerms, h: torch.Tensor, weight: torch.Tensor, a: int, b: int, grad: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows a..b: (weighted sum, CE sum, divergence sum) as fp32 scalars (an unused term is 0) and, with
    `grad`, d(weighted sum)/d(raw logits) [c, V] in fp32.

    The vocabulary-wide work is done by hand on at most three [c, V] buffers: the logits, exp(z - max)
    turned into softmax(z) for CE, exp((z - max) / T) turned into softmax(z / T) for the divergence. The
    divergence itself (every registered one, either tail mode) runs through autograd on [c, k] only: it
    depends on the student only through its logits at the top-k ids and lse_T = logsumexp(z / T), so
        dL/dz = alpha (softmax(z) - onehot(y)) + g_lse softmax(z / T) / T + scatter(top-k ids, g_in).
    """
    z_raw = F.linear(h, weight)  # [c, V]
    z = z_raw.float()
    squash = None
    if head.scale is not None:
        z = z * head.scale
    if head.softcap is not None:
        squash = torch.tanh(z / head.softcap)
        z = squash * head.softcap
    zero = z.new_zeros(())
    ce = div = zero
    m = z.amax(dim=-1, keepdim=True)  # [c, 1]
    grad_z = None
    if terms.targets is not None:
        y = terms.targets[a:b, None]  # [c, 1]
        e = torch.sub(z, m).exp_()  # [c, V]
        s = e.sum(dim=-1, keepdim=True)
        ce = (m + s.log() - z.gather(-1, y)).sum()
        if grad and terms.alpha:
            grad_z = e.div_(s).mul_(terms.alpha)  # alpha softmax(z), in e's buffer
            grad_z.scatter_add_(-1, y, torch.full_like(y, -terms.alpha, dtype=grad_z.dtype))
        del e
    if terms.topk_ids is not None:
        T = float(terms.temperature)
        ids = terms.topk_ids[a:b]
        needs_lse = terms.sample_counts is not None or GATHERED_NEEDS_LSE[terms.tail]
        lse_t = e_t = s_t = None
        if needs_lse:
            e_t = torch.sub(z, m).mul_(1.0 / T).exp_()  # [c, V]
            s_t = e_t.sum(dim=-1, keepdim=True)
            lse_t = (m / T + s_t.log()).squeeze(-1)  # [c]
        coef = terms.beta * T * T
        want = grad and coef > 0
        with torch.enable_grad():
            z_in = z.gather(-1, ids).detach().requires_grad_(want)  # [c, k]
            lse_leaf = lse_t.detach().requires_grad_(want) if needs_lse else None
            pair = _teacher_pair(terms, z_in, lse_leaf, a, b)
            div = LOGIT_LOSSES.get(terms.divergence).fn(pair, terms.args or {}).sum()
            if want:
                leaves = [z_in] + ([lse_leaf] if needs_lse else [])
                grads = torch.autograd.grad(div * coef, leaves)
        div = div.detach()
        if want:
            if needs_lse:
                part = e_t.div_(s_t).mul_(grads[1].unsqueeze(-1) / T)  # g_lse softmax(z / T) / T
                grad_z = part if grad_z is None else grad_z.add_(part)
            if grad_z is None:
                grad_z = torch.zeros_like(z)
            grad_z.scatter_add_(-1, ids, grads[0])
        del e_t
    if grad and grad_z is not None:
        if squash is not None:  # z = cap tanh(u / cap): dz/du = 1 - tanh^2
            grad_z.mul_(squash.square_().neg_().add_(1.0))
        if head.scale is not None:
            grad_z.mul_(head.scale)
    total = terms.alpha * ce + terms.beta * float(terms.temperature) ** 2 * div
    return total, ce, div, grad_z


def _teacher_pair(terms: VocabTerms, z_in: torch.Tensor, lse_leaf: torch.Tensor | None, a: int, b: int):
    """The divergence's pair for rows a..b: top-k with its tail mode, or the importance-weighted draws."""
    T = float(terms.temperature)
    if terms.sample_counts is not None:
        return sampled_pair(z_in, lse_leaf, terms.topk_logits[a:b], terms.sample_counts[a:b], terms.lse[a:b],
                            terms.lse_proposal[a:b], T, float(terms.proposal_temperature))
    return gathered_pair(terms.tail, z_in, lse_leaf, terms.topk_logits[a:b], terms.lse[a:b], T)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, head, terms, chunk, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)  # total, ce, divergence
        for a in range(0, hidden.shape[0], chunk):
            b = min(a + chunk, hidden.shape[0])
            h = hidden[a:b]
            total, ce, div, grad_z = _chunk(head, terms, h, weight, a, b, grad=True)
            if grad_z is not None:
                gz = grad_z.to(h.dtype)
                if need_h:
                    grad_h[a:b] = gz @ weight.to(h.dtype)
                if need_w:
                    if gz.dtype == torch.float32 and h.dtype == torch.float32 and not torch.is_autocast_enabled():
                        grad_w.addmm_(gz.t(), h)
                    else:
                        grad_w.add_((gz.t() @ h).float())
            sums += torch.stack([total, ce, div]).double()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.rows, ctx.weight_dtype = rows, weight.dtype
        out = (sums / max(rows, 1)).float()
        loss, parts = out[0].clone(), out[1:].clone()
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, grad_parts):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / max(ctx.rows, 1)
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        # the [V, d] buffer is scaled in place (no second copy of an embedding-sized tensor): one backward only
        gw = grad_w.mul_(scale).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, head: HeadSpec, terms: VocabTerms, chunk: int = DEFAULT_CHUNK_TOKENS
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(alpha * CE + beta * T^2 * divergence, {"loss_ce", "loss_kl"}) as means over the M rows of `hidden`
    [M, d] (the valid next-token positions), computed `chunk` rows at a time. Differentiable in `hidden`
    and in `head.weight`; the components are detached."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    rows = hidden.shape[0]
    weight = head.weight
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, parts = _ChunkedHeadLoss.apply(hidden, weight, head, terms, int(chunk), rows)
    else:
        with torch.no_grad():
            sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)
            for a in range(0, rows, chunk):
                b = min(a + chunk, rows)
                sums += torch.stack(_chunk(head, terms, hidden[a:b], weight, a, b, grad=False)[:3]).double()
            out = (sums / max(rows, 1)).float()
            loss, parts = out[0], out[1:]
    named = {}
    if terms.targets is not None:
        named["loss_ce"] = parts[0]
    if terms.topk_ids is not None:
        named["loss_kl"] = parts[1] * terms.temperature**2
    return loss, named


def chunk_support(model) -> str:
    """"" when the chunked path reproduces `model`'s logits (checked on a few tokens), else why not."""
    import inspect

    if "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
        return f"{type(model).__name__}.forward takes no logits_to_keep"
    head, why = head_spec(model)
    if head is None:
        return why
    captured = {}
    hook = model.get_decoder().register_forward_hook(
        lambda m, a, out: captured.__setitem__("h", final_hidden(out)))
    try:
        return verify_head(model, head, lambda: captured["h"])
    finally:
        hook.remove()

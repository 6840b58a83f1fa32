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

With exact targets (`ExactTargets`: the teacher's last block output and its head) there is no top-k: each chunk rebuilds the
teacher's [c, V] logits in fp32 from its last block's output, and the divergence runs through autograd on
the full [c, V] distributions (`_exact_divergence`), its gradient added to CE's.

The result is divided by M (the number of valid next-token positions), as the dense path's means are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from pipeline.head import HeadSpec, final_hidden, head_spec, verify_head
from pipeline.losses.logits import (GATHERED_NEEDS_LSE, LOGIT_LOSSES, cross_entropy, exact_logits_loss, exact_pair,
                                   gathered_pair, logits_loss)
from pipeline.losses.sampled import sampled_logits_loss, sampled_pair
from pipeline.targets import BatchTargets, ExactTargets, SampledTargets

# loss.chunk_tokens auto: 512 rows on a CPU (small [chunk, V] buffers, matmuls still efficient); on a GPU as
# many rows as make one [chunk, V] fp32 buffer GPU_BUFFER_SHARE of its memory (the logits' buffer; a second one
# only where exp((z - max) / T) is not a power of e), so the kernels are large and few. An 80 GiB device:
# 1,280 rows at V = 262,144, 6,784 at 49,152.
CPU_CHUNK_TOKENS = 512
GPU_BUFFER_SHARE = 1 / 64
CHUNK_ALIGN = 128
# exact targets hold about this many [chunk, V] fp32 tensors at once (the teacher's logits, both sides' log
# probabilities and probabilities, the divergence's terms and its gradient through autograd): on a GPU the
# auto chunk divides the share among them
EXACT_BUFFERS = 10


def chunk_rows(setting: int | str, vocab: int, device: torch.device | str, total_memory: int | None = None,
               buffers: int = 1) -> int:
    """Rows per chunk for `loss.chunk_tokens` = `setting` (a number, or auto) on `device`; `total_memory`
    (bytes) stands in for the CUDA device's own; `buffers`: the [chunk, V] fp32 tensors the loss holds at
    once (EXACT_BUFFERS for exact targets)."""
    if setting != "auto":
        return int(setting)
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_CHUNK_TOKENS
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(device).total_memory
    rows = int(total_memory * GPU_BUFFER_SHARE) // (4 * int(vocab) * buffers) // CHUNK_ALIGN * CHUNK_ALIGN
    return max(CPU_CHUNK_TOKENS, rows)


@dataclass(frozen=True)
class VocabTerms:
    """What the chunked loss computes per row: CE against `targets` (weight alpha; None = not computed) and
    the divergence against the teacher's targets of one kind (`teacher`, pipeline/targets.py: top-k with its
    tail mode, draws, or the exact distribution; weight beta; None = not computed)."""

    alpha: float
    beta: float
    targets: torch.Tensor | None  # [M] long
    divergence: str = "kl"
    tail: str = "bucket"
    args: Mapping[str, float] | None = None
    temperature: float = 1.0
    teacher: BatchTargets | None = None  # [M, ...] rows

    @property
    def exact(self) -> bool:
        return isinstance(self.teacher, ExactTargets)

    @property
    def gathered(self) -> bool:
        """Whether the divergence reads the student at the teacher's gathered ids (top-k or draws)."""
        return self.teacher is not None and not self.exact

    @property
    def divergence_on(self) -> bool:
        return self.teacher is not None


# exp((z - m) / T) is taken from exp(z - m) as a power (a square root at T = 2), which saves two passes over
# the [c, V] buffer. It is exact up to rounding wherever exp(z - m) is a normal fp32 number. Below that
# (z - m < ln(fp32 tiny) = -87.3) the exponential is flushed toward 0 and so is its power; the true total of
# those elements at T is below V exp(-87.3 / T), which is negligible against the sum (>= 1) while it stays
# under 2^-26. For V = 262,144 that holds up to T = 2.9; a higher T takes the direct exp((z - m) / T).
_LOG_FP32_TINY = math.log(torch.finfo(torch.float32).tiny)


def _power_is_exact(temperature: float, vocab: int) -> bool:
    return math.log(vocab) + _LOG_FP32_TINY / temperature <= -26 * math.log(2)


# On a CPU, exp((z - max) / T) as a power of e is taken this many columns at a time through one small buffer,
# never as a second [c, V] one: a fresh buffer of that size costs the kernel's page faults (as much as a pass
# over it), and a small one stays in cache between its two uses. A GPU's caching allocator has no such cost:
# there it is one block of the whole vocabulary.
CPU_COLUMN_BLOCK = 4096


class _Power:
    """exp((z - max) / T) = e^(1 / T) of a chunk's e = exp(z - max), computed column block by column block."""

    def __init__(self, e: torch.Tensor, temperature: float):
        self.e, self.exponent = e, 1.0 / temperature
        self.width = CPU_COLUMN_BLOCK if e.device.type == "cpu" else e.shape[-1]
        self._buf = torch.empty((e.shape[0], min(self.width, e.shape[-1])), dtype=e.dtype, device=e.device)

    def blocks(self):
        """(e's columns, their power) per block; the power's buffer is reused by the next block."""
        for j in range(0, self.e.shape[-1], self.width):
            e_blk = self.e[:, j:j + self.width]
            out = self._buf[:, :e_blk.shape[-1]]
            if self.exponent == 0.5:
                torch.sqrt(e_blk, out=out)
            else:
                torch.pow(e_blk, self.exponent, out=out)
            yield e_blk, out

    def sum(self) -> torch.Tensor:
        """[c, 1] row sums."""
        return sum(p.sum(dim=-1, keepdim=True) for _, p in self.blocks())


def _chunk(head: HeadSpec, terms: VocabTerms, h: torch.Tensor, weight: torch.Tensor, a: int, b: int, grad: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows a..b: (weighted sum, CE sum, divergence sum) as fp32 scalars (an unused term is 0) and, with
    `grad`, d(weighted sum)/d(raw logits) [c, V] in fp32.

    The vocabulary-wide work is exactly one softmax normaliser per temperature, done by hand in place: the
    logits' [c, V] fp32 buffer becomes e = exp(z - max) (CE's normaliser, and the divergence's at T = 1),
    and e_T = exp((z - max) / T) at another T is a power of e (`_Power`), or a second [c, V] buffer
    where the power is not exact. The divergence
    itself (every registered one, either tail mode) runs through autograd on [c, k] only: it depends on
    the student only through its logits at the top-k ids and lse_T = logsumexp(z / T), so
        dL/dz = alpha (softmax(z) - onehot(y)) + g_lse softmax(z / T) / T + scatter(top-k ids, g_in),
    written into e's buffer in one or two passes.
    """
    z = F.linear(h, weight).float()  # [c, V]: this chunk's own buffer (the matmul's output, or its upcast)
    squash = None
    if head.scale is not None:
        z.mul_(head.scale)
    if head.softcap is not None:
        squash = z.div(head.softcap).tanh_()
        torch.mul(squash, head.softcap, out=z)
    T = float(terms.temperature)
    exact = None
    if terms.exact:  # read z before its buffer turns into exponentials
        exact = _exact_divergence(terms, z, a, b, grad)
    ce_on, kd_on = terms.targets is not None, terms.gathered
    needs_lse = kd_on and (isinstance(terms.teacher, SampledTargets) or GATHERED_NEEDS_LSE[terms.tail])
    zero = z.new_zeros(())
    ce = div = zero
    # everything read from the logits themselves, before their buffer turns into exponentials
    m = z.amax(dim=-1, keepdim=True)  # [c, 1]
    y = terms.targets[a:b, None] if ce_on else None  # [c, 1]
    z_y = z.gather(-1, y) if ce_on else None
    ids = terms.teacher.ids[a:b] if kd_on else None
    z_in = z.gather(-1, ids) if kd_on else None  # [c, k]
    e_t = None
    if needs_lse and T != 1.0 and not _power_is_exact(T, z.shape[-1]):
        e_t = torch.sub(z, m).div_(T).exp_()
    e = s = None
    if ce_on or (needs_lse and e_t is None):
        e = z.sub_(m).exp_()  # in z's buffer
        s = e.sum(dim=-1, keepdim=True)
    if ce_on:
        ce = (m + s.log() - z_y).sum()
    lse_t = s_t = None
    if needs_lse:
        if e_t is None:
            e_t = e if T == 1.0 else _Power(e, T)
        if e_t is e:
            s_t = s
        elif isinstance(e_t, _Power):
            s_t = e_t.sum()
        else:
            s_t = e_t.sum(dim=-1, keepdim=True)
        lse_t = (m / T + s_t.log()).squeeze(-1)  # [c]
    grads = None
    if kd_on:
        coef = terms.beta * T * T
        want = grad and coef > 0
        with torch.enable_grad():
            z_leaf = z_in.detach().requires_grad_(want)
            lse_leaf = lse_t.detach().requires_grad_(want) if needs_lse else None
            pair = _teacher_pair(terms, z_leaf, lse_leaf, a, b)
            div = LOGIT_LOSSES.get(terms.divergence).fn(pair, terms.args or {}).sum()
            if want:
                grads = torch.autograd.grad(div * coef, [z_leaf] + ([lse_leaf] if needs_lse else []))
        div = div.detach()
    grad_z = _logit_grad(terms, z, e, s, e_t, s_t, y, ids, grads, T) if grad else None
    if exact is not None:
        div, grad_exact = exact
        if grad_exact is not None:
            grad_z = grad_exact if grad_z is None else grad_z.add_(grad_exact)
    if grad_z is not None:
        if squash is not None:  # z = cap tanh(u / cap): dz/du = 1 - tanh^2
            grad_z.mul_(squash.square_().neg_().add_(1.0))
        if head.scale is not None:
            grad_z.mul_(head.scale)
    total = terms.alpha * ce + terms.beta * T**2 * div
    return total, ce, div, grad_z


def _exact_divergence(terms: VocabTerms, z: torch.Tensor, a: int, b: int, grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows a..b against exact targets: (divergence sum, d(beta T^2 divergence)/dz [c, V] or None). The
    teacher's logits are rebuilt in fp32 from its last block's output; the divergence runs through autograd
    on the [c, V] rows (every registered one, on the full distributions)."""
    T = float(terms.temperature)
    coef = terms.beta * T * T
    want = grad and coef > 0
    with torch.no_grad():
        z_t = terms.teacher.head.logits(terms.teacher.last[a:b])  # [c, V] fp32
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_(want)
        div = LOGIT_LOSSES.get(terms.divergence).fn(exact_pair(z_leaf, z_t, T), terms.args or {}).sum()
        g = torch.autograd.grad(div * coef, [z_leaf])[0] if want else None
    return div.detach(), g


def _logit_grad(terms: VocabTerms, z, e, s, e_t, s_t, y, ids, grads, T: float) -> torch.Tensor | None:
    """alpha (e / s - onehot(y)) + g_lse e_t / (T s_t) + scatter(ids, g_in), built in the buffers `_chunk`
    leaves: z's buffer, which may hold e, and e_t's, or e_t as a `_Power` of e (each block's power taken
    before that block of e is overwritten). One pass for the softmax terms at T = 1, two at other T. None
    when no term has a gradient."""
    a_col = terms.alpha / s if terms.targets is not None and terms.alpha != 0 else None  # [c, 1]
    t_col = grads[1].unsqueeze(-1) / (T * s_t) if grads is not None and len(grads) > 1 else None  # [c, 1]
    grad_z = None
    if t_col is not None and e_t is e:  # T = 1: both softmax terms in one pass
        grad_z = e.mul_(t_col if a_col is None else a_col + t_col)
    elif t_col is not None and isinstance(e_t, _Power):
        for e_blk, power in e_t.blocks():
            if a_col is None:
                torch.mul(power, t_col, out=e_blk)
            else:
                e_blk.mul_(a_col).addcmul_(power, t_col)
        grad_z = e
    elif t_col is not None:  # e_t in its own buffer
        grad_z = e_t.mul_(t_col) if a_col is None else e.mul_(a_col).addcmul_(e_t, t_col)
    elif a_col is not None:
        grad_z = e.mul_(a_col)
    if a_col is not None:
        grad_z.scatter_add_(-1, y, torch.full_like(y, -terms.alpha, dtype=grad_z.dtype))
    if grads is not None:
        if grad_z is None:
            grad_z = z.zero_()
        grad_z.scatter_add_(-1, ids, grads[0])
    return grad_z


def _teacher_pair(terms: VocabTerms, z_in: torch.Tensor, lse_leaf: torch.Tensor | None, a: int, b: int):
    """The divergence's pair for rows a..b: top-k with its tail mode, or the importance-weighted draws."""
    T = float(terms.temperature)
    t = terms.teacher
    if isinstance(t, SampledTargets):
        return sampled_pair(z_in, lse_leaf, t.logits[a:b], t.counts[a:b], t.lse[a:b], t.lse_proposal[a:b], T,
                            float(t.proposal_temperature))
    return gathered_pair(terms.tail, z_in, lse_leaf, t.logits[a:b], t.lse[a:b], T)


def _matmul_weight(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    """(the head matmuls' dtype, W in it): autocast's dtype inside torch.autocast (training.bf16), else the
    hidden states'. W is cast once per call, not once per chunk and matmul, whether or not autocast caches
    casts; d loss / d logits is then cast once per chunk for both gradient matmuls."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return dtype, weight.to(dtype)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, head, terms, chunk, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # [V, d]: the first chunk's product (no zero fill), then accumulated in place in fp32. A single chunk's
        # product stays in the matmul dtype until backward, as a stock head's weight gradient does
        grad_w = None
        single = hidden.shape[0] <= chunk
        sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)  # total, ce, divergence
        mm_dtype, w_mm = _matmul_weight(hidden, weight)
        for a in range(0, hidden.shape[0], chunk):
            b = min(a + chunk, hidden.shape[0])
            h = hidden[a:b]
            total, ce, div, grad_z = _chunk(head, terms, h, w_mm, a, b, grad=True)
            if grad_z is not None:
                gz = grad_z.to(mm_dtype)
                if need_h:
                    grad_h[a:b] = gz @ w_mm
                if need_w:
                    if grad_w is None:
                        grad_w = gz.t() @ h if single else (gz.t() @ h).float()
                    elif mm_dtype == torch.float32:  # then h is fp32 too (no autocast: W took h's dtype)
                        grad_w.addmm_(gz.t(), h)
                    else:  # a bf16 product added into the fp32 sum, without an fp32 copy of it
                        grad_w.add_(gz.t() @ h)
            sums += torch.stack([total, ce, div]).double()
        if need_w and grad_w is None:  # no term had a gradient
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
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
        # the fp32 [V, d] buffer is scaled in place (no second copy of an embedding-sized tensor; one backward
        # only); a single chunk's bf16 product is scaled in its fp32 copy (elementwise bf16 is slow on a CPU)
        gw = grad_w.float().mul_(scale).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, head: HeadSpec, terms: VocabTerms, chunk: int = CPU_CHUNK_TOKENS
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(alpha * CE + beta * T^2 * divergence, {"loss_ce", "loss_kl"}) as means over the M rows of `hidden`
    [M, d] (the valid next-token positions), computed `chunk` rows at a time. Differentiable in `hidden`
    and in `head.weight`; the components are detached."""
    with torch.profiler.record_function("distill/chunked_head_loss"):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        rows = hidden.shape[0]
        weight = head.weight
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            loss, parts = _ChunkedHeadLoss.apply(hidden, weight, head, terms, int(chunk), rows)
        else:
            with torch.no_grad():
                w_mm = _matmul_weight(hidden, weight)[1]
                sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)
                for a in range(0, rows, chunk):
                    b = min(a + chunk, rows)
                    sums += torch.stack(_chunk(head, terms, hidden[a:b], w_mm, a, b, grad=False)[:3]).double()
                out = (sums / max(rows, 1)).float()
                loss, parts = out[0], out[1:]
        named = {}
        if terms.targets is not None:
            named["loss_ce"] = parts[0]
        if terms.divergence_on:
            named["loss_kl"] = parts[1] * terms.temperature**2
        return loss, named


def dense_vocab_loss(logits: torch.Tensor, terms: VocabTerms) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The dense reference of `chunked_head_loss`: the same terms and result from the full logits [M, V] of
    the same M rows (the model's own head, its final-logit transform included), through the dense losses."""
    with torch.profiler.record_function("distill/dense_vocab_loss"):
        every = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        named: dict[str, torch.Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        if terms.targets is not None:
            named["loss_ce"] = cross_entropy(logits, terms.targets, every)
            total = total + terms.alpha * named["loss_ce"]
        t = terms.teacher
        if isinstance(t, ExactTargets):
            teacher_logits = t.head.logits(t.last)
            named["loss_kl"] = exact_logits_loss(terms.divergence, logits, teacher_logits, terms.temperature, terms.args)
        elif isinstance(t, SampledTargets):
            named["loss_kl"] = sampled_logits_loss(
                terms.divergence, logits, t.ids, t.logits, t.counts, t.lse, t.lse_proposal, every, terms.temperature,
                t.proposal_temperature, args=terms.args)
        elif t is not None:
            named["loss_kl"] = logits_loss(terms.divergence, logits, t.ids, t.logits, t.lse, every,
                                           terms.temperature, tail=terms.tail, args=terms.args)
        if "loss_kl" in named:
            total = total + terms.beta * named["loss_kl"]
        return total, named


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

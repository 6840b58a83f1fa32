"""The output head and the vocabulary losses, chunk by chunk: the full [tokens, vocab] logits never exist.

The student's forward stops at the final (normed) hidden states h [M, d] of the valid next-token
positions; `chunked_head_loss` walks them `chunk` rows at a time. Per chunk it computes the logits from
the output embedding (`HeadSpec`: the weight [V, d], tied or not, and any final-logit scaling or
soft-capping), then

    alpha * sum CE(next token) + beta * T^2 * sum divergence(teacher top-k + tail || student at T)

with exactly the dense path's code (`cross_entropy` rows, `divergence_sum` with the same tail modes and
parameters), and at once the chunk's gradients with respect to h and the weight through a small autograd
graph that is freed before the next chunk. The gradients are kept ([M, d] and [V, d] fp32) and scaled by
the incoming gradient in backward, so the logits are computed once and no tensor larger than
[chunk, V] lives at any time, forward or backward. Without gradients (evaluation, no_grad) the same loop
runs under no_grad.

The result is divided by M (the number of valid next-token positions), as the dense path's means are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from pipeline.losses.logits import LOGIT_LOSSES, TAIL_MODES, divergence_sum

DEFAULT_CHUNK_TOKENS = 512
# final-logit transforms we reproduce, by config attribute (text config)
SOFTCAP_KEYS = ("final_logit_softcapping",)  # Gemma 2/3: z = cap * tanh(z / cap)
SCALE_KEYS = ("logit_scale",)  # Cohere: z = z * scale
DIVIDE_KEYS = ("logits_scaling",)  # Granite: z = z / scaling


@dataclass(frozen=True)
class HeadSpec:
    """logits = transform(h @ weight.T): weight [V, d]; scale multiplies, softcap applies cap * tanh(z / cap)."""

    weight: torch.Tensor
    scale: float | None = None
    softcap: float | None = None

    def logits(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        z = F.linear(h, self.weight if weight is None else weight)  # [c, V]
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


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


def _chunk_sums(head: HeadSpec, terms: VocabTerms, h: torch.Tensor, weight: torch.Tensor, a: int, b: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted sum, CE sum, divergence sum) over rows a..b (fp32 scalars; an unused term is 0)."""
    z = head.logits(h, weight)  # [c, V]
    zero = z.new_zeros((), dtype=torch.float32)
    ce = div = zero
    compute_ce = terms.targets is not None
    if terms.topk_ids is not None:
        owned = z.float()
        if owned is z and compute_ce:
            owned = z.clone()  # the tail mode scales its rows in place; CE still reads z
        div = divergence_sum(
            LOGIT_LOSSES.get(terms.divergence), TAIL_MODES.get(terms.tail), terms.args or {}, owned,
            terms.topk_ids[a:b], terms.topk_logits[a:b], terms.lse[a:b], float(terms.temperature),
        )
    if compute_ce:
        ce = F.cross_entropy(z.float(), terms.targets[a:b], reduction="sum")
    total = terms.alpha * ce + terms.beta * terms.temperature**2 * div
    return total, ce, div


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, head, terms, chunk, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        sums = torch.zeros(3, dtype=torch.float64, device=hidden.device)  # total, ce, divergence
        for a in range(0, hidden.shape[0], chunk):
            b = min(a + chunk, hidden.shape[0])
            with torch.enable_grad():
                h = hidden[a:b].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                total, ce, div = _chunk_sums(head, terms, h, w, a, b)
                wanted = [x for x, need in ((h, need_h), (w, need_w)) if need]
                grads = torch.autograd.grad(total, wanted) if wanted and total.requires_grad else [None] * len(wanted)
            grads = list(grads)
            if need_h and grads[0] is not None:
                grad_h[a:b] = grads.pop(0)
            elif need_h:
                grads.pop(0)
            if need_w and grads and grads[0] is not None:
                grad_w += grads[0]
            sums += torch.stack([total.detach(), ce.detach(), div.detach()]).double()
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
        gh = (grad_h * scale).to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
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
                sums += torch.stack([x.detach() for x in _chunk_sums(head, terms, hidden[a:b], weight, a, b)]).double()
            out = (sums / max(rows, 1)).float()
            loss, parts = out[0], out[1:]
    named = {}
    if terms.targets is not None:
        named["loss_ce"] = parts[0]
    if terms.topk_ids is not None:
        named["loss_kl"] = parts[1] * terms.temperature**2
    return loss, named


def head_spec(model) -> tuple[HeadSpec | None, str]:
    """(HeadSpec, "") for a causal LM whose logits we can reproduce from its final hidden states, else
    (None, why). The caller also checks the result numerically on a few tokens (`verify_head`)."""
    from pipeline.sources.models import text_config

    emb = model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Linear):
        return None, f"the output head is a {type(emb).__name__}, not a Linear"
    if emb.bias is not None:
        return None, "the output head has a bias"
    cfg = text_config(model.config)
    scale = softcap = None
    for key in SCALE_KEYS:
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            scale = float(getattr(cfg, key))
    for key in DIVIDE_KEYS:
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            scale = (scale or 1.0) / float(getattr(cfg, key))
    for key in SOFTCAP_KEYS:
        if getattr(cfg, key, None):
            softcap = float(getattr(cfg, key))
    return HeadSpec(emb.weight, scale, softcap), ""


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


def final_hidden(decoder_output) -> torch.Tensor:
    """The final (normed) hidden states [B, T, d] from a decoder module's output."""
    if hasattr(decoder_output, "last_hidden_state"):
        return decoder_output.last_hidden_state
    return decoder_output[0] if isinstance(decoder_output, (tuple, list)) else decoder_output


def verify_head(model, head: HeadSpec, decoder_output: Callable[[], torch.Tensor], tokens: int = 8) -> str:
    """"" when head.logits(final hidden states) equals the model's own logits on a few tokens (fp32 rounding
    of the head's matmul), else why not. `decoder_output()` returns the last captured final hidden states."""
    device = head.weight.device
    ids = (torch.arange(tokens, device=device) * 7919 % head.weight.shape[0])[None, :]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.float()  # [1, tokens, V]
            got = head.logits(decoder_output()).float()
    finally:
        model.train(was_training)
    if got.shape != ref.shape:
        return f"head logits {tuple(got.shape)} differ in shape from the model's {tuple(ref.shape)}"
    tol = 1e-4 if head.weight.dtype == torch.float32 else 1e-2  # a few roundings of the matmul, not a transform
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    if not err <= tol * max(scale, 1.0):
        return f"head logits differ from the model's by {err:.3g} (max |logit| {scale:.3g})"
    return ""

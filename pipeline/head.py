"""The output head of a causal LM: logits = transform(h @ W.T) from the final (normed) hidden states h.

`head_spec` reads the final-logit transform from the text config (a scale, then a soft cap); the teacher
capture and the student's chunked loss both take it from here. `verify_head` checks a spec against the
model's own forward on a few tokens; `check_capture` checks a capture's top-k logits and ids against it.
A head that is not a plain bias-free Linear, or logits cut to part of the head, is refused by name; a
config attribute that transforms the logits under a name we do not know is caught by those two checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.blocks import text_config
from pipeline.dtypes import DTYPE_NAMES, HALF_ULP
from pipeline.errors import PipelineError

# final-logit transforms we reproduce, by attribute of the text config; applied as z * scale, then the cap
SCALE_KEYS = ("logit_scale", "lm_head_multiplier", "output_multiplier")  # Cohere; Falcon-H1; MuseSpark: z * v
DIVIDE_KEYS = ("logits_scaling", "logits_mup_width_multiplier")  # Granite, MiniCPM3; Inkling: z / v
SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")  # Gemma 2 and others,
# RecurrentGemma, xLSTM: z = cap * tanh(z / cap)
# model types (of the model's config or its text config) whose forward does something else with one of those
# keys: "scale" (multiplies), or None (never applied)
KEY_OVERRIDES = {
    "hyperclovax": {"logits_scaling": "scale"},  # z * logits_scaling
    "hyperclovax_vision_v2": {"logits_scaling": "scale"},
    "mpt": {"logit_scale": None},
    "cohere2_vision": {"logit_scale": None},  # its text config (Cohere2) has one
    "gemma3": {"final_logit_softcapping": None},  # Gemma3ForConditionalGeneration; Gemma3ForCausalLM applies it
}


@dataclass(frozen=True)
class HeadSpec:
    """logits = transform(h @ weight.T): weight [V, d]; scale multiplies, softcap applies cap * tanh(z / cap)."""

    weight: torch.Tensor
    scale: float | None = None
    softcap: float | None = None

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """The final-logit transform of raw logits z = h @ weight.T (fp32): the scale, then the soft cap."""
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.transform(F.linear(h, self.weight if weight is None else weight))  # [c, V]


def head_spec(model) -> tuple[HeadSpec | None, str]:
    """(HeadSpec, "") for a causal LM whose head is a plain bias-free Linear, else (None, why). A config
    attribute we do not know is not seen here: `verify_head` / `check_capture` catch it numerically."""
    emb = model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Linear):
        return None, f"the output head is a {type(emb).__name__}, not a Linear"
    if type(emb).forward is not torch.nn.Linear.forward:
        return None, f"the output head {type(emb).__name__} has its own forward"
    if emb.bias is not None:
        return None, "the output head has a bias"
    cfg = text_config(model.config)
    kept, rows = getattr(cfg, "unpadded_vocab_size", None), emb.weight.shape[0]
    if isinstance(kept, int) and kept < rows:
        return None, f"the forward keeps the first {kept} of the head's {rows} logits (unpadded_vocab_size)"
    ops = {key: "scale" for key in SCALE_KEYS} | {key: "divide" for key in DIVIDE_KEYS}
    ops |= {key: "softcap" for key in SOFTCAP_KEYS}
    for c in (cfg, model.config):
        ops |= KEY_OVERRIDES.get(getattr(c, "model_type", None), {})
    scale = softcap = None
    for key, op in ops.items():
        value = getattr(cfg, key, None)
        if op is None or value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None, f"the config's {key} = {value!r} is not a number"
        if op == "softcap":
            softcap = value or None  # 0 = no cap
        elif op != "scale" and value == 0:
            return None, f"the config's {key} = 0 divides the logits by zero"
        elif value != 1.0:
            scale = (scale or 1.0) * (value if op == "scale" else 1.0 / value)
    return HeadSpec(emb.weight, scale, softcap), ""


# ----------------------------------------------------------------------------- the teacher's whole head
# Exact full-distribution targets (cache.logits exact) rebuild the teacher's logits from its last block's
# output h_n: logits = transform(norm(h_n) @ W.T). The final norms we reproduce, by what they compute (chosen
# by comparing with the module itself, never by class name):
#   rms         w * x / sqrt(mean(x^2) + eps)        Llama, Mistral, Qwen, SmolLM, ...
#   rms_offset  (1 + w) * x / sqrt(mean(x^2) + eps)  Gemma
#   layer       LayerNorm(x; w, b, eps)
NORM_KINDS = ("rms", "rms_offset", "layer")
NORM_PROBE_TOL = 1e-5  # relative: fp32 rounding of a d-wide mean and one rsqrt, far below a wrong formula's error


@dataclass(frozen=True)
class FinalNorm:
    kind: str
    weight: torch.Tensor  # [d]
    eps: float
    bias: torch.Tensor | None = None  # layer only

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """norm(h) in fp32 (the model's own norms compute in fp32 too)."""
        x = h.float()
        w = self.weight.float()
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), w, None if self.bias is None else self.bias.float(), self.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (w + 1.0 if self.kind == "rms_offset" else w)


def final_norm(model) -> tuple[FinalNorm | None, str]:
    """(FinalNorm, "") when the model's final norm is one NORM_KINDS reproduces, checked on a probe against
    the module's own output; else (None, why)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    module = getattr(decoder, "norm", None)
    if not isinstance(module, torch.nn.Module):
        return None, f"no final norm found at {type(decoder).__name__}.norm"
    weight = getattr(module, "weight", None)
    eps = next((getattr(module, k) for k in ("variance_epsilon", "eps") if isinstance(getattr(module, k, None), float)),
               None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        return None, f"the final norm {type(module).__name__} has no 1-d weight and float eps"
    bias = getattr(module, "bias", None)
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(4, weight.shape[0], generator=gen) * 3).to(weight.device, weight.dtype)
    with torch.no_grad():
        want = module(probe).float()
        for kind in NORM_KINDS:
            if (kind == "layer") != isinstance(module, torch.nn.LayerNorm):
                continue
            norm = FinalNorm(kind, weight.detach(), float(eps), bias.detach() if bias is not None else None)
            got = norm(probe)
            tol = NORM_PROBE_TOL if weight.dtype == torch.float32 else 4 * HALF_ULP[DTYPE_NAMES[weight.dtype]]
            if got.shape == want.shape and ((got - want).abs() <= tol * want.abs().clamp_min(1.0)).all():
                return norm, ""
    return None, f"the final norm {type(module).__name__} is not one of {', '.join(NORM_KINDS)}"


@dataclass(frozen=True)
class TeacherHead:
    """The teacher's logits from its last block's output: transform(norm(h_n) @ W.T), all in fp32."""

    norm: FinalNorm
    head: HeadSpec

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h_last.device.type, enabled=False):  # a target: fp32 whatever the student runs in
            return self.head.logits(self.norm(h_last), self.head.weight.float())

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the cache stores (safetensors): the weights, in the teacher's dtype."""
        out = {"norm.weight": self.norm.weight, "lm_head.weight": self.head.weight}
        if self.norm.bias is not None:
            out["norm.bias"] = self.norm.bias
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def record(self) -> dict:
        """The manifest's description of the stored tensors (with tensors(), enough to rebuild this)."""
        return {"norm": self.norm.kind, "eps": self.norm.eps, "scale": self.head.scale, "softcap": self.head.softcap}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], record: dict) -> "TeacherHead":
        norm = FinalNorm(record["norm"], tensors["norm.weight"], float(record["eps"]), tensors.get("norm.bias"))
        return cls(norm, HeadSpec(tensors["lm_head.weight"], record.get("scale"), record.get("softcap")))

    def to(self, device) -> "TeacherHead":
        n, h = self.norm, self.head
        bias = None if n.bias is None else n.bias.to(device)
        return TeacherHead(FinalNorm(n.kind, n.weight.to(device), n.eps, bias),
                           HeadSpec(h.weight.to(device), h.scale, h.softcap))


def teacher_head(model) -> tuple[TeacherHead | None, str]:
    """(TeacherHead, "") for a model whose final norm and head we reproduce, else (None, why) in one line."""
    head, why = head_spec(model)
    if head is None:
        return None, why
    norm, why = final_norm(model)
    if norm is None:
        return None, why
    return TeacherHead(norm, HeadSpec(head.weight.detach(), head.scale, head.softcap)), ""


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


def capture_tolerance(logit_dtype: str, model_dtype: torch.dtype, hidden_size: int) -> float:
    """The bound of `check_capture`, relative to the largest |logit|: what a correct capture may be off by.

    With u half the float spacing at 1 (relative rounding), a captured logit and the model's own differ by
      - the rounding to the stored format: u_store;
      - in a half-precision model: each side rounds the head's output to the model's dtype, each after its
        own matmul (the reference runs on fewer rows, so other kernels and accumulation orders, through every
        block as well as the head), and the reference applies the transform in that dtype too (up to 3
        roundings: / cap, tanh, * cap). 8 u_model; measured <= 1.5 u_model on tiny bf16 models;
      - in an fp32 model the output roundings are negligible against the matmuls' accumulation: ~sqrt(d) u
        of the sum of |terms| per dot product, the sum taken as a few times the largest |logit|:
        16 sqrt(d) u (6.1e-5 at d = 4096); measured <= 7 u at d = 64.
    A transform left out is off by a large fraction of the logits themselves (a factor 1/16 or 8, a soft cap
    missing on logits past the cap): measured >= 33x this bound in bf16.
    """
    u_model = HALF_ULP[DTYPE_NAMES.get(model_dtype, "fp32")]
    if model_dtype in (torch.float16, torch.bfloat16):
        return HALF_ULP[logit_dtype] + 8 * u_model
    return HALF_ULP[logit_dtype] + 16 * math.sqrt(hidden_size) * u_model


def _as_long(x) -> torch.Tensor:
    return x.long() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x).astype(np.int64))


def _as_float(x) -> torch.Tensor:
    return x.float() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x, dtype=np.float32))


def _worst(a: float, t: torch.Tensor) -> float:
    """max(a, t.max()), a NaN counting as +inf (a plain max would drop it)."""
    b = t.amax().float().item() if t.numel() else 0.0
    return math.inf if math.isnan(b) else max(a, b)


def check_capture(model, topk_ids, topk_logits, input_ids, attention_mask=None, logit_dtype: str = "fp16",
                  rows: int = 2) -> None:
    """Raise PipelineError (one line) unless a capture's top-k agrees with the model's own forward.

    topk_ids / topk_logits [B, T, k] (arrays or tensors; the logits decoded to float, logits_from_numpy)
    as captured from input_ids / attention_mask [B, T], stored as `logit_dtype`. The first `rows` rows run
    through `model(...).logits` one at a time; at every non-padding position the model's logits at the
    captured ids must equal the captured ones within `capture_tolerance` times the largest |logit|, and the
    captured top-1 id must hold the model's largest logit (a tie within the same bound allowed). k = 0 (no
    top-k stored): nothing to compare.
    """
    all_ids, all_vals, input_ids = _as_long(topk_ids), _as_float(topk_logits), _as_long(input_ids)
    mask = torch.ones_like(input_ids) if attention_mask is None else _as_long(attention_mask)
    if all_ids.shape[:2] != input_ids.shape or all_vals.shape != all_ids.shape or mask.shape != input_ids.shape:
        raise PipelineError(f"teacher: check_capture got top-k ids {tuple(all_ids.shape)}, logits "
                            f"{tuple(all_vals.shape)} for input_ids {tuple(input_ids.shape)}")
    if all_ids.shape[-1] == 0:
        return
    weight = model.get_output_embeddings().weight
    device = weight.device
    err = top1_gap = scale = 0.0
    was_training = model.training
    model.eval()
    try:
        for r in range(min(rows, input_ids.shape[0])):
            keep = mask[r].bool()
            if not keep.any():
                continue
            with torch.no_grad():
                ref = model(input_ids=input_ids[r : r + 1].to(device), attention_mask=mask[r : r + 1].to(device),
                            use_cache=False).logits[0, keep.to(device)]  # [n, V] in the model's dtype
                ids = all_ids[r][keep].to(device)
                if ids.numel() and not (0 <= ids.min().item() and ids.max().item() < ref.shape[-1]):
                    raise PipelineError(f"teacher: a captured id is outside the model's {ref.shape[-1]} logits")
                at_ids = ref.gather(-1, ids).float()  # [n, k]
                scale = _worst(scale, ref.abs())
                err = _worst(err, (at_ids - all_vals[r][keep].to(device)).abs())
                top1_gap = _worst(top1_gap, ref.amax(-1).float() - at_ids[:, 0])
            del ref
    finally:
        model.train(was_training)
    if not math.isfinite(scale):
        raise PipelineError("teacher: the model's own logits are not finite on the first batch")
    bound = capture_tolerance(logit_dtype, weight.dtype, weight.shape[1]) * scale
    dtype = DTYPE_NAMES.get(weight.dtype, str(weight.dtype))
    if not err <= bound:
        raise PipelineError(f"teacher: the captured logits differ from the model's own forward by {err:.3g} (max "
                            f"|logit| {scale:.3g}; {bound:.3g} allowed for a {dtype} model stored as {logit_dtype}): "
                            f"its final-logit transform is not reproduced")
    if not top1_gap <= bound:
        raise PipelineError(f"teacher: the captured top-1 id is not the model's own argmax: its logit is "
                            f"{top1_gap:.3g} below the largest (max |logit| {scale:.3g}; {bound:.3g} allowed)")

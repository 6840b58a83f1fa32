"""Which decoder architectures pruning understands, and what every one of their tensors is indexed by.

Pruning rewrites a state dict by name, so it has to know, per tensor, which axis runs over hidden
channels, MLP neurons or query heads. A tensor that no rule describes is an error, never silently
copied: a model family we have not looked at must fail loudly instead of producing a broken student.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import PipelineError

# Axis kinds a tensor axis can be indexed by (anything else is left whole).
HIDDEN = "hidden"  # residual-stream channels, size hidden_size
NEURONS = "neurons"  # MLP intermediate units, size intermediate_size
QHEADS = "qheads"  # query heads, rows of size head_dim each (q_proj rows, o_proj columns)


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    # norms inside a decoder layer; all of them normalise hidden_size vectors
    layer_norms: tuple[str, ...]
    # RMSNorm scale convention: y = x_hat * (offset + w); Gemma stores w around 0 (offset 1)
    norm_offset: float
    # embeddings multiplied by sqrt(hidden_size) inside the embedding module (Gemma)
    scaled_embeddings: bool


_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", _LLAMA_NORMS, 0.0, False),
    "mistral": ArchSpec("mistral", _LLAMA_NORMS, 0.0, False),
    "qwen2": ArchSpec("qwen2", _LLAMA_NORMS, 0.0, False),
    "qwen3": ArchSpec("qwen3", _LLAMA_NORMS, 0.0, False),
    "gemma3_text": ArchSpec("gemma3_text", _GEMMA_NORMS, 1.0, True),
}

# Tensor name (relative to one decoder layer) -> {axis: kind}. Axes not listed are kept whole.
# Linear weights are [out, in]: q/k/v/gate/up read the hidden stream on axis 1, o/down write it on axis 0.
_LAYER_AXES: dict[str, dict[int, str]] = {
    "self_attn.q_proj.weight": {0: QHEADS, 1: HIDDEN},
    "self_attn.q_proj.bias": {0: QHEADS},
    "self_attn.k_proj.weight": {1: HIDDEN},  # KV heads stay: grouped-query attention keeps its groups
    "self_attn.k_proj.bias": {},
    "self_attn.v_proj.weight": {1: HIDDEN},
    "self_attn.v_proj.bias": {},
    "self_attn.o_proj.weight": {0: HIDDEN, 1: QHEADS},
    "self_attn.o_proj.bias": {0: HIDDEN},
    "self_attn.q_norm.weight": {},  # [head_dim]: per-head norm, untouched by any width pruning
    "self_attn.k_norm.weight": {},
    "mlp.gate_proj.weight": {0: NEURONS, 1: HIDDEN},
    "mlp.gate_proj.bias": {0: NEURONS},
    "mlp.up_proj.weight": {0: NEURONS, 1: HIDDEN},
    "mlp.up_proj.bias": {0: NEURONS},
    "mlp.down_proj.weight": {0: HIDDEN, 1: NEURONS},
    "mlp.down_proj.bias": {0: HIDDEN},
}
_GLOBAL_AXES: dict[str, dict[int, str]] = {
    "model.embed_tokens.weight": {1: HIDDEN},  # [V, H]
    "model.norm.weight": {0: HIDDEN},
    "lm_head.weight": {1: HIDDEN},  # [V, H]
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def arch_spec(config) -> ArchSpec:
    """The spec for `config.model_type`; a clear error naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PipelineError(
            f"pruning does not support model type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def split_layer_key(key: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); None for non-layer tensors."""
    m = _LAYER_KEY.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


def tensor_axes(key: str, spec: ArchSpec) -> dict[int, str]:
    """{axis: kind} for one state-dict key; raises for a tensor no rule describes."""
    parts = split_layer_key(key)
    if parts is None:
        axes = _GLOBAL_AXES.get(key)
    else:
        name = parts[1]
        if name.endswith(".weight") and name[: -len(".weight")] in spec.layer_norms:
            axes = {0: HIDDEN}
        else:
            axes = _LAYER_AXES.get(name)
    if axes is None:
        raise PipelineError(f"pruning does not know the tensor {key!r} of a {spec.model_type} model")
    return axes


def head_dim(config) -> int:
    """Per-head width; several configs omit it and derive it from hidden_size."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

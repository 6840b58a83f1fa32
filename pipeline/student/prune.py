"""Depth and width surgery on a decoder-only causal LM, and the pruning record (`pruning.json`).

A pruning is described by a `PrunePlan` (which original blocks, hidden channels, MLP neurons and query
heads stay). `build_pruned` applies it by rewriting the state dict by name and loading it into a fresh
model built from a standard config, so layer indices (self_attn.layer_idx, ...), `layer_types` and every
size are those of an ordinary model of the new shape: the result is a plain HF model.

Blocks are 1-based original indices (docs/architecture.md, section 2); neurons, heads and channels are 0-based
tensor indices into the original model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.registry import Registry
from pipeline.student.architectures import (
    HIDDEN,
    NEURONS,
    QHEADS,
    ArchSpec,
    arch_spec,
    head_dim,
    split_layer_key,
    tensor_axes,
)
from pipeline.student.importance import BlockScores, WidthScores

RECORD_FILE = "pruning.json"
RECORD_VERSION = 1


@dataclass
class PrunePlan:
    kept_layers: list[int]  # original 1-based block indices, in order
    kept_channels: list[int] | None = None  # original hidden channels, ascending; None = all
    kept_neurons: dict[int, list[int]] | None = None  # original block -> MLP neurons kept, ascending
    kept_heads: dict[int, list[int]] | None = None  # original block -> query heads kept, ascending


# ----------------------------------------------------------------------------- depth

# (scores, n_remove, removable 1-based blocks in order) -> removed 1-based blocks
DepthMethod = Callable[["BlockScores | None", int, list[int]], list[int]]
DEPTH_METHODS: Registry[DepthMethod] = Registry("pruning method")


@DEPTH_METHODS.register("importance")
def remove_least_important(scores: BlockScores | None, n: int, removable: list[int]) -> list[int]:
    """The n blocks with the lowest block influence 1 - cos(in, out)."""
    if scores is None:
        raise ValueError("importance pruning needs block scores")
    block = scores.block()
    return sorted(sorted(removable, key=lambda b: block[b - 1])[:n])


@DEPTH_METHODS.register("last")
def remove_last(scores: BlockScores | None, n: int, removable: list[int]) -> list[int]:
    """The last n removable blocks (the usual baseline)."""
    return removable[len(removable) - n :]


@DEPTH_METHODS.register("consecutive")
def remove_consecutive(scores: BlockScores | None, n: int, removable: list[int]) -> list[int]:
    """The run of n adjacent blocks whose input and output are closest: 1 - cos(run input, run output)."""
    if scores is None:
        raise ValueError("consecutive pruning needs block scores")
    starts = removable[: len(removable) - n + 1]  # removable blocks are one contiguous range
    best = min(starts, key=lambda s: scores.run(s, n))
    return list(range(best, best + n))


def resolve_amount(amount: str | int | float, num_layers: int, flag: str = "--remove") -> int:
    """`--remove`: a block count ('6') or a fraction of the blocks ('0.2' -> round(0.2 * L))."""
    text = str(amount).strip()
    flag = flag if flag.endswith(":") else flag + " "  # "--remove 6" | "--candidates last:6"
    try:
        value = float(text)
    except ValueError:
        raise PipelineError(f"{flag}{text!r}: expected a number of blocks or a fraction in (0, 1)") from None
    if "." in text or "e" in text.lower():
        if not 0 < value < 1:
            raise PipelineError(f"{flag}{text}: a fraction must lie in (0, 1)")
        n = round(value * num_layers)
    else:
        n = int(value)
    if n < 0:
        raise PipelineError(f"{flag}{text}: must be >= 0")
    if n >= num_layers:
        raise PipelineError(f"{flag}{text}: cannot remove {n} of the model's {num_layers} blocks (at least one must stay)")
    return n


def removable_blocks(num_layers: int, n_remove: int, keep_first: int, keep_last: int) -> list[int]:
    """Blocks that may go (1-based), after protecting the first `keep_first` and last `keep_last`."""
    if keep_first < 0 or keep_last < 0:
        raise PipelineError("--keep-first/--keep-last must be >= 0")
    removable = list(range(1 + keep_first, num_layers - keep_last + 1))
    if n_remove > len(removable):
        raise PipelineError(
            f"cannot remove {n_remove} blocks: only {len(removable)} of {num_layers} are not protected "
            f"(--keep-first {keep_first}, --keep-last {keep_last})"
        )
    return removable


def select_depth(
    method: str, scores: BlockScores | None, num_layers: int, n_remove: int, keep_first: int, keep_last: int
) -> list[int]:
    """Removed blocks (1-based, ascending) for a registered depth method."""
    fn = DEPTH_METHODS.get(method)
    removable = removable_blocks(num_layers, n_remove, keep_first, keep_last)
    if n_remove == 0:
        return []
    removed = sorted(fn(scores, n_remove, removable))
    assert len(removed) == n_remove and set(removed) <= set(removable), (method, removed)
    return removed


# ----------------------------------------------------------------------------- width


@dataclass
class WidthTarget:
    hidden_size: int | None = None  # None = unchanged
    intermediate_size: int | None = None
    num_heads: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.hidden_size, self.intermediate_size, self.num_heads))


def check_width(config, hidden_size: int | None, intermediate_size: int | None, num_heads: int | None) -> WidthTarget:
    """Validate requested widths against the original config; sizes equal to the original become None."""
    old = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
           "num_heads": config.num_attention_heads}
    new = {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_heads": num_heads}
    out = {}
    for key, value in new.items():
        flag = "--" + key.replace("_", "-")
        if value is not None and not 1 <= value <= old[key]:
            raise PipelineError(f"{flag} {value}: must be between 1 and the original {old[key]}")
        out[key] = None if value == old[key] else value
    if out["num_heads"] is not None:
        kv = config.num_key_value_heads or config.num_attention_heads
        if out["num_heads"] % kv:
            raise PipelineError(
                f"--num-heads {num_heads}: must be a multiple of the {kv} key/value heads "
                "(query heads are pruned within each grouped-query group)"
            )
    target = WidthTarget(**out)
    # the sizes must also make a valid config (e.g. hidden_size a multiple of the heads): fail now, not after calibration
    blocks = list(range(1, config.num_hidden_layers + 1))
    pruned_config(config, PrunePlan(
        blocks,
        None if target.hidden_size is None else list(range(target.hidden_size)),
        None if target.intermediate_size is None else {b: list(range(target.intermediate_size)) for b in blocks},
        None if target.num_heads is None else {b: list(range(target.num_heads)) for b in blocks},
    ))
    return target


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, ascending; ties go to the lower index (stable)."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return sorted(order.tolist())


def plan_width(config, scores: WidthScores, kept_layers: list[int], target: WidthTarget) -> PrunePlan:
    """Top-scoring channels (global), neurons and heads (per kept block, uniform counts)."""
    plan = PrunePlan(kept_layers=list(kept_layers))
    if target.hidden_size is not None:
        plan.kept_channels = _top(scores.channel_scores(kept_layers), target.hidden_size)
    if target.intermediate_size is not None:
        plan.kept_neurons = {b: _top(scores.neurons[b - 1], target.intermediate_size) for b in kept_layers}
    if target.num_heads is not None:
        n_heads = config.num_attention_heads
        n_kv = config.num_key_value_heads or n_heads
        per_group_old, per_group_new = n_heads // n_kv, target.num_heads // n_kv
        plan.kept_heads = {}
        for b in kept_layers:
            kept: list[int] = []
            for g in range(n_kv):  # query heads g*rep .. (g+1)*rep-1 share key/value head g
                group = scores.heads[b - 1][g * per_group_old : (g + 1) * per_group_old]
                kept += [g * per_group_old + h for h in _top(group, per_group_new)]
            plan.kept_heads[b] = kept
    return plan


# ----------------------------------------------------------------------------- surgery


def _config_error(e: Exception) -> PipelineError:
    cause = e.__cause__ or e  # strict-dataclass errors wrap the validator's own ValueError
    text = " ".join(str(cause).split()) or type(cause).__name__
    return PipelineError(f"the pruned sizes do not make a valid config: {text}")


def pruned_config(config, plan: PrunePlan):
    """A standard config of the new shape; per-layer lists follow the kept blocks."""
    from huggingface_hub.errors import StrictDataclassError

    old_layers = config.num_hidden_layers
    kept0 = [b - 1 for b in plan.kept_layers]
    d = config.to_dict()
    d["num_hidden_layers"] = len(kept0)
    d["head_dim"] = head_dim(config)  # explicit: several configs would re-derive it from hidden_size
    if plan.kept_channels is not None:
        d["hidden_size"] = len(plan.kept_channels)
    if plan.kept_neurons is not None:
        d["intermediate_size"] = len(next(iter(plan.kept_neurons.values())))
    if plan.kept_heads is not None:
        d["num_attention_heads"] = len(next(iter(plan.kept_heads.values())))
    for key, value in list(d.items()):
        # per-layer lists (layer_types, ...): one entry per block
        if "layer" in key and isinstance(value, list) and len(value) == old_layers:
            d[key] = [value[i] for i in kept0]
    if isinstance(d.get("max_window_layers"), int):
        # Qwen: blocks below max_window_layers use full attention; they stay a prefix of the kept blocks
        d["max_window_layers"] = sum(1 for i in kept0 if i < d["max_window_layers"])
    try:
        return type(config).from_dict(d)
    except (ValueError, TypeError, StrictDataclassError) as e:
        raise _config_error(e) from None


def _index(kind: str, plan: PrunePlan, block: int | None, hd: int) -> torch.Tensor | None:
    """LongTensor of kept positions along an axis of `kind` (None = keep all)."""
    if kind == HIDDEN:
        idx = plan.kept_channels
    elif kind == NEURONS:
        idx = None if plan.kept_neurons is None else plan.kept_neurons[block]
    elif kind == QHEADS:
        if plan.kept_heads is None:
            return None
        heads = torch.as_tensor(plan.kept_heads[block], dtype=torch.long)
        return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)  # head rows, [kept * hd]
    else:
        raise AssertionError(kind)
    return None if idx is None else torch.as_tensor(idx, dtype=torch.long)


def prune_state_dict(
    state_dict: dict[str, torch.Tensor], plan: PrunePlan, spec: ArchSpec, config
) -> dict[str, torch.Tensor]:
    """Renumbered and sliced tensors for the plan. Untouched tensors are the same objects (no copy)."""
    new_index = {b - 1: j for j, b in enumerate(plan.kept_layers)}  # original 0-based -> new 0-based
    hd = head_dim(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if tied and key == "lm_head.weight":
            continue  # the same tensor as the embeddings; re-tied after loading
        axes = tensor_axes(key, spec)
        parts = split_layer_key(key)
        block = None
        if parts is not None:
            if parts[0] not in new_index:
                continue
            block = parts[0] + 1
            key = f"model.layers.{new_index[parts[0]]}.{parts[1]}"
        for axis, kind in axes.items():
            idx = _index(kind, plan, block, hd)
            if idx is not None:
                t = t.index_select(axis, idx)
        out[key] = t
    if spec.scaled_embeddings and plan.kept_channels is not None:
        _rescale_embeddings(out, spec, config.hidden_size, len(plan.kept_channels), tied)
    return out


def _rescale_embeddings(sd: dict[str, torch.Tensor], spec: ArchSpec, old_h: int, new_h: int, tied: bool) -> None:
    """Keep embedding outputs exact when the module multiplies by sqrt(hidden_size) (Gemma).

    E' = c E with c = sqrt(old_h / new_h) gives E'[id] * sqrt(new_h) = E[id] * sqrt(old_h). A tied LM head
    then reads c E too; the final norm's scale (offset + w) is divided by c so the logits stay the same.
    """
    c = math.sqrt(old_h / new_h)
    emb = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = (emb.double() * c).to(emb.dtype)
    if tied:
        w = sd["model.norm.weight"]
        sd["model.norm.weight"] = ((spec.norm_offset + w.double()) / c - spec.norm_offset).to(w.dtype)


@torch.no_grad()
def build_pruned(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A new model of the same class with the plan applied (eval mode, same dtype and device).

    Tensors the plan leaves whole are shared with `model`, so depth-only candidates cost almost no memory.
    """
    from transformers.initialization import no_init_weights

    spec = arch_spec(model.config)
    cfg = pruned_config(model.config, plan)
    sd = prune_state_dict(model.state_dict(), plan, spec, model.config)
    with no_init_weights():
        new = type(model)(cfg)
    missing, unexpected = new.load_state_dict(sd, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(f"pruned state dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    new.generation_config = copy.deepcopy(model.generation_config)
    device = next(model.parameters()).device
    return new.to(device).eval()


# ----------------------------------------------------------------------------- record


def sizes(config) -> dict[str, int]:
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads or config.num_attention_heads,
        "head_dim": head_dim(config),
        "vocab_size": config.vocab_size,
    }


def pruning_record(
    source: str,
    old_config,
    new_config,
    plan: PrunePlan,
    method: str | None,
    width_importance: str | None,
    block_scores: BlockScores | None,
    calibration: dict,
) -> dict:
    """The content of `pruning.json` (see docs/pruning.md for the keys)."""
    n = old_config.num_hidden_layers
    removed = [b for b in range(1, n + 1) if b not in plan.kept_layers]
    scores: dict = {}
    if block_scores is not None:
        scores["block_importance"] = {str(b): float(v) for b, v in enumerate(block_scores.block(), start=1)}
        if removed and removed == list(range(removed[0], removed[-1] + 1)):
            scores["removed_run_importance"] = block_scores.run(removed[0], len(removed))

    def per_block(d: dict[int, list[int]] | None) -> dict[str, list[int]] | None:
        return None if d is None else {str(b): list(v) for b, v in d.items()}

    return {
        "format_version": RECORD_VERSION,
        "source": source,
        "model_type": old_config.model_type,
        "method": method if removed else None,
        "width_importance": width_importance,
        "calibration": calibration,
        "removed_layers": removed,
        "kept_layers": list(plan.kept_layers),
        "scores": scores,
        "kept_channels": plan.kept_channels,
        "kept_neurons": per_block(plan.kept_neurons),
        "kept_heads": per_block(plan.kept_heads),
        "sizes": {"old": sizes(old_config), "new": sizes(new_config)},
    }

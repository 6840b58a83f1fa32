"""A model's anatomy as the project reads it: where a decoder keeps its blocks (the capture, the trainer's hooks
and the pruner share the lookup) and which config describes its language model."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor: a weight split over processes (FSDP2 shards, a tensor-parallel plan)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a possibly sharded one: a DTensor gathered (a collective: every process of its
    mesh calls it), anything else as it is."""
    return tensor.full_tensor() if tensor is not None and is_sharded(tensor) else tensor


def text_config(config):
    """The language-model part of a config (multimodal configs nest it as text_config)."""
    return getattr(config, "text_config", None) or config


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder blocks, in order (block i is `decoder_layers(model)[i - 1]`)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PipelineError(f"cannot find the decoder blocks of {type(model).__name__}")
    return layers

"""Sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`) of the student and its projectors.

`training: {fsdp: full_shard, fsdp_config: {...}}` is read here, not by the Trainer: transformers hands `fsdp` to
accelerate's FSDP plugin, which shards only on accelerators (on a CPU process group accelerate never enters its
FSDP mode: with `use_cpu` the run trains unsharded, without it the Trainer refuses), and which would shard the
student alone, leaving the projectors replicated beside it. So the trainer applies `fully_shard` itself, on
gloo (CPU) and nccl (CUDA) alike: one unit per decoder block, then the root (the embeddings, the final norm and
the head), and one unit per linear projector, all on one 1-D mesh over every process. The Trainer then gets a
model accelerate has already prepared without DDP (`Accelerator.prepare_model(evaluation_mode=True)`, the
route the Trainer itself takes for a model sharded at load time).

The root unit keeps its parameters unsharded from its forward until its backward (reshard_after_forward
False, as accelerate does for the root): the chunked vocabulary loss reads the head's weight after the forward,
and finds there the full weight FSDP gathered for that forward, never a gather of its own.

Checkpoints of a sharded run are sharded too (`ShardedCheckpoint`): every process writes its own shards of the
student, the projectors and the optimizer state with torch.distributed.checkpoint (DCP) into the checkpoint
folder, so no process ever holds the whole state; resuming, and `load_best_model_at_end`, read them back into the
shards. A checkpoint folder therefore needs a filesystem every process sees (one node, or a shared mount). The
run's own outputs stay whole: rank 0 gathers the student into a plain HF folder and the projectors at the end.

CPU offload (`fsdp: full_shard offload`, or fsdp_config `offload_params`) is FSDP2's CPUOffloadPolicy: the
shards, their gradients and the optimizer step live in host memory and each unit is copied to the device for
its forward and backward. The gradient norm then reduces CPU tensors, which nccl cannot: such a run's process
group carries gloo for the CPU beside nccl for CUDA (`init_process_group`).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from pipeline.blocks import is_sharded, whole
from pipeline.errors import PipelineError

FSDP_KEYS = ("fsdp", "fsdp_config")
# training.fsdp words (transformers' spellings): full_shard reshards every block after its forward,
# shard_grad_op keeps it gathered until its backward; auto_wrap is what is always done (a unit per block)
_MODES = {"full_shard": True, "shard_grad_op": False}
_REFUSED_MODES = {"hybrid_shard": "hybrid sharding", "hybrid_shard_zero2": "hybrid sharding",
                  "no_shard": "no_shard (that is DDP: drop training.fsdp)"}
SHARDED_STUDENT = "student_sharded"  # checkpoint-N/<this>/: DCP shards of the student and the projectors
SHARDED_OPTIMIZER = "optimizer_sharded"  # checkpoint-N/<this>/: DCP shards of the optimizer state
# fsdp_config keys (with or without the fsdp_ prefix) with no effect on this path: FSDP1 tuning, loading
# and checkpoint formats (the run directory always holds a plain HF student/ written by rank 0)
_IGNORED_CONFIG = {"min_num_params", "transformer_layer_cls_to_wrap", "auto_wrap_policy", "cpu_ram_efficient_loading",
                   "state_dict_type", "sync_module_states", "use_orig_params", "limit_all_gathers", "forward_prefetch",
                   "backward_prefetch", "xla", "xla_fsdp_v2", "xla_fsdp_grad_ckpt"}


@dataclasses.dataclass(frozen=True)
class FsdpSettings:
    """How the student's blocks are sharded: `reshard_after_forward` (full_shard) frees each block's gathered
    parameters after its forward and gathers them again for its backward."""

    reshard_after_forward: bool = True
    offload: bool = False


# `accelerate launch --use_fsdp` (or an accelerate config file with distributed_type FSDP) passes its FSDP plugin
# to the processes in these variables; the values are accelerate's spellings
_ACCELERATE_FSDP = "ACCELERATE_USE_FSDP"
_ACCELERATE_STRATEGIES = {"1": "full_shard", "FULL_SHARD": "full_shard", "2": "shard_grad_op",
                          "SHARD_GRAD_OP": "shard_grad_op", "3": "no_shard", "NO_SHARD": "no_shard",
                          "4": "hybrid_shard", "HYBRID_SHARD": "hybrid_shard", "5": "hybrid_shard_zero2",
                          "HYBRID_SHARD_ZERO2": "hybrid_shard_zero2"}


def accelerate_fsdp(environ=os.environ) -> dict:
    """The `training:` keys an accelerate FSDP launch asks for ({} without one): fsdp and fsdp_config, read from
    the variables `accelerate launch` sets, so that they go through the same checks as the section's own."""
    if environ.get(_ACCELERATE_FSDP, "false").lower() != "true":
        return {}
    mode = [_ACCELERATE_STRATEGIES.get(environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper(), "full_shard")]
    config = {"fsdp_version": environ.get("FSDP_VERSION", "1")}
    for key in ("reshard_after_forward", "offload_params", "activation_checkpointing"):
        value = environ.get(f"FSDP_{key.upper()}")
        if value is not None and not (key == "reshard_after_forward" and value.upper() in _ACCELERATE_STRATEGIES):
            config[f"fsdp_{key}"] = value
    return {"fsdp": " ".join(mode), "fsdp_config": config}


def take_over_accelerate_fsdp(environ=os.environ) -> None:
    """After `fsdp_settings` has read an accelerate FSDP launch: turn accelerate's own FSDP off in this process,
    so that the Trainer's accelerator neither shards the student a second time nor refuses the projectors."""
    if _ACCELERATE_FSDP in environ:
        environ[_ACCELERATE_FSDP] = "false"


def fsdp_settings(training: dict, environ=os.environ) -> FsdpSettings | None:
    """The `training:` section's FSDP request -> FsdpSettings, None without one. Without `training.fsdp`, an
    accelerate FSDP launch (`accelerate launch --use_fsdp --fsdp_version 2`) is the request. One-line errors,
    before any model loads: DeepSpeed, FSDP version 1, an option this path does not have, FSDP without a
    distributed launch."""
    if not training.get("fsdp") and not training.get("fsdp_config") and accelerate_fsdp(environ):
        training = {**training, **accelerate_fsdp(environ)}
    if training.get("deepspeed"):
        raise PipelineError("training.deepspeed: DeepSpeed is not supported (the projectors train beside the "
                            "student); to shard, set training.fsdp=full_shard under torchrun")
    mode = training.get("fsdp")
    if mode in (None, False, "", []):
        if training.get("fsdp_config"):
            raise PipelineError("training.fsdp_config is set but training.fsdp is not: set training.fsdp=full_shard")
        return None
    words = mode.split() if isinstance(mode, str) else ([] if mode is True else [str(w) for w in mode])
    reshard, offload = True, False
    for word in words:
        if word in _REFUSED_MODES:
            raise PipelineError(f"training.fsdp {word}: {_REFUSED_MODES[word]} is not supported; use full_shard")
        if word in _MODES:
            reshard = _MODES[word]
        elif word == "offload":
            offload = True
        elif word != "auto_wrap":
            raise PipelineError(f"training.fsdp {word!r}: not one of full_shard, shard_grad_op, offload, auto_wrap")
    config = training.get("fsdp_config") or {}
    if not isinstance(config, dict):
        raise PipelineError("training.fsdp_config must be a mapping (fsdp_version, reshard_after_forward, ...)")
    for key, value in config.items():
        name = key.removeprefix("fsdp_")
        if name == "version":
            if str(value) != "2":
                raise PipelineError(f"training.fsdp_config.{key} {value}: only FSDP2 (fully_shard) is supported")
        elif name == "reshard_after_forward":
            reshard = _flag(key, value)
        elif name in ("offload_params", "cpu_offload"):
            offload = _flag(key, value)
        elif name == "activation_checkpointing":
            if _flag(key, value):
                raise PipelineError(f"training.fsdp_config.{key}: set training.activation_checkpointing=true instead "
                                    "(the student's own per-block checkpointing, which the hooks are tested with)")
        elif name not in _IGNORED_CONFIG:
            raise PipelineError(f"training.fsdp_config.{key}: unknown FSDP option")
    if "WORLD_SIZE" not in os.environ:
        raise PipelineError("training.fsdp needs a distributed launch (WORLD_SIZE is not set): start the run with "
                            "torchrun --nproc_per_node N or accelerate launch, or drop training.fsdp")
    return FsdpSettings(reshard_after_forward=reshard, offload=offload)


def _flag(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise PipelineError(f"training.fsdp_config.{key} {value!r}: not true or false")


def shard(model: torch.nn.Module, projectors: torch.nn.ModuleDict, settings: FsdpSettings,
          device: torch.device) -> None:
    """Shard, in place, the student (a unit per decoder block, then the root) and every linear projector (a unit
    each: the loss calls each projector's own forward, which is where FSDP gathers its weight) across all
    processes. Every process must hold the same initial weights (the same checkpoint, the seeded projectors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pipeline.blocks import decoder_layers

    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if settings.offload else OffloadPolicy()
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, offload_policy=offload)
    # the head stays gathered from the forward to the backward for the chunked loss
    fully_shard(model, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    for module in projectors.values():
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                        offload_policy=offload)


def init_process_group(settings: FsdpSettings | None) -> None:
    """Start the process group before the Trainer does, where a sharded run needs more than its default: with
    CPU offload on CUDA, nccl for the devices and gloo for the CPU, where the offloaded gradients' norm is
    reduced (nccl alone has no CPU collectives); and at world 1 (`torchrun --nproc_per_node 1`, one GPU with
    offload), where the Trainer starts none but the mesh needs one. Otherwise the Trainer's own start is kept."""
    if settings is None or torch.distributed.is_initialized():
        return
    if not settings.offload and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)


def full_student_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded student's whole state dict, on rank 0's CPU ({} on the other ranks). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_projectors(projectors, template):
    """`template` (an unsharded copy of the projectors taken before `shard`) holding the sharded projectors'
    current weights, whole, on the CPU (what save_projectors writes). Every rank calls it."""
    with torch.no_grad():
        for key, module in projectors.items():
            for name, p in module.named_parameters():
                getattr(template[key], name).copy_(whole(p).detach().to("cpu"))
    return template


def local_bytes(tensors) -> int:
    """The bytes of `tensors` this process holds: a DTensor's local shard, any other tensor whole."""
    held = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if is_sharded(t) else t
        held += local.numel() * local.element_size()
    return held


class ShardedCheckpoint:
    """A sharded run's checkpoints: the student and the projectors under SHARDED_STUDENT, the optimizer state
    under SHARDED_OPTIMIZER, each written as every process's own shards (torch.distributed.checkpoint) and
    read back into the shards. Every process calls every method (they are collectives).

    The two are one tree, {"student": model, "projectors": projectors}: its parameter names are what the
    optimizer's state is keyed by, so a resumed run may even change the number of processes."""

    def __init__(self, model: torch.nn.Module, projectors: torch.nn.ModuleDict):
        self.tree = torch.nn.ModuleDict({"student": model, "projectors": projectors})

    def save_model(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        dcp.save(get_model_state_dict(self.tree), checkpoint_id=os.path.join(folder, SHARDED_STUDENT))

    def load_model(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        path = self._path(folder, SHARDED_STUDENT)
        state = get_model_state_dict(self.tree)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.tree, state)

    def save_optimizer(self, folder: str, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.tree, _unwrapped(optimizer))
        dcp.save(state, checkpoint_id=os.path.join(folder, SHARDED_OPTIMIZER))

    def load_optimizer(self, folder: str, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        path = self._path(folder, SHARDED_OPTIMIZER)
        optimizer = _unwrapped(optimizer)
        state = get_optimizer_state_dict(self.tree, optimizer)  # the shapes to read into (state made if none)
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(self.tree, optimizer, state)

    @staticmethod
    def _path(folder: str, name: str) -> str:
        path = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise PipelineError(f"checkpoint {folder} has no {name}/ (the shards of a training.fsdp run): it was not "
                                "saved by a sharded run, or its save did not finish")
        return path


def _unwrapped(optimizer):
    """The torch optimizer inside accelerate's wrapper (the state-dict helpers read its param_groups and state)."""
    return getattr(optimizer, "optimizer", optimizer)

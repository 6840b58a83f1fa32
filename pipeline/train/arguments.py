"""The `training:` section -> transformers.TrainingArguments: each value coerced to its field's type (an unknown
key or a bad value is a one-line error), under the project's CPU-friendly defaults and, on a GPU, the DataLoader
defaults of a run from the cache."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import typing

import torch

from pipeline.config import coerce
from pipeline.errors import PipelineError

# CPU-friendly defaults under the user's `training:` section (which wins); a GPU run from the cache also gets
# loader_defaults
TRAINING_DEFAULTS = {
    "output_dir": "runs/train",
    "report_to": "none",
    "logging_steps": 10,
    "dataloader_pin_memory": False,
    "save_total_limit": 2,
    "disable_tqdm": False,  # the CLI quiets transformers' logger, which would otherwise hide the step bar
    "ddp_find_unused_parameters": False,  # every student parameter takes part in the loss: skip DDP's graph scan
}
# TrainingArguments spells "off" as the string "no" (save_strategy, eval_strategy, ...), except report_to, whose
# "no" would name an integration; YAML 1.1 reads a bare `no` as False
_OFF = {"report_to": "none"}


def training_arguments(training: dict, *, online: bool = False, sharded: bool | None = None):
    """cfg.training -> TrainingArguments, each value coerced to its field's type (an unknown key or a bad value
    is a one-line error), under TRAINING_DEFAULTS and, when it trains on a GPU, `loader_defaults`. `online`:
    the live teacher runs in the collator, so the loader stays in the main process. `sharded`: whether the trainer
    shards the student (None: read from the section's fsdp keys)."""
    from transformers import TrainingArguments

    from pipeline.train.fsdp import FSDP_KEYS, fsdp_settings

    if training.get("deepspeed"):
        fsdp_settings({"deepspeed": training["deepspeed"]})  # its one-line refusal
    # the trainer shards itself (pipeline/train/fsdp.py, read by run_train): the Trainer must not see fsdp
    training_fsdp = {key: value for key, value in training.items() if key in FSDP_KEYS}
    training = {key: value for key, value in training.items() if key not in FSDP_KEYS}
    fields = _training_fields()
    unknown = sorted(set(training) - set(fields))
    if unknown:
        raise PipelineError(f"unknown key training.{unknown[0]}: not a transformers.TrainingArguments field")
    user = {key: _training_value(key, value, fields[key]) for key, value in training.items()}
    if online and user.get("dataloader_num_workers"):
        raise PipelineError("--online runs the teacher in the collator: set training.dataloader_num_workers=0")
    loader = loader_defaults(user, cuda=not user.get("use_cpu", False) and torch.cuda.is_available(), online=online,
                             cpus=_usable_cpus(), local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    kwargs = {**TRAINING_DEFAULTS, **loader, **user, "remove_unused_columns": False}
    if sharded is None:
        sharded = fsdp_settings(training_fsdp) is not None
    arguments = _sharded_arguments() if sharded else TrainingArguments
    try:
        return arguments(**kwargs)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"training: {first}") from None


def loader_defaults(training: dict, *, cuda: bool, online: bool, cpus: int, local_world_size: int = 1) -> dict:
    """The DataLoader settings of a run from the cache on a GPU, for the keys `training` leaves unset.

    On a CPU the step is slow enough to hide the cache read in the main process (TRAINING_DEFAULTS). On a GPU it
    is not: each process reads ahead in worker processes (half its share of the `cpus`, at most 4, the rest left
    to the main process), into pinned memory for the copy to the device, kept across epochs and evaluations.
    Online runs build every batch with the teacher in the collator, in the main process: nothing changes."""
    if not cuda or online:
        return {}
    workers = training.get("dataloader_num_workers", min(4, max(1, cpus // local_world_size // 2)))
    defaults = {"dataloader_num_workers": workers, "dataloader_pin_memory": True}
    if workers > 0:  # both are refused without workers (TrainingArguments, DataLoader)
        defaults.update(dataloader_prefetch_factor=4, dataloader_persistent_workers=True)
    return {key: value for key, value in defaults.items() if key not in training}


@functools.cache
def _sharded_arguments() -> type:
    """TrainingArguments for a sharded run (training.fsdp): the Trainer must not move the student to the device
    whole, since it may not fit there; each unit moves as it is sharded, or stays on the CPU offloaded. This is
    the subclass override the Trainer documents for `place_model_on_device`."""
    from transformers import TrainingArguments

    @dataclasses.dataclass
    class ShardedTrainingArguments(TrainingArguments):
        @property
        def place_model_on_device(self) -> bool:
            return False

    return ShardedTrainingArguments


@functools.cache
def _training_fields() -> dict[str, typing.Any]:
    """TrainingArguments' constructor fields -> their resolved types."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}


def _training_value(key: str, value, tp):
    """One `training:` value coerced to its TrainingArguments type by the config schema's rules, a number also
    from text (`1e-4` quoted, or written by a YAML 1.1 tool, is a string). False for a field that takes no bool
    is YAML's reading of a bare `no`: the field's "off" string."""
    where = f"training.{key}"
    try:
        return coerce(value, tp, where, from_text=True)
    except PipelineError:
        if value is False:
            with contextlib.suppress(PipelineError):
                return coerce(_OFF.get(key, "no"), tp, where)
        raise


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

"""The one place that reaches into `transformers.Trainer`'s private methods.

The distillation trainer needs six things the Trainer offers no public argument or callback for:
- its own train sampler (whole cache chunks shuffled, `ChunkShuffleSampler`): `_get_train_sampler`;
- one global gradient norm over the student and the projectors, which live beside the model and are
  clipped with it: `_clip_grad_norm` and `_get_grad_norm` (the Trainer's own norm covers the model only);
- a resume from a checkpoint saved at max_steps that takes no step: the Trainer checks max_steps only after
  a step, so it would take one more (at a constant learning rate that moves the weights); `train` loads the
  checkpoint's weights with `_load_from_checkpoint` and its state instead;
- its evaluation step on the batch the Trainer would use (moved to the device, under the run's context):
  `_prepare_inputs`, reached through `prepared_inputs`;
- the projectors saved into every checkpoint: the public `save_model` tells a checkpoint's save (its private
  `_internal_call` parameter) from a user's, and `checkpoint_saved` runs after the former only;
- nothing else: the best model, evaluation prefixes and gradient-accumulation scaling go through public
  methods, callbacks and the documented `loss_is_scaled_for_ga` attribute.

`TrainerAdapter` overrides exactly those private methods and turns them into named hooks
(`train_sampler`, `clipped_parameters`, `before_grad_norm`, `checkpoint_saved`, and `prepared_inputs` to call). They were written against the transformers
range below, which pyproject.toml pins; `check_trainer_seams()` (run by the tests) confirms that the
installed Trainer still has each private method with the signature relied on, so an upgrade that moves one
fails loudly in the suite rather than silently skipping the projectors' clipping.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput

# [lowest, first untested): the versions these seams were tested on; pyproject.toml pins the same range
TESTED_TRANSFORMERS = ("5.25.0", "5.26.0")

# private method (or a public one with a private parameter) -> its parameters after self, as this module calls or
# overrides it
SEAMS = {
    "_get_train_sampler": ("train_dataset",),
    "_clip_grad_norm": ("model",),
    "_get_grad_norm": ("model", "grad_norm"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_prepare_inputs": ("inputs",),
    "save_model": ("output_dir", "_internal_call"),
}
CALLED_ONLY = ("_load_from_checkpoint", "_prepare_inputs")  # the seams this module calls without overriding


def check_trainer_seams(trainer_cls: type = Trainer) -> list[str]:
    """What no longer matches in `trainer_cls` (a missing method, other parameters); [] when all hold."""
    problems = []
    for name, params in SEAMS.items():
        method = getattr(trainer_cls, name, None)
        if method is None:
            problems.append(f"Trainer.{name} is gone")
            continue
        got = tuple(inspect.signature(method).parameters)[1:]
        if got != params:
            problems.append(f"Trainer.{name}{got} is not Trainer.{name}{params}")
    return problems


class TrainerAdapter(Trainer):
    """A Trainer whose private seams call named hooks; subclasses override the hooks only."""

    # the loss compute_loss returns is a per-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    # ---- hooks
    def train_sampler(self, dataset) -> torch.utils.data.Sampler | None:
        """The training sampler for `dataset`; None keeps the Trainer's own."""
        return None

    def clipped_parameters(self, model) -> list[torch.nn.Parameter]:
        """Every parameter under the one gradient norm (clipped together, logged as grad_norm)."""
        return list(model.parameters())

    def before_grad_norm(self) -> None:
        """Runs before the norm is taken, once or more per optimizer step (e.g. to all-reduce gradients the
        DDP wrapper does not see)."""

    def checkpoint_saved(self, output_dir: str) -> None:
        """Runs after the Trainer has saved a checkpoint's model into `output_dir` (every process)."""

    def prepared_inputs(self, inputs: dict) -> dict:
        """`inputs` as the Trainer's own steps use them (on the device, under its input preparation)."""
        return self._prepare_inputs(inputs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save_model(); then, for a checkpoint, `checkpoint_saved`."""
        super().save_model(output_dir, _internal_call)
        if _internal_call:
            self.checkpoint_saved(output_dir or self.args.output_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """The Trainer's train(), except that resuming from a checkpoint at or past max_steps finishes at once:
        the checkpoint's weights and state, no step (train_loss None: none was taken in this process)."""
        if isinstance(resume_from_checkpoint, str) and self.args.max_steps > 0:
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            if state.global_step >= self.args.max_steps:
                self._load_from_checkpoint(resume_from_checkpoint)
                self.state = state
                return TrainOutput(state.global_step, None, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ---- the private methods, as hooks
    def _get_train_sampler(self, train_dataset=None):
        sampler = self.train_sampler(train_dataset if train_dataset is not None else self.train_dataset)
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def _clip_grad_norm(self, model):
        """Clip all `clipped_parameters` under one norm; returns the norm before clipping."""
        self.before_grad_norm()
        return self.accelerator.clip_grad_norm_(self.clipped_parameters(model), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # max_grad_norm 0: the norm is still logged, over the same parameters
            self.before_grad_norm()
            grad_norm = self.accelerator.clip_grad_norm_(self.clipped_parameters(model), float("inf"))
        return grad_norm

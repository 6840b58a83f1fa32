"""The one place that reaches into `transformers.Trainer`'s private methods.

The distillation trainer needs seven things the Trainer offers no public argument or callback for:
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
- checkpoints that count only once whole: `_save_checkpoint` writes trainer_state.json after the model, the
  projectors, optimizer, scheduler and RNG states, and only then rotates older checkpoints away. So a
  checkpoint folder whose trainer_state.json reads back is whole (`checkpoint_problem`), and a kill mid-save
  leaves the previous whole one in place; the start of a checkpoint's save (`save_model` again) removes the
  trainer_state.json of a folder it rewrites, so that folder, too, counts only once the Trainer has finished
  it. Each process writes its own RNG state; `_save_rng_state` ends with a barrier, so that rank 0 writes the
  trainer state only once every process's files are there. The adapter neither calls nor overrides
  `_save_checkpoint`: `check_trainer_seams` reads its source for that order (SAVE_ORDER);
- checkpoints of a student that holds only shards (FSDP): the Trainer writes and reads a checkpoint's model and
  optimizer whole, from rank 0, through `save_model`, `_save_optimizer_and_scheduler`,
  `_load_optimizer_and_scheduler`, `_load_from_checkpoint` and `_load_best_model`; with a `sharded_checkpoint`
  each of those writes or reads every process's shards instead (the scheduler stays the Trainer's file);
- nothing else: the best model (of an unsharded run), evaluation prefixes and gradient-accumulation scaling go through public
  methods, callbacks and the documented `loss_is_scaled_for_ga` attribute.

`TrainerAdapter` overrides exactly those private methods and turns them into named hooks
(`train_sampler`, `clipped_parameters`, `before_grad_norm`, `checkpoint_saved`, `sharded_checkpoint`, and
`prepared_inputs` to call). They were written against the transformers range below, which pyproject.toml pins; `check_trainer_seams()` (run by the tests) confirms that the
installed Trainer still has each private method with the signature relied on, and that its checkpoint save
still writes trainer_state.json last, so an upgrade that moves one fails loudly in the suite rather than
silently skipping the projectors' clipping or resuming from a half-written checkpoint.
"""

from __future__ import annotations

import inspect
import json
import os
import re

import torch
from transformers import Trainer, TrainerState
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

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
    "_save_optimizer_and_scheduler": ("output_dir",),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_best_model": (),
    "_save_rng_state": ("output_dir",),
}
CALLED_ONLY = ("_prepare_inputs",)  # the seams this module calls without overriding
# the private method whose order of writes `checkpoint_problem` relies on, and what it must call, in this order:
# the model (and through save_model the projectors), the RNG states (after optimizer and scheduler), the
# trainer state, and only then the rotation of older checkpoints
SAVE_ORDER = ("_save_checkpoint", ("self.save_model(", "self._save_optimizer_and_scheduler(", "self._save_rng_state(",
                                   "TRAINER_STATE_NAME", "rotate_checkpoints("))
CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # the folder names get_last_checkpoint reads


def check_trainer_seams(trainer_cls: type = Trainer) -> list[str]:
    """What no longer matches in `trainer_cls` (a missing method, other parameters, a checkpoint save that no
    longer writes trainer_state.json after the rest and before rotating); [] when all hold."""
    problems = []
    for name, params in SEAMS.items():
        method = getattr(trainer_cls, name, None)
        if method is None:
            problems.append(f"Trainer.{name} is gone")
            continue
        got = tuple(inspect.signature(method).parameters)[1:]
        if got != params:
            problems.append(f"Trainer.{name}{got} is not Trainer.{name}{params}")
    name, calls = SAVE_ORDER
    method = getattr(trainer_cls, name, None)
    try:
        source = inspect.getsource(method) if method is not None else ""
    except (OSError, TypeError):
        source = ""
    where = [source.find(call) for call in calls]
    if -1 in where or where != sorted(where):
        problems.append(f"Trainer.{name} no longer calls {', '.join(calls)} in this order")
    return problems


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint folder is not whole, None when it is: its trainer_state.json, the file the
    Trainer writes last in a checkpoint, is there and reads back."""
    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return f"no {TRAINER_STATE_NAME}: its save did not finish"
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return f"{TRAINER_STATE_NAME} is cut short: its save did not finish"
    return None


def checkpoints(folder: str | os.PathLike) -> list[str]:
    """The checkpoint-N folders in `folder`, newest (highest N) first; [] when `folder` is no folder."""
    try:
        names = [n for n in os.listdir(folder) if CHECKPOINT_RE.match(n) and os.path.isdir(os.path.join(folder, n))]
    except OSError:
        return []
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: -int(CHECKPOINT_RE.match(n).group(1)))]


def last_whole_checkpoint(folder: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest whole checkpoint in `folder` or None, [(newer folder, why it is not whole), ...]): what
    get_last_checkpoint would return, minus checkpoints whose save did not finish."""
    skipped = []
    for path in checkpoints(folder):
        why = checkpoint_problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


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

    def sharded_checkpoint(self):
        """How checkpoints are written when the model holds only shards: an object with save_model(folder),
        load_model(folder), save_optimizer(folder, optimizer) and load_optimizer(folder, optimizer), each a
        collective every process calls (pipeline/train/fsdp.ShardedCheckpoint); None: the Trainer's own files."""
        return None

    def prepared_inputs(self, inputs: dict) -> dict:
        """`inputs` as the Trainer's own steps use them (on the device, under its input preparation)."""
        return self._prepare_inputs(inputs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save_model(); then, for a checkpoint, `checkpoint_saved`. A checkpoint's save starts
        here: a folder it rewrites loses its trainer_state.json first, so it is not whole until the Trainer has
        written that file again, last."""
        checkpoint = output_dir is not None and CHECKPOINT_RE.match(os.path.basename(os.path.normpath(output_dir)))
        if _internal_call and checkpoint and self.args.should_save:
            try:
                os.remove(os.path.join(output_dir, TRAINER_STATE_NAME))
            except FileNotFoundError:
                pass
        sharded = self.sharded_checkpoint() if _internal_call and checkpoint else None
        if sharded is not None:
            sharded.save_model(output_dir)
        else:
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
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        sharded = self.sharded_checkpoint()
        if sharded is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        sharded.save_optimizer(output_dir, self.optimizer)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        sharded = self.sharded_checkpoint()
        if sharded is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        sharded.load_optimizer(checkpoint, self.optimizer)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        sharded = self.sharded_checkpoint()
        if sharded is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        sharded.load_model(resume_from_checkpoint)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process's files are written before rank 0's trainer state

    def _load_best_model(self) -> None:
        sharded = self.sharded_checkpoint()
        if sharded is None:
            return super()._load_best_model()
        sharded.load_model(self.state.best_model_checkpoint)

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

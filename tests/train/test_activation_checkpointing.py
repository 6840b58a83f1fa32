"""Activation checkpointing (`training.activation_checkpointing: true`, the student's own per-block checkpointing)
with the hidden-state hooks and the projectors: the run is the unchecked run, to the last bit.

Why bit for bit: transformers checkpoints each decoder block's `forward` (non-reentrant torch.utils.checkpoint),
so the forward hooks that read the mapped blocks' outputs run outside the checkpoint, once per step, on the same
tensors; the backward recomputes each block's forward with the same kernels on the same inputs, then runs the
same backward. No operation changes its operands or its order, so every loss, gradient and weight is identical:
any difference at all means a hook saw a recomputed or a detached output (the hidden and dynamics terms would
then lose or double their gradients)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pipeline.config import load_config
from pipeline.recipes.train import run_train

STEPS = 2


class _Checkpointed(TrainerCallback):
    """Which of the student's blocks recompute their forward in the backward, seen at every step."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append([layer.gradient_checkpointing and layer.training for layer in model.model.layers])


def test_checkpointed_run_equals_the_unchecked_run(tiny, train_overrides):
    runs = {}
    for checkpointing in (False, True):
        out = tiny["root"] / f"checkpointing_{checkpointing}"
        overrides = train_overrides(out, max_steps=STEPS, optim="adamw_torch", learning_rate=0.01,
                                    activation_checkpointing=checkpointing)
        seen = _Checkpointed()
        run_train(load_config(None, tiny["overrides"] + ["loss.delta=0.5"] + overrides), callbacks=[seen])
        assert seen.seen == [[checkpointing] * 2] * STEPS  # every block of the 2-block student, or none
        state = json.loads((out / "trainer_state.json").read_text())
        runs[checkpointing] = ([h for h in state["log_history"] if "loss" in h],
                               load_file(str(out / "student" / "model.safetensors")),
                               load_file(str(out / "projectors.safetensors")))
    (logs, student, projectors), (logs_c, student_c, projectors_c) = runs[False], runs[True]
    assert len(logs) == STEPS and {"loss_hidden", "loss_fdd", "loss_kl", "grad_norm"} <= set(logs[0])
    assert logs_c == logs
    for ours, theirs in ((student_c, student), (projectors_c, projectors)):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
    start = load_file(str(tiny["student"] + "/model.safetensors"))
    assert max((student[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the steps moved the student

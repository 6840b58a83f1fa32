"""An interrupted run resumed from its checkpoint reproduces the uninterrupted loss curve and projectors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pipeline.config import load_config
from pipeline.recipes.train import run_train


class Interrupt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt  # the process dies right after the checkpoint is on disk


def _curve(run_dir):
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [{k: v for k, v in h.items() if k.startswith("loss") or k == "step"}
            for h in state["log_history"] if "loss" in h]


def test_resume_reproduces_curve(tiny, train_overrides):
    # 6 optimizer steps of 2 x 2 sequences over 12 train sequences: crosses two epoch boundaries
    # save_total_limit 1: the checkpoint a run resumes from is deleted when it saves the next one
    extra = dict(max_steps=6, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3, save_total_limit=1,
                 lr_scheduler_type="linear", warmup_steps=1)
    full = tiny["root"] / "resume_full"
    whole = run_train(load_config(None, tiny["overrides"] + train_overrides(full, **extra)))
    assert whole["metrics"]["global_step"] == 6 and whole["metrics"]["steps_this_run"] == 6

    cut = tiny["root"] / "resume_cut"
    cfg = load_config(None, tiny["overrides"] + train_overrides(cut, **extra))
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, callbacks=[Interrupt(3)])
    ckpt = cut / "checkpoint-3"
    assert (ckpt / "projectors.safetensors").is_file() and (ckpt / "projectors.json").is_file()
    assert not (cut / "student").exists()  # no half-written outputs
    start = load_file(str(ckpt / "projectors.safetensors"))  # before the resumed run rotates the checkpoint away
    summary = run_train(cfg, resume="latest")
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert summary["metrics"]["global_step"] == 6 and summary["metrics"]["steps_this_run"] == 3  # what its seconds cover

    a, b = _curve(full), _curve(cut)
    assert [h["step"] for h in a] == [1, 2, 3, 4, 5, 6] and [h["step"] for h in b] == [1, 2, 3, 4, 5, 6]
    for ha, hb in zip(a, b):
        assert ha.keys() == hb.keys()
        for k in ha:
            assert ha[k] == pytest.approx(hb[k], rel=1e-6, abs=1e-9), (ha["step"], k)
    for name in ("projectors.safetensors", "student/model.safetensors"):
        wa, wb = load_file(str(full / name)), load_file(str(cut / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7)
    # the projectors kept training after the checkpoint (restored and optimized, not frozen)
    end = load_file(str(full / "projectors.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_resume_from_the_final_checkpoint_takes_no_step(tiny, train_overrides):
    """A run that died after its last checkpoint resumes to the same weights: no optimizer step beyond
    max_steps (the Trainer alone would take one before checking; with a constant learning rate it moves them)."""
    extra = dict(max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1, lr_scheduler_type="constant")
    full = tiny["root"] / "final_full"
    run_train(load_config(None, tiny["overrides"] + train_overrides(full, **extra)))

    cut = tiny["root"] / "final_cut"
    cfg = load_config(None, tiny["overrides"] + train_overrides(cut, **extra))
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, callbacks=[Interrupt(4)])
    summary = run_train(cfg, resume="latest")
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert summary["metrics"]["global_step"] == 4 and summary["metrics"]["steps_this_run"] == 0
    assert [h["step"] for h in _curve(cut)] == [h["step"] for h in _curve(full)]
    for name in ("projectors.safetensors", "student/model.safetensors"):
        wa, wb = load_file(str(full / name)), load_file(str(cut / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)

"""The projectors in the optimizer step: one global clipping norm with the student, no gradient left over
after a skipped step, and load_best_model_at_end restoring the best checkpoint's projectors."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pipeline.config import load_config
from pipeline.recipes.train import run_train


def _projector_params(optimizer) -> list[torch.Tensor]:
    return list(optimizer.param_groups[-1]["params"])  # the projectors' group is added last


class RecordGrads(TrainerCallback):
    """The gradients the optimizer is about to apply (after clipping), student and projectors apart."""

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.student = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        self.projectors = [p.grad.detach().clone() for p in _projector_params(optimizer)]


def _norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def _grad_norm_logged(out) -> float:
    state = json.loads((out / "trainer_state.json").read_text())
    return next(h["grad_norm"] for h in state["log_history"] if "grad_norm" in h)


def test_one_global_norm_over_student_and_projectors(tiny, train_overrides, tmp_path):
    def run(name: str, max_grad_norm: float) -> RecordGrads:
        rec = RecordGrads()
        out = tmp_path / name
        run_train(load_config(None, tiny["overrides"] + train_overrides(out, max_grad_norm=max_grad_norm)),
                  callbacks=[rec])
        rec.logged = _grad_norm_logged(out)
        return rec

    free = run("free", 1e9)  # never clips
    total = _norm(free.student + free.projectors)
    projector_share = _norm(free.projectors) / total
    assert 0.01 < projector_share < 0.99  # both sides carry gradient: a norm over one side alone differs
    # the logged grad_norm is the pre-clip norm over both, the same fp64 sum up to fp32 rounding
    assert abs(free.logged - total) <= 1e-6 * total

    limit = total / 4
    clipped = run("clipped", limit)
    assert abs(clipped.logged - total) <= 1e-6 * total
    # every gradient, student's and projectors', scaled by the same factor (torch's clip: max / (norm + 1e-6))
    scale = limit / (total + 1e-6)
    for got, ref in zip(clipped.student + clipped.projectors, free.student + free.projectors):
        torch.testing.assert_close(got, ref * scale, rtol=2e-6, atol=1e-12)
    assert abs(_norm(clipped.student + clipped.projectors) - limit) <= 1e-5 * limit


class SkipFirstStep(TrainerCallback):
    """Step 1 is skipped the way fp16 loss scaling skips one (GradScaler.step never calls optimizer.step);
    at the start of step 2 no gradient may be left, the student's nor the projectors'."""

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 0:
            inner = optimizer.optimizer
            self.before = [p.detach().clone() for p in _projector_params(optimizer)]
            inner.step = lambda *a, **k: None  # this step only
            self.inner = inner

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            del self.inner.step  # the class's step again

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 1:
            self.left_student = [p for p in model.parameters() if p.grad is not None]
            self.left_projectors = [p for p in _projector_params(optimizer) if p.grad is not None]
            self.after_skip = [p.detach().clone() for p in _projector_params(optimizer)]


def test_skipped_step_leaves_no_projector_gradient(tiny, train_overrides, tmp_path):
    cb = SkipFirstStep()
    out = tmp_path / "run"
    run_train(load_config(None, tiny["overrides"] + train_overrides(out, max_steps=2)), callbacks=[cb])
    assert cb.left_student == [] and cb.left_projectors == []
    for a, b in zip(cb.before, cb.after_skip):  # the skipped step changed nothing
        assert torch.equal(a, b)
    trained = load_file(str(out / "projectors.safetensors"))
    assert any(not torch.equal(v, b) for v, b in zip(trained.values(), cb.after_skip))  # step 2 did train


def test_load_best_model_at_end_restores_the_best_projectors(tiny, train_overrides, tmp_path):
    out = tmp_path / "run"
    extra = dict(max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                 save_total_limit=None, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                 greater_is_better=True, learning_rate=1e-2)
    run_train(load_config(None, tiny["overrides"] + train_overrides(out, **extra)))
    state = json.loads((out / "trainer_state.json").read_text())
    best = out / state["best_model_checkpoint"].split("/")[-1]
    assert best.name != "checkpoint-3"  # the last step is not the best here: the check below can tell them apart
    final = load_file(str(out / "projectors.safetensors"))
    for name, folder in (("best", best), ("last", out / "checkpoint-3")):
        saved = load_file(str(folder / "projectors.safetensors"))
        same = all(torch.equal(final[k], saved[k]) for k in final)
        assert same == (name == "best"), name
    student = load_file(str(out / "student" / "model.safetensors"))
    best_student = load_file(str(best / "model.safetensors"))
    assert all(torch.equal(student[k], best_student[k]) for k in student)

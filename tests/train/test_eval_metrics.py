"""Held-out instrumentation: eval_cos_L<j> and eval_loss_<component> at every evaluation, checked against a
manual computation (a plain forward with our own hooks, HF's own CE, the cached teacher states)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pipeline.cache import open_cache
from pipeline.config import load_config
from pipeline.recipes.train import run_train
from pipeline.student.projectors import build_projectors


def test_eval_logs_cosine_per_block_and_every_component(tiny, train_overrides):
    out = tiny["root"] / "eval_metrics"
    cfg = load_config(None, tiny["overrides"] + train_overrides(out, max_steps=2, eval_strategy="steps", eval_steps=1))
    run_train(cfg)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 1, 2, 2]  # eval_on_start, every step, and the final evaluate()
    run = json.loads((out / "run.json").read_text())
    layer_map = {int(j): t for j, t in run["layer_map"].items()}
    assert layer_map == {1: 2, 2: 4}
    for h in evals:
        assert {"eval_loss_ce", "eval_loss_kl", "eval_loss_hidden", "eval_cos_L1", "eval_cos_L2",
                "eval_loss_hidden_L1", "eval_loss_hidden_L2"} <= set(h)
        total = 0.4 * h["eval_loss_ce"] + 0.4 * h["eval_loss_kl"] + 0.2 * h["eval_loss_hidden"]
        assert math.isclose(h["eval_loss"], total, rel_tol=1e-5)

    # manual step-0 values: the untrained student, the seeded initial projectors, the cached teacher states
    cache = open_cache(tiny["cache"])
    rows = [cache[i] for i in cache.indices("heldout")]
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows])).long()  # [B, T] packed: all valid
    student = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    captured = {}
    hooks = [student.model.layers[j - 1].register_forward_hook(
        lambda m, a, o, j=j: captured.__setitem__(j, o[0] if isinstance(o, tuple) else o)) for j in layer_map]
    with torch.no_grad():
        ce = student(input_ids=ids, labels=ids).loss.item()  # HF's own shifted mean
    for h in hooks:
        h.remove()
    projectors = build_projectors(layer_map, 24, 32, "auto", "xavier", seed=3)
    start = evals[0]
    assert math.isclose(start["eval_loss_ce"], ce, rel_tol=1e-5)
    for j, t in layer_map.items():
        with torch.no_grad():
            s = projectors[str(j)](captured[j].reshape(-1, 24).double().float())  # [N, 32]
        teacher = torch.from_numpy(np.stack([r["hidden"][t] for r in rows])).reshape(-1, 32)
        cos = F.cosine_similarity(s.double(), teacher.double(), dim=-1).mean().item()
        assert abs(start[f"eval_cos_L{j}"] - cos) <= 1e-6, (j, start[f"eval_cos_L{j}"], cos)
        assert math.isclose(start[f"eval_loss_hidden_L{j}"], 1 - cos, rel_tol=1e-5)
    # training moves the student: later evaluations see other cosines
    assert evals[-1]["eval_cos_L1"] != start["eval_cos_L1"]

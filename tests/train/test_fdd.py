"""FDD through the trainer's loss path vs a float64 computation from the definition (own hooks, own
projector application, the teacher's block outputs from its own forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from pipeline.cache import open_cache
from pipeline.errors import PipelineError
from pipeline.losses.spec import LossSpec
from pipeline.student.layer_map import build_layer_map
from pipeline.student.projectors import build_projectors
from pipeline.train.dataset import hidden_key
from pipeline.train.trainer import UniversalDistillationTrainer
from tests.numerics import U, assert_within
from tests.numerics import gamma as gamma_n


def _block_outputs(model, ids, attention, layers) -> dict[int, torch.Tensor]:
    """{j: output of block j (1-based), before the final norm} [B, T, d] from our own forward hooks."""
    got = {}
    hooks = [model.model.layers[j - 1].register_forward_hook(
        lambda m, a, o, j=j: got.__setitem__(j, o[0] if isinstance(o, tuple) else o)) for j in layers]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention, use_cache=False)
    for h in hooks:
        h.remove()
    return got


def _fdd_rounding(s, e_s, t, pairs) -> float:
    """Bound on |fp32 FDD - exact FDD| for projected student states s[j] [M, d] (float64, their fp32 errors
    e_s[j]) and exact teacher states t[j]: per pair the steps ds = s_b - s_a and dt = t_b - t_a (one rounding
    each, and ds carries both inputs' errors); the cosine of two d-vectors, normalise-then-dot or
    dot / (norm * norm): two d-term sums of squares (relative gamma(d)), square roots, divides and products
    (4 roundings) and the d-term dot product (gamma(d)), relative to A = sum_i |ds_i dt_i| / (|ds| |dt|) <= 1,
    so (2 gamma(d) + 4U) A, plus the steps' errors through d cos / d ds = (dt^ - cos ds^) / |ds|; then
    1 - cos (one rounding), the mean over the M tokens (gamma(M - 1) of the sum of |terms|, a divide) and
    the mean over the pairs (the same)."""
    per_pair, e_pair = [], []
    for a, b in pairs:
        ds, dt = s[b] - s[a], t[b] - t[a]
        e_ds, e_dt = e_s[b] + e_s[a] + U * ds.abs(), U * dt.abs()
        n_s, n_t = ds.norm(dim=-1, keepdim=True), dt.norm(dim=-1, keepdim=True)
        u_s, u_t = ds / n_s, dt / n_t
        cos = (u_s * u_t).sum(-1, keepdim=True)
        e_cos = ((2 * gamma_n(ds.shape[-1]) + 4 * U) * (u_s * u_t).abs().sum(-1)
                 + ((u_t - cos * u_s).abs() * e_ds).sum(-1) / n_s[:, 0]
                 + ((u_s - cos * u_t).abs() * e_dt).sum(-1) / n_t[:, 0])
        x = 1 - cos[:, 0]
        m = x.mean()
        per_pair.append(m)
        e_pair.append((e_cos + U * x.abs()).mean() + gamma_n(len(x) - 1) * x.abs().mean() + U * m.abs())
    fdd = torch.stack(per_pair).mean()
    return float(torch.stack(e_pair).mean() + gamma_n(len(pairs) - 1) * torch.stack(per_pair).abs().mean()
                 + U * fdd.abs())


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_fdd_from_the_trainer_equals_float64_definition(tiny, tiny_factory, tmp_path, gamma):
    # a 3-block student under the 4-block teacher: uniform map {1: 1, 2: 3, 3: 4}, two consecutive pairs
    student_dir = tiny_factory.model(tmp_path / "student3", layers=3, hidden=24, seed=5)
    layer_map = build_layer_map("uniform", 3, 4, 1, None)
    assert layer_map == {1: 1, 2: 3, 3: 4}
    cache = open_cache(tiny["cache"])
    ids = torch.from_numpy(np.stack([cache[i]["input_ids"] for i in cache.indices("train")[:2]])).long()  # [2, 32]
    length = torch.tensor([32, 19])  # a padded row: its tail must not count
    attention = (torch.arange(32)[None, :] < length[:, None]).long()  # [2, 32]
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    teacher_states = _block_outputs(teacher, ids, attention, sorted(set(layer_map.values())))  # fp32, [2, 32, 32]

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    projectors = build_projectors(layer_map, 24, 32, "auto", "xavier", seed=3)
    proj64 = {j: projectors[str(j)].weight.detach().double() for j in layer_map}  # [32, 24]
    trainer = UniversalDistillationTrainer(
        model=student, args=TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none"),
        projectors=projectors, layer_map=layer_map, loss=LossSpec(alpha=0.0, beta=0.0, gamma=gamma, delta=0.7),
    )
    inputs = {"input_ids": ids, "length": length, **{hidden_key(t): h for t, h in teacher_states.items()}}
    # the block outputs the trainer's forward produces, from our own hooks on that same forward
    own = {}
    hooks = [student.model.layers[j - 1].register_forward_hook(
        lambda m, a, o, j=j: own.__setitem__(j, (o[0] if isinstance(o, tuple) else o).detach())) for j in layer_map]
    total, parts = trainer.distill_loss(trainer.model, inputs)
    for hook in hooks:
        hook.remove()
    trainer.remove_hooks()
    expected = {"loss_ce", "loss_fdd"} | ({"loss_hidden", "loss_hidden_L1", "loss_hidden_L2", "loss_hidden_L3"}
                                          if gamma else set())
    assert set(parts) == expected

    # the definition in float64 on those block outputs: consecutive mapped blocks (1, 2), (2, 3); valid tokens
    # t < length. The trainer's FDD differs from it by its own fp32 rounding only (_fdd_rounding)
    h = {j: own[j].double().reshape(-1, 24)[attention.bool().reshape(-1)] for j in layer_map}  # [M, 24]
    s = {j: h[j] @ proj64[j].T for j in layer_map}  # P_j(h_j) [M, 32]
    e_s = {j: gamma_n(24) * h[j].abs() @ proj64[j].abs().T for j in layer_map}  # 24-term dot products
    valid = attention.bool().reshape(-1)  # [64]
    t = {j: teacher_states[layer_map[j]].double().reshape(-1, 32)[valid] for j in layer_map}  # H_t(j) [M, 32]
    pairs = []
    for a, b in [(1, 2), (2, 3)]:
        ds, dt = s[b] - s[a], t[b] - t[a]
        cos = (ds * dt).sum(-1) / (ds.norm(dim=-1) * dt.norm(dim=-1))
        pairs.append((1 - cos).mean())
    want = float(torch.stack(pairs).mean())
    got = float(parts["loss_fdd"].detach())
    assert 0.05 < want < 1.95  # random blocks: the steps are far from aligned, not degenerate
    assert_within("FDD", got, want, _fdd_rounding(s, e_s, t, [(1, 2), (2, 3)]))
    # the total is the weighted sum of the parts (alpha = beta = 0): in fp32, each weight rounded and
    # multiplied (2 roundings per term) and the sum (one more): gamma(3) of the sum of the terms
    hidden = float(parts["loss_hidden"].detach()) if gamma else 0.0
    assert_within("total", float(total.detach()), 0.7 * got + gamma * hidden, gamma_n(3) * (0.7 * got + gamma * hidden))

    # the padded tail is ignored: garbage there changes nothing
    poisoned = {k: v.clone() for k, v in inputs.items()}
    for tl in teacher_states:
        poisoned[hidden_key(tl)][1, 19:] = 1e6
    trainer2 = UniversalDistillationTrainer(
        model=student, args=TrainingArguments(output_dir=str(tmp_path / "run2"), use_cpu=True, report_to="none"),
        projectors=projectors, layer_map=layer_map, loss=LossSpec(alpha=0.0, beta=0.0, gamma=gamma, delta=0.7),
    )
    assert float(trainer2.distill_loss(trainer2.model, poisoned)[1]["loss_fdd"].detach()) == got
    trainer2.remove_hooks()


def test_unknown_dynamics_refused_by_the_trainer(tiny, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    with pytest.raises(PipelineError, match="unknown dynamics loss 'fdd2'; valid: fdd"):
        UniversalDistillationTrainer(
            model=student, args=TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none"),
            projectors=build_projectors({1: 2, 2: 4}, 24, 32, "auto", "xavier", seed=3), layer_map={1: 2, 2: 4},
            loss=LossSpec(delta=0.2, dynamics="fdd2"),
        )

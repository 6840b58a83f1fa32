"""Calibration statistics and importance scores vs independent computations on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from pipeline.errors import PipelineError
from pipeline.student.architectures import arch_spec
from pipeline.student.importance import WIDTH_IMPORTANCE, BlockScores, collect_stats

H, I, L, NH, NKV = 64, 96, 5, 4, 2


def _llama(seed: int = 0) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=NH, num_key_value_heads=NKV, attention_bias=True)
    return tf.LlamaForCausalLM(cfg).eval()


def _ids(n: int = 6, t: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, (n, t)).astype(np.int32)


@torch.no_grad()
def test_block_importance_matches_hidden_states():
    model = _llama()
    ids = _ids()
    stats = collect_stats(model, arch_spec(model.config), ids, None, batch_size=4, progress=False)
    # independent: HF's hidden_states[i] is the input of block i+1 for i < L (the last one is normed)
    hs = model(torch.as_tensor(ids).long(), output_hidden_states=True).hidden_states
    scores = BlockScores(stats.boundary_cos)
    for b in range(1, L):
        cos = torch.nn.functional.cosine_similarity(hs[b - 1], hs[b], dim=-1).mean()
        assert scores.block()[b - 1] == pytest.approx(1 - float(cos), abs=1e-5)
    # a run of length one is the block itself; a longer run compares its first input with its last output
    assert scores.run(2, 1) == pytest.approx(scores.block()[1])
    cos_run = torch.nn.functional.cosine_similarity(hs[1], hs[4], dim=-1).mean()
    assert scores.run(2, 3) == pytest.approx(1 - float(cos_run), abs=1e-5)
    assert np.allclose(np.diagonal(stats.boundary_cos), 1.0, atol=1e-5)
    assert stats.tokens == ids.size


@torch.no_grad()
def test_padding_is_excluded():
    model = _llama()
    spec = arch_spec(model.config)
    ids = _ids(n=2, t=10)
    padded = np.concatenate([ids, np.full((2, 6), 7, dtype=np.int32)], axis=1)  # [2, 16], 6 pad tokens
    a = collect_stats(model, spec, ids, None, batch_size=2, progress=False)
    b = collect_stats(model, spec, padded, np.array([10, 10]), batch_size=2, progress=False)
    assert b.tokens == a.tokens == 20
    assert np.allclose(a.boundary_cos, b.boundary_cos, atol=1e-5)
    for x, y in zip(a.neuron_sq + a.head_sq, b.neuron_sq + b.head_sq):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-7)


@torch.no_grad()
def test_neuron_and_head_stats_match_manual_computation():
    model = _llama()
    ids = torch.as_tensor(_ids()).long()
    layer = model.model.layers[2]
    captured = {}
    h1 = layer.mlp.register_forward_pre_hook(lambda m, a: captured.__setitem__("mlp_in", a[0]))
    h2 = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("o_in", a[0]))
    model(ids)
    h1.remove(), h2.remove()
    stats = collect_stats(model, arch_spec(model.config), ids.numpy(), None, batch_size=4, progress=False)

    mlp = layer.mlp
    x = captured["mlp_in"]
    a = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)  # [B, T, I]
    assert torch.allclose(stats.neuron_sq[2].float(), (a**2).mean((0, 1)), rtol=1e-4)

    hd = H // NH
    z = captured["o_in"].view(*ids.shape, NH, hd)
    w = layer.self_attn.o_proj.weight  # [H, NH * hd]
    per_head = torch.stack([(z[..., h, :] @ w[:, h * hd:(h + 1) * hd].T).pow(2).sum(-1).mean() for h in range(NH)])
    assert torch.allclose(stats.head_sq[2].float(), per_head, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["activation", "magnitude"])
def test_zeroed_neurons_and_heads_score_zero(kind):
    model = _llama()
    mlp = model.model.layers[1].mlp
    dead = [3, 40, 77]
    mlp.gate_proj.weight[dead] = 0
    mlp.up_proj.weight[dead] = 0
    mlp.down_proj.weight[:, dead] = 0
    hd = H // NH
    model.model.layers[1].self_attn.o_proj.weight[:, hd:2 * hd] = 0  # head 1 writes nothing
    model.model.layers[1].self_attn.q_proj.weight[hd:2 * hd] = 0
    spec = arch_spec(model.config)
    stats = collect_stats(model, spec, _ids(), None, batch_size=4, progress=False)
    scores = WIDTH_IMPORTANCE.get(kind)(model, spec, stats)
    assert torch.all(scores.neurons[1][dead] == 0)
    alive = [i for i in range(I) if i not in dead]
    assert torch.all(scores.neurons[1][alive] > 0)
    assert scores.heads[1][1] == 0 and torch.all(scores.heads[1][[0, 2, 3]] > 0)
    assert scores.channel_scores([1, 2]).shape == (H,)


@torch.no_grad()
def test_channel_scores_follow_norm_outputs():
    model = _llama()
    spec = arch_spec(model.config)
    stats = collect_stats(model, spec, _ids(), None, batch_size=4, progress=False)
    scores = WIDTH_IMPORTANCE.get("activation")(model, spec, stats)
    # blocks 2 and 4 kept: final norm + their two norms, each sqrt(mean y^2)
    expect = stats.norm_sq["model.norm"].float().sqrt()
    for i in (1, 3):
        for n in spec.layer_norms:
            expect = expect + stats.norm_sq[f"model.layers.{i}.{n}"].float().sqrt()
    assert torch.allclose(scores.channel_scores([2, 4]), expect)


def test_width_importance_registry():
    assert WIDTH_IMPORTANCE.names() == ["activation", "magnitude"]
    with pytest.raises(PipelineError, match="activation, magnitude"):
        WIDTH_IMPORTANCE.get("fisher")

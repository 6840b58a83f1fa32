"""Depth and width surgery on tiny random models of every supported architecture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn

from pipeline.errors import PipelineError
from pipeline.student.architectures import ARCHITECTURES, arch_spec
from pipeline.student.importance import WIDTH_IMPORTANCE, BlockScores, WidthScores, collect_stats
from pipeline.student.prune import (
    DEPTH_METHODS,
    PrunePlan,
    WidthTarget,
    build_pruned,
    check_width,
    plan_width,
    pruned_config,
    pruning_record,
    resolve_amount,
    select_depth,
)

H, I, L, NH, NKV, V = 64, 96, 6, 4, 2, 128
_COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
               num_attention_heads=NH, num_key_value_heads=NKV)


def _config(arch: str):
    if arch == "llama":
        return tf.LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=5)
    if arch == "qwen2":  # sliding window from block 3 on (max_window_layers), head_dim derived from hidden
        return tf.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=2)
    if arch == "qwen3":  # q/k norms, head_dim independent of hidden_size
        return tf.Qwen3Config(**_COMMON, head_dim=24)
    if arch == "gemma3_text":  # scaled tied embeddings, (1 + w) norms, alternating sliding/full blocks
        return tf.Gemma3TextConfig(**_COMMON, head_dim=24, sliding_window=5, sliding_window_pattern=2)
    raise AssertionError(arch)


ARCHS = sorted(ARCHITECTURES)


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_config(arch)).eval()
    with torch.no_grad():  # random norm scales so that slicing them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _ids(n: int = 3, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).integers(0, V, (n, t))).long()


class _Skip(nn.Module):
    """A decoder block that returns its input: the manual 'forward without this block'."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _random_plan(model: nn.Module, kept: list[int], seed: int = 0, channels: int = 48, neurons: int = 40,
                 heads_per_group: int = 1) -> PrunePlan:
    g = torch.Generator().manual_seed(seed)
    rep = NH // NKV
    return PrunePlan(
        kept_layers=kept,
        kept_channels=sorted(torch.randperm(H, generator=g)[:channels].tolist()),
        kept_neurons={b: sorted(torch.randperm(I, generator=g)[:neurons].tolist()) for b in kept},
        kept_heads={b: sorted(k * rep + int(h) for k in range(NKV)
                              for h in torch.randperm(rep, generator=g)[:heads_per_group]) for b in kept},
    )


# ----------------------------------------------------------------------------- depth


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_removing_blocks_equals_skipping_them(arch):
    model = _model(arch)
    ids = _ids(t=12)  # longer than the sliding window (5): a wrong layer_types would change the result
    kept = [1, 3, 4, 6]
    pruned = build_pruned(model, PrunePlan(kept))
    for b in (2, 5):
        model.model.layers[b - 1] = _Skip()
    expect = model(ids).logits
    got = pruned(ids).logits
    assert torch.allclose(got, expect, atol=1e-5), (got - expect).abs().max()
    assert pruned.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]
    old_types = getattr(_config(arch), "layer_types", None)
    if old_types is not None:
        assert pruned.config.layer_types == [old_types[b - 1] for b in kept]


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_reloads_with_identical_logits(arch, tmp_path):
    model = _model(arch)
    plan = _random_plan(model, [1, 2, 4, 5])
    pruned = build_pruned(model, plan)
    pruned.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    ids = _ids()
    assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    c = reloaded.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads) == (4, 48, 40, 2)
    assert c.num_key_value_heads == NKV


def test_qwen2_sliding_window_layers_follow_kept_blocks():
    cfg = _config("qwen2")
    assert cfg.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 4
    new = pruned_config(cfg, PrunePlan([2, 3, 6]))
    assert new.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert new.max_window_layers == 1


# ----------------------------------------------------------------------------- width


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_width_keeps_exactly_the_selected_slices(arch):
    model = _model(arch)
    plan = _random_plan(model, [2, 3, 5], seed=1)
    pruned = build_pruned(model, plan)
    ch = torch.tensor(plan.kept_channels)
    hd = model.config.head_dim
    emb = model.model.embed_tokens.weight
    assert torch.equal(pruned.model.embed_tokens.weight, emb[:, ch])
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight[:, ch])
    assert torch.equal(pruned.model.norm.weight, model.model.norm.weight[ch])
    for j, b in enumerate(plan.kept_layers):
        old, new = model.model.layers[b - 1], pruned.model.layers[j]
        n = torch.tensor(plan.kept_neurons[b])
        rows = torch.tensor([h * hd + d for h in plan.kept_heads[b] for d in range(hd)])
        pairs = {
            "mlp.gate_proj.weight": old.mlp.gate_proj.weight[n][:, ch],
            "mlp.up_proj.weight": old.mlp.up_proj.weight[n][:, ch],
            "mlp.down_proj.weight": old.mlp.down_proj.weight[ch][:, n],
            "self_attn.q_proj.weight": old.self_attn.q_proj.weight[rows][:, ch],
            "self_attn.k_proj.weight": old.self_attn.k_proj.weight[:, ch],
            "self_attn.v_proj.weight": old.self_attn.v_proj.weight[:, ch],
            "self_attn.o_proj.weight": old.self_attn.o_proj.weight[ch][:, rows],
            "input_layernorm.weight": old.input_layernorm.weight[ch],
            "post_attention_layernorm.weight": old.post_attention_layernorm.weight[ch],
        }
        if arch == "llama":
            pairs.update({
                "mlp.gate_proj.bias": old.mlp.gate_proj.bias[n],
                "mlp.down_proj.bias": old.mlp.down_proj.bias[ch],
                "self_attn.q_proj.bias": old.self_attn.q_proj.bias[rows],
                "self_attn.k_proj.bias": old.self_attn.k_proj.bias,
                "self_attn.o_proj.bias": old.self_attn.o_proj.bias[ch],
            })
        else:
            pairs["self_attn.q_norm.weight"] = old.self_attn.q_norm.weight
        params = dict(new.named_parameters())
        for name, expect in pairs.items():
            assert torch.equal(params[name], expect), (b, name)


@torch.no_grad()
def test_gemma_scaled_tied_embeddings_stay_exact():
    model = _model("gemma3_text")
    plan = PrunePlan(list(range(1, L + 1)), kept_channels=list(range(0, H, 2)))
    pruned = build_pruned(model, plan)
    ch = torch.tensor(plan.kept_channels)
    ids = _ids()
    # embedding output (sqrt(hidden) scale inside the module) = the original's, sliced
    assert torch.allclose(pruned.model.embed_tokens(ids), model.model.embed_tokens(ids)[..., ch], atol=1e-5)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    # LM head on the final norm: RMS over kept channels, original scale (1 + w) and original embedding rows
    y = torch.randn(2, 5, len(ch))
    x_hat = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    expect = (x_hat * (1 + model.model.norm.weight[ch])) @ model.model.embed_tokens.weight[:, ch].T
    assert torch.allclose(pruned.lm_head(pruned.model.norm(y)), expect, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["activation", "magnitude"])
def test_zeroed_neurons_and_heads_go_first_and_output_is_unchanged(kind):
    model = _model("llama")
    hd = H // NH
    rng = np.random.default_rng(0)
    dead: dict[int, list[int]] = {}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        d = sorted(rng.choice(I, 16, replace=False).tolist())
        dead[i + 1] = d
        mlp.gate_proj.weight[d] = 0
        mlp.gate_proj.bias[d] = 0
        mlp.up_proj.weight[d] = 0
        mlp.up_proj.bias[d] = 0
        mlp.down_proj.weight[:, d] = 0
        # query heads 1 and 3 (one per key/value group) contribute nothing: their o_proj columns are zero
        for h in (1, 3):
            layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            layer.self_attn.q_proj.weight[h * hd:(h + 1) * hd] = 0
            layer.self_attn.q_proj.bias[h * hd:(h + 1) * hd] = 0
    spec = arch_spec(model.config)
    ids = _ids(n=4, t=16)
    stats = collect_stats(model, spec, ids.numpy(), None, batch_size=4, progress=False)
    scores = WIDTH_IMPORTANCE.get(kind)(model, spec, stats)
    kept = list(range(1, L + 1))
    plan = plan_width(model.config, scores, kept, check_width(model.config, None, I - 16, 2))
    for b in kept:
        assert set(plan.kept_neurons[b]) == set(range(I)) - set(dead[b])
        assert plan.kept_heads[b] == [0, 2]
    pruned = build_pruned(model, plan)
    assert torch.allclose(pruned(ids).logits, model(ids).logits, atol=1e-5)


def test_plan_width_takes_top_scores():
    cfg = _config("llama")
    neurons = [torch.arange(I, dtype=torch.float) * (1 if b % 2 else -1) for b in range(L)]
    heads = [torch.tensor([0.5, 0.1, 0.2, 0.9]) for _ in range(L)]
    channels = [torch.zeros(H) for _ in range(L)]
    channels[4][[5, 9]] = 10.0  # block 5's norms want channels 5 and 9
    scores = WidthScores(neurons, heads, channels, torch.linspace(0, 1, H))
    plan = plan_width(cfg, scores, [1, 2, 5], WidthTarget(hidden_size=4, intermediate_size=3, num_heads=2))
    assert plan.kept_channels == [5, 9, 62, 63]
    assert plan.kept_neurons[1] == [0, 1, 2] and plan.kept_neurons[2] == [93, 94, 95]
    assert plan.kept_heads[1] == [0, 3]  # one head per group (0,1) and (2,3)
    plan = plan_width(cfg, scores, [1, 2, 6], WidthTarget(hidden_size=2))
    assert plan.kept_channels == [62, 63]  # block 5 removed: its norms no longer vote


# ----------------------------------------------------------------------------- choices and errors


def _scores(block: list[float]) -> BlockScores:
    """Boundary cosines whose adjacent entries give `block`; runs multiply 'distance' (cos = prod of cos)."""
    n = len(block)
    cos = np.ones((n + 1, n + 1))
    for i in range(n + 1):
        for j in range(i + 1, n + 1):
            cos[i, j] = cos[j, i] = float(np.prod([1 - block[k] for k in range(i, j)]))
    return BlockScores(cos)


def test_depth_methods():
    s = _scores([0.9, 0.05, 0.3, 0.02, 0.04, 0.5, 0.01, 0.6])
    assert DEPTH_METHODS.names() == ["consecutive", "importance", "last"]
    assert select_depth("importance", s, 8, 3, 0, 0) == [4, 5, 7]
    assert select_depth("last", s, 8, 3, 0, 0) == [6, 7, 8]
    assert select_depth("consecutive", s, 8, 2, 0, 0) == [4, 5]
    assert select_depth("last", s, 8, 2, 0, 1) == [6, 7]  # last block protected
    assert select_depth("importance", s, 8, 2, 0, 2) == [4, 5]
    assert select_depth("importance", s, 8, 0, 0, 0) == []
    with pytest.raises(PipelineError, match="consecutive, importance, last"):
        DEPTH_METHODS.get("random")
    with pytest.raises(PipelineError, match="only 2 of 8"):
        select_depth("importance", s, 8, 3, 3, 3)


def test_resolve_amount():
    assert resolve_amount("6", 30) == 6
    assert resolve_amount("0.2", 30) == 6
    for bad in ("30", "31", "-1", "1.5", "six"):
        with pytest.raises(PipelineError):
            resolve_amount(bad, 30)


def test_width_errors():
    cfg = _config("llama")
    assert check_width(cfg, H, None, None) == WidthTarget()  # the original size is no change
    with pytest.raises(PipelineError, match="--hidden-size 65"):
        check_width(cfg, 65, None, None)
    with pytest.raises(PipelineError, match="--intermediate-size 0"):
        check_width(cfg, None, 0, None)
    with pytest.raises(PipelineError, match="multiple of the 2 key/value heads"):
        check_width(cfg, None, None, 3)
    with pytest.raises(PipelineError, match="hidden size .30. is not a multiple of the number of attention"):
        check_width(_config("gemma3_text"), 30, None, None)


def test_unsupported_architecture():
    with pytest.raises(PipelineError, match="'gpt2'.*gemma3_text, llama, mistral, qwen2, qwen3"):
        arch_spec(tf.GPT2Config())


def test_record():
    model = _model("llama")
    plan = _random_plan(model, [1, 2, 3, 4])
    pruned = build_pruned(model, plan)
    rec = pruning_record("src", model.config, pruned.config, plan, "consecutive", "activation",
                         _scores([0.1] * L), {"source": "x"})
    assert rec["kept_layers"] == [1, 2, 3, 4] and rec["removed_layers"] == [5, 6]
    assert rec["scores"]["block_importance"]["1"] == pytest.approx(0.1)
    assert rec["scores"]["removed_run_importance"] == pytest.approx(1 - 0.9**2)
    assert rec["sizes"]["old"]["hidden_size"] == H and rec["sizes"]["new"]["hidden_size"] == 48
    assert rec["kept_neurons"]["3"] == plan.kept_neurons[3]
    assert math.isfinite(rec["scores"]["block_importance"]["6"])

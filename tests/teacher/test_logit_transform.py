"""Final-logit transforms (pipeline/head.py) against each architecture's own forward; the teacher capture and
its build-time check on them. Tiny random models from the stock transformers config classes, no downloads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

from pipeline.errors import PipelineError
from pipeline.head import capture_tolerance, check_capture, final_hidden, head_spec
from pipeline.teacher.capture import TeacherCapture

V, CAP = 512, 10.0
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
MAMBA = dict(mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=16, mamba_expand=1)
# every family transformers 5.25 ships with a causal LM whose forward transforms the head's logits; the values
# are not powers of two, so a transform done in another order or way shows as rounding
FAMILIES = {
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.07)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=0.07, sliding_window=8)),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", dict(logit_scale=0.07, num_experts=4)),
    "cohere_compass": ("CohereCompassTextConfig", "CohereCompassForCausalLM", dict(
        logit_scale=0.07, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=6.0)),
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM", dict(logits_scaling=6.0)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(logits_scaling=6.0, num_local_experts=4)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", dict(
        logits_scaling=6.0, num_local_experts=4)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(
        logits_scaling=6.0, num_local_experts=4)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        MAMBA, logits_scaling=6.0, num_local_experts=4, layer_types=["mamba", "attention"])),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", dict(  # logits_scaling = hidden_size / dim_model_base
        dim_model_base=24, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=16)),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=0.3)),  # multiplies
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(MAMBA, mamba_d_ssm=64, lm_head_multiplier=0.07)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=CAP)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=CAP, sliding_window=8)),
    "gemma3n_text": ("Gemma3nTextConfig", "Gemma3nForCausalLM", dict(
        final_logit_softcapping=CAP, num_kv_shared_layers=0, laurel_rank=8, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], activation_sparsity_pattern=[0.0, 0.0],
        vocab_size_per_layer_input=V, hidden_size_per_layer_input=8)),
    "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(final_logit_softcapping=CAP)),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(final_logit_softcapping=CAP)),
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", dict(final_logit_softcapping=CAP)),
    "beam": ("BeamConfig", "BeamForCausalLM", dict(
        final_logit_softcapping=CAP, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1,
        topk_group=1)),
    "inkling": ("InklingTextConfig", "InklingForCausalLM", dict(  # divides h by the multiplier before the head
        logits_mup_width_multiplier=6.0, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=32, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
        sliding_window_size=8)),
    "inkling2": ("Inkling2TextConfig", "Inkling2ForCausalLM", dict(
        final_logit_softcapping=CAP, unpadded_vocab_size=V, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
        sliding_window_size=8)),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", dict(logits_soft_cap=CAP)),
    "xlstm": ("xLSTMConfig", "xLSTMForCausalLM", dict(output_logit_soft_cap=CAP)),
}
# forwards that compute their logits in float32 whatever the model's dtype, or that cannot run in float64
FP32_LOGITS = {"beam", "xlstm"}
NO_FP64 = {"inkling2"}
NOT_CAPTURED = {"xlstm": "its decoder has no `layers` (TeacherCapture finds no blocks)"}
U32 = 2.0 ** -24


def _build(name: str) -> torch.nn.Module:
    """The family's tiny model in float32, the head scaled so the transform matters: logits up to ~20 after a
    scale, or raw logits up to ~2.5 caps (the cap bends them, without saturating into ties)."""
    config_cls, model_cls, extra = FAMILIES[name]
    cfg = getattr(transformers, config_cls)(**(COMMON | extra))
    cfg._experts_implementation = "eager"  # the grouped kernels take no float64
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    spec, why = head_spec(model)
    assert spec is not None, why
    probe = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # twice: a tied head scales the input embedding too
        with torch.no_grad():
            z = torch.nn.functional.linear(_final_hidden(model, probe), spec.weight).abs().max()
            z = z * abs(spec.scale or 1.0)
            spec.weight.mul_((2.5 * CAP if spec.softcap else 20.0) / z.item())
    return model


def _final_hidden(model, ids, mask=None) -> torch.Tensor:
    got = {}
    hook = model.get_decoder().register_forward_hook(lambda m, a, out: got.__setitem__("h", final_hidden(out)))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        hook.remove()
    return got["h"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, _build(request.param)


@pytest.fixture(scope="module", params=[name for name in FAMILIES if name not in NOT_CAPTURED])
def captured_family(request):
    """The families TeacherCapture can hook (NOT_CAPTURED says why the others cannot)."""
    return request.param, _build(request.param)


def _ids():
    ids = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    return ids, mask


def test_head_spec_reproduces_each_forward(family):
    """(a) head_spec(model).logits(final hidden states) == model(ids).logits, in float64: the model's own
    forward is the reference. Measured, relative to max |logit|: 0 where the forward applies the same
    operations; <= 9.9e-16 where it divides (Granite z / s; MiniCPM3, Inkling h / s before the matmul) and we
    multiply by 1 / s; 1.8 fp32 roundings where the forward makes its logits float32 (beam, xlstm); 0 for inkling2,
    run in float32 (its router is float32)."""
    name, model = family
    fp64 = name not in NO_FP64
    model = copy.deepcopy(model).double() if fp64 else model
    spec, why = head_spec(model)
    assert spec is not None, why
    ids, _ = _ids()  # no padding: a padded row is NaN in some float64 attention paths
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.double()
        h = _final_hidden(model, ids)
        got = spec.logits(h).double()
        raw = torch.nn.functional.linear(h, spec.weight).double()
    scale = ref.abs().max().item()
    bound = 1e-12 * scale if fp64 and name not in FP32_LOGITS else 4 * U32 * scale
    err = (got - ref).abs().max().item()
    assert err <= bound, f"{name}: head_spec logits differ from the forward by {err:.3g} (max |logit| {scale:.3g})"
    assert (raw - ref).abs().max().item() > 0.05 * scale, f"{name}: the transform does not matter here"


def _capture(model, logit_dtype="fp32"):
    ids, mask = _ids()
    cap = TeacherCapture(model, layers=[], topk=8, temperatures=[1.0, 2.0], logit_dtype=logit_dtype)
    try:
        return ids, mask, cap(ids, mask)
    finally:
        cap.close()


_CAPTURED = {}


def _fp32_capture(name, model):
    """The family's fp32 capture, made once for (b) and (c)."""
    if _CAPTURED.get(name, (None,))[0] is not model:
        _CAPTURED[name] = (model, _capture(model))
    return _CAPTURED[name][1]


def _untransformed(model, ids, mask, topk_ids) -> np.ndarray:
    """The head's logits at the captured ids without the final-logit transform (float32): what a capture that
    leaves the transform out stores."""
    with torch.no_grad():
        raw = torch.nn.functional.linear(_final_hidden(model, ids, mask), model.get_output_embeddings().weight)
        return raw.float().gather(-1, torch.from_numpy(topk_ids.astype(np.int64))).numpy()


# Bound for the fp32 capture against the model's own logits, in fp32 roundings of the row's max |logit|. The
# capture runs the same kernels on the same shapes as the forward (the head sees all B*T rows in one chunk);
# what differs is how the transform meets the matmul. Measured, top-k logits / lse: 0 / <= 1.0 where the
# forward applies the same operations (Cohere, Gemma, Falcon-H1, ...: the lse is rounded once to fp32);
# 2.0 / 2.7 for Granite's z / s against our z * (1 / s); 6.8 / 6.3 for MiniCPM3 and Inkling, which divide h
# before the matmul where we scale its result (the matmul's own rounding, relative to the sum of |terms|).
HEAD_ROUNDINGS = 12


def test_capture_matches_the_forward(captured_family):
    """(b) the fp32 capture's top-k ids/logits are the top-k of model(ids).logits; its lse at T is
    logsumexp(logits / T)."""
    name, model = captured_family
    ids, mask, c = _fp32_capture(name, model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
    keep = mask.bool().numpy()
    top_v, top_i = ref.topk(8, dim=-1)
    np.testing.assert_array_equal(c.topk_ids.astype(np.int64)[keep], top_i.numpy()[keep])
    bound = HEAD_ROUNDINGS * U32 * ref.abs().amax(-1).numpy()[keep]  # [n]
    err = np.abs(c.topk_logits.astype(np.float64)[keep] - top_v.numpy()[keep]).max(-1)
    assert (err <= bound).all(), f"{name}: top-k logits off by {err.max():.3g} (bound {bound.min():.3g})"
    for t, temp in enumerate([1.0, 2.0]):
        err = np.abs(c.lse[t][keep].astype(np.float64) - torch.logsumexp(ref / temp, dim=-1).numpy()[keep])
        assert (err <= bound).all(), f"{name}: lse at T={temp} off by {err.max():.3g} (bound {bound.min():.3g})"


def test_build_check_catches_a_transform_left_out(captured_family):
    """(c) check_capture passes on the capture and fails, in one line, on the logits without the transform
    (what the capture stored for Cohere and Granite teachers before it took the transform from head_spec)."""
    name, model = captured_family
    ids, mask, c = _fp32_capture(name, model)
    garbage = c.topk_logits.copy()
    garbage[~mask.bool().numpy()] = 1e6  # padding positions are not compared
    check_capture(model, c.topk_ids, garbage, ids, mask, "fp32", rows=3)
    untransformed = _untransformed(model, ids, mask, c.topk_ids)
    with pytest.raises(PipelineError, match="^teacher: the captured logits differ from the model's own forward by"
                       ) as e:
        check_capture(model, c.topk_ids, untransformed, ids, mask, "fp32", rows=3)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("logit_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["cohere", "granite", "gemma2", "minicpm3"])
def test_build_check_in_half_precision(name, logit_dtype):
    """check_capture on a bf16 model, whose own logits come from a bf16 matmul and a bf16 transform.
    Measured on these models: at most 0.18 of the bound (capture_tolerance: 8 bf16 roundings plus the stored
    format's); the logits without the transform are off by >= 33x the bound."""
    from pipeline.cache.codecs import logits_from_numpy

    model = _build(name).to(torch.bfloat16)
    ids, mask, c = _capture(model, logit_dtype)
    vals = logits_from_numpy(c.topk_logits, logit_dtype)
    check_capture(model, c.topk_ids, vals, ids, mask, logit_dtype, rows=3)
    untransformed = _untransformed(model, ids, mask, c.topk_ids)
    with pytest.raises(PipelineError, match="differ from the model's own forward"):
        check_capture(model, c.topk_ids, untransformed, ids, mask, logit_dtype, rows=3)


def test_build_check_catches_a_wrong_top1():
    """Consistent logits at the wrong ids: the captured top-1 is the model's second best."""
    model = _build("cohere")
    ids, mask, c = _capture(model)
    swapped_ids = c.topk_ids.copy()
    swapped_ids[..., [0, 1]] = swapped_ids[..., [1, 0]]
    swapped = c.topk_logits.copy()
    swapped[..., [0, 1]] = swapped[..., [1, 0]]
    with pytest.raises(PipelineError, match="^teacher: the captured top-1 id is not the model's own argmax"):
        check_capture(model, swapped_ids, swapped, ids, mask, "fp32")


def test_build_check_refuses_nan_ids_and_shapes():
    model = _build("granite")
    ids, mask, c = _capture(model)
    nan = c.topk_logits.copy()
    nan[0, 3, 2] = np.nan
    with pytest.raises(PipelineError, match="differ from the model's own forward by inf"):
        check_capture(model, c.topk_ids, nan, ids, mask, "fp32")
    far = c.topk_ids.astype(np.int64)
    far[0, 3, 2] = V
    with pytest.raises(PipelineError, match=f"^teacher: a captured id is outside the model's {V} logits$"):
        check_capture(model, far, c.topk_logits, ids, mask, "fp32")
    with pytest.raises(PipelineError, match="^teacher: check_capture got top-k ids"):
        check_capture(model, c.topk_ids[:, :-1], c.topk_logits[:, :-1], ids, mask, "fp32")


def test_capture_tolerance_is_rounding_sized():
    assert capture_tolerance("fp32", torch.float32, 4096) == pytest.approx(U32 + 16 * 64 * U32)  # 6.1e-5
    assert capture_tolerance("fp16", torch.bfloat16, 4096) == pytest.approx(2.0 ** -11 + 8 * 2.0 ** -8)


class _ScaledHead(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.weight = linear.weight

    def forward(self, h):
        return self.linear(h) * 2.0


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"})
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["module", "own_forward", "bias", "not_a_number", "vocab_cut"])
def test_an_unreproducible_head_is_refused(kind):
    """(d) a head that is not a plain bias-free Linear, a transform value we cannot read, or logits cut to
    part of the head's rows: refused up front."""
    model = _llama()
    if kind == "module":
        model.lm_head = _ScaledHead(model.lm_head)
        why = "the output head is a _ScaledHead, not a Linear"
    elif kind == "own_forward":
        model = transformers.DoryForCausalLM(transformers.DoryConfig(**COMMON)).eval()  # a learned per-token scale
        why = "the output head DoryLMHead has its own forward"
    elif kind == "bias":
        model.lm_head = torch.nn.Linear(64, V, bias=True)
        why = "the output head has a bias"
    elif kind == "not_a_number":
        model.config.logit_scale = "inv_sqrt_d_model"
        why = "the config's logit_scale = 'inv_sqrt_d_model' is not a number"
    else:
        config_cls, model_cls, extra = FAMILIES["inkling"]
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(
            **(COMMON | extra | dict(unpadded_vocab_size=V - 12)))).eval()
        why = f"the forward keeps the first {V - 12} of the head's {V} logits (unpadded_vocab_size)"
    with pytest.raises(PipelineError) as e:
        TeacherCapture(model, layers=[], topk=8, temperatures=[1.0], logit_dtype="fp32")
    assert str(e.value) == f"teacher: cannot reproduce its logits: {why}"


def test_a_key_the_forward_ignores_is_not_applied():
    """MPT's config has a logit_scale its HF forward never applies (KEY_OVERRIDES)."""
    torch.manual_seed(0)
    model = transformers.MptForCausalLM(transformers.MptConfig(
        d_model=64, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64, logit_scale=0.5)).double().eval()
    spec, why = head_spec(model)
    assert spec is not None and (spec.scale, spec.softcap) == (None, None), why
    ids, _ = _ids()
    with torch.no_grad():
        got = {}
        hook = model.transformer.register_forward_hook(lambda m, a, out: got.__setitem__("h", final_hidden(out)))
        ref = model(input_ids=ids, use_cache=False).logits
        hook.remove()
    assert (spec.logits(got["h"]) - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()

"""Exact full-distribution targets: the teacher's logits rebuilt from its last block's output h_n with its
final norm and head (pipeline/head.py TeacherHead), and the chunked loss against them, checked against the
live teacher's own forward in fp64 and a dense fp64 divergence written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.blocks import decoder_layers
from pipeline.dtypes import HALF_ULP
from pipeline.head import HeadSpec, TeacherHead, final_norm, teacher_head
from pipeline.losses.chunked import VocabTerms, chunked_head_loss, dense_vocab_loss
from pipeline.losses.logits import LOGIT_LOSSES
from pipeline.targets import ExactTargets
from tests.losses.test_chunked import ARGS, _reference_divergence

V, D_T, D_S, T = 96, 32, 24, 2.0


def _llama(seed: int = 0, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D_T, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                      initializer_range=0.2, **extra)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)  # not all ones: the norm's weight must be applied
    return model


def _gemma(seed: int = 0) -> GemmaForCausalLM:
    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=V, hidden_size=D_T, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2)
    model = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(-0.5, 0.5)  # Gemma scales by (1 + w)
    return model


def _last_block_output(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_n [B*T, d] from a hook on the last block, the model's own logits [B*T, V]) of one forward."""
    store = {}
    hook = decoder_layers(model)[-1].register_forward_hook(
        lambda m, a, out: store.__setitem__("h", (out[0] if isinstance(out, (tuple, list)) else out).detach()))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        hook.remove()
    return store["h"].reshape(-1, store["h"].shape[-1]), logits.reshape(-1, logits.shape[-1])


IDS = torch.arange(2 * 12).reshape(2, 12) * 37 % V


@pytest.mark.parametrize("make,kind", [(_llama, "rms"), (_gemma, "rms_offset")])
def test_teacher_head_rebuilds_the_models_logits(make, kind):
    model = make()
    head, why = teacher_head(model)
    assert why == "" and head.norm.kind == kind
    h, logits = _last_block_output(model, IDS)
    got = head.logits(h)
    # the same fp32 operations as the model's own norm and head: a few roundings of the d-wide matmul at most
    bound = 4 * math.sqrt(D_T) * HALF_ULP["fp32"] * logits.abs().max().item()
    assert (got - logits).abs().max().item() <= bound
    # and a stored copy (safetensors tensors + manifest record) rebuilds the same head
    again = TeacherHead.from_stored(head.tensors(), head.record())
    assert torch.equal(again.logits(h), got)


def test_scale_and_softcap_are_part_of_the_head():
    model = _llama(final_logit_softcapping=3.0)
    model.config.final_logit_softcapping = 3.0  # read by head_spec (Llama's forward does not apply it)
    head, _ = teacher_head(model)
    assert head.head.softcap == 3.0
    h, _ = _last_block_output(model, IDS)
    raw = TeacherHead(head.norm, HeadSpec(head.head.weight)).logits(h)
    torch.testing.assert_close(head.logits(h), 3.0 * torch.tanh(raw / 3.0), rtol=1e-6, atol=1e-6)


def test_a_norm_we_do_not_reproduce_is_refused_in_one_line():
    model = _llama()

    class Scaled(torch.nn.Module):  # a final norm with a formula of its own
        def __init__(self, inner):
            super().__init__()
            self.inner, self.weight, self.eps = inner, inner.weight, 1e-6

        def forward(self, x):
            return 2.0 * self.inner(x)

    model.model.norm = Scaled(model.model.norm)
    assert final_norm(model) == (None, "the final norm Scaled is not one of rms, rms_offset, layer")
    assert teacher_head(model)[0] is None


def _exact_case(seed: int = 0):
    teacher = _llama(seed)
    h_t, _ = _last_block_output(teacher, IDS)
    g = torch.Generator().manual_seed(seed + 1)
    h_s = torch.randn(h_t.shape[0], D_S, generator=g)
    w_s = torch.randn(V, D_S, generator=g) * 0.4
    targets = torch.randint(0, V, (h_t.shape[0],), generator=g)
    return teacher, h_t, h_s, w_s, targets


def _fp64_reference(teacher, h_s, w_s, targets, name, alpha, beta):
    """alpha CE + beta T^2 divergence, row means, with the teacher's distribution from its own forward run in
    float64 (no rebuilt head at all) and the student's from its logits in float64."""
    t64 = teacher.double()
    with torch.no_grad():
        z_t = t64(input_ids=IDS).logits.reshape(-1, V)
    teacher.float()
    z_s = h_s.double() @ w_s.double().T
    ce = -torch.log_softmax(z_s, -1).gather(-1, targets[:, None]).squeeze(-1)
    p, q = torch.softmax(z_t / T, -1), torch.softmax(z_s / T, -1)
    div = _reference_divergence(name, p, q, ARGS[name])
    return alpha * ce.mean() + beta * T**2 * div.mean()


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES.names()))
def test_exact_loss_and_gradients_against_the_live_teacher_in_fp64(name):
    teacher, h_t, h_s, w_s, targets = _exact_case()
    head, _ = teacher_head(teacher)
    terms = VocabTerms(alpha=0.3, beta=0.7, targets=targets, divergence=name, args=ARGS[name], temperature=T,
                       teacher=ExactTargets(h_t, head))
    h = h_s.clone().requires_grad_(True)
    w = w_s.clone().requires_grad_(True)
    loss, named = chunked_head_loss(h, HeadSpec(w), terms, chunk=5)  # uneven chunks: 24 rows = 5+5+5+5+4
    loss.backward()

    h64 = h_s.double().requires_grad_(True)
    w64 = w_s.double().requires_grad_(True)
    ref = _fp64_reference(teacher, h64, w64, targets, name, 0.3, 0.7)
    ref.backward()
    # fp32 softmax work on [24, 96] logits of magnitude ~10: a few fp32 roundings of each term, relative
    assert abs(loss.item() - ref.item()) <= 2e-6 * max(1.0, abs(ref.item()))
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert (got.double() - want).abs().max().item() <= 2e-6 * want.abs().max().item()
    assert set(named) == {"loss_ce", "loss_kl"}

    # the dense path on the same terms (the model-free reference of the chunked loop) agrees too
    dense, _ = dense_vocab_loss(h_s @ w_s.T, terms)
    assert abs(dense.item() - ref.item()) <= 2e-6 * max(1.0, abs(ref.item()))


def test_self_distillation_is_zero():
    """A student equal to its teacher (its own final hidden states and head): the exact divergence is 0 to
    rounding and its gradient vanishes; the top-k bucket path could hide a truncation error here, this cannot."""
    teacher = _llama()
    head, _ = teacher_head(teacher)
    h_t, _ = _last_block_output(teacher, IDS)
    normed = head.norm(h_t).clone().requires_grad_(True)
    terms = VocabTerms(alpha=0.0, beta=1.0, targets=None, temperature=T, teacher=ExactTargets(h_t, head))
    loss, named = chunked_head_loss(normed, head.head, terms, chunk=7)
    loss.backward()
    assert abs(loss.item()) <= 1e-6
    assert normed.grad.abs().max().item() <= 1e-6

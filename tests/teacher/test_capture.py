"""Captured top-k/lse/block outputs against a dense forward of the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.errors import PipelineError
from pipeline.cache.codecs import logits_from_numpy
from pipeline.teacher.capture import TeacherCapture
from tests.conftest import make_tiny_model


def _dense(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits.float(), out.hidden_states


# Error bounds from the real rounding, elementwise, in units of the spacing of floats at the reference value.
# The dense reference runs the same fp32 kernels on the same inputs and shapes as the captured path (the LM
# head sees all B*T <= 1024 rows in one chunk, as in the dense pass), so their fp32 values agree exactly:
# measured 0 for logits, lse and block outputs, with 1 and 2 threads. FP32_ULPS allows a last-bit
# difference only; a different head chunking changes the matmul's accumulation order and moves logits by
# much more (measured up to 2.5e-5, ~1750 ulps, with 1-row chunks on SmolLM2).
# Storing a logit z in fp16/bf16 rounds to nearest: |fmt(z) - z| <= ulp_fmt(z) / 2 (2^-11 |z| for fp16,
# 2^-8 |z| for bf16 at most); measured 0.4995 ulp (fp16, tiny), 0.5000 (fp16, SmolLM2), 0.4926 (bf16).
SIGNIFICAND_BITS = {"fp32": 24, "fp16": 11, "bf16": 8}
MIN_SPACING = {"fp32": 2.0 ** -149, "fp16": 2.0 ** -24, "bf16": 2.0 ** -133}  # spacing of the subnormals
FP32_ULPS = 2


def ulp(x, fmt: str = "fp32") -> np.ndarray:
    """Spacing of `fmt` floats at |x|: 2^(e - p) for 2^(e-1) <= |x| < 2^e and p significand bits (float64)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    _, e = np.frexp(x)
    return np.where(x > 0, np.maximum(np.ldexp(1.0, e - SIGNIFICAND_BITS[fmt]), MIN_SPACING[fmt]), MIN_SPACING[fmt])


def _assert_within(what: str, got, ref, bound) -> None:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    err = np.abs(got - ref)
    bound = np.broadcast_to(bound, err.shape)
    i = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"{what}: |got - ref| = {err[i]:.3g} > {bound[i]:.3g} at ref {ref[i]:.6g}"


def check_tail_criteria(what: str, implied, true) -> None:
    """The cache's promise: within 5% relative for tails >= 1e-4, never collapsed for tails >= 1e-5."""
    implied, true = np.asarray(implied, dtype=np.float64), np.asarray(true, dtype=np.float64)
    big = true >= 1e-4
    rel = np.abs(implied[big] - true[big]) / true[big]
    assert (rel <= 0.05).all(), f"{what}: relative error {rel.max():.3g} for a tail >= 1e-4"
    assert (implied[true >= 1e-5] > 0).all(), f"{what}: a tail >= 1e-5 collapsed to 0"


def _check_against_dense(model, ids, layers, k, temps, logit_dtype="fp32"):
    cap = TeacherCapture(model, layers, k, temps, logit_dtype)
    got = cap(ids)
    cap.close()
    logits, hs = _dense(model, ids)
    n = len(hs) - 1  # number of blocks
    ref_vals, ref_ids = torch.topk(logits, k, dim=-1)
    ref_vals = ref_vals.numpy()
    vals = logits_from_numpy(got.topk_logits, logit_dtype)
    # ids may differ only where values tie; compare the logits at the returned ids instead
    gathered = torch.gather(logits, -1, torch.from_numpy(got.topk_ids.astype(np.int64))).numpy()
    _assert_within("dense logits at the captured ids", gathered, ref_vals, FP32_ULPS * ulp(ref_vals))
    # the stored value: the fp32 logit rounded once to the storage format
    bound = FP32_ULPS * ulp(ref_vals) + (0.5 * ulp(ref_vals, logit_dtype) if logit_dtype != "fp32" else 0.0)
    _assert_within(f"top-k logits stored as {logit_dtype}", vals, ref_vals, bound)
    ids64 = torch.from_numpy(got.topk_ids.astype(np.int64))
    for j, t in enumerate(temps):
        # The independent reference, in float64 from the dense fp32 logits (z / T is exact for T = 0.5, 1,
        # 2): the true tail outside the captured ids, and the normaliser that makes the stored (rounded)
        # logits carry exactly that tail: logsumexp(stored / T) - log(1 - tail). Equal to the full-vocabulary
        # lse when nothing is rounded (fp32).
        log_p = torch.log_softmax(logits.double() / t, -1)
        ref_tail = torch.logsumexp(log_p.scatter(-1, ids64, float("-inf")), -1).exp().numpy()
        ref_lse = (torch.logsumexp(torch.from_numpy(vals).double() / t, -1) - torch.log1p(-torch.from_numpy(ref_tail))).numpy()
        if logit_dtype == "fp32":
            full = torch.logsumexp(logits.double() / t, -1).numpy()
            np.testing.assert_allclose(ref_lse, full, rtol=0, atol=1e-12)  # the definitions agree
        # fp32 rounds the stored value once (0.5 ulp) after the float64 arithmetic on [N, k]; the tail from
        # the fp32 logsumexp outside the top-k is off by a few 2^-24 relative to the tail, hence absolute
        # in log(1 - tail) by less than 2^-21: ulp(lse) + 2^-21. Measured <= 0.5 ulp.
        _assert_within(f"stored lse at T={t}", got.lse[j], ref_lse, ulp(ref_lse) + 2.0 ** -21)
        # what a reader derives: 1 - sum_I exp(stored_i / T - lse'), exact in float64 here; it moves by
        # (1 - tail) times the lse's error
        implied = -np.expm1(torch.logsumexp(torch.from_numpy(vals).double() / t
                                            - torch.from_numpy(got.lse[j]).double().unsqueeze(-1), -1).numpy())
        _assert_within(f"tail at T={t}", implied, ref_tail, ulp(ref_lse) + 2.0 ** -21)
        check_tail_criteria(f"tail at T={t}", implied, ref_tail)
    norm = model.get_decoder().norm
    for layer in layers:
        h = torch.from_numpy(got.hidden[layer])
        if layer < n:
            ref = hs[layer].float().numpy()
            _assert_within(f"block output {layer}", h.numpy(), ref, FP32_ULPS * ulp(ref))
        else:
            # the last block's value is before the final norm: norm(it) is HF's last hidden state
            ref = hs[-1].float().numpy()
            with torch.no_grad():
                _assert_within(f"norm(block output {layer})", norm(h).numpy(), ref, FP32_ULPS * ulp(ref))
            assert not np.allclose(h.numpy(), ref, atol=1e-3)
    return got


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_capture_matches_dense_forward(tmp_path, smollm_tokenizer, arch):
    path = make_tiny_model(tmp_path / arch, smollm_tokenizer, vocab=49152, layers=4, arch=arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    got = _check_against_dense(model, ids, [0, 1, 3, 4], k=16, temps=[1.0, 2.0, 0.5])
    assert got.topk_ids.dtype == np.uint16


@pytest.mark.parametrize("logit_dtype", ["fp16", "bf16"])
def test_reduced_precision_logits(tiny_teacher, logit_dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(1))
    _check_against_dense(model, ids, [2], k=8, temps=[1.0], logit_dtype=logit_dtype)


def test_vocab_above_uint16_stores_uint32_ids(tmp_path, smollm_tokenizer):
    path = make_tiny_model(tmp_path / "big", smollm_tokenizer, vocab=262144, layers=2, hidden=16)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(2))
    got = _check_against_dense(model, ids, [1], k=32, temps=[1.0])
    assert got.topk_ids.dtype == np.uint32
    assert (got.topk_ids > 65535).any()  # the high ids really occur and survive


def test_bad_layer_and_topk(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with pytest.raises(PipelineError, match="beyond the teacher's depth"):
        TeacherCapture(model, [5], 8, [1.0])
    with pytest.raises(PipelineError, match="vocabulary size"):
        TeacherCapture(model, [1], 49153, [1.0])


def test_real_packaged_teacher_matches_dense(smollm_tokenizer):
    """The embedded SmolLM2 teacher, a few real sequences, every captured value against a dense pass."""
    from pipeline.config import load_config
    from pipeline.data.sequences import sequences_from_config
    from pipeline.sources.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    cfg = load_config(None, ["data.num_sequences=2", "data.seq_len=48", "data.heldout_fraction=0"])
    seqs = sequences_from_config(cfg.data, tok)
    ids = torch.from_numpy(seqs.input_ids).long()
    got = _check_against_dense(model, ids, [0, 15, 30], k=64, temps=[1.0, 2.0], logit_dtype="fp16")
    # the check has teeth here: real prose has confident tokens whose fp16 top-64 with the full-vocabulary
    # lse (format 1) imply a tail off by far more than 5% or none at all (measured: 5 of 96 tails < 1e-4 at
    # T = 1, off by up to 54x, 5 collapsed); the stored normaliser keeps them (measured <= 0.5% off)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    vals = torch.from_numpy(logits_from_numpy(got.topk_logits, "fp16")).double()
    log_p = torch.log_softmax(logits, -1)
    true = torch.logsumexp(log_p.scatter(-1, torch.from_numpy(got.topk_ids.astype(np.int64)), float("-inf")), -1)
    assert (true.exp() < 1e-4).any()
    naive = -torch.expm1(torch.logsumexp(vals - torch.logsumexp(logits, -1, keepdim=True), -1))
    with pytest.raises(AssertionError):
        check_tail_criteria("full-vocabulary lse", naive.numpy(), true.exp().numpy())
    # sanity of the real model: its top-1 guess is the true next token often on real prose
    hits = (got.topk_ids[:, :-1, 0] == seqs.input_ids[:, 1:]).mean()
    assert hits > 0.3


def test_stored_lse_keeps_confident_tails_synthetic():
    """V = 49,152, k = 64, fp16 logits, 200 positions from flat to very confident (tails 1e-14 .. 0.9),
    against a float64 full softmax. The normaliser of the full fp32 logits (what format 1 stored) does not
    hold: with fp16-rounded logits its implied tails are off by far more than 5% or collapse to 0."""
    from pipeline.teacher.capture import stored_lse

    g = torch.Generator().manual_seed(0)
    n, v, k = 200, 49152, 64
    z = torch.randn(n, v, generator=g) * 2 + torch.linspace(-5, 25, n)[:, None]
    z[torch.arange(n), torch.randint(0, v, (n,), generator=g)] += torch.linspace(8, 40, n)
    top, ids = torch.topk(z, k)
    stored = top.half().float()
    for t in (1.0, 2.0):
        log_p = torch.log_softmax(z.double() / t, -1)
        true = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1).exp().numpy()
        assert (true < 1e-4).sum() >= 5 and (true >= 1e-4).sum() >= 50  # both regimes at both temperatures
        lse = stored_lse(z.clone(), top, ids, stored, [t])[0].double()

        def implied(norm):
            return -torch.expm1(torch.logsumexp(stored.double() / t - norm[:, None], -1)).numpy()

        check_tail_criteria(f"T={t}", implied(lse), true)
        _assert_within(f"tail at T={t}", implied(lse), true, ulp(lse.numpy()) + 2.0 ** -21)
        with pytest.raises(AssertionError):
            check_tail_criteria("full-vocabulary lse", implied(torch.logsumexp(z / t, -1).double()), true)


def test_launched_batches_equal_one_at_a_time(tiny_teacher):
    """Batches launched before any result is taken (as the build overlaps them) give what one call at a time
    gives, every array to the bit, with draws and with the hidden states encoded where the teacher runs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 49152, (2, 16), generator=g) for _ in range(3)]
    for codec in (None, "int8"):
        cap = TeacherCapture(model, [0, 2], 8, [1.0, 2.0], "fp16", hidden_codec=codec, samples=6)
        one = [cap(b, sequences=[2 * i, 2 * i + 1]) for i, b in enumerate(batches)]
        launched = [cap.submit(b, sequences=[2 * i, 2 * i + 1]) for i, b in enumerate(batches)]
        for a, b in zip(one, (x.result() for x in launched)):
            for key in ("topk_ids", "topk_logits", "lse", "sample_ids", "sample_counts", "sample_logits"):
                assert getattr(a, key).tobytes() == getattr(b, key).tobytes(), key
            for layer in (0, 2):
                if codec is None:
                    assert a.hidden[layer].tobytes() == b.hidden[layer].tobytes()
                else:
                    assert a.token_squares[layer].tobytes() == b.token_squares[layer].tobytes()
                    assert {s: v.tobytes() for s, v in a.encoded[layer].items()} == \
                           {s: v.tobytes() for s, v in b.encoded[layer].items()}
        cap.close()

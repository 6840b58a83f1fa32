"""Captured top-k/lse/block outputs against a dense forward of the same model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.errors import PipelineError
from pipeline.teacher.capture import TeacherCapture, logits_from_numpy
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
    for j, t in enumerate(temps):
        # float64 logsumexp of the dense fp32 logits (z / T is exact for T = 0.5, 1, 2). fp32 logsumexp:
        # max + log(sum exp(z - max)) rounds log(s) and the sum (0.5 ulp of lse each, as log s <= lse
        # here), plus the exp and accumulation error of s relative to s (a few 2^-24, i.e. the same in
        # absolute terms on log s): ulp(lse) + 2^-21. Measured <= 0.76 ulp(lse).
        ref_lse = torch.logsumexp(logits.double() / t, -1).numpy()
        _assert_within(f"lse at T={t}", got.lse[j], ref_lse, ulp(ref_lse) + 2.0 ** -21)
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
    # sanity of the real model: its top-1 guess is the true next token often on real prose
    hits = (got.topk_ids[:, :-1, 0] == seqs.input_ids[:, 1:]).mean()
    assert hits > 0.3

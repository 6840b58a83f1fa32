"""A lossless cache and the live teacher give the same losses and the same update."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.recipes.train import run_train


def _first_log(run_dir):
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return next(h for h in state["log_history"] if "loss" in h)


def assert_same_losses_and_update(runs: dict, rel: float, weights_rtol: float = 1e-5) -> None:
    """The cache run and the online run of train_cache_and_online logged the same first losses (each within
    `rel`, relative) and trained the same student."""
    a, b = _first_log(runs[False]), _first_log(runs[True])
    keys = [k for k in a if k.startswith("loss")]
    assert {"loss", "loss_ce", "loss_kl", "loss_hidden"} <= set(keys)
    for k in keys:
        assert abs(a[k] - b[k]) <= rel * abs(b[k]) + 1e-8, (k, a[k], b[k])
    sa = load_file(str(runs[False] / "student" / "model.safetensors"))
    sb = load_file(str(runs[True] / "student" / "model.safetensors"))
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=weights_rtol, atol=1e-6)


def first_logs_by_chunk(root, overrides: list[str], extra: list[str], train_overrides, chunks=(0, 7)) -> dict:
    """{chunk_tokens: the first logged losses} of one step per setting (0 = the dense path)."""
    logs = {}
    for chunk in chunks:
        out = root / f"chunk_{chunk}"
        run_train(load_config(None, overrides + train_overrides(out) + extra + [f"loss.chunk_tokens={chunk}"]))
        logs[chunk] = _first_log(out)
    return logs


def train_cache_and_online(root, overrides: list[str], extra: list[str], train_overrides, prefix: str) -> dict:
    """The same config (overrides, the training keys, then extra) trained from the cache and with the live
    teacher (--online), SGD at lr 0.5 so that a difference in any term shows in the first logged losses
    -> {online: run dir}."""
    runs = {}
    for online in (False, True):
        out = root / f"{prefix}_{'online' if online else 'cache'}"
        run_train(load_config(None, overrides + train_overrides(out, optim="sgd", learning_rate=0.5) + extra),
                  online=online)
        runs[online] = out
    return runs


def test_cache_matches_online(tiny, train_overrides):
    """Every term on, FDD included (loss.delta > 0): hooks, projectors and teacher layers on both paths."""
    runs = train_cache_and_online(tiny["root"], tiny["overrides"], ["loss.delta=0.3"], train_overrides, "parity")
    a, b = _first_log(runs[False]), _first_log(runs[True])
    keys = [k for k in a if k.startswith("loss")]
    assert {"loss", "loss_ce", "loss_kl", "loss_hidden", "loss_hidden_L1", "loss_hidden_L2", "loss_fdd"} <= set(keys)
    assert a["loss_fdd"] > 0.05  # random student blocks: the FDD term is not trivially ~0
    assert a["loss_kl"] > 0.05  # a sharp teacher: the KL term is not trivially ~0
    for k in keys:
        assert abs(a[k] - b[k]) <= 1e-4 * abs(b[k]) + 1e-7, (k, a[k], b[k])
    # held-out: eval_loss_fdd logged, and the compound loss is the weighted sum with delta
    for run in runs.values():
        evals = [h for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "eval_loss" in h]
        assert evals
        for h in evals:
            total = 0.4 * h["eval_loss_ce"] + 0.4 * h["eval_loss_kl"] + 0.2 * h["eval_loss_hidden"] + 0.3 * h["eval_loss_fdd"]
            assert abs(h["eval_loss"] - total) <= 1e-6 * total, h
    sa = load_file(str(runs[False] / "student" / "model.safetensors"))
    sb = load_file(str(runs[True] / "student" / "model.safetensors"))
    start = load_file(str(tiny["root"] / "student" / "model.safetensors"))
    moved = 0.0
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-5, atol=1e-6)
        moved = max(moved, (sa[name] - start[name]).abs().max().item())
    assert moved > 1e-4  # the step did change the student
    pa = load_file(str(runs[False] / "projectors.safetensors"))
    pb = load_file(str(runs[True] / "projectors.safetensors"))
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_close_to_fp32(tiny, train_overrides):
    """training.bf16 (CPU autocast): the same components within bf16 rounding, fp32 weights and projectors."""
    logs, runs = {}, {}
    for bf16 in (False, True):
        out = tiny["root"] / f"precision_bf16_{bf16}"
        run_train(load_config(None, tiny["overrides"] + train_overrides(out, bf16=bf16, max_steps=2)))
        logs[bf16], runs[bf16] = _first_log(out), out
    a, b = logs[False], logs[True]
    for k in [k for k in a if k.startswith("loss")]:
        assert abs(a[k] - b[k]) <= 3e-2 * abs(a[k]) + 1e-4, (k, a[k], b[k])
    assert any(abs(a[k] - b[k]) > 0 for k in a if k.startswith("loss"))  # autocast did change the arithmetic
    student = load_file(str(runs[True] / "student" / "model.safetensors"))
    projectors = load_file(str(runs[True] / "projectors.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in [*student.values(), *projectors.values()])

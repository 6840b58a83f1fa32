"""Training from sampled teacher targets: a few steps from the cache, the live teacher drawing the same
targets (online parity), the dense and chunked paths agreeing, and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.recipes.train import run_train

from .conftest import tiny_cache
from .test_parity import _first_log, assert_same_losses_and_update, first_logs_by_chunk, train_cache_and_online

SAMPLED = ["cache.logits=topk+sampled", "cache.samples=16", "cache.proposal_temperature=1.0"]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """{root, teacher, student, overrides}: the tiny pair and a topk+sampled cache (K = 16 at Tp = 1; loss
    T = 2: weighted)."""
    return tiny_cache(tmp_path_factory.mktemp("sampled"), SAMPLED)


def _history(run_dir):
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


def test_few_steps_from_sampled_targets(sampled, train_overrides):
    out = sampled["root"] / "steps"
    cfg = load_config(None, sampled["overrides"] + train_overrides(out, max_steps=3) + [
        "loss.logits_source=sampled", "loss.gamma=0"])
    said = []
    summary = run_train(cfg, echo=said.append)
    # the printed loss is the resolved one: the sampled targets and their proposal temperature (from the cache)
    lines = [m for m in said if m.startswith("loss: ")]
    assert len(lines) == 1 and "sampled targets, proposal T=1" in lines[0], said
    logs = [h for h in _history(out) if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert torch.isfinite(torch.tensor([h["loss"], h["loss_kl"], h["loss_ce"]])).all()
        assert h["loss_kl"] > 0.05  # a sharp teacher, a random student
    assert summary["config"]["loss"]["logits_source"] == "sampled"
    assert torch.isfinite(torch.tensor(summary["metrics"]["eval_loss_after"]))


def test_sampled_cache_matches_online(sampled, train_overrides):
    """The live teacher draws with the same (seed, sequence index) streams: same losses and the same update."""
    runs = train_cache_and_online(sampled["root"], sampled["overrides"], ["loss.logits_source=sampled"],
                                  train_overrides, "parity")
    assert_same_losses_and_update(runs, rel=1e-4)


def test_dense_and_chunked_agree(sampled, train_overrides):
    logs = first_logs_by_chunk(sampled["root"], sampled["overrides"],
                               ["loss.logits_source=sampled", "loss.logits=skew_kl"], train_overrides)
    for k in ("loss", "loss_kl", "loss_ce"):
        assert abs(logs[0][k] - logs[7][k]) <= 1e-5 * abs(logs[0][k]), (k, logs[0][k], logs[7][k])
    assert abs(logs[0]["grad_norm"] - logs[7]["grad_norm"]) <= 1e-4 * logs[0]["grad_norm"]


def test_topk_source_unchanged_on_a_mixed_cache(sampled, tmp_path, train_overrides):
    """On a topk+sampled cache, auto reads the top-k targets: the same first step as logits_source=topk."""
    logs = {}
    for source in ("auto", "topk"):
        out = tmp_path / source
        run_train(load_config(None, sampled["overrides"] + train_overrides(out) + [f"loss.logits_source={source}"]))
        logs[source] = _first_log(out)
    assert logs["auto"]["loss"] == logs["topk"]["loss"]


@pytest.mark.parametrize("extra,message", [
    (["loss.logits_source=sampled", "loss.logits=jsd"], "loss.logits jsd has no unbiased estimate"),
    (["loss.logits_source=sampled", "cache.logits=topk"], "loss.logits_source sampled: the cache holds cache.logits topk"),
])
def test_one_line_errors_before_anything_loads(sampled, tmp_path, train_overrides, extra, message, tiny):
    # cache.logits=topk points the run at a plain top-k cache (the shared tiny one)
    overrides = sampled["overrides"] + train_overrides(tmp_path / "out") + extra
    if "cache.logits=topk" in extra:
        overrides += [f"cache.dir={tiny['cache']}"]
    with pytest.raises(PipelineError, match=message.replace("(", r"\(")):
        run_train(load_config(None, overrides))
    assert not (tmp_path / "out").exists()

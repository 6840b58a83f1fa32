"""Phase two sharded with FSDP2 (`training.fsdp: full_shard`) on two CPU processes (torchrun, gloo): the student
and the projectors are DTensors, half of each held per process, and the run takes the steps a one-process run
with the same global batch takes (2 processes x batch 2 against 1 x batch 4, as in test_ddp.py: the packed tiny
cache gives every row the same number of valid tokens, so the mean of the half-batch means is the full mean).

The bound. Both sharded and DDP runs differ from the one-process run only in how each gradient element is summed:
two partial sums (one per process) added by the collective, then divided by 2, instead of one sum over the 4 rows.
That is a reassociation of an fp32 sum, a few ulps of the summands per element and step; AdamW (three steps here)
turns a gradient perturbation into an update perturbation that is not a fixed multiple of it (its step divides
by sqrt(v) + eps), so no tight closed-form bound is derived here. Instead the test runs DDP's 2-process run, which
has the same reduction structure, as the yardstick: the FSDP run's largest weight difference from the
one-process run must stay within 4x DDP's (plus 1e-7), and every logged loss within rel 1e-5 (measured: FSDP
5.3e-7, DDP 1.2e-6 on the student, against steps that move it by ~3e-2). The chunked vocabulary loss (loss.chunk_tokens
auto: 512 rows on a CPU) reads the head's weight inside the root unit's gathered state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.recipes.train import run_train
from pipeline.train.arguments import training_arguments
from pipeline.train.fsdp import fsdp_settings

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
COMMON = dict(optim="adamw_torch", learning_rate=0.01, max_steps=STEPS)
FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})


def _torchrun(tiny, tmp_path: Path, overrides: list[str]) -> None:
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(load_config(None, tiny["overrides"]).to_dict(), sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.cli", "train", str(cfg_path)]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _logs(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def test_fsdp_two_processes_equal_one(tiny, train_overrides, tmp_path):
    from transformers import AutoModelForCausalLM

    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    run_train(load_config(None, tiny["overrides"] + train_overrides(one, per_device_train_batch_size=4, **COMMON)))
    _torchrun(tiny, tmp_path, train_overrides(ddp, per_device_train_batch_size=2, **COMMON))
    _torchrun(tiny, tmp_path, train_overrides(fsdp, per_device_train_batch_size=2, **COMMON, **FSDP))

    # sharded: every student and projector parameter a DTensor, each process holding half of the elements
    sharding = json.loads((fsdp / "run.json").read_text())["fsdp"]
    assert sharding["processes"] == 2
    assert sharding["dtensor_parameters"] == sharding["parameters"]
    assert sharding["student_local_fraction"] == pytest.approx(0.5, abs=0.01)
    assert sharding["projectors_local_fraction"] == pytest.approx(0.5, abs=0.01)

    # rank 0 wrote a plain HF student and the projectors, both whole
    start = load_file(str(Path(tiny["student"]) / "model.safetensors"))
    s1 = load_file(str(one / "student" / "model.safetensors"))
    sf = load_file(str(fsdp / "student" / "model.safetensors"))
    assert _max_diff(s1, start) > 1e-3  # the steps moved the student
    reopened = AutoModelForCausalLM.from_pretrained(fsdp / "student")
    assert type(reopened).__name__ == "LlamaForCausalLM"
    assert json.loads((fsdp / "student" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for k, v in reopened.state_dict().items():
        torch.testing.assert_close(v, sf[k], rtol=0, atol=0)
    p1, pf = load_file(str(one / "projectors.safetensors")), load_file(str(fsdp / "projectors.safetensors"))

    # the same weights as one process, within DDP's own distance from it (same reduction of 2 partial gradients)
    yardstick = max(_max_diff(s1, load_file(str(ddp / "student" / "model.safetensors"))),
                    _max_diff(p1, load_file(str(ddp / "projectors.safetensors"))))
    assert _max_diff(s1, sf) <= 4 * yardstick + 1e-7
    assert _max_diff(p1, pf) <= 4 * yardstick + 1e-7

    # the same losses and gradient norm (student + projectors under one norm) at every step
    a, b = _logs(one), _logs(fsdp)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, STEPS + 1))
    for ha, hb in zip(a, b):
        keys = [k for k in ha if k.startswith("loss") or k == "grad_norm"]
        assert {"loss", "loss_ce", "loss_kl", "loss_hidden", "grad_norm"} <= set(keys) <= set(hb)
        for k in keys:
            assert hb[k] == pytest.approx(ha[k], rel=1e-5, abs=1e-7), (ha["step"], k)
    m1 = json.loads((one / "run.json").read_text())["metrics"]
    mf = json.loads((fsdp / "run.json").read_text())["metrics"]
    for k in ("train_loss", "eval_loss_before", "eval_loss_after"):
        assert mf[k] == pytest.approx(m1[k], rel=1e-5), k


def test_fsdp_without_a_distributed_launch_is_one_line(tiny, train_overrides, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    cfg = load_config(None, tiny["overrides"] + train_overrides(out, **FSDP))
    with pytest.raises(PipelineError, match=r"WORLD_SIZE is 1: launch with torchrun") as e:
        run_train(cfg)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_deepspeed_is_refused_naming_fsdp(tmp_path):
    for call in (fsdp_settings, training_arguments):
        with pytest.raises(PipelineError, match=r"training.deepspeed: DeepSpeed is not supported .*training.fsdp"):
            call({"output_dir": str(tmp_path), "deepspeed": "ds.json"})


@pytest.mark.parametrize("training, message", [
    ({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 1}}, "only FSDP2"),
    ({"fsdp": "full_shard offload"}, "CPU offload is not supported"),
    ({"fsdp": "full_shard", "fsdp_config": {"fsdp_nonsense": 1}}, "unknown FSDP option"),
    ({"fsdp_config": {"fsdp_version": 2}}, "training.fsdp is not"),
])
def test_bad_fsdp_settings(training, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match=message):
        fsdp_settings(training)


def test_fsdp_settings_as_hf_writes_them(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fsdp_settings({}) is None
    assert fsdp_settings({"fsdp": "full_shard auto_wrap", "fsdp_config": {
        "fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "state_dict_type": "FULL_STATE_DICT"}}).reshard_after_forward
    assert not fsdp_settings({"fsdp": "shard_grad_op"}).reshard_after_forward
    assert not fsdp_settings({"fsdp": True, "fsdp_config": {"reshard_after_forward": "false"}}).reshard_after_forward
    # the Trainer never sees fsdp: the pipeline shards itself, the same way on gloo and nccl
    assert not training_arguments({"output_dir": "x", "fsdp": "full_shard"}).fsdp

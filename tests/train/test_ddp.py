"""Phase two on two CPU processes (`accelerate launch`, DDP over gloo) takes the same steps as one process
with the same global batch.

Why equality holds: every process draws the same ChunkShuffleSampler order and accelerate shards each global
batch of 4 into consecutive halves (rank 0 rows 0-1, rank 1 rows 2-3). The tiny cache is packed (no padding),
so every sequence has the same number of valid tokens and the mean of the two half-batch mean losses is the
full-batch mean: DDP's averaged student gradients and the projectors' all-reduced gradients equal the
one-process gradients, up to float summation order. SGD keeps the update linear in the gradient (AdamW's
first step is ~lr * sign(g), which flips on near-zero gradient entries and would hide or fake differences).
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
from pipeline.recipes.train import run_train
from pipeline.student.projectors import build_projectors

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
COMMON = dict(optim="sgd", learning_rate=0.5, max_steps=STEPS)


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "trainer_state.json").read_text())


def _logs(run_dir: Path) -> list[dict]:
    return [h for h in _state(run_dir)["log_history"] if "loss" in h]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_two_processes_equal_one(tiny, train_overrides, tmp_path):
    # one process, global batch 4
    one = tmp_path / "one"
    run_train(load_config(None, tiny["overrides"] + train_overrides(one, per_device_train_batch_size=4, **COMMON)))

    # `accelerate launch` on a CPU-only machine: --multi_gpu is the flag that starts torchrun-style workers
    # (--cpu or a MULTI_CPU config start a single process unless mpirun is used); training.use_cpu=true then
    # gives a MULTI_CPU accelerator state with the gloo backend. 2 processes x batch 2 = global batch 4.
    two = tmp_path / "two"
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(load_config(None, tiny["overrides"]).to_dict(), sort_keys=False))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "pipeline.cli", "train", str(cfg_path)]
    for item in train_overrides(two, per_device_train_batch_size=2, **COMMON):
        cmd += ["--set", item]
    # HF_HOME: no user-level accelerate default_config.yaml leaks into the launch
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    # the same student (rank 0 writes it; unsynchronized ranks would each keep their own half-batch steps)
    start = load_file(str(Path(tiny["student"]) / "model.safetensors"))
    s1 = load_file(str(one / "student" / "model.safetensors"))
    _assert_same_weights(s1, load_file(str(two / "student" / "model.safetensors")))
    assert max((s1[k] - start[k]).abs().max().item() for k in start) > 1e-3  # the steps did move the student

    # the same projectors (outside the DDP wrapper: averaged by the optimizer pre-step hook)
    p1 = load_file(str(one / "projectors.safetensors"))
    _assert_same_weights(p1, load_file(str(two / "projectors.safetensors")))
    layer_map = {int(j): t for j, t in json.loads((one / "run.json").read_text())["layer_map"].items()}
    init = build_projectors(layer_map, 24, 32, seed=3).state_dict()  # the run's seeded initial projectors
    assert init.keys() == p1.keys()
    assert max((p1[k] - init[k]).abs().max().item() for k in p1) > 1e-3  # the projectors were trained

    # the same steps over the same global batches
    state_one, state_two = _state(one), _state(two)
    assert state_one["global_step"] == state_two["global_step"] == STEPS
    a, b = _logs(one), _logs(two)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, STEPS + 1))
    for ha, hb in zip(a, b):
        assert ha["epoch"] == pytest.approx(hb["epoch"])  # 4 sequences per step in both runs
        keys = [k for k in ha if k.startswith("loss") or k == "grad_norm"]
        assert {"loss", "loss_ce", "loss_kl", "loss_hidden", "grad_norm"} <= set(keys) <= set(hb)
        for k in keys:
            assert hb[k] == pytest.approx(ha[k], rel=1e-5, abs=1e-7), (ha["step"], k)
    m1 = json.loads((one / "run.json").read_text())["metrics"]
    m2 = json.loads((two / "run.json").read_text())["metrics"]
    assert m1["global_step"] == m2["global_step"] == STEPS
    for k in ("train_loss", "eval_loss_before", "eval_loss_after"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-5), k

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
import shutil
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
from pipeline.train.fsdp import FsdpSettings, fsdp_settings, take_over_accelerate_fsdp

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
COMMON = dict(optim="adamw_torch", learning_rate=0.01, max_steps=STEPS)
FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# accelerate's own FSDP launch (what an accelerate config file with distributed_type FSDP sets), no training.fsdp
ACCELERATE_FSDP = ["accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                   "no", "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2"]


def _torchrun(tiny, tmp_path: Path, overrides: list[str], *flags: str, launcher=TORCHRUN) -> None:
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(load_config(None, tiny["overrides"]).to_dict(), sort_keys=False))
    cmd = [sys.executable, "-m", *launcher, "-m", "pipeline.cli", "train", str(cfg_path), *flags]
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
    # sharded, with activation checkpointing (the one-process and DDP runs keep their activations)
    _torchrun(tiny, tmp_path, train_overrides(fsdp, per_device_train_batch_size=2, activation_checkpointing=True,
                                              **COMMON, **FSDP))

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


def test_fsdp_at_world_one_with_offload(tiny, train_overrides, tmp_path):
    """`torchrun --nproc_per_node 1` with `fsdp: full_shard offload`: one GPU training a student larger than its
    memory, shards and optimizer step in host memory (on this CPU the same code, gloo). At world 1 FSDP's
    all-gathers and reduce-scatters are copies, so the first step's forward sees the plain run's values: its
    losses equal the plain run's to the bit. The backward may add a block's incoming gradients in another order
    (FSDP's hooks change the autograd graph), so the gradient norm is held to the rounding bound of a sum of
    squares over every parameter element, gamma_n = n u / (1 - n u)."""
    one, w1 = tmp_path / "one", tmp_path / "w1"
    sgd = dict(optim="sgd", learning_rate=0.01, max_steps=1, per_device_train_batch_size=4)
    run_train(load_config(None, tiny["overrides"] + train_overrides(one, **sgd)))
    _torchrun(tiny, tmp_path, train_overrides(w1, **sgd, fsdp="full_shard offload", fsdp_config={"fsdp_version": 2}),
              launcher=["torch.distributed.run", "--standalone", "--nproc_per_node", "1"])

    sharding = json.loads((w1 / "run.json").read_text())["fsdp"]
    assert sharding["processes"] == 1 and sharding["offload"] is True
    assert sharding["dtensor_parameters"] == sharding["parameters"]
    (a,), (b,) = _logs(one), _logs(w1)
    for k in [k for k in a if k.startswith("loss")]:
        assert b[k] == a[k], k
    start = load_file(str(Path(tiny["student"]) / "model.safetensors"))
    n = sum(t.numel() for t in start.values()) + sum(t.numel() for t in load_file(str(one / "projectors.safetensors")).values())
    u = 2.0 ** -24
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=n * u / (1 - n * u), abs=0)
    sw = load_file(str(w1 / "student" / "model.safetensors"))
    assert _max_diff(sw, start) > 1e-4  # the step moved the sharded student, written whole by rank 0


def _dcp(folder: Path) -> dict:
    """A DCP checkpoint folder read whole into one process (torch.distributed.checkpoint's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / (folder.name + ".pt")
    dcp_to_torch_save(folder, target)
    return torch.load(target, weights_only=False)


def _flat(tree, prefix="") -> dict:
    """Nested dicts and lists of tensors and numbers -> {dotted path: leaf}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def _identical(a: dict, b: dict) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        if torch.is_tensor(fa[key]):
            assert torch.equal(fa[key], fb[key]), key
        else:
            assert fa[key] == fb[key], key


def test_fsdp_checkpoints_resume_and_best_model(tiny, train_overrides, tmp_path):
    """Launched by `accelerate launch --use_fsdp --fsdp_version 2` (the resumed run: torchrun and training.fsdp).
    Checkpoints of a sharded run hold every process's shards (student, projectors, optimizer state), never a
    whole copy; a run resumed from one continues bit for bit (its next checkpoint, optimizer state included, is
    identical to the uninterrupted run's); load_best_model_at_end loads the best checkpoint's shards, and the
    run's student/ and projectors are then that checkpoint's weights, whole.

    The resumed run also offloads its shards to the CPU (FSDP2's CPUOffloadPolicy). On a CPU process group the
    shards live on the CPU either way, so offloading changes no arithmetic and the run must still be identical:
    this shows the offloaded path trains, saves and restores; what offload saves on a GPU is measured elsewhere."""
    settings = dict(COMMON, max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2,
                    eval_strategy="steps", eval_steps=2, save_total_limit=3, load_best_model_at_end=True,
                    metric_for_best_model="loss", greater_is_better=True)  # "best" = the higher held-out loss
    run = tmp_path / "run"
    _torchrun(tiny, tmp_path, train_overrides(run, **settings), launcher=ACCELERATE_FSDP)
    assert json.loads((run / "run.json").read_text())["fsdp"]["student_local_fraction"] == pytest.approx(0.5, abs=0.01)
    state = json.loads((run / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_loss" in h]  # steps 0, 2, 4, then after loading the best
    assert [h["step"] for h in evals] == [0, 2, 4, 4]
    assert evals[1]["eval_loss"] > evals[2]["eval_loss"] and state["best_model_checkpoint"].endswith("checkpoint-2")
    # the held-out losses after training are step 2's: the student and the projectors (the hidden term) restored
    assert {k: v for k, v in evals[3].items() if k.startswith("eval_loss")} == {
        k: v for k, v in evals[1].items() if k.startswith("eval_loss")}
    for step in (2, 4):
        folder = run / f"checkpoint-{step}"
        names = sorted(p.name for p in folder.iterdir())
        assert {"student_sharded", "optimizer_sharded", "scheduler.pt", "trainer_state.json", "rng_state_0.pth",
                "rng_state_1.pth"} <= set(names), names
        assert not {"model.safetensors", "optimizer.pt", "projectors.safetensors"} & set(names), names
        shards = sorted(p.name for p in (folder / "student_sharded").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards

    # the best checkpoint's shards, gathered here, are the run's whole student and projectors
    best = _dcp(run / "checkpoint-2" / "student_sharded")
    student = load_file(str(run / "student" / "model.safetensors"))
    projectors = load_file(str(run / "projectors.safetensors"))
    assert {f"student.{k}" for k in student} | {f"projectors.{k}" for k in projectors} == set(best)
    for k, v in student.items():
        assert torch.equal(v, best[f"student.{k}"]), k
    for k, v in projectors.items():
        assert torch.equal(v, best[f"projectors.{k}"]), k
    last = {k.removeprefix("student."): v for k, v in _dcp(run / "checkpoint-4" / "student_sharded").items()
            if k.startswith("student.")}
    assert _max_diff(student, last) > 1e-4  # steps 3 and 4 moved it: the best is not simply the last

    # resumed from checkpoint-2 (the newest whole one once checkpoint-4 is gone), with CPU offload
    uninterrupted = {name: _dcp(run / "checkpoint-4" / name) for name in ("student_sharded", "optimizer_sharded")}
    shutil.rmtree(run / "checkpoint-4")
    offload = dict(FSDP, fsdp="full_shard offload")
    _torchrun(tiny, tmp_path, train_overrides(run, **settings, **offload), "--resume")
    summary = json.loads((run / "run.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert summary["fsdp"]["offload"] and summary["fsdp"]["shard_devices"] == ["cpu"]
    for name, whole_state in uninterrupted.items():
        _identical(_dcp(run / "checkpoint-4" / name), whole_state)
    resumed = [h for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    first = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    assert resumed == first  # steps 3 and 4 logged the same numbers, to the last bit


def test_fsdp_without_a_distributed_launch_is_one_line(tiny, train_overrides, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    cfg = load_config(None, tiny["overrides"] + train_overrides(out, **FSDP))
    with pytest.raises(PipelineError, match=r"^training.fsdp needs a distributed launch \(WORLD_SIZE is not set\)") as e:
        run_train(cfg)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_deepspeed_is_refused_naming_fsdp(tmp_path):
    for call in (fsdp_settings, training_arguments):
        with pytest.raises(PipelineError, match=r"training.deepspeed: DeepSpeed is not supported .*training.fsdp"):
            call({"output_dir": str(tmp_path), "deepspeed": "ds.json"})


@pytest.mark.parametrize("training, message", [
    ({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 1}}, "only FSDP2"),
    ({"fsdp": "full_shard offload_everything"}, "not one of full_shard"),
    ({"fsdp": "full_shard", "fsdp_config": {"activation_checkpointing": True}}, "training.activation_checkpointing=true"),
    ({"fsdp": "full_shard", "fsdp_config": {"fsdp_nonsense": 1}}, "unknown FSDP option"),
    ({"fsdp_config": {"fsdp_version": 2}}, "training.fsdp is not"),
])
def test_bad_fsdp_settings(training, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match=message):
        fsdp_settings(training)


def test_an_accelerate_fsdp_launch_is_read_as_training_fsdp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
           "FSDP_OFFLOAD_PARAMS": "true"}
    assert fsdp_settings({}, env) == FsdpSettings(reshard_after_forward=False, offload=True)
    assert fsdp_settings({"fsdp": "full_shard"}, env) == FsdpSettings()  # the section's own request wins
    assert fsdp_settings({}, {**env, "ACCELERATE_USE_FSDP": "false"}) is None
    with pytest.raises(PipelineError, match="only FSDP2"):
        fsdp_settings({}, {"ACCELERATE_USE_FSDP": "true"})  # accelerate's default version is 1
    with pytest.raises(PipelineError, match="hybrid sharding is not supported"):
        fsdp_settings({}, {**env, "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"})
    taken = dict(env)
    take_over_accelerate_fsdp(taken)  # the Trainer's accelerator must not shard a second time
    assert taken["ACCELERATE_USE_FSDP"] == "false"


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

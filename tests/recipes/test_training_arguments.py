"""`training:` -> TrainingArguments: values coerced by the config schema against the real field types, and the
loader defaults of a GPU run (applied only to keys the user left unset)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from pipeline.config import coerce, load_config
from pipeline.errors import PipelineError
from pipeline.train import arguments as train_mod
from pipeline.train.arguments import TRAINING_DEFAULTS, loader_defaults, training_arguments


def _args(tmp_path, **training):
    return training_arguments({"output_dir": str(tmp_path / "run"), **training})


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_bare_no_means_the_off_string(tmp_path):
    """YAML 1.1 reads a bare `no` as False: a field that takes no bool gets its "off" string."""
    args = _args(tmp_path, save_strategy=False, eval_strategy=False, logging_strategy=False, hub_strategy="end")
    assert args.save_strategy == "no" and args.eval_strategy == "no" and args.logging_strategy == "no"
    assert _args(tmp_path, report_to=False).report_to == []  # report_to's "off" is "none" ("no" names no integration)
    assert _args(tmp_path, include_num_input_tokens_seen=False).include_num_input_tokens_seen == "no"  # takes bool


def test_bool_fields_stay_bool(tmp_path):
    args = _args(tmp_path, use_cpu=False, bf16=False, disable_tqdm=True, tf32=None)
    assert args.use_cpu is False and args.bf16 is False and args.disable_tqdm is True
    with pytest.raises(PipelineError) as e:
        _args(tmp_path, bf16="yes")
    assert _one_line(e) == "training.bf16: expected bool, got 'yes'"


def test_numbers_from_text(tmp_path):
    args = _args(tmp_path, learning_rate="1e-4", weight_decay="0.01", per_device_train_batch_size="8",
                 gradient_accumulation_steps=" 2 ", warmup_steps=3)
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert args.weight_decay == 0.01
    assert args.per_device_train_batch_size == 8 and isinstance(args.per_device_train_batch_size, int)
    assert args.gradient_accumulation_steps == 2
    assert args.get_warmup_steps(100) == 3  # an int for a float field (a step count or a ratio) keeps its meaning


@pytest.mark.parametrize("training,message", [
    ({"learning_rate": "abc"}, "training.learning_rate: expected float, got 'abc'"),
    ({"per_device_train_batch_size": "8.5"}, "training.per_device_train_batch_size: expected int, got '8.5'"),
    ({"per_device_train_batch_size": 2.0}, "training.per_device_train_batch_size: expected int, got 2.0"),
    ({"save_steps": False}, "training.save_steps: expected float, got False"),
    ({"report_to": [1]}, "training.report_to: expected null | str | list of str, got [1]"),
    ({"learning_rat": 1e-3}, "unknown key training.learning_rat: not a transformers.TrainingArguments field"),
])
def test_bad_values_are_one_line_errors(tmp_path, training, message):
    with pytest.raises(PipelineError) as e:
        _args(tmp_path, **training)
    assert _one_line(e) == message


def test_union_optional_enum_and_list_fields(tmp_path):
    args = _args(tmp_path, report_to=["tensorboard"], eval_strategy="steps", eval_steps=5, save_strategy="epoch",
                 lr_scheduler_type="cosine", optim="adamw_torch", dataloader_prefetch_factor=None,
                 debug=["underflow_overflow"], lr_scheduler_kwargs={"num_cycles": 2}, trackio_static_space_id=False,
                 label_names=["labels"], data_seed=None)
    assert args.report_to == ["tensorboard"] and args.eval_strategy == "steps" and args.eval_steps == 5
    assert args.save_strategy == "epoch" and args.lr_scheduler_type == "cosine" and args.optim == "adamw_torch"
    assert args.dataloader_prefetch_factor is None and args.debug == ["underflow_overflow"]
    assert args.lr_scheduler_kwargs == {"num_cycles": 2} and args.label_names == ["labels"]
    assert _args(tmp_path, report_to="none").report_to == []
    with pytest.raises(PipelineError) as e:  # a str field of an enum: TrainingArguments names the valid values
        _args(tmp_path, lr_scheduler_type="nope")
    assert _one_line(e).startswith("training: nope is not a valid SchedulerType")


def test_every_default_passes_its_own_type():
    """The coercion refuses none of the values TrainingArguments declares as its own defaults."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    for f in dataclasses.fields(TrainingArguments):
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING:
            coerce(default, hints[f.name], f"training.{f.name}", from_text=True)
    for key, value in TRAINING_DEFAULTS.items():
        coerce(value, hints[key], f"training.{key}")


def test_from_yaml_and_set(tmp_path):
    """`training:` as the config file and `--set` deliver it (YAML-parsed: `no` is False, '8' quoted a str)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"training: {{output_dir: {tmp_path / 'run'}, save_strategy: no, report_to: no, "
                    "learning_rate: '1e-4'}\n")
    cfg = load_config(path, ["training.eval_strategy=no", "training.per_device_train_batch_size='8'",
                             "training.gradient_accumulation_steps=4", "training.use_cpu=no"])
    assert cfg.training["per_device_train_batch_size"] == "8" and cfg.training["use_cpu"] is False
    args = training_arguments(cfg.training)
    assert args.save_strategy == "no" and args.eval_strategy == "no" and args.report_to == []
    assert args.learning_rate == 1e-4 and args.per_device_train_batch_size == 8
    assert args.gradient_accumulation_steps == 4 and args.use_cpu is False
    assert cfg.training["save_strategy"] is False  # the config (run.json) keeps what the user wrote


# --------------------------------------------------------------------------- loader defaults


def test_loader_defaults_on_cpu_and_online():
    assert loader_defaults({}, cuda=False, online=False, cpus=16) == {}
    assert loader_defaults({}, cuda=True, online=True, cpus=16) == {}  # the teacher runs in the collator


@pytest.mark.parametrize("cpus,local_world_size,workers", [(16, 1, 4), (6, 1, 3), (2, 1, 1), (1, 1, 1), (16, 8, 1),
                                                           (16, 2, 4), (12, 2, 3)])
def test_loader_defaults_on_a_gpu(cpus, local_world_size, workers):
    assert loader_defaults({}, cuda=True, online=False, cpus=cpus, local_world_size=local_world_size) == {
        "dataloader_num_workers": workers, "dataloader_pin_memory": True, "dataloader_prefetch_factor": 4,
        "dataloader_persistent_workers": True}


def test_loader_defaults_leave_user_keys():
    user = {"dataloader_num_workers": 2, "dataloader_pin_memory": False}
    assert loader_defaults(user, cuda=True, online=False, cpus=16) == {
        "dataloader_prefetch_factor": 4, "dataloader_persistent_workers": True}
    # the user's 0 workers: prefetching and persistent workers would be refused without workers
    assert loader_defaults({"dataloader_num_workers": 0}, cuda=True, online=False, cpus=16) == {
        "dataloader_pin_memory": True}
    assert loader_defaults({"dataloader_prefetch_factor": 2}, cuda=True, online=False, cpus=16) == {
        "dataloader_num_workers": 4, "dataloader_pin_memory": True, "dataloader_persistent_workers": True}


def test_training_arguments_applies_loader_defaults(tmp_path, monkeypatch):
    """The facts handed to loader_defaults, and its result under the user's keys (this machine has no GPU)."""
    seen = {}

    def fake(training, **facts):
        seen.update(facts)
        return {"dataloader_num_workers": 2, "dataloader_pin_memory": True, "dataloader_persistent_workers": True}

    monkeypatch.setattr(train_mod, "loader_defaults", fake)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = _args(tmp_path, dataloader_persistent_workers=False)
    assert args.dataloader_num_workers == 2 and args.dataloader_pin_memory is True
    assert args.dataloader_persistent_workers is False  # the user's
    assert seen == {"cuda": torch.cuda.is_available(), "online": False, "cpus": train_mod._usable_cpus(),
                    "local_world_size": 2}


def test_cpu_run_keeps_its_defaults(tmp_path):
    args = _args(tmp_path, use_cpu=True)
    assert args.dataloader_num_workers == 0 and args.dataloader_pin_memory is False
    assert args.dataloader_prefetch_factor is None and args.dataloader_persistent_workers is False


def test_online_refuses_workers(tmp_path):
    with pytest.raises(PipelineError) as e:
        training_arguments({"output_dir": str(tmp_path), "dataloader_num_workers": 2}, online=True)
    assert "set training.dataloader_num_workers=0" in _one_line(e)

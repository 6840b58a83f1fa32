"""Compatibility errors before step one: each a one-line PipelineError."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.losses.spec import LossSpec
from pipeline.recipes.train import run_train
from pipeline.train.arguments import training_arguments
from pipeline.train import checks


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_check_functions():
    with pytest.raises(PipelineError) as e:
        checks.check_vocab(100, 258)
    assert "vocabulary (100)" in _one_line(e)
    with pytest.raises(PipelineError) as e:
        checks.check_tokenizer("aaa", "bbb")
    assert "tokenizer" in _one_line(e)
    checks.check_tokenizer(None, "bbb")  # a student without a tokenizer is not checked
    with pytest.raises(PipelineError) as e:
        checks.check_layers({1: 2, 2: 4}, [2, 3])
    assert "teacher layer 4" in _one_line(e)
    with pytest.raises(PipelineError) as e:
        checks.check_temperature(3.0, [1.0, 2.0])
    assert "cached temperatures: 1, 2" in _one_line(e)
    for source in ("topk", "sampled"):
        with pytest.raises(PipelineError) as e:
            checks.check_loss_temperature(LossSpec(temperature=3.0, logits_source=source), [1.0, 2.0])
        assert "cached temperatures: 1, 2" in _one_line(e)
    # exact targets rebuild the logits from layer n, so any temperature is servable
    checks.check_loss_temperature(LossSpec(temperature=3.0, logits_source="exact"), [1.0, 2.0])
    with pytest.raises(PipelineError) as e:
        checks.check_seq_len(64, 32)
    assert "data.seq_len" in _one_line(e)


def _run(tiny, train_overrides, out, *extra):
    return run_train(load_config(None, tiny["overrides"] + train_overrides(out) + list(extra)))


def test_temperature_layers_seq_len(tiny, train_overrides, tmp_path):
    out = tmp_path / "run"
    for override, message in [
        ("loss.temperature=4.0", "cached temperatures"),
        ("mapping.strategy={1: 1, 2: 4}", "teacher layer 1"),
        ("mapping.strategy=selected", "pruning.json"),
    ]:
        with pytest.raises(PipelineError) as e:
            _run(tiny, train_overrides, out, override)
        assert message in _one_line(e), override
    assert not out.exists()  # nothing written before the checks pass


def test_seq_len_comes_from_the_manifest(tiny, train_overrides, tmp_path, tiny_factory, capsys):
    """The YAML's data.seq_len describes a cache build; training from a cache takes the manifest's."""
    out = tmp_path / "run"
    summary = run_train(load_config(None, tiny["overrides"] + train_overrides(out) + ["data.seq_len=512"]))
    assert summary["cache"]["seq_len"] == 32 and summary["metrics"]["global_step"] == 1
    assert "data.seq_len 512 is not used; the cache holds 32-token sequences" in capsys.readouterr().err
    # a student that cannot attend over the cached sequences is refused before anything is written
    short = tiny_factory.model(tmp_path / "short")
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    config["max_position_embeddings"] = 16
    (tmp_path / "short" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError) as e:
        _run(tiny, train_overrides, tmp_path / "r_short", f"student.model={short}")
    assert "max_position_embeddings is 16" in _one_line(e)
    assert not (tmp_path / "r_short").exists()


def test_vocab_and_tokenizer(tiny, train_overrides, tmp_path, tiny_factory):
    small = tiny_factory.model(tmp_path / "small_vocab", vocab=200, with_tokenizer=False)
    with pytest.raises(PipelineError) as e:
        _run(tiny, train_overrides, tmp_path / "r1", f"student.model={small}")
    assert "does not cover" in _one_line(e)

    other = tmp_path / "other_tok"
    shutil.copytree(tiny["student"], other)
    cfg_path = other / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = "<s>"  # a different special token: a different digest
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PipelineError) as e:
        _run(tiny, train_overrides, tmp_path / "r2", f"student.model={other}")
    assert "tokenizer" in _one_line(e)


def test_unknown_training_key():
    with pytest.raises(PipelineError) as e:
        training_arguments({"output_dir": "x", "learning_rat": 1e-3})
    assert "training.learning_rat" in _one_line(e)
    with pytest.raises(PipelineError) as e:
        training_arguments({"output_dir": "x", "lr_scheduler_type": "nope"})
    _one_line(e)
    # `--set training.save_strategy=no` arrives from YAML as False; "no" is what it means
    assert training_arguments({"output_dir": "x", "save_strategy": False}).save_strategy == "no"
    assert training_arguments({"output_dir": "x", "use_cpu": False}).use_cpu is False

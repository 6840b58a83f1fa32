"""`distill train CONFIG [--set ...] [--online] [--resume]`: outputs, one-line errors, exit codes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main

_spec = importlib.util.spec_from_file_location("train_tiny", Path(__file__).parents[1] / "train" / "conftest.py")
tiny_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_mod)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_mod.byte_tokenizer()
    teacher = tiny_mod.save_model(tiny_mod.tiny_llama(4, 32, seed=0, init_range=0.2), tok, root / "teacher")
    student = tiny_mod.save_model(tiny_mod.tiny_llama(2, 24, seed=1), None, root / "student")  # no tokenizer
    overrides = tiny_mod.base_overrides(root, teacher, student, str(root / "cache"))
    config = root / "train.yaml"
    config.write_text("loss: {alpha: 0.5, beta: 0.3, gamma: 0.2, temperature: 1.0}\n")
    runner = CliRunner()
    args = ["cache", "build", str(config)] + [x for o in overrides for x in ("--set", o)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    return root, config, overrides


def _invoke(config, overrides, *extra):
    args = ["train", str(config)] + [x for o in overrides for x in ("--set", o)] + list(extra)
    return CliRunner().invoke(main, args)


def test_train_writes_run_dir(setup):
    root, config, overrides = setup
    out = root / "run"
    training = tiny_mod.training_overrides(out, max_steps=2, save_strategy="steps", save_steps=1)
    result = _invoke(config, overrides + training)
    assert result.exit_code == 0, result.output
    assert "loss: 0.5 ce + 0.3 kl(T=2, tail bucket) + 0.2 cosine hidden\n" in result.output  # the resolved loss
    for name in ("student/config.json", "student/model.safetensors", "projectors.safetensors", "projectors.json",
                 "trainer_state.json", "run.json", "checkpoint-2/projectors.safetensors"):
        assert (out / name).is_file(), name
    assert not list((out / "student").glob("projectors*"))  # never merged into the student
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["loss"]["alpha"] == 0.5 and run["mode"] == "cache"
    assert run["cache"]["fingerprint_digest"] and run["layer_map"] == {"1": 2, "2": 4}
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert {"loss_ce", "loss_kl", "loss_hidden", "loss_hidden_L1", "loss_hidden_L2"} <= set(logged[0])

    # plain transformers loads the student; the tokenizer came from the cache's teacher (student had none)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(out / "student").config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(out / "student").eos_token == "</s>"

    # --resume from the last checkpoint continues to a later max_steps
    more = tiny_mod.training_overrides(out, max_steps=3, save_strategy="steps", save_steps=1)
    result = _invoke(config, overrides + more, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-2")


@pytest.mark.parametrize("extra,needle", [
    (["--set", "training.no_such_arg=1"], "unknown key training.no_such_arg"),
    (["--set", "loss.temperature=3.0"], "cached temperatures: 1, 2"),
    (["--set", "mapping.strategy={1: 1, 2: 3}"], "needs teacher layer 1"),
    (["--set", "cache.dir=/nonexistent/cache"], "cache directory not found"),
    (["--resume"], "no checkpoint"),
    (["--set", "loss.logits=nope"], "unknown logits loss 'nope'; valid: gjsd, jsd, kl, reverse_kl, skew_kl, skew_reverse_kl"),
    (["--set", "loss.hidden=l1"], "unknown hidden loss 'l1'; valid: cosine, mse, nmse"),
    (["--set", "loss.dynamics=fd"], "unknown dynamics loss 'fd'; valid: fdd"),
    (["--set", "loss.preset=shallow"], "unknown loss preset 'shallow'; valid: advanced, depth, depth_width, width"),
    (["--set", "loss.logits_args={beta: 0.5}"], "kl takes no parameter 'beta' (it takes: none)"),
    (["--set", "loss.logits=gjsd", "--set", "loss.logits_args={beta: 1.0}"], "beta: 1.0 for gjsd must be in (0, 1)"),
    (["--set", "loss.logits=skew_kl", "--set", "loss.logits_args={lambda: 1}"], "must be in [0, 1) (lambda = 1"),
    (["--set", "loss.logits=skew_kl", "--set", "loss.skew_alpha=0"], "loss.skew_alpha: 0.0 must be in (0, 1]"),
    (["--set", "loss.skew_alpha=0.5", "--set", "loss.skew_lambda=0.5"], "two spellings of one setting"),
    (["--set", "loss.delta=0.2", "--set", "mapping.stride=2"], "loss.delta > 0 (fdd) compares consecutive mapped"),
    (["--set", "loss.chunk_tokens=-8"], "loss.chunk_tokens: -8 must be >= 0"),
    (["--set", "loss.chunk_tokens=2.5"], "loss.chunk_tokens: expected int | 'auto', got 2.5"),
])
def test_one_line_errors(setup, extra, needle):
    root, config, overrides = setup
    result = _invoke(config, overrides + tiny_mod.training_overrides(root / "err"), *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (root / "err").exists()


def test_evaluations_without_a_heldout_split(setup, tmp_path):
    """eval_strategy=steps on a cache with no held-out rows: one line before the student loads, no run dir."""
    root, config, overrides = setup
    no_heldout = [o for o in overrides if not o.startswith("cache.dir=")] + [
        f"cache.dir={tmp_path / 'cache'}", "data.heldout_fraction=0"]
    built = CliRunner().invoke(main, ["cache", "build", str(config)] + [x for o in no_heldout for x in ("--set", o)])
    assert built.exit_code == 0, built.output
    result = _invoke(config, no_heldout + tiny_mod.training_overrides(tmp_path / "run"),
                     "--set", "training.eval_strategy=steps", "--set", "training.eval_steps=1")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: training.eval_strategy is steps but the held-out split is empty (data.heldout_fraction 0): "
        "set training.eval_strategy=no")
    assert not (tmp_path / "run").exists()


def test_eval_sequences_scores_the_first_n(setup, tmp_path):
    """data.eval_sequences: the periodic evaluation scores the first N held-out sequences, and those only."""
    root, config, overrides = setup
    losses = {}
    for n in (1, 2):  # the cache holds 2 held-out sequences
        out = tmp_path / f"run{n}"
        training = tiny_mod.training_overrides(out, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=1)
        result = _invoke(config, overrides + training, "--set", f"data.eval_sequences={n}")
        assert result.exit_code == 0, result.output
        assert f"/ {n} held-out sequences" in result.output
        state = json.loads((out / "trainer_state.json").read_text())
        losses[n] = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h][-1]
    assert losses[1] != losses[2]  # the second sequence changed the mean: it was not scored with N = 1

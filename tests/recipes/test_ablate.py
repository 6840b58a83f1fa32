"""`distill ablate`: one cache built once for every variant, each variant trained and scored in its own process,
a crashing variant leaves the others, reruns skip finished variants and restart unfinished ones, and every
bad variant is refused before anything runs. Scores are checked against plain transformers losses."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from pipeline.cache import open_cache
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.config import AblateEvalConfig
from pipeline.recipes import ablate as ablate_recipe
from pipeline.recipes.ablate import run_ablate, variant_identity
from tests.recipes.in_process import commands_in_process
from tests.train.conftest import SEQ_LEN, tiny_pair


def _config(tmp_path, teacher, student, variants, cache_dir=None) -> str:
    data = {
        "teacher": {"model": teacher},
        "student": {"model": student},
        "data": {"sources": [{"path": str(tmp_path / "corpus.txt")}], "seq_len": SEQ_LEN, "num_sequences": 12,
                 "heldout_fraction": 0.25, "seed": 0},
        "cache": {"dir": str(cache_dir or tmp_path / "cache"), "topk": 16, "temperatures": [1.0, 2.0],
                  "layers": "auto", "batch_size": 4, "shard_sequences": 8, "chunk_sequences": 4},
        "mapping": {"strategy": "uniform"},
        "loss": {"temperature": 2.0},
        "training": {"per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_steps": 2, "logging_steps": 1,
                     "save_strategy": "no", "seed": 3, "use_cpu": True},
        "ablate": {"output_dir": str(tmp_path / "ablate"), "variants": variants},
    }
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate_models")
    teacher, student = tiny_pair(root)
    broken = root / "broken"
    shutil.copytree(student, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # config fine, weights unreadable
    words = "rivers carry old stories of kings and scholars who measured the stars at night".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(30 + i % 9)) for i in range(60)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return {"root": root, "teacher": teacher, "student": student, "broken": str(broken)}


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """{cache, baseline}: the cache an ablation of the base config (variant `kd: {}`) builds, and the teacher's and
    the untrained student's baseline scores on it, made once, in this process, by the same `distill cache build`
    and `distill eval` commands (and arguments) the ablation runs in its child processes. For the tests whose
    subject comes after those steps (resume, SIGTERM): they name this cache as cache.dir (it is only read: a
    finished cache is never rebuilt, training and eval never write to it) and copy the baseline folder into their
    own ablate.output_dir, where the ablation finds the scores still valid and keeps them.
    test_ablation_over_one_cache builds its own cache and baselines through the ablation."""
    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache

    root = tmp_path_factory.mktemp("ablate_built")
    shutil.copy(models["root"] / "corpus.txt", root / "corpus.txt")
    config = _config(root, models["teacher"], models["student"], {"kd": {}})
    base = load_config(config)
    build_cache(base)
    cache = open_cache(base.cache.dir)
    assert cache.layers == [2, 4]  # what the ablation builds for the uniform map {1: 2, 2: 4}
    baseline = root / "ablate" / "baseline"
    for model, name in ((models["teacher"], "teacher.json"), (models["student"], "pruned.json")):
        args = ablate_recipe._eval_args(model, base.cache.dir, base.ablate.eval, baseline / name)
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    return {"cache": base.cache.dir, "baseline": baseline}


def _with_built(built, tmp_path) -> None:
    """The baseline scores of `built` in this test's ablate.output_dir."""
    shutil.copytree(built["baseline"], tmp_path / "ablate" / "baseline")


def _ppl(model_dir, ids) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.from_numpy(ids).long()
    with torch.no_grad():
        return math.exp(model(input_ids=x, labels=x).loss.item())


def test_ablation_over_one_cache(models, tmp_path, monkeypatch):
    shutil.copy(models["root"] / "corpus.txt", tmp_path / "corpus.txt")
    variants = {
        "ce_only": {"loss.beta": 0, "loss.gamma": 0},
        "kd_uniform": {},
        "kd_last": {"mapping.strategy": "last"},
        "broken": {"student.model": models["broken"]},
    }
    config = _config(tmp_path, models["teacher"], models["student"], variants)
    out = tmp_path / "ablate"
    # what ablation.json says as each variant starts: the finished ones done (or failed), the rest pending
    seen, run_variant = {}, ablate_recipe._run_variant

    def spy(name, *args):
        summary = json.loads((out / "ablation.json").read_text())
        seen[name] = ({r["variant"]: r["status"] for r in summary["rows"]}, summary["pending"],
                      (out / "ablation.md").read_text())
        return run_variant(name, *args)

    monkeypatch.setattr(ablate_recipe, "_run_variant", spy)
    # kd_last's commands (a success, its scores checked below) and broken's (a crash) run as the ablation's own
    # child processes; the cache build, the baselines and the other variants in this process, for time
    commands_in_process(monkeypatch, except_variants=("kd_last", "broken"))
    result = run_ablate(config)
    assert seen["ce_only"][:2] == ({n: "pending" for n in variants}, list(variants))
    assert seen["kd_last"][:2] == ({"ce_only": "done", "kd_uniform": "done", "kd_last": "pending", "broken": "pending"},
                                   ["kd_last", "broken"])
    assert "| kd_last | mapping.strategy=last | not finished yet |" in seen["kd_last"][2]
    assert "| kd_uniform | (base) | not finished yet |" not in seen["kd_last"][2]

    # one cache, built once, holding the union of what the variants with a hidden loss map
    cache = open_cache(tmp_path / "cache")
    assert cache.layers == [2, 3, 4]  # uniform {1: 2, 2: 4} and last {1: 3, 2: 4}
    rows = {r["variant"]: r for r in result["rows"]}
    assert result["failed"] == ["broken"] and rows["broken"]["stage"] == "train"
    assert "Error while deserializing" in rows["broken"]["log_tail"]  # the crash, as the variant's log tail
    assert not (out / "broken" / "variant.json").exists()
    for name in ("ce_only", "kd_uniform", "kd_last"):
        run = json.loads((out / name / "run.json").read_text())
        assert run["mode"] == "cache" and rows[name]["status"] == "done" and rows[name]["steps"] == 2
        assert sorted(p.name for p in (out / name / "eval").iterdir()) == ["pruned.json", "student.json", "teacher.json"]
    assert json.loads((out / "kd_last" / "run.json").read_text())["layer_map"] == {"1": 3, "2": 4}

    # the scores are held-out perplexities of the real folders, and the recovery follows from them
    held = np.stack([cache[i]["input_ids"] for i in cache.indices("heldout")])
    ppl_teacher, ppl_pruned = _ppl(models["teacher"], held), _ppl(models["student"], held)
    assert math.isclose(result["baseline"]["teacher"]["heldout_perplexity"], ppl_teacher, rel_tol=1e-4)
    assert math.isclose(result["baseline"]["pruned"]["heldout_perplexity"], ppl_pruned, rel_tol=1e-4)
    for name in ("ce_only", "kd_last"):
        ppl = _ppl(out / name / "student", held)
        assert math.isclose(rows[name]["metrics"]["heldout_perplexity"], ppl, rel_tol=1e-4)
        assert math.isclose(rows[name]["recovery"]["ppl_recovery"], (ppl_pruned - ppl) / (ppl_pruned - ppl_teacher),
                            rel_tol=1e-3)
    assert json.loads((out / "ablation.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    table = (out / "ablation.md").read_text()
    assert "| kd_last | mapping.strategy=last |" in table and "failed in train" in table
    assert (out / "ablation.png").stat().st_size > 0

    # rerun: finished variants are skipped (no new process), the failed one is tried again
    stamps = {n: (out / n / "variant.json").stat().st_mtime_ns for n in ("ce_only", "kd_uniform", "kd_last")}
    # an interrupted variant: no marker, a leftover file -> restarted from a clean folder
    (out / "kd_uniform" / "variant.json").unlink()
    (out / "kd_uniform" / "leftover.txt").write_text("half-written")
    # (through the CLI, which calls run_ablate and exits non-zero while a variant fails; what run_ablate returns
    # is what it writes to ablation.json)
    rerun = CliRunner().invoke(main, ["ablate", config], catch_exceptions=False)
    again = json.loads((out / "ablation.json").read_text())
    assert (out / "ce_only" / "variant.json").stat().st_mtime_ns == stamps["ce_only"]
    assert (out / "kd_last" / "variant.json").stat().st_mtime_ns == stamps["kd_last"]
    assert (out / "kd_uniform" / "variant.json").is_file() and not (out / "kd_uniform" / "leftover.txt").exists()
    assert again["failed"] == ["broken"]

    # the CLI exits non-zero while a variant fails
    assert rerun.exit_code == 1, rerun.output


@pytest.mark.parametrize("variants,message", [
    ({"a": {"loss.alpah": 1}}, "variant a: unknown key loss.alpah"),
    ({"a": {"loss.temperature": 3.0}}, "variant a: loss.temperature 3 is not in the cache; cached temperatures: 1, 2"),
    ({"a": {"cache.topk": 8}}, "ablate.variants.a: cache.topk cannot vary"),
    ({"a": {"loss.logits": "nope"}}, "variant a: unknown logits loss 'nope'"),
    ({"a": {"training.max_stepz": 2}}, "variant a: unknown key training.max_stepz"),
    ({"a": {"mapping.projector_init": "nope"}}, "variant a: unknown projector init 'nope'"),
    ({"a": {"mapping.projector": "identity"}}, "variant a: projector kind 'identity' needs equal widths"),
    ({"bad name": {}}, "ablate.variants: 'bad name' is not a usable variant name"),
    ({}, "ablate.variants is empty"),
])
def test_bad_variants_refused_before_anything_runs(models, tmp_path, variants, message):
    shutil.copy(models["root"] / "corpus.txt", tmp_path / "corpus.txt")
    config = _config(tmp_path, models["teacher"], models["student"], {"ok": {}, **variants} if variants else {})
    with pytest.raises(PipelineError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        run_ablate(config)
    assert not (tmp_path / "ablate").exists() and not (tmp_path / "cache").exists()


def test_layer_the_existing_cache_lacks(models, tmp_path):
    """An existing cache is never rebuilt: a variant mapping a teacher layer it lacks is refused up front."""
    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache

    shutil.copy(models["root"] / "corpus.txt", tmp_path / "corpus.txt")
    config = _config(tmp_path, models["teacher"], models["student"], {"ok": {}, "deep": {"mapping.strategy": {1: 1, 2: 4}}})
    build_cache(load_config(config))  # uniform map only: layers [2, 4]
    result = CliRunner().invoke(main, ["ablate", config])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: variant deep: the layer map needs teacher layer 1")
    assert not (tmp_path / "ablate").exists()


def test_cache_of_another_format_refused(models, tmp_path):
    """A cache an older version of the code wrote cannot be read by the variants: one line up front, nothing run."""
    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache

    shutil.copy(models["root"] / "corpus.txt", tmp_path / "corpus.txt")
    config = _config(tmp_path, models["teacher"], models["student"], {"ok": {}})
    build_cache(load_config(config))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest["format_version"] = 2
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["ablate", config])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"error: the cache {tmp_path / 'cache'} holds a format-2 cache (this code reads and writes format 3); "
        "delete it and rerun: the ablation rebuilds it")
    assert not (tmp_path / "ablate").exists()


def test_variant_identity_tracks_base_config_eval_and_cache():
    data = {"training": {"max_steps": 2}, "mapping": {"strategy": {1: 2, 2: 4}}}
    ident = variant_identity(data, AblateEvalConfig(), "abc")
    assert json.loads(json.dumps(ident)) == ident  # a marker read back from disk compares equal (int keys too)
    assert variant_identity({**data, "training": {"max_steps": 3}}, AblateEvalConfig(), "abc") != ident
    assert variant_identity(data, AblateEvalConfig(limit=5), "abc") != ident
    assert variant_identity(data, AblateEvalConfig(), "abd") != ident


def test_no_heldout_and_foreign_folders_refused(models, tmp_path):
    shutil.copy(models["root"] / "corpus.txt", tmp_path / "corpus.txt")
    config = _config(tmp_path, models["teacher"], models["student"], {"ok": {}})
    with pytest.raises(PipelineError, match="no held-out sequences"):
        run_ablate(config, ("data.heldout_fraction=0",))
    (tmp_path / "ablate" / "ok").mkdir(parents=True)
    (tmp_path / "ablate" / "ok" / "mine.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="was not written by `distill ablate`"):
        run_ablate(config)
    assert (tmp_path / "ablate" / "ok" / "mine.txt").read_text() == "keep me"
    assert not (tmp_path / "cache").exists()


def test_interrupted_variant_resumes_from_its_checkpoint(models, built, tmp_path, monkeypatch):
    """A variant killed after a checkpoint continues from it on rerun (the same identity), and ends with the
    same student as an uninterrupted run; one that started with another config starts again from scratch.
    (The commands run in this process: the subject is what the ablation resumes, not its child processes.)"""
    from safetensors.torch import load_file

    commands_in_process(monkeypatch)
    shutil.copy(models["root"] / "corpus.txt", tmp_path / "corpus.txt")
    config = _config(tmp_path, models["teacher"], models["student"], {"kd": {}}, cache_dir=built["cache"])
    _with_built(built, tmp_path)
    steps = ("training.max_steps=2", "training.save_strategy=steps", "training.save_steps=1")
    run_ablate(config, steps)
    out = tmp_path / "ablate" / "kd"
    finished = load_file(out / "student" / "model.safetensors")
    assert not list(out.glob("checkpoint-*"))  # kept only while the variant is unfinished
    marker = json.loads((out / "variant.json").read_text())
    assert marker["resumed_from"] is None

    # the state a kill after the first checkpoint leaves: the variant's training to step 1, no marker, no student
    (out / "variant.json").unlink()
    shutil.rmtree(out / "student")
    train = CliRunner().invoke(main, ["train", str(out / "config.yaml"), "--set", "training.save_total_limit=null"])
    assert train.exit_code == 0, train.output
    shutil.rmtree(out / "checkpoint-2")
    shutil.rmtree(out / "student")
    assert (out / "variant-started.json").is_file() and (out / "checkpoint-1").is_dir()

    again = run_ablate(config, steps)
    assert again["failed"] == []
    marker = json.loads((out / "variant.json").read_text())
    assert marker["resumed_from"] == str(out / "checkpoint-1")
    assert again["rows"][0]["resumed_from"] == str(out / "checkpoint-1")
    assert again["heldout_kl_support"] == "top-16 + tail bucket"
    row = next(line for line in (out.parent / "ablation.md").read_text().splitlines() if line.startswith("| kd |"))
    assert row.endswith(" (resumed) |")
    resumed = load_file(out / "student" / "model.safetensors")
    for name, tensor in finished.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)

    # another config under the same name: the leftover checkpoint is not resumed
    (out / "variant.json").unlink()
    (out / "checkpoint-1").mkdir()
    run_ablate(config, steps + ("loss.temperature=1.0",))
    assert json.loads((out / "variant.json").read_text())["resumed_from"] is None


def _children(pid: int) -> dict[int, bytes]:
    """The live processes whose parent is `pid`, with their command lines."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc to find the child process")
def test_sigterm_stops_the_running_variant(models, built, tmp_path):
    """`kill` of `distill ablate` (SIGTERM) stops the variant's training process too, instead of leaving it
    training into the variant's folder beside the next run."""
    shutil.copy(models["root"] / "corpus.txt", tmp_path / "corpus.txt")
    config = _config(tmp_path, models["teacher"], models["student"], {"kd": {}}, cache_dir=built["cache"])
    _with_built(built, tmp_path)
    ablate = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ablate", config, "--set",
                               "training.max_steps=1000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, train = time.monotonic() + 240, None
    try:
        while train is None and time.monotonic() < deadline and ablate.poll() is None:
            train = next((pid for pid, cmd in _children(ablate.pid).items() if b"\0train\0" in cmd), None)
            time.sleep(0.2)
        assert train is not None, "distill ablate never started the variant's training"
        ablate.send_signal(signal.SIGTERM)
        assert ablate.wait(timeout=60) == 128 + signal.SIGTERM
        assert not Path(f"/proc/{train}").exists()
    finally:
        ablate.kill()
        ablate.wait()
        if train is not None and Path(f"/proc/{train}").exists():
            os.kill(train, signal.SIGKILL)  # the failure above: no orphan left training

"""The demo chain (prune -> cache -> train -> score) on a tiny teacher, with its scores checked against
plain transformers losses on the cache's held-out rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.cache import open_cache
from pipeline.errors import PipelineError
from pipeline.recipes.demo import DEMO_CONFIG, run_demo
from tests.conftest import make_tiny_model


def _perplexity(path, ids: np.ndarray) -> float:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    x = torch.from_numpy(ids).long()
    with torch.no_grad():
        return math.exp(model(input_ids=x, labels=x).loss.item())  # HF's own shifted mean NLL


def test_demo_chain_on_tiny_teacher(tmp_path, smollm_tokenizer, corpus_file):
    teacher = make_tiny_model(tmp_path / "teacher", smollm_tokenizer, vocab=49152, layers=6)
    overrides = (
        f"teacher.model={teacher}", f"data.sources=[{{path: {corpus_file}}}]", "data.seq_len=32",
        "data.num_sequences=16", "data.heldout_fraction=0.25", f"student.model={tmp_path / 'student'}",
        f"cache.dir={tmp_path / 'cache'}", "cache.batch_size=4", "cache.shard_sequences=8", "cache.chunk_sequences=4",
        "mapping.stride=2", f"training.output_dir={tmp_path / 'run'}", "training.max_steps=2",
        "training.eval_steps=1", "training.per_device_train_batch_size=2", "training.use_cpu=true",
        "eval.tasks=[arc_easy, winogrande]", "eval.limit=3",
    )
    result = run_demo(DEMO_CONFIG, overrides, remove=2, calibration_sequences=4)

    record = json.loads((tmp_path / "student" / "pruning.json").read_text())
    assert len(record["removed_layers"]) == 2 and len(record["kept_layers"]) == 4
    c = open_cache(tmp_path / "cache")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    # selected map, stride 2 over 4 student blocks: blocks 2 and 4 learn from the teacher blocks they were
    assert run["layer_map"] == {"2": record["kept_layers"][1], "4": record["kept_layers"][3]}
    assert c.layers == sorted(run["layer_map"].values())  # cache.layers=auto cached exactly those
    assert result["train"]["global_step"] == 2

    held = np.stack([c[i]["input_ids"] for i in c.indices("heldout")])
    assert result["heldout_sequences"] == len(held) == 4
    for name, path in (("teacher", teacher), ("pruned", tmp_path / "student"), ("distilled", tmp_path / "run" / "student")):
        assert math.isclose(result[name]["perplexity"], _perplexity(path, held), rel_tol=1e-4), name
        assert set(result[name]["tasks"]) == {"arc_easy", "winogrande"}
    # the teacher against its own cache: KL only from the fp16 rounding of the cached logits
    assert abs(result["teacher"]["kl"]) < 1e-3 < result["pruned"]["kl"]
    gap = result["pruned"]["perplexity"] - result["teacher"]["perplexity"]
    assert math.isclose(result["recovery"]["ppl_recovery"],
                        (result["pruned"]["perplexity"] - result["distilled"]["perplexity"]) / gap, rel_tol=1e-9)
    assert json.loads((tmp_path / "run" / "demo.json").read_text()) == json.loads(json.dumps(result))
    for role in ("teacher", "pruned", "student"):
        assert json.loads((tmp_path / "run" / "eval" / f"{role}.json").read_text())["tasks"]["arc_easy"]["n"] == 3
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "layer_cosine_heatmap.png" in report and (tmp_path / "run" / "report" / "layer_cosine_heatmap.png").is_file()


def test_demo_never_overwrites_a_folder_prune_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="not written by `distill prune`"):
        run_demo(DEMO_CONFIG, (f"student.model={mine}",))
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]


@pytest.mark.parametrize("override,message", [
    ("eval.tasks=[arc_easy, nope]", "unknown benchmark task"),
    ("eval.limit=0", "eval.limit: 0 must be >= 1"),
    ("data.heldout_fraction=0", "no held-out sequences"),
])
def test_demo_checks_its_eval_step_before_the_first_step(tmp_path, override, message):
    with pytest.raises(PipelineError, match=message):
        run_demo(DEMO_CONFIG, (f"student.model={tmp_path / 'student'}", f"cache.dir={tmp_path / 'cache'}",
                               f"training.output_dir={tmp_path / 'run'}", override))
    assert list(tmp_path.iterdir()) == []

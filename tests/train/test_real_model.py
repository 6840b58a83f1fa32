"""Real model, end to end: packaged SmolLM2 teacher, cache of 8 x 64 tokens, student = teacher minus
blocks 12-17; a few steps from the cache lower the held-out loss and the student loads with plain
transformers."""

from __future__ import annotations

import json

import torch

from pipeline.config import load_config
from pipeline.recipes.cache import build_cache
from pipeline.recipes.train import run_train
from pipeline.sources import models

REMOVED = range(12, 18)  # 1-based blocks 12..17: low importance (docs/pruning.md: 13..18 are the six least important)


def _pruned_student(path):
    model, tok = models.load_model("smollm2-135m-instruct")
    layers = model.model.layers
    keep = [i for i in range(len(layers)) if i + 1 not in REMOVED]  # 0-based positions kept
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "pruning.json").write_text(json.dumps({"kept_layers": [i + 1 for i in keep]}))
    return str(path)


def test_smollm2_recovers_from_cache(tmp_path):
    student = _pruned_student(tmp_path / "student")
    base = [
        f"student.model={student}", f"cache.dir={tmp_path / 'cache'}", "data.seq_len=64", "data.num_sequences=8",
        "data.heldout_fraction=0.25", "cache.topk=64", "cache.layers=auto", "cache.batch_size=4",
        "cache.shard_sequences=8", "cache.chunk_sequences=4", "mapping.strategy=selected", "mapping.stride=6",
    ]
    build_cache(load_config("configs/demo.yaml", base))
    out = tmp_path / "run"
    training = [
        f"training.output_dir={out}", "training.per_device_train_batch_size=2", "training.max_steps=3",
        "training.learning_rate=2.0e-4", "training.logging_steps=1", "training.save_strategy='no'",
        "training.warmup_steps=0", "training.use_cpu=true",
    ]
    summary = run_train(load_config("configs/demo.yaml", base + training))
    m = summary["metrics"]
    assert summary["layer_map"] == {"6": 6, "12": 18, "18": 24, "24": 30}  # selected: original block indices
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert summary["cache"]["fingerprint"]["tokenizer_digest"]

    # the run's student is a plain HF folder (no projector weights inside), with its tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out / "student")
    assert loaded.config.num_hidden_layers == 24
    assert AutoTokenizer.from_pretrained(out / "student").vocab_size == 49152
    assert (out / "projectors.safetensors").is_file() and (out / "projectors.json").is_file()
    assert json.loads((out / "projectors.json").read_text())["kinds"] == {"6": "identity", "12": "identity", "18": "identity", "24": "identity"}

"""nmse divides by one constant per teacher layer: the teacher's mean square over the train split, stored in
the manifest at build time (or computed once from an older cache), never the current batch's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.cache.reader import open_cache
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.recipes.train import run_train


def test_manifest_holds_the_train_split_mean_square(tiny):
    cache = open_cache(tiny["cache"])
    stored = {int(k): v for k, v in cache.manifest["hidden_mean_square"].items()}
    assert sorted(stored) == cache.layers
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.float32).eval()
    ids = torch.from_numpy(np.stack([cache[i]["input_ids"] for i in cache.indices("train")])).long()
    captured = {}
    blocks = model.model.layers
    hooks = [blocks[t - 1].register_forward_hook(
        lambda m, a, o, t=t: captured.__setitem__(t, (o[0] if isinstance(o, tuple) else o).double()))
        for t in stored if t > 0]
    with torch.no_grad():
        embeddings = model.model.embed_tokens(ids).double()
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for t, value in stored.items():
        h = embeddings if t == 0 else captured[t]
        ref = float(h.square().mean())  # packed cache: every token valid
        assert abs(value - ref) <= 1e-6 * ref, (t, value, ref)  # fp32 forwards in other batch shapes
    # the held-out rows are not part of it
    assert len(cache.indices("heldout")) > 0


def test_a_manifest_without_the_constants_is_refused_in_one_line(tiny, tmp_path):
    """Every build writes the mean square of each cached layer; a manifest without it was not written by this
    version and is refused when opened, naming the key and the fix, not filled in silently."""
    old = tmp_path / "cache"
    shutil.copytree(tiny["cache"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    stored = manifest.pop("hidden_mean_square")
    assert stored
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="lacks hidden_mean_square of layer .*--overwrite"):
        open_cache(old)


def _first_log(run_dir):
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return next(h for h in state["log_history"] if "loss" in h)


def test_nmse_is_mse_over_the_stored_constant(tiny, train_overrides):
    cache = open_cache(tiny["cache"])
    logs, summaries = {}, {}
    for name, online in (("mse", False), ("nmse", False), ("nmse_online", True)):
        out = tiny["root"] / f"hidden_{name}"
        cfg = load_config(None, tiny["overrides"] + train_overrides(out) + [f"loss.hidden={name.split('_')[0]}"])
        summaries[name] = run_train(cfg, online=online)
        logs[name] = _first_log(out)
    layer_map = {int(j): t for j, t in summaries["nmse"]["layer_map"].items()}
    stored = cache.manifest["hidden_mean_square"]
    assert summaries["nmse"]["hidden_mean_square"] == {str(t): stored[str(t)] for t in sorted(set(layer_map.values()))}
    for j, t in layer_map.items():
        key = f"loss_hidden_L{j}"
        # same student, same first batch: nmse is exactly mse divided by the layer's stored constant
        assert abs(logs["nmse"][key] - logs["mse"][key] / stored[str(t)]) <= 1e-6 * logs["nmse"][key], key
        # the live teacher computes the same constant itself before training
        assert abs(logs["nmse_online"][key] - logs["nmse"][key]) <= 1e-5 * logs["nmse"][key], key
        assert abs(summaries["nmse_online"]["hidden_mean_square"][str(t)] - stored[str(t)]) <= 1e-6 * stored[str(t)]

"""Exact full-distribution targets from the cache (cache.logits topk+exact): what the build stores, the
held-out KL before any step against the live teacher's own forward in float64, online parity, the dense and
chunked paths agreeing, and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.cache import open_cache
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.recipes.train import run_train

from .conftest import tiny_cache
from .test_parity import _first_log, assert_same_losses_and_update, first_logs_by_chunk, train_cache_and_online

EXACT = ["cache.logits=topk+exact", "cache.exact_codec=fp32", "cache.topk=8"]  # top-8: the top-k targets differ
KL_ONLY = ["loss.alpha=0", "loss.beta=1", "loss.gamma=0"]


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """{root, teacher, student, overrides}: the tiny pair and a topk+exact cache."""
    return tiny_cache(tmp_path_factory.mktemp("exact"), EXACT)


def test_the_cache_stores_the_head_once_and_layer_n(exact):
    cache = open_cache(exact["root"] / "cache")
    m = cache.manifest
    assert m["logits"] == "topk+exact" and cache.exact_layer == 4 and 4 in m["layers"]  # 4 blocks: layer n = 4
    assert m["exact"]["norm"] == "rms" and m["exact"]["file"] == "teacher_head.safetensors"
    stored = load_file(exact["root"] / "cache" / "teacher_head.safetensors")
    teacher = AutoModelForCausalLM.from_pretrained(exact["teacher"])
    assert torch.equal(stored["lm_head.weight"], teacher.lm_head.weight.detach())
    assert torch.equal(stored["norm.weight"], teacher.model.norm.weight.detach())
    assert CliRunner().invoke(main, ["cache", "verify", str(exact["root"] / "cache")]).exit_code == 0
    info = CliRunner().invoke(main, ["cache", "info", str(exact["root"] / "cache")])
    assert info.exit_code == 0 and "exact        layer 4 (fp32, 117 B/token) + the teacher's rms norm and head" in info.output


@pytest.mark.parametrize("encode_on", ["writer", "device"])
def test_layer_n_at_its_own_codec(exact, tmp_path, encode_on):
    """hidden_codec bf16 with exact_codec fp32: layer n is stored at fp32 (the teacher's own block output, bit
    for bit), the other layers at bf16, whether the writer or the teacher's device encodes."""
    from pipeline.recipes.cache import build_cache
    from pipeline.blocks import decoder_layers

    overrides = [o for o in exact["overrides"] if not o.startswith(("cache.dir=", "cache.hidden_codec="))] + [
        f"cache.dir={tmp_path / 'c'}", "cache.hidden_codec=bf16", f"cache.encode_on={encode_on}"]
    build_cache(load_config(None, overrides))
    cache = open_cache(tmp_path / "c")
    assert cache.manifest["layer_codecs"] == {"4": "fp32"} and cache.manifest["hidden_codec"] == "bf16"
    i = cache.indices("train")[0]
    item = cache[i]
    teacher = AutoModelForCausalLM.from_pretrained(exact["teacher"]).eval()
    outs = {}
    hooks = [decoder_layers(teacher)[j - 1].register_forward_hook(
        lambda m, a, out, j=j: outs.__setitem__(j, out[0] if isinstance(out, (tuple, list)) else out)) for j in (2, 4)]
    with torch.no_grad():
        teacher(input_ids=torch.from_numpy(item["input_ids"]).long()[None])
    for h in hooks:
        h.remove()
    assert torch.equal(torch.from_numpy(item["hidden"][4]), outs[4][0])
    assert torch.equal(torch.from_numpy(item["hidden"][2]), outs[2][0].to(torch.bfloat16).float())


def test_heldout_kl_before_training_equals_the_live_teachers_fp64(exact, train_overrides):
    """The step-0 evaluation from exact targets is T^2 mean KL(teacher || student) over the held-out next-token
    positions, with both distributions from the models' own forwards in float64: no top-k, no tail."""
    out = exact["root"] / "before"
    cfg = load_config(None, exact["overrides"] + train_overrides(out, eval_strategy="steps", eval_steps=1) + KL_ONLY
                      + ["loss.logits_source=exact"])
    said = []
    run_train(cfg, echo=said.append)
    assert any("exact targets" in line for line in said if line.startswith("loss: "))
    state = json.loads((out / "trainer_state.json").read_text())
    before = next(h for h in state["log_history"] if h.get("step") == 0 and "eval_loss_kl" in h)

    want = 2.0**2 * _fp64_heldout_kl(exact, exact["student"], 2.0)
    # fp32 forwards of 2-4 blocks and an fp32 softmax over 258 ids: relative error ~1e-6
    assert abs(before["eval_loss_kl"] - want) <= 1e-5 * want, (before["eval_loss_kl"], want)


def _fp64_heldout_kl(exact, model_dir, T: float) -> float:
    """Mean KL(teacher_T || model_T) over the cache's held-out next-token positions, both distributions from
    the models' own forwards in float64."""
    cache = open_cache(exact["root"] / "cache")
    ids = torch.stack([torch.from_numpy(cache[i]["input_ids"]) for i in cache.indices("heldout")]).long()
    with torch.no_grad():
        zt = AutoModelForCausalLM.from_pretrained(exact["teacher"]).double()(input_ids=ids).logits[:, :-1]
        zs = AutoModelForCausalLM.from_pretrained(model_dir).double()(input_ids=ids).logits[:, :-1]
    log_p, log_q = torch.log_softmax(zt / T, -1), torch.log_softmax(zs / T, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def test_eval_reports_the_exact_heldout_kl(exact, tmp_path):
    """`distill eval --heldout` on a cache with exact targets: KL(teacher || model) at T = 1 over the whole
    vocabulary (the live teacher's own fp64 forward as reference), the top-k bucket KL beside it."""
    out = tmp_path / "student.json"
    result = CliRunner().invoke(main, ["eval", "--model", exact["student"], "--heldout", str(exact["root"] / "cache"),
                                       "--tasks", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    h = json.loads(out.read_text())["heldout"]
    want = _fp64_heldout_kl(exact, exact["student"], 1.0)
    assert h["kl_support"] == "full vocabulary (exact targets)"
    assert abs(h["kl_to_teacher"] - want) <= 1e-5 * want, (h["kl_to_teacher"], want)
    assert abs(sum(h["per_sequence"]["kl"]) / h["tokens"] - h["kl_to_teacher"]) <= 1e-9
    assert h["kl_to_teacher_topk"] < 0.9 * want  # the top-8 bucket KL misses the tail's shape


def test_any_loss_temperature_with_exact_targets(exact, train_overrides):
    """Exact targets rebuild the logits: T = 3, which the cache did not store, trains, and the step-0 held-out
    KL is the live models' fp64 one at T = 3. Top-k targets at T = 3 stay a one-line error."""
    out = exact["root"] / "t3"
    cfg = load_config(None, exact["overrides"] + train_overrides(out, eval_strategy="steps", eval_steps=1) + KL_ONLY
                      + ["loss.logits_source=exact", "loss.temperature=3.0"])
    run_train(cfg)
    state = json.loads((out / "trainer_state.json").read_text())
    before = next(h for h in state["log_history"] if h.get("step") == 0 and "eval_loss_kl" in h)
    want = 3.0**2 * _fp64_heldout_kl(exact, exact["student"], 3.0)
    assert abs(before["eval_loss_kl"] - want) <= 1e-5 * want, (before["eval_loss_kl"], want)
    with pytest.raises(PipelineError, match="loss.temperature 3 is not in the cache; cached temperatures: 1, 2"):
        run_train(load_config(None, exact["overrides"] + train_overrides(exact["root"] / "t3topk") + [
            "loss.logits_source=topk", "loss.temperature=3.0"]))


def test_exact_cache_matches_online(exact, train_overrides):
    """The live teacher's own head and layer n give the same losses and the same update as the cache's."""
    runs = train_cache_and_online(exact["root"], exact["overrides"], ["loss.logits_source=exact", "loss.logits=skew_kl"],
                                  train_overrides, "parity")
    assert_same_losses_and_update(runs, rel=1e-6)


def test_dense_and_chunked_agree(exact, train_overrides):
    logs = first_logs_by_chunk(exact["root"], exact["overrides"], ["loss.logits_source=exact", "loss.logits=jsd"],
                               train_overrides)
    for k in ("loss", "loss_kl", "loss_ce"):
        assert abs(logs[0][k] - logs[7][k]) <= 1e-5 * abs(logs[0][k]), (k, logs[0][k], logs[7][k])


def test_auto_reads_exact_targets_and_topk_still_works(exact, train_overrides):
    said = []
    run_train(load_config(None, exact["overrides"] + train_overrides(exact["root"] / "auto")), echo=said.append)
    assert any("exact targets" in line for line in said if line.startswith("loss: "))
    said = []
    run_train(load_config(None, exact["overrides"] + train_overrides(exact["root"] / "topk") + [
        "loss.logits_source=topk"]), echo=said.append)
    assert any("tail bucket" in line for line in said if line.startswith("loss: "))


def test_a_damaged_head_file_is_refused_in_one_line(exact, train_overrides, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(exact["root"] / "cache", cache)
    head = cache / "teacher_head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 1
    head.write_bytes(bytes(data))
    overrides = [o for o in exact["overrides"] if not o.startswith("cache.dir=")] + [f"cache.dir={cache}"]
    with pytest.raises(PipelineError, match="teacher_head.safetensors is damaged: it does not match its checksum in manifest.json"):
        run_train(load_config(None, overrides + train_overrides(tmp_path / "run")))
    verify = CliRunner().invoke(main, ["cache", "verify", str(cache)])
    assert verify.exit_code != 0 and "teacher_head.safetensors" in verify.output
    head.unlink()
    with pytest.raises(PipelineError, match="teacher_head.safetensors is missing; .*distill cache build CONFIG"):
        run_train(load_config(None, overrides + train_overrides(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_a_cache_without_exact_targets_is_refused_in_one_line(tiny, train_overrides, tmp_path):
    with pytest.raises(PipelineError, match="loss.logits_source exact: the cache holds cache.logits topk; set "
                                            "loss.logits_source=topk or rebuild with cache.logits=topk\\+exact"):
        run_train(load_config(None, tiny["overrides"] + train_overrides(tmp_path / "run") + ["loss.logits_source=exact"]))
    assert not (tmp_path / "run").exists()


def test_a_teacher_whose_head_we_cannot_rebuild_is_refused_before_writing(exact, tmp_path, monkeypatch):
    import pipeline.head

    from pipeline.recipes.cache import build_cache

    monkeypatch.setattr(pipeline.head, "final_norm", lambda model: (None, "the final norm Odd is not one of rms, "
                                                                          "rms_offset, layer"))
    overrides = [o for o in exact["overrides"] if not o.startswith("cache.dir=")] + [f"cache.dir={tmp_path / 'c'}"]
    with pytest.raises(PipelineError, match="cache.logits topk\\+exact: the teacher's logits cannot be rebuilt from its "
                                            "last block output: the final norm Odd is not one of"):
        build_cache(load_config(None, overrides))
    assert not (tmp_path / "c").exists()


def test_exact_alone_and_all_three_kinds(exact, train_overrides, tmp_path):
    """cache.logits exact stores no top-k (the full lse only) and trains from the head; topk+sampled+exact
    holds all three kinds of one teacher pass, each trainable, auto reading the exact ones."""
    from pipeline.recipes.cache import build_cache

    base = [o for o in exact["overrides"] if not o.startswith(("cache.dir=", "cache.logits="))]
    for mode, sources in (("exact", ["exact"]), ("topk+sampled+exact", ["topk", "sampled", "exact"])):
        overrides = base + [f"cache.dir={tmp_path / mode}", f"cache.logits={mode}", "cache.samples=8"]
        build_cache(load_config(None, overrides))
        cache = open_cache(tmp_path / mode)
        assert cache.manifest["logits"] == mode and cache.exact_layer == 4
        assert cache.topk == (0 if mode == "exact" else 8) and cache.samples == (0 if mode == "exact" else 8)
        for source in sources:
            out = tmp_path / f"{mode}-{source}"
            run_train(load_config(None, overrides + train_overrides(out) + [f"loss.logits_source={source}"]))
            log = _first_log(out)
            assert log["loss_kl"] > 0.05, (mode, source, log)  # a sharp teacher, a random student
        said = []
        run_train(load_config(None, overrides + train_overrides(tmp_path / f"{mode}-auto")), echo=said.append)
        assert any("exact targets" in line for line in said if line.startswith("loss: "))
        # what each kind costs: the target columns' blobs, inside the side data
        info = CliRunner().invoke(main, ["cache", "info", str(tmp_path / mode), "--json"])
        per_token = json.loads(info.output)["bytes_per_token"]
        columns = {"topk_ids", "topk_logits", "sample_ids", "sample_counts", "sample_logits"} if sources[0] == "topk" \
            else set()
        assert set(per_token["targets"]) == columns and all(v > 0 for v in per_token["targets"].values())
        assert sum(per_token["targets"].values()) < per_token["side_data"]
    with pytest.raises(PipelineError, match="loss.logits_source topk: the cache holds cache.logits exact; set "
                                            "loss.logits_source=exact"):
        run_train(load_config(None, base + [f"cache.dir={tmp_path / 'exact'}", "cache.logits=exact"]
                              + train_overrides(tmp_path / "no") + ["loss.logits_source=topk"]))

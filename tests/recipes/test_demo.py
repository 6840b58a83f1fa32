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
from pipeline.cache.manifest import FORMAT_VERSION
from pipeline.errors import PipelineError
from pipeline.recipes.demo import DEMO_CONFIG, run_demo
from tests.conftest import make_tiny_model


def _perplexity(path, ids: np.ndarray) -> float:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    x = torch.from_numpy(ids).long()
    with torch.no_grad():
        return math.exp(model(input_ids=x, labels=x).loss.item())  # HF's own shifted mean NLL


U32 = 2.0 ** -24  # fp32 unit roundoff


def _spread(x: torch.Tensor) -> torch.Tensor:
    return x.max(-1).values - x.min(-1).values


def _kl_to_cache(path, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out next-token position, in float64 from our own forward on the unpadded rows: the bucket
    KL(cached teacher || model) at T = 1 (docs/architecture.md, section 12: the k cached ids plus one tail bucket of
    mass 1 - sum of the cached top-k probabilities), and a bound on the fp32 rounding of the same value.

    The bound: the pipeline forms every log in fp32 from fp32 inputs. To first order the errors of the k
    in-bucket logs cancel: p's go into its own tail (1 - sum of the rounded p_i), and the bucket KL
    is stationary in q where q = p. What is left is each side's own rounding of its tail: a logsumexp over
    k logs spanning R nats rounds the log-mass by <= u (R + log2 k + 2) (exp arguments, exp, sum, log),
    1 - mass turns that into mass / tail times as much on log tail, weighted by p_tail (p_tail / q_tail for
    q), plus a few u for the final sums: B = u (mass_p (R_p + c) + p_tail / q_tail mass_q (R_q + c) + 4).
    Measured on the demo's tiny teacher: every position within 0.73 B (29 u at most); the mean error 0.3 u
    against a mean B of 18 u, 15% of the KL (the per-position errors mostly cancel; the bound does not
    count on that)."""
    model = AutoModelForCausalLM.from_pretrained(path).double().eval()
    kls, bounds = [], []
    for i in cache.indices("heldout"):
        r = cache[i]
        n = int(r.get("length", len(r["input_ids"])))
        with torch.no_grad():
            ids = torch.tensor(r["input_ids"][None, :n], dtype=torch.long)  # [1, n]
            logits = model(input_ids=ids).logits[0, :-1]  # [n-1, V]
        log_q = torch.log_softmax(logits, -1)  # the model's next token after position t, at t
        top = torch.from_numpy(r["topk_ids"][: n - 1].astype(np.int64))  # [n-1, k]
        z = torch.from_numpy(r["topk_logits"][: n - 1].astype(np.float64))  # [n-1, k] (fp16 values)
        log_p_in = z - torch.from_numpy(r["lse"][1.0][: n - 1].astype(np.float64))[:, None]
        mass_p = log_p_in.exp().sum(-1)
        p_tail = 1 - mass_p
        assert (p_tail > 0).all()  # top-64 of 49,152 ids never holds all the mass here
        log_q_in = log_q.gather(1, top)
        outside = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, top, False)
        log_q_tail = torch.logsumexp(log_q.masked_fill(~outside, -math.inf), -1)  # summed over the other ids
        kls.append((log_p_in.exp() * (log_p_in - log_q_in)).sum(-1) + p_tail * (p_tail.log() - log_q_tail))
        c = math.log2(top.shape[-1]) + 2
        mass_q, q_tail = log_q_in.exp().sum(-1), log_q_tail.exp()
        bounds.append(U32 * (mass_p * (_spread(log_p_in) + c) + p_tail / q_tail * mass_q * (_spread(log_q_in) + c) + 4))
    return torch.cat(kls), torch.cat(bounds)


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
    # cache.dir holds a cache an older version of the code wrote (only its manifest matters here): the demo
    # rebuilds it, where `distill cache build` would refuse it without --overwrite
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({"format_version": 2, "fingerprint": {"format_version": 2}}))
    result = run_demo(DEMO_CONFIG, overrides, remove=2, calibration_sequences=4)

    record = json.loads((tmp_path / "student" / "pruning.json").read_text())
    assert len(record["removed_layers"]) == 2 and len(record["kept_layers"]) == 4
    c = open_cache(tmp_path / "cache")
    assert c.manifest["format_version"] == FORMAT_VERSION
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
    # the teacher against its own cache: KL only from the fp16 rounding of the cached logits, positive and
    # tiny (second order in the rounding), equal to our float64 computation within the fp32 rounding bound
    kl, bound = _kl_to_cache(teacher, c)
    assert len(kl) == 4 * 31 and (kl > 0).all()
    assert abs(result["teacher"]["kl"] - kl.mean().item()) <= bound.mean().item(), (result["teacher"]["kl"], kl.mean())
    assert 0 < result["teacher"]["kl"] < 1e-3 < result["pruned"]["kl"]
    heldout = json.loads((tmp_path / "run" / "eval" / "teacher.json").read_text())["heldout"]
    assert heldout["tokens"] == len(kl) and heldout["kl_to_teacher"] == result["teacher"]["kl"]  # the same positions
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
    ("eval.limit=0", "eval.limit must be a positive whole number of items, got 0"),
    ("eval.limit={boolq: 3}", "eval.limit names 'boolq', not among the tasks scored"),
    ("data.heldout_fraction=0", "no held-out sequences"),
])
def test_demo_checks_its_eval_step_before_the_first_step(tmp_path, override, message):
    with pytest.raises(PipelineError, match=message):
        run_demo(DEMO_CONFIG, (f"student.model={tmp_path / 'student'}", f"cache.dir={tmp_path / 'cache'}",
                               f"training.output_dir={tmp_path / 'run'}", override))
    assert list(tmp_path.iterdir()) == []

"""scripts/docs/results.py --budget: the budget runs' tables from a real (tiny) ablation of the same shape as
configs/budget/recovery.yaml: the objectives, the three target kinds of one cache, the goals, the hidden-state
term's paired difference (at one seed and across two), the held-out curves; and --from-copies regenerating the same tables."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.recipes.ablate import run_ablate
from tests.recipes.in_process import commands_in_process
from tests.train.conftest import SEQ_LEN, tiny_pair

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {
    "ce_only": {"loss.alpha": 1.0, "loss.beta": 0.0, "loss.gamma": 0.0},
    "features": {},
    "logits": {"loss.gamma": 0.0},
    "logits_exact": {"loss.gamma": 0.0, "loss.logits_source": "exact"},
    "logits_sampled": {"loss.gamma": 0.0, "loss.logits_source": "sampled"},
    "features_seed1": {"training.seed": 4},
    "logits_seed1": {"loss.gamma": 0.0, "training.seed": 4},
}


@pytest.fixture(scope="module")
def budget(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    teacher, student = tiny_pair(root)
    words = "rivers carry old stories of kings and scholars who measured the stars at night".split()
    (root / "corpus.txt").write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(30 + i % 9))
                                                 for i in range(60)))
    config = {
        "teacher": {"model": teacher}, "student": {"model": student},
        "data": {"sources": [{"path": str(root / "corpus.txt")}], "seq_len": SEQ_LEN, "num_sequences": 12,
                 "heldout_fraction": 0.25, "seed": 0, "eval_sequences": 2},
        "cache": {"dir": str(root / "cache"), "topk": 16, "temperatures": [1.0, 2.0], "layers": "auto",
                  "logits": "topk+sampled+exact", "samples": 8, "batch_size": 4, "shard_sequences": 8,
                  "chunk_sequences": 4},
        "mapping": {"strategy": "uniform"},
        "loss": {"preset": "depth", "temperature": 2.0, "logits_source": "topk"},
        "training": {"per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_steps": 2, "logging_steps": 1,
                     "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "no", "seed": 3, "use_cpu": True},
        "ablate": {"output_dir": str(root / "ablate"), "variants": VARIANTS},
    }
    (root / "budget.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        commands_in_process(mp)  # the tables are this module's subject, not the child processes
        result = run_ablate(root / "budget.yaml")
    assert result["failed"] == [], [r.get("log_tail") for r in result["rows"]]
    out = root / "results"
    r = subprocess.run([sys.executable, "-m", "scripts.docs.results", str(root / "ablate"), "--budget",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "out": out}


def _per_position(result: dict, key: str) -> list[float]:
    p = result["heldout"]["per_sequence"]
    return [s / n for s, n in zip(p[key], p["tokens"]) if n]


def test_tables_and_their_numbers(budget):
    out = budget["out"]
    tables = (out / "tables.md").read_text()
    for title in ("## Every model", "## Against the goals (depth student)", "## Objectives (depth student)",
                  "## Does the hidden-state term help?", "## The hidden-state term across training seeds",
                  "## Training seed: seed 1 - seed 0", "## Teacher targets at equal steps"):
        assert title in tables, title
    results = json.loads((out / "results.json").read_text())
    evals = {p.stem: json.loads(p.read_text()) for p in (out / "evals").glob("*.json")}

    # the hidden-state term: features - logits, per held-out sequence, by hand from the eval JSONs
    f, g = _per_position(evals["features"], "kl"), _per_position(evals["logits"], "kl")
    d = [a - b for a, b in zip(f, g)]
    assert results["hidden_term"]["kl"]["diff"] == pytest.approx(sum(d) / len(d), rel=1e-12)
    # and across the two training seeds: the mean of the seeds' mean differences
    f1, g1 = _per_position(evals["features_seed1"], "kl"), _per_position(evals["logits_seed1"], "kl")
    d1 = [a - b for a, b in zip(f1, g1)]
    assert results["hidden_term_seeds"]["kl"]["diff"] == pytest.approx((sum(d) / len(d) + sum(d1) / len(d1)) / 2, rel=1e-12)
    # the held-out KL is the exact one (the cache holds exact targets), the top-k bucket's beside it
    h = evals["logits"]["heldout"]
    assert h["kl_support"] == "full vocabulary (exact targets)" and h["kl_to_teacher_topk"] <= h["kl_to_teacher"]

    # what each kind costs: its columns' blobs, and layer n for exact targets
    cache = json.loads((out / "cache.json").read_text())["bytes_per_token"]
    targets = results["targets"]
    assert targets["logits"]["bytes_per_token"] == pytest.approx(
        cache["targets"]["topk_ids"] + cache["targets"]["topk_logits"])
    assert targets["logits_exact"]["bytes_per_token"] == pytest.approx(cache["hidden_per_layer"]["4"])
    assert set(targets) == {"logits", "logits_exact", "logits_sampled"} and targets["logits"]["vs_topk"] is None
    # the goals table holds the recovery metrics of each depth variant
    for v in ("ce_only", "features", "logits"):
        assert set(results["goals"][v]) == {"kl_recovery", "capability_retention", "ppl_retention"}
    assert (out / "heldout_curves.png").stat().st_size > 0
    curve = json.loads((out / "curves" / "features.json").read_text())
    assert [c["step"] for c in curve] == [0, 1, 2] and all("eval_loss_kl" in c for c in curve)


def test_from_copies_regenerates_the_same_tables(budget):
    out = budget["out"]
    before = (out / "tables.md").read_text()
    (out / "tables.md").unlink()
    r = subprocess.run([sys.executable, "-m", "scripts.docs.results", "--budget", "--from-copies",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "tables.md").read_text() == before


def test_curve_trend_per_doubling():
    """The trend of a curve that is exactly a + b log2(tokens) (plus its step-0 point and an end off the trend):
    the nearest evaluation to each of 100k/200k/400k/800k tokens, the slope b per doubling, and the end value
    carried by b x log2(10) to 10x the tokens."""
    from scripts.docs import budget as results

    tokens, a, b = 1024, 5.0, -0.07
    curve = [{"step": 0, "eval_loss_ce": 9.0}]
    curve += [{"step": s, "eval_loss_ce": a + b * math.log2(s * tokens)} for s in range(98, 977, 98)]
    curve += [{"step": 977, "eval_loss_ce": 3.5}]
    trend = results.curve_trend(curve, tokens, "eval_loss_ce")
    assert [d["tokens"] for d in trend["doublings"]] == [98 * tokens, 196 * tokens, 392 * tokens, 784 * tokens]
    assert trend["start"] == 9.0 and trend["end"] == 3.5 and trend["end_tokens"] == 977 * tokens
    assert abs(trend["per_doubling"] - b) < 1e-12
    assert trend["extrapolated"] == {"tokens": 9770 * tokens, "value": pytest.approx(3.5 + b * math.log2(10), abs=1e-12)}
    # too coarse a curve to place four doublings, or no step-0 point: no trend
    assert results.curve_trend(curve[:1] + curve[8:], tokens, "eval_loss_ce") is None
    assert results.curve_trend(curve[1:], tokens, "eval_loss_ce") is None
    assert results.curve_trend(curve, tokens, "eval_loss_kl") is None


def test_projected_kl_by_hand():
    """The exact KL carried by its curve's trend: 0.5 x (0.15 / 0.2) = 0.375 against a pruned KL of 1.0."""
    from scripts.docs import budget as results

    trends = {"kd": {"eval_loss_kl": {"end": 0.2, "extrapolated": {"value": 0.15}}}}
    ev = {"kd": {"heldout": {"kl_to_teacher": 0.5}}, "pruned-kd": {"heldout": {"kl_to_teacher": 1.0}}}
    lines, data = results.table_projected(trends, {**ev, "ce": {"heldout": {"kl_to_teacher": 0.8}},
                                                   "pruned-ce": {"heldout": {"kl_to_teacher": 1.0}}}, ["ce", "kd"])
    assert data == {"kd": {"kl": 0.5, "kl_recovery": 0.5, "ratio": pytest.approx(0.75), "kl_projected": pytest.approx(0.375),
                           "kl_recovery_projected": pytest.approx(0.625)}}
    assert lines[-1] == "| kd | 0.5000 | 50.0% | 0.750 | 0.3750 | 62.5% |"


def test_across_seeds_by_hand():
    """Two seeds' differences -0.003 and -0.001: mean -0.002, seed stderr sd / sqrt(2) = 0.001; consistent only
    when both are resolved over items with the same sign."""
    from scripts.docs import budget as results

    a = results.across_seeds([{"diff": -0.003, "stderr": 0.0002}, {"diff": -0.001, "stderr": 0.0002}])
    assert a["diff"] == pytest.approx(-0.002, abs=1e-15) and a["stderr"] == pytest.approx(0.001, abs=1e-15)
    assert a["n"] == 2 and a["consistent"] == "yes"
    # one seed unresolved (|diff| < 2 stderr), or the signs differ: not consistent
    assert results.across_seeds([{"diff": -0.003, "stderr": 0.0002}, {"diff": -0.0003, "stderr": 0.0002}])["consistent"] == "no"
    assert results.across_seeds([{"diff": -0.003, "stderr": 0.0002}, {"diff": 0.001, "stderr": 0.0002}])["consistent"] == "no"
    assert results.across_seeds([{"diff": -0.003, "stderr": 0.0002}])["diff"] is None


def test_other_divergence_labelled_and_not_projected():
    """A skew-KL variant's periodic KL term is labelled by its divergence in the trend table, and the exact KL is
    not carried by it (its curve is not the KL's); a KL variant with the same curve is."""
    from scripts.docs import budget as results

    curve = [{"step": 0, "eval_loss_ce": 4.0, "eval_loss_kl": 0.9}]
    curve += [{"step": s, "eval_loss_ce": 3.0, "eval_loss_kl": 0.3 - 0.01 * math.log2(s)} for s in range(98, 977, 98)]
    curve += [{"step": 977, "eval_loss_ce": 2.9, "eval_loss_kl": 0.2}]

    def run(name):
        return {"config": {"loss": {"logits": name}, "training": {"per_device_train_batch_size": 4}},
                "cache": {"seq_len": 256}}

    runs = {"kd": run("kl"), "adv": run("skew_kl")}
    lines, trends = results.table_trends({"kd": curve, "adv": curve}, runs, ["kd", "adv"])
    assert [line.split(" | ")[1] for line in lines[2:]] == ["CE", "KL term x T^2", "CE", "skew_kl term x T^2"]
    ev = {v: {"heldout": {"kl_to_teacher": 0.5}} for v in ("kd", "adv")}
    ev.update({f"pruned-{v}": {"heldout": {"kl_to_teacher": 1.0}} for v in ("kd", "adv")})
    _, projected = results.table_projected(trends, ev, ["kd", "adv"])
    assert set(projected) == {"kd"}

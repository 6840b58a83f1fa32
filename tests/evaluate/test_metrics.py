"""Recovery metrics against numbers worked out by hand from the definitions (docs/architecture.md, section 14)."""

from __future__ import annotations

import copy
import math

import pytest

from pipeline.errors import PipelineError
from pipeline.evaluate.metrics import (
    paired_accuracy,
    paired_accuracy_task_mean,
    paired_difference,
    paired_heldout,
    primary_metric,
    recovery_metrics,
)


def _result(ppl, kl, tasks):
    return {"model": "m", "heldout": {"perplexity": ppl, "kl_to_teacher": kl, "tokens": 100}, "tasks": tasks}


def _task(items, norm_items=None):
    t = {"acc": sum(items) / len(items), "acc_stderr": 0.01, "n": len(items), "split": "validation",
         "items": {"acc": items}}
    if norm_items is not None:
        t.update(acc_norm=sum(norm_items) / len(norm_items), acc_norm_stderr=0.02)
        t["items"]["acc_norm"] = norm_items
    return t


TEACHER = _result(20.0, 0.0, {"arc_easy": _task([1, 1, 1, 0], [1, 1, 1, 1]), "winogrande": _task([1, 1, 0, 0])})
PRUNED = _result(40.0, 0.8, {"arc_easy": _task([1, 0, 0, 0], [1, 0, 0, 0]), "winogrande": _task([0, 1, 0, 0])})
MODEL = _result(25.0, 0.3, {"arc_easy": _task([1, 1, 0, 0], [1, 1, 1, 0]), "winogrande": _task([1, 1, 0, 0])})


def test_paired_difference_by_hand():
    # d = [0, 1, -1, 1]: mean 0.25, sample sd sqrt(((-.25)^2 + .75^2 + (-1.25)^2 + .75^2) / 3) = sqrt(2.75 / 3)
    d = paired_difference([1, 1, 0, 1], [1, 0, 1, 0])
    assert d["diff"] == 0.25 and d["n"] == 4
    assert math.isclose(d["stderr"], math.sqrt(2.75 / 3) / 2)
    assert paired_difference([1], [0])["stderr"] is None
    with pytest.raises(PipelineError, match="same items"):
        paired_difference([1, 0], [1])


def test_paired_heldout_by_hand():
    def scored(nll, kl, tokens, cache="c1"):
        return {"heldout": {"cache_fingerprint": cache, "per_sequence": {"nll": nll, "kl": kl, "tokens": tokens}}}

    x = scored([30.0, 20.0, 0.0], [3.0, 1.0, 0.0], [10, 5, 0])  # per position: nll 3, 4; kl .3, .2 (row 3 empty)
    y = scored([20.0, 15.0, 0.0], [1.0, 2.0, 0.0], [10, 5, 0])  # per position: nll 2, 3; kl .1, .4
    d = paired_heldout(x, y, "nll")  # differences 1, 1: mean 1, sd 0
    assert d == {"diff": 1.0, "stderr": 0.0, "n": 2}
    d = paired_heldout(x, y, "kl")  # differences .2, -.2: mean 0, sd sqrt(.08), stderr sqrt(.08) / sqrt(2) = .2
    assert abs(d["diff"]) < 1e-15 and math.isclose(d["stderr"], 0.2) and d["n"] == 2
    assert paired_heldout(x, {"heldout": {"cache_fingerprint": "c1"}}, "kl")["diff"] is None
    with pytest.raises(PipelineError, match="same cache"):
        paired_heldout(x, scored([1.0], [1.0], [1], cache="c2"), "nll")
    with pytest.raises(PipelineError, match="different positions"):
        paired_heldout(x, scored([1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [9, 5, 0]), "nll")


def test_paired_accuracy_pools_items_by_hand():
    # arc_easy on acc_norm: MODEL [1,1,1,0] vs PRUNED [1,0,0,0]; winogrande on acc: [1,1,0,0] vs [0,1,0,0]
    # pooled d = [0,1,1,0, 1,0,0,0]: mean 3/8, sd^2 = (3 * (5/8)^2 + 5 * (3/8)^2) / 7 = (75 + 45) / 448
    d = paired_accuracy(MODEL, PRUNED)
    assert d["n"] == 8 and math.isclose(d["diff"], 3 / 8)
    assert math.isclose(d["stderr"], math.sqrt(120 / 448 / 8))
    short = copy.deepcopy(PRUNED)
    short["tasks"]["winogrande"]["items"]["acc"] = [0, 1]
    with pytest.raises(PipelineError, match="same --limit"):
        paired_accuracy(MODEL, short)


def test_paired_accuracy_task_mean_by_hand():
    # unequal task sizes: arc_easy (acc_norm) d = [0,1,1,0]: mean 1/2, sd^2 = 4 (1/2)^2 / 3 = 1/3, se^2 = 1/12;
    # winogrande (acc) 2 items d = [1, 0]: mean 1/2, sd^2 = 1/2, se^2 = 1/4. Task mean 1/2, se sqrt(1/12 + 1/4) / 2
    # (the pooled difference would be 3/6 here too, but weighs arc_easy twice)
    short_m, short_p = copy.deepcopy(MODEL), copy.deepcopy(PRUNED)
    short_m["tasks"]["winogrande"]["items"]["acc"] = [1, 1]
    short_p["tasks"]["winogrande"]["items"]["acc"] = [0, 1]
    d = paired_accuracy_task_mean(short_m, short_p)
    assert d["n"] == 2 and math.isclose(d["diff"], 0.5)
    assert math.isclose(d["stderr"], math.sqrt(1 / 12 + 1 / 4) / 2)
    one = copy.deepcopy(short_m)
    one["tasks"]["winogrande"]["items"]["acc"] = [1]
    two = copy.deepcopy(short_p)
    two["tasks"]["winogrande"]["items"]["acc"] = [0]
    assert paired_accuracy_task_mean(one, two)["diff"] is None  # a one-item task has no standard error


def test_recovery_metrics_by_hand():
    r = recovery_metrics(TEACHER, PRUNED, MODEL)
    assert math.isclose(r["ppl_retention"], 20 / 25)
    assert math.isclose(r["ppl_recovery"], (40 - 25) / (40 - 20))  # 0.75
    assert math.isclose(r["kl_recovery"], (0.8 - 0.3) / 0.8)
    rows = {row["task"]: row for row in r["tasks"]}
    # arc_easy reports acc_norm: teacher 1.0, pruned 0.25, model 0.75
    assert rows["arc_easy"]["metric"] == "acc_norm" and rows["winogrande"]["metric"] == "acc"
    assert math.isclose(rows["arc_easy"]["retention"], 0.75)
    assert math.isclose(rows["arc_easy"]["recovery"], (0.75 - 0.25) / (1.0 - 0.25))
    assert rows["arc_easy"]["vs_teacher"]["diff"] == -0.25  # d = [0, 0, 0, -1]
    assert math.isclose(rows["arc_easy"]["vs_teacher"]["stderr"], math.sqrt((3 * 0.25**2 + 0.75**2) / 3) / 2)
    assert rows["arc_easy"]["vs_pruned"]["diff"] == 0.5
    # winogrande: teacher 0.5, pruned 0.25, model 0.5
    assert math.isclose(rows["winogrande"]["retention"], 1.0)
    assert math.isclose(rows["winogrande"]["recovery"], 1.0)
    assert rows["winogrande"]["vs_teacher"] == {"diff": 0.0, "stderr": 0.0, "n": 4}
    assert math.isclose(r["capability_retention"], (0.75 + 1.0) / 2)
    assert math.isclose(r["benchmark_recovery"], (2 / 3 + 1.0) / 2)


def test_no_gap_gives_none_not_inf():
    same = _result(20.0, 0.0, {"winogrande": _task([1, 0])})
    r = recovery_metrics(same, same, same)
    assert r["ppl_recovery"] is None and r["kl_recovery"] is None
    assert r["tasks"][0]["recovery"] is None and "benchmark_recovery" not in r


def test_different_limits_refused():
    short = _result(25.0, 0.3, {"winogrande": _task([1, 1])})
    with pytest.raises(PipelineError, match="same --limit"):
        recovery_metrics(TEACHER, PRUNED, short)


def test_primary_metric():
    assert primary_metric({"acc": 0.5, "acc_norm": 0.6}) == "acc_norm"
    assert primary_metric({"acc": 0.5}) == "acc"


def test_heldout_on_different_text_refused():
    teacher, pruned, model = copy.deepcopy(TEACHER), copy.deepcopy(PRUNED), copy.deepcopy(MODEL)
    for r, source in ((teacher, "cache a"), (pruned, "cache a"), (model, "cache b")):
        r["heldout"]["source"] = source
    with pytest.raises(PipelineError, match="different text"):
        recovery_metrics(teacher, pruned, model)
    model["heldout"]["source"] = "cache a"
    assert recovery_metrics(teacher, pruned, model)["ppl_recovery"] == 0.75

"""Recovery metrics from the eval JSONs of a teacher, its pruned student and a recovered student.

The book's definitions (docs/architecture.md, section 14), plus the uncertainty a few hundred benchmark items carry:

    PPL retention        = ppl_teacher / ppl_model                                   (1 = teacher's)
    PPL recovery         = (ppl_pruned - ppl_model) / (ppl_pruned - ppl_teacher)     (1 = gap closed)
    KL recovery          = (kl_pruned - kl_model) / kl_pruned                        (KL to the teacher)
    capability retention = mean over tasks of acc_model / acc_teacher
    benchmark recovery   = (acc_model - acc_pruned) / (acc_teacher - acc_pruned)     per task, and the mean

Accuracy is each task's primary metric: `acc_norm` when lm-eval reports it (length-normalised choice
log-likelihood: ARC, HellaSwag, PIQA, OBQA), else `acc` (Winogrande, LAMBADA, BoolQ). With per-item
results of two models on the same items, the paired difference mean(x_i - y_i) has standard error
sd(x - y) / sqrt(n), much smaller than the two independent stderrs combined when the models agree on
most items. A ratio whose denominator is zero (no gap to recover) is None, never inf or NaN.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.errors import PipelineError


def primary_metric(task: dict) -> str:
    """'acc_norm' when the task reports it, else 'acc'."""
    return "acc_norm" if task.get("acc_norm") is not None else "acc"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den != 0 and math.isfinite(num) and math.isfinite(den) else None


def paired_difference(x: list[float], y: list[float]) -> dict[str, float | int | None]:
    """Mean of x_i - y_i over the same items, its standard error sd(d) / sqrt(n) and n."""
    if len(x) != len(y):
        raise PipelineError(f"paired difference needs the same items: {len(x)} vs {len(y)} results")
    n = len(x)
    if n == 0:
        return {"diff": None, "stderr": None, "n": 0}
    d = [a - b for a, b in zip(x, y)]
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n) if n > 1 else None
    return {"diff": mean, "stderr": se, "n": n}


def paired_heldout(x: dict, y: dict, key: str) -> dict[str, float | int | None]:
    """Paired difference of two models' held-out `key` ("nll" or "kl", nats per position) over the same
    held-out sequences, from the eval JSONs' heldout.per_sequence: per sequence the mean over its scored
    positions, then mean(x_i - y_i) and its standard error over sequences (positions within one sequence
    are not independent; sequences from different documents nearly are). None values when either side
    lacks per-sequence scores."""
    hx, hy = x.get("heldout") or {}, y.get("heldout") or {}
    if hx.get("cache_fingerprint") != hy.get("cache_fingerprint"):
        raise PipelineError("paired held-out difference needs both models scored on the same cache")
    px, py = hx.get("per_sequence") or {}, hy.get("per_sequence") or {}
    if px.get(key) is None or py.get(key) is None:
        return {"diff": None, "stderr": None, "n": 0}
    if px["tokens"] != py["tokens"]:
        raise PipelineError("paired held-out difference: the two results scored different positions")
    keep = [i for i, m in enumerate(px["tokens"]) if m > 0]
    return paired_difference([px[key][i] / px["tokens"][i] for i in keep],
                             [py[key][i] / py["tokens"][i] for i in keep])


def _items(result: dict, task: str, metric: str) -> list[float] | None:
    t = result.get("tasks", {}).get(task, {})
    items = t.get("items", {}).get(metric)
    return [float(v) for v in items] if items is not None else None


def _shared_items(x: dict, y: dict) -> list[tuple[list[float], list[float]]]:
    """Per task both scored (sorted by name), the two models' per-item results on its primary metric; a task
    scored on different items is refused."""
    pairs = []
    for task, tx in sorted(x.get("tasks", {}).items()):
        if task not in y.get("tasks", {}):
            continue
        metric = primary_metric(tx)
        ix, iy = _items(x, task, metric), _items(y, task, metric)
        if ix is None or iy is None:
            continue
        if len(ix) != len(iy):
            raise PipelineError(f"task {task}: {len(ix)} vs {len(iy)} items; evaluate both with the same --limit")
        pairs.append((ix, iy))
    return pairs


def paired_accuracy(x: dict, y: dict) -> dict[str, float | int | None]:
    """Paired difference of two models' accuracy pooled over every benchmark item both scored (each task's
    primary metric): with equal items per task, the difference of the mean accuracies over tasks."""
    pairs = _shared_items(x, y)
    return paired_difference([v for ix, _ in pairs for v in ix], [v for _, iy in pairs for v in iy])


def paired_accuracy_task_mean(x: dict, y: dict) -> dict[str, float | int | None]:
    """Paired accuracy difference per task both scored, then their mean over tasks (every task weighs the same,
    as in the mean accuracy and capability retention, whatever its item count) with the standard error
    sqrt(sum se_t^2) / n_tasks (tasks are independent item sets); n = the tasks. None values when a task has
    a single item (no standard error) or none is shared."""
    diffs = [paired_difference(ix, iy) for ix, iy in _shared_items(x, y)]
    if not diffs or any(d["stderr"] is None for d in diffs):
        return {"diff": None, "stderr": None, "n": len(diffs)}
    n = len(diffs)
    return {"diff": sum(d["diff"] for d in diffs) / n, "stderr": math.sqrt(sum(d["stderr"] ** 2 for d in diffs)) / n,
            "n": n}


def task_rows(teacher: dict, pruned: dict | None, model: dict) -> list[dict[str, Any]]:
    """Per task scored by teacher and model: accuracies, stderrs, retention, recovery, paired differences."""
    rows = []
    for task, tm in model.get("tasks", {}).items():
        tt = teacher.get("tasks", {}).get(task)
        if tt is None:
            continue
        metric = primary_metric(tt)
        if tm.get(metric) is None:
            continue
        if tm.get("n") != tt.get("n"):
            raise PipelineError(f"task {task}: teacher scored {tt.get('n')} items, model {tm.get('n')}; "
                                "evaluate both with the same --limit")
        row: dict[str, Any] = {
            "task": task, "metric": metric, "n": tm.get("n"),
            "teacher": tt[metric], "teacher_stderr": tt.get(f"{metric}_stderr"),
            "model": tm[metric], "model_stderr": tm.get(f"{metric}_stderr"),
            "retention": _ratio(tm[metric], tt[metric]),
        }
        model_items, teacher_items = _items(model, task, metric), _items(teacher, task, metric)
        if model_items is not None and teacher_items is not None:
            row["vs_teacher"] = paired_difference(model_items, teacher_items)
        tp = (pruned or {}).get("tasks", {}).get(task)
        if tp is not None and tp.get(metric) is not None:
            row["pruned"], row["pruned_stderr"] = tp[metric], tp.get(f"{metric}_stderr")
            row["recovery"] = _ratio(tm[metric] - tp[metric], tt[metric] - tp[metric])
            pruned_items = _items(pruned, task, metric)
            if model_items is not None and pruned_items is not None:
                row["vs_pruned"] = paired_difference(model_items, pruned_items)
        rows.append(row)
    return rows


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _check_same_text(named: dict[str, dict]) -> None:
    """Held-out scores compare only on the same tokens: same source and token count, and the same cache
    fingerprint where both results record one."""
    scored = {n: h for n, h in named.items() if h.get("perplexity") is not None}
    fingerprints = {h["cache_fingerprint"] for h in scored.values() if h.get("cache_fingerprint")}
    if len({(h.get("source"), h.get("tokens")) for h in scored.values()}) > 1 or len(fingerprints) > 1:
        detail = "; ".join(f"{n}: {h.get('source')} ({h.get('tokens')} tokens)" for n, h in scored.items())
        raise PipelineError(f"held-out scores come from different text, not comparable: {detail}")


def recovery_metrics(teacher: dict, pruned: dict | None, model: dict) -> dict[str, Any]:
    """Every recovery metric computable from the three eval results (pruned may be None)."""
    out: dict[str, Any] = {}
    ht, hm = teacher.get("heldout") or {}, model.get("heldout") or {}
    hp = (pruned or {}).get("heldout") or {}
    _check_same_text({"teacher": ht, "pruned": hp, "model": hm})
    if ht.get("perplexity") is not None and hm.get("perplexity") is not None:
        out["ppl_retention"] = _ratio(ht["perplexity"], hm["perplexity"])
        if hp.get("perplexity") is not None:
            out["ppl_recovery"] = _ratio(hp["perplexity"] - hm["perplexity"], hp["perplexity"] - ht["perplexity"])
    if hp.get("kl_to_teacher") is not None and hm.get("kl_to_teacher") is not None:
        out["kl_recovery"] = _ratio(hp["kl_to_teacher"] - hm["kl_to_teacher"], hp["kl_to_teacher"])
    rows = task_rows(teacher, pruned, model)
    if rows:
        out["tasks"] = rows
        out["capability_retention"] = _mean([r["retention"] for r in rows])
        recoveries = [r.get("recovery") for r in rows]
        if any(r is not None for r in recoveries):
            out["benchmark_recovery"] = _mean(recoveries)
        diffs = [r["vs_teacher"] for r in rows if "vs_teacher" in r and r["vs_teacher"]["stderr"] is not None]
        if diffs and len(diffs) == len(rows):
            # mean over tasks of the paired accuracy difference; tasks are independent item sets
            out["mean_diff_vs_teacher"] = {
                "diff": sum(d["diff"] for d in diffs) / len(diffs),
                "stderr": math.sqrt(sum(d["stderr"] ** 2 for d in diffs)) / len(diffs),
            }
    return out

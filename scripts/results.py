"""Tables of the results pages from their result files.

    python scripts/results.py runs/budget --budget --out docs/results        # docs/results.md (`make experiments`)
    python scripts/results.py runs/experiments --out docs/results-toy        # docs/results-toy.md (`make experiments-toy`)

Reads what the runs leave under EXP (the ablations' ablation.json, every model's eval JSON, each variant's
run record; the budget runs' held-out curves and the cache's bytes per target kind; the toy experiment's
online run and report figures), copies the small files next to the tables (no weights, no cache) and writes
OUT/tables.md and OUT/results.json. Reading the copies instead (`--from-copies`) regenerates the same tables
without the runs.

Every number is computed here from those files with pipeline.evaluate.metrics: recovery metrics from the
teacher, pruned and recovered eval JSONs, and paired differences (same held-out sequences, same benchmark
items) with their standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluate.metrics import (  # noqa: E402
    paired_accuracy,
    paired_accuracy_task_mean,
    paired_heldout,
    primary_metric,
    recovery_metrics,
)

TASKS = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "piqa"]
TASK_LABEL = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "hellaswag": "HellaSwag", "winogrande": "Winogr.",
              "lambada_openai": "LAMBADA", "piqa": "PIQA"}
KINDS = [("depth", "objectives", "features"), ("width", "kinds", "width"),
         ("depth_width", "kinds", "depth_width")]
ABLATIONS = ("objectives", "kinds", "seeds", "budget")  # output dirs under EXP (students.yaml writes kinds/)
OPTIONAL = ("kinds", "seeds", "budget")  # tables whose runs are missing are left out
OBJECTIVES = ["ce_only", "logits", "features", "advanced"]
SEEDS = [("ce_only", "ce_only_seed1"), ("features", "features_seed1")]
MAPS = ["features", "map_last", "map_selected"]
BUDGET = ["features", "features_x4"]
TAILS = ["features", "tail_renormalize"]
LABEL = {"ce_only": "CE only (fine-tune)", "logits": "logits KD (0.5 / 0.5)", "features": "features (0.4 / 0.4 / 0.2)",
         "advanced": "advanced (0.2 CE, 0.5 skew KL, 0.1 cos, 0.2 FDD)", "map_last": "last",
         "map_selected": "selected", "tail_renormalize": "renormalize",
         "features_x4": "features, 120 steps (4x tokens)"}
FIGURES = ["loss_components.png", "hidden_loss_by_layer.png", "layer_cosine_heatmap.png"]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def done_variants(ablation_dir: Path, out: Path) -> list[str]:
    """Copy each finished variant's eval JSONs and run record from one ablation's folder into `out`'s evals/
    and runs/; returns those variants in run order."""
    done = [r["variant"] for r in load(ablation_dir / "ablation.json")["rows"] if r["status"] == "done"]
    for v in done:
        shutil.copy2(ablation_dir / v / "eval" / "student.json", out / "evals" / f"{v}.json")
        shutil.copy2(ablation_dir / v / "eval" / "pruned.json", out / "evals" / f"pruned-{v}.json")
        shutil.copy2(ablation_dir / v / "run.json", out / "runs" / f"{v}.run.json")
    return done


def collect(exp: Path, out: Path) -> None:
    """Copy the small result files of the runs under `exp` into `out` (the layout --from-copies reads)."""
    (out / "evals").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for ablation in ABLATIONS:
        src = exp / ablation
        if not (src / "ablation.json").is_file() and ablation in OPTIONAL:
            continue
        shutil.copy2(src / "ablation.json", out / f"{ablation}.ablation.json")
        done_variants(src, out)
        shutil.copy2(src / "baseline" / "teacher.json", out / "evals" / "teacher.json")
    if (exp / "online" / "run.json").is_file():
        shutil.copy2(exp / "online" / "run.json", out / "runs" / "online.run.json")
    for fig in FIGURES:
        if (exp / "report" / fig).is_file():
            shutil.copy2(exp / "report" / fig, out / fig)


def pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def pm(d: dict | None, scale: float = 1.0, fmt: str = "+.3f") -> str:
    """A paired difference 'diff ± stderr' (scaled), or '-'."""
    if not d or d.get("diff") is None:
        return "-"
    if d.get("stderr") is None:
        se = ""
    else:
        e = scale * d["stderr"]
        se = f" ± {e:{fmt.lstrip('+')}}" if float(f"{e:{fmt.lstrip('+')}}") > 0 or e == 0 else f" ± {e:.0e}"
    return f"{scale * d['diff']:{fmt}}{se}"


def acc(result: dict, task: str) -> str:
    t = result.get("tasks", {}).get(task)
    if not t:
        return "-"
    m = primary_metric(t)
    return f"{100 * t[m]:.0f} ± {100 * t[m + '_stderr']:.0f}" if t.get(m + "_stderr") is not None else f"{100 * t[m]:.0f}"


def mean_acc(result: dict) -> float | None:
    vals = [t[primary_metric(t)] for k, t in result.get("tasks", {}).items() if k in TASKS]
    return sum(vals) / len(vals) if vals else None


def model_row(label: str, r: dict) -> str:
    h = r.get("heldout") or {}
    cells = [label, f"{r.get('parameters', 0) / 1e6:.1f}M", f"{h['perplexity']:.2f}", f"{h['kl_to_teacher']:.4f}"]
    cells += [acc(r, t) for t in TASKS] + [pct(mean_acc(r))]
    return "| " + " | ".join(cells) + " |"


def table_models(rows: list[tuple[str, dict]]) -> list[str]:
    head = ["model", "params", "held-out PPL", "KL to teacher", *(TASK_LABEL[t] for t in TASKS), "mean acc"]
    return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)] + [model_row(n, r) for n, r in rows]


def paired(x: dict, y: dict) -> dict:
    """x - y paired: held-out NLL and KL over the same sequences, accuracy over the same items."""
    return {"nll": paired_heldout(x, y, "nll"), "kl": paired_heldout(x, y, "kl"), "acc": paired_accuracy(x, y)}


def compare(names: list[str], ref: str, ev: dict[str, dict], pruned: dict, teacher: dict, pair=paired,
            labels: dict = LABEL) -> tuple[list[str], dict]:
    """Rows of variants against `ref` (paired on the same sequences / items by `pair`) plus their recovery
    metrics."""
    head = ["variant", "held-out PPL", "KL to teacher", "mean acc", "PPL recovery", "KL recovery",
            "capability retention", f"ΔNLL vs {ref} (nats)", f"ΔKL vs {ref}", f"Δacc vs {ref} (points)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    data = {}
    for n in names:
        r = ev[n]
        rec = recovery_metrics(teacher, pruned, r)
        d = pair(r, ev[ref])
        data[n] = {"recovery": {k: v for k, v in rec.items() if k != "tasks"}, "vs_" + ref: d}
        h = r["heldout"]
        same = n == ref
        lines.append("| " + " | ".join([
            labels.get(n, n) + (" (reference)" if same else ""), f"{h['perplexity']:.2f}", f"{h['kl_to_teacher']:.4f}",
            pct(mean_acc(r)), pct(rec.get("ppl_recovery")), pct(rec.get("kl_recovery")),
            pct(rec.get("capability_retention")),
            "" if same else pm(d["nll"], fmt="+.4f"), "" if same else pm(d["kl"], fmt="+.4f"),
            "" if same else pm(d["acc"], 100, "+.1f")]) + " |")
    return lines, data


def plot_paired(results: dict, path: Path) -> Path | None:
    """Each compared variant's paired difference against its reference (held-out KL, NLL, accuracy),
    with +-2 standard errors: a bar whose whisker crosses 0 is not resolved."""
    rows = []
    for key, title in (("objectives", "vs CE only"), ("maps", "vs uniform map"), ("tails", "vs bucket tail"),
                       ("budget", "vs 30 steps")):
        for name, data in results.get(key, {}).items():
            d = next((v for k, v in data.items() if k.startswith("vs_")), None)
            if d is not None and d["kl"]["diff"] is not None and d["kl"]["stderr"]:
                rows.append((f"{LABEL.get(name, name).split(' (')[0]} {title}", d))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(rows) + 1.6), sharey=True)
    y = np.arange(len(rows))
    for ax, (key, label, scale) in zip(axes, (("kl", "Δ KL to teacher (nats/position)", 1.0),
                                              ("nll", "Δ held-out NLL (nats/position)", 1.0),
                                              ("acc", "Δ accuracy, 600 items (points)", 100.0))):
        diff = np.array([scale * r[1][key]["diff"] for r in rows])
        err = np.array([2 * scale * (r[1][key]["stderr"] or 0.0) for r in rows])
        ax.barh(y, diff, xerr=err, color=["#4477aa" if abs(v) > e else "#bbbbbb" for v, e in zip(diff, err)],
                capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [r[0] for r in rows])
    axes[0].invert_yaxis()
    fig.suptitle("Paired differences ± 2 stderr (grey: not resolved); depth student, same held-out sequences and items")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the budget runs
# configs/budget/recovery.yaml: one ablation, the depth student's objectives, the target kinds at equal steps,
# the width student, training-seed repeats named <variant>_seed1
BUDGET_OBJECTIVES = ["ce_only", "logits", "features", "advanced"]
TARGET_KINDS = [("logits", "top-64 + tail bucket", "topk"), ("logits_exact", "exact (full distribution)", "exact"),
                ("logits_sampled", "sampled, K = 64", "sampled")]
GOALS = [("kl_recovery", "KL recovery", 0.60), ("capability_retention", "capability retention", 0.97),
         ("ppl_retention", "PPL retention", 0.95)]
BUDGET_LABEL = {**LABEL, "logits": "logits KD (0.5 / 0.5)", "features": "features (depth preset 0.5 / 0.5 / 0.1)",
                "advanced": "advanced (skew KL + cosine + FDD)", "logits_exact": "logits KD, exact targets",
                "logits_sampled": "logits KD, sampled targets", "width_features": "width student, features",
                "features_seed1": "features, training seed 1", "logits_seed1": "logits KD, training seed 1"}
CURVE_KEYS = ("eval_loss_ce", "eval_loss_kl")
# paired_budget's differences as table rows: key, label, scale, format
PAIRED_MEASURES = (("nll", "held-out NLL (nats/position)", 1.0, "+.4f"), ("kl", "held-out KL to teacher", 1.0, "+.4f"),
                   ("acc", "accuracy, mean over tasks (points)", 100, "+.2f"))
DOUBLINGS = (100_000, 200_000, 400_000, 800_000)  # training tokens: the curve's points per doubling
EXTRAPOLATE = 10  # the budget multiple the log-linear trend is carried to


def curve_trend(curve: list[dict], tokens: int, key: str) -> dict | None:
    """One variant's periodic held-out `key` at 0, ~100k, ~200k, ~400k and ~800k training tokens (the nearest
    evaluation) and at the end, its least-squares change per doubling of tokens over the four doublings, and
    that trend carried from the end to EXTRAPOLATE x the tokens (a log-linear extrapolation)."""
    points = [(c["step"] * tokens, c[key]) for c in curve if key in c]
    if len(points) < 2 or not points[0][0] == 0:
        return None
    at = [min(points[1:], key=lambda p: abs(math.log2(p[0] / t))) for t in DOUBLINGS]
    if len({p[0] for p in at}) < len(at):
        return None  # the curve is too coarse to place four doublings
    x, y = np.log2([p[0] for p in at]), np.array([p[1] for p in at])
    slope = float(np.polyfit(x, y, 1)[0])
    end = points[-1]
    return {"start": points[0][1], "doublings": [{"tokens": t, "value": v} for t, v in at], "end_tokens": end[0],
            "end": end[1], "per_doubling": slope,
            "extrapolated": {"tokens": EXTRAPOLATE * end[0], "value": end[1] + slope * math.log2(EXTRAPOLATE)}}


def divergence(run: dict) -> str:
    """The divergence a run's KL term measured (`loss.logits`: kl, skew_kl, ...): only KL curves carry the KL."""
    return run["config"]["loss"].get("logits", "kl")


def table_trends(curves: dict[str, list[dict]], runs: dict[str, dict], variants: list[str]) -> tuple[list[str], dict]:
    head = ["variant", "held-out measure", "0", *(f"{t // 1000}k" for t in DOUBLINGS), "end", "per doubling",
            f"{EXTRAPOLATE}x (log-linear)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    data: dict = {}
    for v in variants:
        name = divergence(runs[v])
        for key, what in zip(CURVE_KEYS, ("CE", "KL term x T^2" if name == "kl" else f"{name} term x T^2")):
            trend = curve_trend(curves.get(v, []), tokens_per_step(runs[v]), key)
            if trend is None:
                continue
            if key == "eval_loss_kl":
                trend["divergence"] = name
            data.setdefault(v, {})[key] = trend
            lines.append("| " + " | ".join([BUDGET_LABEL.get(v, v), what, f"{trend['start']:.3f}",
                                             *(f"{d['value']:.3f}" for d in trend["doublings"]), f"{trend['end']:.3f}",
                                             f"{trend['per_doubling']:+.3f}",
                                             f"{trend['extrapolated']['value']:.3f}"]) + " |")
    return lines, data


def collect_budget(exp: Path, out: Path) -> None:
    """Copy the small result files of `make budget` (one ablation under `exp`) into `out`: the ablation record,
    every eval JSON, each variant's run record and held-out curve, and what each target kind costs in the
    cache (`distill cache info --json` of the ablation's cache)."""
    for sub in ("evals", "runs", "curves"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ablation = load(exp / "ablation.json")
    shutil.copy2(exp / "ablation.json", out / "ablation.json")
    shutil.copy2(exp / "baseline" / "teacher.json", out / "evals" / "teacher.json")
    for v in done_variants(exp, out):
        history = load(exp / v / "trainer_state.json")["log_history"]
        curve, steps = [], set()
        for h in history:  # the periodic evaluations (the run's final one repeats the last step's: kept once)
            if "eval_loss" in h and h["step"] not in steps:
                steps.add(h["step"])
                curve.append({k: h[k] for k in ("step", "eval_runtime", *CURVE_KEYS) if k in h})
        (out / "curves" / f"{v}.json").write_text(json.dumps(curve, indent=1) + "\n")
    from pipeline.cache.info import cache_facts

    info = cache_facts(ablation["cache"])
    (out / "cache.json").write_text(json.dumps({k: info[k] for k in ("bytes_per_token", "bytes", "tokens", "layers",
                                                                     "exact", "layer_codecs")}, indent=1) + "\n")


def paired_budget(x: dict, y: dict) -> dict:
    """x - y paired: held-out NLL and KL over the same sequences, accuracy as the mean over tasks of each task's
    paired difference (the full sets differ in size: pooling items would weigh PIQA six times ARC-C)."""
    return {"nll": paired_heldout(x, y, "nll"), "kl": paired_heldout(x, y, "kl"), "acc": paired_accuracy_task_mean(x, y)}


def resolved(d: dict) -> str:
    """'yes' when a paired difference is more than twice its standard error from 0."""
    if not d or d.get("diff") is None or not d.get("stderr"):
        return "-"
    return "yes" if abs(d["diff"]) > 2 * d["stderr"] else "no"


def across_seeds(diffs: list[dict]) -> dict:
    """One paired difference measured at several training seeds (each over the same items): their mean, with the
    seeds' standard error sd / sqrt(n) as its stderr (training noise: the items are the same at every seed), and
    'yes' in `consistent` when every seed's difference is resolved (> 2 stderr over items) with the same sign."""
    values = [d["diff"] for d in diffs]
    if len(values) < 2 or any(v is None for v in values):
        return {"diff": None, "stderr": None, "n": len(values), "consistent": "-"}
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    signs = {math.copysign(1.0, v) for v in values}
    consistent = "yes" if len(signs) == 1 and all(resolved(d) == "yes" for d in diffs) else "no"
    return {"diff": mean, "stderr": se, "n": n, "consistent": consistent}


def tokens_per_step(run: dict) -> int:
    t = run["config"]["training"]
    return int(t["per_device_train_batch_size"]) * int(t.get("gradient_accumulation_steps", 1)) * int(run["cache"]["seq_len"])


def step_seconds(run: dict, curve: list[dict]) -> float | None:
    """The training loop's seconds per optimizer step, its held-out evaluations taken out. A resumed run's
    train_seconds cover only the steps its last process ran (after the checkpoint it resumed from)."""
    m = run["metrics"]
    steps = m.get("steps_this_run", m.get("global_step"))
    if not m.get("train_seconds") or not steps:
        return None
    first = m["global_step"] - steps  # the step this process started at
    evals = sum(c.get("eval_runtime", 0.0) for c in curve if c["step"] > first or first == 0)
    return (m["train_seconds"] - evals) / steps


def budget_tables(out: Path) -> tuple[list[str], dict]:
    ev = {p.stem: load(p) for p in sorted((out / "evals").glob("*.json"))}
    runs = {p.name[: -len(".run.json")]: load(p) for p in sorted((out / "runs").glob("*.run.json"))}
    curves = {p.stem: load(p) for p in sorted((out / "curves").glob("*.json"))}
    cache = load(out / "cache.json")
    teacher = ev["teacher"]
    variants = [r["variant"] for r in load(out / "ablation.json")["rows"] if r["variant"] in runs]  # run order
    depth = [v for v in BUDGET_OBJECTIVES if v in ev]
    results: dict = {"models": {}, "goals": {}, "objectives": {}, "hidden_term": {}, "targets": {}, "width": {},
                     "seeds": {}, "hidden_term_seeds": {}}
    md: list[str] = []

    # every model: held-out perplexity and KL (exact where the cache holds exact targets), the six benchmarks
    rows = [("teacher (SmolLM2-135M-Instruct)", teacher)]
    pruned_seen = set()
    for v in variants:
        student = runs[v]["student_source"]
        if student not in pruned_seen:
            pruned_seen.add(student)
            rows.append((f"pruned: {Path(student).name}", ev[f"pruned-{v}"]))
    rows += [(BUDGET_LABEL.get(v, v), ev[v]) for v in variants]
    md += ["## Every model", ""] + table_models(rows) + [""]

    # against the goals, depth student
    if depth:
        head = ["variant", *(f"{label} (goal {100 * goal:.0f}%)" for _, label, goal in GOALS)]
        md += ["## Against the goals (depth student)", "", "| " + " | ".join(head) + " |",
               "|---|" + "---:|" * (len(head) - 1)]
        for v in depth + [x for x in ("logits_exact", "logits_sampled") if x in ev]:
            rec = recovery_metrics(teacher, ev[f"pruned-{v}"], ev[v])
            cells = []
            for key, _, goal in GOALS:
                value = rec.get(key)
                met = value is not None and value >= goal
                cells.append("-" if value is None else
                             f"{pct(value)} ({'met' if met else f'{100 * (goal - value):.1f} points short'})")
            results["goals"][v] = {key: rec.get(key) for key, _, _ in GOALS}
            md.append("| " + " | ".join([BUDGET_LABEL.get(v, v), *cells]) + " |")
        md.append("")

    # objectives against CE only; the hidden-state term (features - logits)
    if "ce_only" in ev and len(depth) > 1:
        lines, data = compare(depth, "ce_only", ev, ev[f"pruned-{depth[0]}"], teacher, pair=paired_budget,
                              labels=BUDGET_LABEL)
        md += ["## Objectives (depth student), paired against CE only", ""] + lines + [""]
        results["objectives"] = data
    if "features" in ev and "logits" in ev:
        d = paired_budget(ev["features"], ev["logits"])
        results["hidden_term"] = d
        md += ["## Does the hidden-state term help? features - logits KD (same CE and KL weights, + 0.1 cosine)", "",
               "| measure | features - logits | resolved (> 2 stderr) |", "|---|---:|---:|"]
        md += [f"| {label} | {pm(d[key], scale, fmt)} | {resolved(d[key])} |" for key, label, scale, fmt in PAIRED_MEASURES]
        md.append("")
    if all(v in ev for v in ("features", "logits", "features_seed1", "logits_seed1")):
        per_seed = [paired_budget(ev["features"], ev["logits"]), paired_budget(ev["features_seed1"], ev["logits_seed1"])]
        results["hidden_term_seeds"] = {k: across_seeds([d[k] for d in per_seed]) for k in ("nll", "kl", "acc")}
        md += ["## The hidden-state term across training seeds: features - logits KD at seeds 0 and 1", "",
               "| measure | seed 0 | seed 1 | mean of the seeds ± seed spread | same sign, resolved at every seed |",
               "|---|---:|---:|---:|---:|"]
        for key, label, scale, fmt in PAIRED_MEASURES:
            a = results["hidden_term_seeds"][key]
            md.append(f"| {label} | {pm(per_seed[0][key], scale, fmt)} | {pm(per_seed[1][key], scale, fmt)} | "
                      f"{pm(a, scale, fmt)} | {a['consistent']} |")
        md.append("")

    # the target kinds at equal steps
    kinds = [(v, label, kind) for v, label, kind in TARGET_KINDS if v in ev]
    if len(kinds) > 1:
        from pipeline.cache.info import target_kind_bytes

        head = ["targets", "bytes/token", "s/step", "KL to teacher", "KL recovery", "PPL retention",
                "ΔKL vs top-k", "ΔNLL vs top-k", "Δacc vs top-k (points)"]
        md += ["## Teacher targets at equal steps (logits KD, depth student)", "",
               "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for v, label, kind in kinds:
            nbytes = target_kind_bytes(cache, kind)
            rec = recovery_metrics(teacher, ev[f"pruned-{v}"], ev[v])
            d = paired_budget(ev[v], ev["logits"]) if v != "logits" else None
            secs = step_seconds(runs[v], curves.get(v, []))
            results["targets"][v] = {"bytes_per_token": nbytes, "step_seconds": secs, "kl_recovery": rec.get("kl_recovery"),
                                     "ppl_retention": rec.get("ppl_retention"), "vs_topk": d}
            md.append("| " + " | ".join([
                label, f"{nbytes:.0f}", "-" if secs is None else f"{secs:.2f}", f"{ev[v]['heldout']['kl_to_teacher']:.4f}",
                pct(rec.get("kl_recovery")), pct(rec.get("ppl_retention")),
                "" if d is None else pm(d["kl"], fmt="+.4f"), "" if d is None else pm(d["nll"], fmt="+.4f"),
                "" if d is None else pm(d["acc"], 100, "+.2f")]) + " |")
        md.append("")

    # the width student
    width = [v for v in variants if v.startswith("width")]
    if width:
        head = ["variant", "PPL retention", "PPL recovery", "KL recovery", "capability retention", "Δacc vs pruned (points)"]
        md += ["## The width student", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for v in width:
            rec = recovery_metrics(teacher, ev[f"pruned-{v}"], ev[v])
            d = paired_budget(ev[v], ev[f"pruned-{v}"])
            results["width"][v] = {"recovery": {k: x for k, x in rec.items() if k != "tasks"}, "acc_vs_pruned": d["acc"]}
            md.append("| " + " | ".join([BUDGET_LABEL.get(v, v), pct(rec.get("ppl_retention")), pct(rec.get("ppl_recovery")),
                                          pct(rec.get("kl_recovery")), pct(rec.get("capability_retention")),
                                          pm(d["acc"], 100, "+.2f")]) + " |")
        md.append("")

    # training-seed repeats: <variant>_seed1 against <variant>
    pairs = [(v[: -len("_seed1")], v) for v in variants if v.endswith("_seed1") and v[: -len("_seed1")] in ev]
    if pairs:
        md += ["## Training seed: seed 1 - seed 0 of the same variant", "",
               "| variant | ΔNLL (nats) | ΔKL | Δacc (points) |", "|---|---:|---:|---:|"]
        for a, b in pairs:
            d = paired_budget(ev[b], ev[a])
            results["seeds"][a] = d
            md.append(f"| {BUDGET_LABEL.get(a, a)} | {pm(d['nll'], fmt='+.4f')} | {pm(d['kl'], fmt='+.4f')} | "
                      f"{pm(d['acc'], 100, '+.2f')} |")
        md.append("")

    for name, r in ev.items():
        h = r.get("heldout") or {}
        results["models"][name] = {"model": r.get("model"), "parameters": r.get("parameters"),
                                   "perplexity": h.get("perplexity"), "kl_to_teacher": h.get("kl_to_teacher"),
                                   "kl_to_teacher_topk": h.get("kl_to_teacher_topk"), "mean_acc": mean_acc(r)}
    lines, results["trends"] = table_trends(curves, runs, variants)
    if results["trends"]:
        md += ["## The held-out curve per doubling of training tokens (the periodic evaluation's sequences)", ""]
        md += lines + [""]
        lines, results["projected"] = table_projected(results["trends"], ev, variants)
        if results["projected"]:
            md += [f"## {EXTRAPOLATE}x the tokens, projected: the exact held-out KL scaled by its curve's trend", ""]
            md += lines + [""]
    figure = plot_curves(curves, {v: runs[v] for v in variants}, out / "heldout_curves.png")
    if figure is not None:
        md += [f"![Held-out loss per 100k training tokens]({figure.name})", ""]
    return md, results


def table_projected(trends: dict, ev: dict[str, dict], variants: list[str]) -> tuple[list[str], dict]:
    """Each distilled variant's exact held-out KL (T = 1, all held-out sequences) carried to EXTRAPOLATE x the
    tokens in the proportion its periodic KL curve's log-linear trend falls (extrapolated / end), and the KL
    recovery that would give against its pruned student's KL. A variant trained on another divergence (skew KL)
    is left out: its curve is not the KL's."""
    head = ["variant", "KL to teacher", "KL recovery", f"curve's KL term: {EXTRAPOLATE}x / end",
            f"KL to teacher at {EXTRAPOLATE}x", f"KL recovery at {EXTRAPOLATE}x"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    data: dict = {}
    for v in variants:
        trend = trends.get(v, {}).get("eval_loss_kl")
        if trend is not None and trend.get("divergence", "kl") != "kl":
            continue  # another divergence's curve (skew KL) does not fall in proportion to the KL
        kl, pruned = ev[v]["heldout"].get("kl_to_teacher"), ev[f"pruned-{v}"]["heldout"].get("kl_to_teacher")
        if trend is None or kl is None or not pruned or trend["end"] <= 0:
            continue
        ratio = trend["extrapolated"]["value"] / trend["end"]
        data[v] = {"kl": kl, "kl_recovery": 1 - kl / pruned, "ratio": ratio, "kl_projected": kl * ratio,
                   "kl_recovery_projected": 1 - kl * ratio / pruned}
        d = data[v]
        lines.append("| " + " | ".join([BUDGET_LABEL.get(v, v), f"{kl:.4f}", pct(d["kl_recovery"]), f"{ratio:.3f}",
                                         f"{d['kl_projected']:.4f}", pct(d["kl_recovery_projected"])]) + " |")
    return lines, data


def plot_curves(curves: dict[str, list[dict]], runs: dict[str, dict], path: Path) -> Path | None:
    """Held-out CE (every variant) and KL (the distilled ones) against training tokens, one line per variant."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    others = []
    for i, v in enumerate(v for v in runs if v in curves):  # one color per variant in both panels
        tokens = tokens_per_step(runs[v])
        for ax, key in zip(axes, CURVE_KEYS):
            if key == "eval_loss_kl" and divergence(runs[v]) != "kl":
                others.append(BUDGET_LABEL.get(v, v))  # another divergence's scale: in the trend table only
                continue
            points = [(c["step"] * tokens / 1e5, c[key]) for c in curves[v] if key in c]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, color=colors[i % len(colors)], label=BUDGET_LABEL.get(v, v))
    for ax, title in zip(axes, ("held-out CE (nats/token)",
                                "held-out KL term x T^2, as each variant's targets measure it\n"
                                "(top-k bucket, exact or sampled: compare within a kind)"
                                + (f"\nnot shown: {', '.join(others)} (another divergence)" if others else ""))):
        ax.set_xlabel("training tokens (x 100k)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Held-out loss during training (the periodic evaluation's held-out sequences)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exp", nargs="?", default=None,
                    help="what the runs wrote (default: runs/budget with --budget, else runs/experiments)")
    ap.add_argument("--out", default=None, help="where the copies, tables.md and results.json go "
                    "(default: docs/results with --budget, else docs/results-toy)")
    ap.add_argument("--from-copies", action="store_true", help="read OUT's copies only (no runs needed)")
    ap.add_argument("--budget", action="store_true", help="EXP is `make budget`'s ablation (docs/results.md)")
    a = ap.parse_args()
    a.exp = a.exp or ("runs/budget" if a.budget else "runs/experiments")
    out = Path(a.out or ("docs/results" if a.budget else "docs/results-toy"))
    if a.budget:
        if not a.from_copies:
            collect_budget(Path(a.exp), out)
        md, results = budget_tables(out)
        (out / "tables.md").write_text("\n".join(md) + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print("\n".join(md))
        return
    if not a.from_copies:
        collect(Path(a.exp), out)
    ev = {p.stem: load(p) for p in sorted((out / "evals").glob("*.json"))}
    runs = {p.name[: -len(".run.json")]: load(p) for p in sorted((out / "runs").glob("*.run.json"))}
    teacher = ev["teacher"]
    results: dict = {"models": {}, "objectives": {}, "maps": {}, "tails": {}, "budget": {}, "students": {}}
    md = []

    # Table 6.1: each pruning kind before and after
    rows = [("teacher (SmolLM2-135M-Instruct)", teacher)]
    for kind, _, v in KINDS:
        if v in ev:
            rows += [(f"{kind}: pruned", ev[f"pruned-{v}"]), (f"{kind}: recovered (features)", ev[v])]
    md += ["## Table 6.1: before and after, per pruning kind", ""] + table_models(rows) + [""]
    head = ["student", "PPL retention", "PPL recovery", "KL recovery", "capability retention",
            "Δacc recovered - pruned (points)", "Δacc recovered - teacher (points)", "ΔNLL recovered - pruned (nats)"]
    md += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for kind, _, v in KINDS:
        if v not in ev:
            continue
        pruned = ev[f"pruned-{v}"]
        rec = recovery_metrics(teacher, pruned, ev[v])
        d_pruned, d_teacher = paired_accuracy(ev[v], pruned), paired_accuracy(ev[v], teacher)
        d_nll = paired_heldout(ev[v], pruned, "nll")
        results["students"][kind] = {"variant": v, "recovery": {k: x for k, x in rec.items() if k != "tasks"},
                                     "tasks": rec.get("tasks"), "acc_vs_pruned": d_pruned, "acc_vs_teacher": d_teacher,
                                     "nll_vs_pruned": d_nll}
        md.append("| " + " | ".join([kind, pct(rec.get("ppl_retention")), pct(rec.get("ppl_recovery")),
                                      pct(rec.get("kl_recovery")), pct(rec.get("capability_retention")),
                                      pm(d_pruned, 100, "+.1f"), pm(d_teacher, 100, "+.1f"),
                                      pm(d_nll, fmt="+.4f")]) + " |")
    md.append("")

    # Table 6.2 and the map / tail comparisons (the depth student)
    if "features" in ev:
        pruned = ev["pruned-features"]
        for title, names, ref, key in (("Table 6.2: objectives (depth student)", OBJECTIVES, "ce_only", "objectives"),
                                       ("Layer map (depth student, features objective)", MAPS, "features", "maps"),
                                       ("Tail at T = 2 (depth student, features objective)", TAILS, "features",
                                        "tails"),
                                       ("Token budget (depth student, features objective)", BUDGET, "features",
                                        "budget")):
            present = [n for n in names if n in ev]
            if len(present) < 2:
                continue
            lines, data = compare(present, ref, ev, pruned, teacher)
            md += [f"## {title}", ""] + lines + [""]
            results[key] = data
        md += ["## Per benchmark, depth student (accuracy % ± stderr)", ""]
        md += table_models([("teacher", teacher), ("pruned", pruned)] + [(LABEL.get(n, n), ev[n])
                            for n in OBJECTIVES + MAPS[1:] + TAILS[1:] if n in ev]) + [""]

    # training-seed spread: the same variant with training.seed 1 instead of 0
    pairs = [(a, b) for a, b in SEEDS if a in ev and b in ev]
    if pairs:
        md += ["## Training seed (depth student): seed 1 - seed 0 of the same variant", "",
               "| variant | PPL seed 0 / 1 | KL seed 0 / 1 | mean acc seed 0 / 1 | ΔNLL (nats) | ΔKL | Δacc (points) |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for a, b in pairs:
            ha, hb = ev[a]["heldout"], ev[b]["heldout"]
            d = paired(ev[b], ev[a])
            results.setdefault("seeds", {})[a] = d
            md.append(f"| {LABEL.get(a, a)} | {ha['perplexity']:.2f} / {hb['perplexity']:.2f} | "
                      f"{ha['kl_to_teacher']:.4f} / {hb['kl_to_teacher']:.4f} | {pct(mean_acc(ev[a]))} / "
                      f"{pct(mean_acc(ev[b]))} | {pm(d['nll'], fmt='+.4f')} | {pm(d['kl'], fmt='+.4f')} | "
                      f"{pm(d['acc'], 100, '+.1f')} |")
        md.append("")

    # cost: one cache build + N cached runs vs N online runs. The cached run timed against the online one
    # is features_seed1 when present (the same objective; run after the others, on otherwise idle cores)
    cost = {}
    for ablation in ABLATIONS:
        p = out / f"{ablation}.ablation.json"
        if p.is_file() and load(p).get("cache_build"):
            cost["cache_build"] = load(p)["cache_build"]
    cached = "features_seed1" if "features_seed1" in runs else "features"
    md += ["## Cost: one cache vs online runs", "",
           "| run | seconds | peak RSS MiB |", "|---|---:|---:|"]
    if cost.get("cache_build"):
        b = cost["cache_build"]
        md.append(f"| cache build, once (teacher forward over 65,536 tokens, 16 layers written) | {b['seconds']:.0f} "
                  f"| {b['peak_rss_mib']:.0f} |")
    for name, label in ((cached, f"cached KD, features objective ({cached}), 30 steps"),
                        ("online", "online KD, features objective (live teacher), 30 steps")):
        if name in runs:
            r = runs[name]
            secs, peak = r["metrics"].get("train_seconds"), (r.get("resources") or {}).get("peak_rss_mib")
            md.append(f"| {label} | {secs:.0f} | {peak:.0f} |")
            cost[name] = {"train_seconds": secs, "peak_rss_mib": peak}
    trained = [n for n, r in runs.items() if n != "online" and r["metrics"].get("global_step") == 30]
    if cost.get("cache_build") and cached in cost and "online" in cost:
        n = len(trained)
        one_cache = cost["cache_build"]["seconds"] + n * cost[cached]["train_seconds"]
        online = n * cost["online"]["train_seconds"]
        cost["totals"] = {"runs": n, "one_cache_seconds": one_cache, "online_seconds": online}
        md += ["", f"For the {n} 30-step runs of this page: one cache + {n} cached runs = "
               f"{one_cache / 60:.0f} min; {n} online runs = {online / 60:.0f} min "
               f"({online / one_cache:.2f}x), from the two timed runs above (each training loop with its held-out "
               "evaluations; benchmark scoring, the same for both, excluded)."]
    results["cost"] = cost
    for name, r in ev.items():
        h = r.get("heldout") or {}
        results["models"][name] = {"model": r.get("model"), "parameters": r.get("parameters"),
                                   "perplexity": h.get("perplexity"), "kl_to_teacher": h.get("kl_to_teacher"),
                                   "mean_acc": mean_acc(r),
                                   "tasks": {t: x.get(primary_metric(x)) for t, x in r.get("tasks", {}).items()}}
    figure = plot_paired(results, out / "paired_differences.png")
    if figure is not None:
        md += ["", f"![Paired differences]({figure.name})", ""]
    (out / "tables.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

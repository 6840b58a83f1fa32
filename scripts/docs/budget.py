"""docs/results.md's tables (`make experiments`): the budget runs of configs/budget/recovery.yaml, one ablation
of the depth student's objectives, the kinds of teacher targets at equal steps, the width student and
training-seed repeats named <variant>_seed1; with each variant's held-out curve per doubling of training tokens.

Accuracy differences here are the mean over tasks of each task's paired difference (the full validation sets
differ in size: pooling items would weigh PIQA six times ARC-C).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from pipeline import targets
from pipeline.evaluate.metrics import paired_accuracy_task_mean, paired_heldout, recovery_metrics
from scripts.docs.plots import CURVE_KEYS, plot_curves
from scripts.docs.tables import (
    LABEL, compare, divergence, done_variants, header, load, mean_acc, pct, pm, read_copies, row, table_models,
    tokens_per_step,
)

OBJECTIVES = ["ce_only", "logits", "features", "advanced"]
# the target-kind variants (logits KD at equal steps) and the kind of teacher target each reads
TARGET_VARIANTS = {"logits": "topk", "logits_exact": "exact", "logits_sampled": "sampled"}
GOALS = [("kl_recovery", "KL recovery", 0.60), ("capability_retention", "capability retention", 0.97),
         ("ppl_retention", "PPL retention", 0.95)]
BUDGET_LABEL = {**LABEL, "logits": "logits KD (0.5 / 0.5)", "features": "features (depth preset 0.5 / 0.5 / 0.1)",
                "advanced": "advanced (skew KL + cosine + FDD)", "logits_exact": "logits KD, exact targets",
                "logits_sampled": "logits KD, sampled targets", "width_features": "width student, features",
                "features_seed1": "features, training seed 1", "logits_seed1": "logits KD, training seed 1"}
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


def table_projected(trends: dict, ev: dict[str, dict], variants: list[str]) -> tuple[list[str], dict]:
    """Each distilled variant's exact held-out KL (T = 1, all held-out sequences) carried to EXTRAPOLATE x the
    tokens in the proportion its periodic KL curve's log-linear trend falls (extrapolated / end), and the KL
    recovery that would give against its pruned student's KL. A variant trained on another divergence (skew KL)
    is left out: its curve is not the KL's."""
    lines = header("variant", "KL to teacher", "KL recovery", f"curve's KL term: {EXTRAPOLATE}x / end",
                   f"KL to teacher at {EXTRAPOLATE}x", f"KL recovery at {EXTRAPOLATE}x")
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


def target_label(v: str, run: dict) -> str:
    """A target-kind variant's label in the targets table, with the k or K its cache stored."""
    kind = targets.kind(TARGET_VARIANTS[v])
    count = {"topk": run["cache"].get("topk"), "sampled": run["config"]["cache"].get("samples")}.get(kind.name)
    return kind.label_for(count)


# ----------------------------------------------------------------------------- the tables, section by section


class Budget:
    """The copies of one budget run (`read`), and each section's markdown lines and results.json entries."""

    def __init__(self, out: Path):
        self.out = out
        self.ev, self.runs = read_copies(out)
        self.curves = {p.stem: load(p) for p in sorted((out / "curves").glob("*.json"))}
        self.cache = load(out / "cache.json")
        self.teacher = self.ev["teacher"]
        self.variants = [r["variant"] for r in load(out / "ablation.json")["rows"] if r["variant"] in self.runs]
        self.depth = [v for v in OBJECTIVES if v in self.ev]
        self.results: dict = {"models": {}, "goals": {}, "objectives": {}, "hidden_term": {}, "targets": {},
                              "width": {}, "seeds": {}, "hidden_term_seeds": {}}

    def recovery(self, v: str) -> dict:
        return recovery_metrics(self.teacher, self.ev[f"pruned-{v}"], self.ev[v])

    def every_model(self) -> list[str]:
        """Held-out perplexity and KL (exact where the cache holds exact targets), the six benchmarks."""
        rows = [("teacher (SmolLM2-135M-Instruct)", self.teacher)]
        pruned_seen = set()
        for v in self.variants:
            student = self.runs[v]["student_source"]
            if student not in pruned_seen:
                pruned_seen.add(student)
                rows.append((f"pruned: {Path(student).name}", self.ev[f"pruned-{v}"]))
        rows += [(BUDGET_LABEL.get(v, v), self.ev[v]) for v in self.variants]
        return ["## Every model", ""] + table_models(rows) + [""]

    def goals(self) -> list[str]:
        if not self.depth:
            return []
        md = ["## Against the goals (depth student)", "",
              *header("variant", *(f"{label} (goal {100 * goal:.0f}%)" for _, label, goal in GOALS))]
        for v in self.depth + [x for x in ("logits_exact", "logits_sampled") if x in self.ev]:
            rec = self.recovery(v)
            cells = []
            for key, _, goal in GOALS:
                value = rec.get(key)
                met = value is not None and value >= goal
                cells.append("-" if value is None else
                             f"{pct(value)} ({'met' if met else f'{100 * (goal - value):.1f} points short'})")
            self.results["goals"][v] = {key: rec.get(key) for key, _, _ in GOALS}
            md.append(row(BUDGET_LABEL.get(v, v), *cells))
        return md + [""]

    def objectives(self) -> list[str]:
        """The objectives against CE only."""
        if "ce_only" not in self.ev or len(self.depth) < 2:
            return []
        lines, self.results["objectives"] = compare(self.depth, "ce_only", self.ev, self.ev[f"pruned-{self.depth[0]}"],
                                                    self.teacher, pair=paired_budget, labels=BUDGET_LABEL)
        return ["## Objectives (depth student), paired against CE only", ""] + lines + [""]

    def hidden_term(self) -> list[str]:
        """features - logits KD: what the hidden-state term adds."""
        if "features" not in self.ev or "logits" not in self.ev:
            return []
        d = self.results["hidden_term"] = paired_budget(self.ev["features"], self.ev["logits"])
        md = ["## Does the hidden-state term help? features - logits KD (same CE and KL weights, + 0.1 cosine)", "",
              "| measure | features - logits | resolved (> 2 stderr) |", "|---|---:|---:|"]
        md += [f"| {label} | {pm(d[key], scale, fmt)} | {resolved(d[key])} |" for key, label, scale, fmt in PAIRED_MEASURES]
        return md + [""]

    def hidden_term_seeds(self) -> list[str]:
        """The same difference at training seeds 0 and 1, and their mean with the seeds' spread."""
        if not all(v in self.ev for v in ("features", "logits", "features_seed1", "logits_seed1")):
            return []
        ev = self.ev
        per_seed = [paired_budget(ev["features"], ev["logits"]), paired_budget(ev["features_seed1"], ev["logits_seed1"])]
        seeds = self.results["hidden_term_seeds"] = {k: across_seeds([d[k] for d in per_seed]) for k in ("nll", "kl", "acc")}
        md = ["## The hidden-state term across training seeds: features - logits KD at seeds 0 and 1", "",
              "| measure | seed 0 | seed 1 | mean of the seeds ± seed spread | same sign, resolved at every seed |",
              "|---|---:|---:|---:|---:|"]
        for key, label, scale, fmt in PAIRED_MEASURES:
            a = seeds[key]
            md.append(f"| {label} | {pm(per_seed[0][key], scale, fmt)} | {pm(per_seed[1][key], scale, fmt)} | "
                      f"{pm(a, scale, fmt)} | {a['consistent']} |")
        return md + [""]

    def target_kinds(self) -> list[str]:
        """The kinds of teacher targets at equal steps: what each costs and what it buys, against top-k."""
        from pipeline.cache.info import target_kind_bytes

        kinds = [v for v in TARGET_VARIANTS if v in self.ev]
        if len(kinds) < 2:
            return []
        md = ["## Teacher targets at equal steps (logits KD, depth student)", "",
              *header("targets", "bytes/token", "s/step", "KL to teacher", "KL recovery", "PPL retention",
                      "ΔKL vs top-k", "ΔNLL vs top-k", "Δacc vs top-k (points)")]
        for v in kinds:
            nbytes = target_kind_bytes(self.cache, TARGET_VARIANTS[v])
            rec = self.recovery(v)
            d = paired_budget(self.ev[v], self.ev["logits"]) if v != "logits" else None
            secs = step_seconds(self.runs[v], self.curves.get(v, []))
            self.results["targets"][v] = {"bytes_per_token": nbytes, "step_seconds": secs,
                                          "kl_recovery": rec.get("kl_recovery"),
                                          "ppl_retention": rec.get("ppl_retention"), "vs_topk": d}
            md.append(row(
                target_label(v, self.runs[v]), f"{nbytes:.0f}", "-" if secs is None else f"{secs:.2f}",
                f"{self.ev[v]['heldout']['kl_to_teacher']:.4f}", pct(rec.get("kl_recovery")),
                pct(rec.get("ppl_retention")), "" if d is None else pm(d["kl"], fmt="+.4f"),
                "" if d is None else pm(d["nll"], fmt="+.4f"), "" if d is None else pm(d["acc"], 100, "+.2f")))
        return md + [""]

    def width(self) -> list[str]:
        width = [v for v in self.variants if v.startswith("width")]
        if not width:
            return []
        md = ["## The width student", "",
              *header("variant", "PPL retention", "PPL recovery", "KL recovery", "capability retention",
                      "Δacc vs pruned (points)")]
        for v in width:
            rec = self.recovery(v)
            d = paired_budget(self.ev[v], self.ev[f"pruned-{v}"])
            self.results["width"][v] = {"recovery": {k: x for k, x in rec.items() if k != "tasks"}, "acc_vs_pruned": d["acc"]}
            md.append(row(BUDGET_LABEL.get(v, v), pct(rec.get("ppl_retention")), pct(rec.get("ppl_recovery")),
                          pct(rec.get("kl_recovery")), pct(rec.get("capability_retention")), pm(d["acc"], 100, "+.2f")))
        return md + [""]

    def seeds(self) -> list[str]:
        """Training-seed repeats: <variant>_seed1 against <variant>."""
        pairs = [(v[: -len("_seed1")], v) for v in self.variants if v.endswith("_seed1") and v[: -len("_seed1")] in self.ev]
        if not pairs:
            return []
        md = ["## Training seed: seed 1 - seed 0 of the same variant", "",
              "| variant | ΔNLL (nats) | ΔKL | Δacc (points) |", "|---|---:|---:|---:|"]
        for a, b in pairs:
            d = self.results["seeds"][a] = paired_budget(self.ev[b], self.ev[a])
            md.append(f"| {BUDGET_LABEL.get(a, a)} | {pm(d['nll'], fmt='+.4f')} | {pm(d['kl'], fmt='+.4f')} | "
                      f"{pm(d['acc'], 100, '+.2f')} |")
        return md + [""]

    def models(self) -> None:
        for name, r in self.ev.items():
            h = r.get("heldout") or {}
            self.results["models"][name] = {
                "model": r.get("model"), "parameters": r.get("parameters"), "perplexity": h.get("perplexity"),
                "kl_to_teacher": h.get("kl_to_teacher"), "kl_to_teacher_topk": h.get("kl_to_teacher_topk"),
                "mean_acc": mean_acc(r)}

    def trends(self) -> list[str]:
        """The held-out curves per doubling of tokens, the exact KL carried by them, the figure."""
        md = []
        lines, self.results["trends"] = table_trends(self.curves, self.runs, self.variants)
        if self.results["trends"]:
            md += ["## The held-out curve per doubling of training tokens (the periodic evaluation's sequences)", ""]
            md += lines + [""]
            lines, self.results["projected"] = table_projected(self.results["trends"], self.ev, self.variants)
            if self.results["projected"]:
                md += [f"## {EXTRAPOLATE}x the tokens, projected: the exact held-out KL scaled by its curve's trend", ""]
                md += lines + [""]
        figure = plot_curves(self.curves, {v: self.runs[v] for v in self.variants}, self.out / "heldout_curves.png",
                             BUDGET_LABEL)
        if figure is not None:
            md += [f"![Held-out loss per 100k training tokens]({figure.name})", ""]
        return md


def budget_tables(out: Path) -> tuple[list[str], dict]:
    """docs/results.md's tables (markdown lines) and results.json from the copies in `out`."""
    b = Budget(out)
    md = (b.every_model() + b.goals() + b.objectives() + b.hidden_term() + b.hidden_term_seeds() + b.target_kinds()
          + b.width() + b.seeds())
    b.models()
    md += b.trends()
    return md, b.results

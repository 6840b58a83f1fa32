"""docs/results-toy.md's tables (`make experiments-toy`): the chapter-6 experiment at a toy budget, three
pruned students over one cache, the objectives, layer maps, tail modes, token budget and seed repeats of the
depth student, and the cost of one cache against online runs."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.evaluate.metrics import paired_accuracy, paired_heldout, primary_metric, recovery_metrics
from scripts.docs.plots import plot_paired
from scripts.docs.tables import (
    LABEL, compare, done_variants, header, load, mean_acc, paired, pct, pm, read_copies, row, table_models,
)

KINDS = [("depth", "objectives", "features"), ("width", "kinds", "width"),
         ("depth_width", "kinds", "depth_width")]
ABLATIONS = ("objectives", "kinds", "seeds", "budget")  # output dirs under EXP (students.yaml writes kinds/)
OPTIONAL = ("kinds", "seeds", "budget")  # tables whose runs are missing are left out
OBJECTIVES = ["ce_only", "logits", "features", "advanced"]
SEEDS = [("ce_only", "ce_only_seed1"), ("features", "features_seed1")]
MAPS = ["features", "map_last", "map_selected"]
BUDGET = ["features", "features_x4"]
TAILS = ["features", "tail_renormalize"]
FIGURES = ["loss_components.png", "hidden_loss_by_layer.png", "layer_cosine_heatmap.png"]
# the depth student's comparisons: title, variants, reference, results.json key
COMPARISONS = (("Table 6.2: objectives (depth student)", OBJECTIVES, "ce_only", "objectives"),
               ("Layer map (depth student, features objective)", MAPS, "features", "maps"),
               ("Tail at T = 2 (depth student, features objective)", TAILS, "features", "tails"),
               ("Token budget (depth student, features objective)", BUDGET, "features", "budget"))


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


class Toy:
    """The copies of the toy experiment (`read`), and each section's markdown lines and results.json entries."""

    def __init__(self, out: Path):
        self.out = out
        self.ev, self.runs = read_copies(out)
        self.teacher = self.ev["teacher"]
        self.results: dict = {"models": {}, "objectives": {}, "maps": {}, "tails": {}, "budget": {}, "students": {}}

    def students(self) -> list[str]:
        """Table 6.1: each pruning kind before and after, and its recovery metrics."""
        ev, teacher = self.ev, self.teacher
        rows = [("teacher (SmolLM2-135M-Instruct)", teacher)]
        for kind, _, v in KINDS:
            if v in ev:
                rows += [(f"{kind}: pruned", ev[f"pruned-{v}"]), (f"{kind}: recovered (features)", ev[v])]
        md = ["## Table 6.1: before and after, per pruning kind", ""] + table_models(rows) + [""]
        md += header("student", "PPL retention", "PPL recovery", "KL recovery", "capability retention",
                     "Δacc recovered - pruned (points)", "Δacc recovered - teacher (points)",
                     "ΔNLL recovered - pruned (nats)")
        for kind, _, v in KINDS:
            if v not in ev:
                continue
            pruned = ev[f"pruned-{v}"]
            rec = recovery_metrics(teacher, pruned, ev[v])
            d_pruned, d_teacher = paired_accuracy(ev[v], pruned), paired_accuracy(ev[v], teacher)
            d_nll = paired_heldout(ev[v], pruned, "nll")
            self.results["students"][kind] = {
                "variant": v, "recovery": {k: x for k, x in rec.items() if k != "tasks"}, "tasks": rec.get("tasks"),
                "acc_vs_pruned": d_pruned, "acc_vs_teacher": d_teacher, "nll_vs_pruned": d_nll}
            md.append(row(kind, pct(rec.get("ppl_retention")), pct(rec.get("ppl_recovery")), pct(rec.get("kl_recovery")),
                          pct(rec.get("capability_retention")), pm(d_pruned, 100, "+.1f"), pm(d_teacher, 100, "+.1f"),
                          pm(d_nll, fmt="+.4f")))
        return md + [""]

    def depth_comparisons(self) -> list[str]:
        """Table 6.2 and the map / tail / budget comparisons of the depth student, then its per-benchmark table."""
        ev = self.ev
        if "features" not in ev:
            return []
        pruned, md = ev["pruned-features"], []
        for title, names, ref, key in COMPARISONS:
            present = [n for n in names if n in ev]
            if len(present) < 2:
                continue
            lines, self.results[key] = compare(present, ref, ev, pruned, self.teacher)
            md += [f"## {title}", ""] + lines + [""]
        md += ["## Per benchmark, depth student (accuracy % ± stderr)", ""]
        md += table_models([("teacher", self.teacher), ("pruned", pruned)] + [(LABEL.get(n, n), ev[n])
                           for n in OBJECTIVES + MAPS[1:] + TAILS[1:] if n in ev]) + [""]
        return md

    def seeds(self) -> list[str]:
        """The training-seed spread: the same variant with training.seed 1 instead of 0."""
        ev = self.ev
        pairs = [(a, b) for a, b in SEEDS if a in ev and b in ev]
        if not pairs:
            return []
        md = ["## Training seed (depth student): seed 1 - seed 0 of the same variant", "",
              "| variant | PPL seed 0 / 1 | KL seed 0 / 1 | mean acc seed 0 / 1 | ΔNLL (nats) | ΔKL | Δacc (points) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for a, b in pairs:
            ha, hb = ev[a]["heldout"], ev[b]["heldout"]
            d = paired(ev[b], ev[a])
            self.results.setdefault("seeds", {})[a] = d
            md.append(f"| {LABEL.get(a, a)} | {ha['perplexity']:.2f} / {hb['perplexity']:.2f} | "
                      f"{ha['kl_to_teacher']:.4f} / {hb['kl_to_teacher']:.4f} | {pct(mean_acc(ev[a]))} / "
                      f"{pct(mean_acc(ev[b]))} | {pm(d['nll'], fmt='+.4f')} | {pm(d['kl'], fmt='+.4f')} | "
                      f"{pm(d['acc'], 100, '+.1f')} |")
        return md + [""]

    def cost(self) -> list[str]:
        """One cache build + N cached runs against N online runs. The cached run timed against the online one is
        features_seed1 when present (the same objective; run after the others, on otherwise idle cores)."""
        runs, cost = self.runs, {}
        for ablation in ABLATIONS:
            p = self.out / f"{ablation}.ablation.json"
            if p.is_file() and load(p).get("cache_build"):
                cost["cache_build"] = load(p)["cache_build"]
        cached = "features_seed1" if "features_seed1" in runs else "features"
        md = ["## Cost: one cache vs online runs", "", "| run | seconds | peak RSS MiB |", "|---|---:|---:|"]
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
        md += self._totals(cost, cached)
        self.results["cost"] = cost
        return md

    def _totals(self, cost: dict, cached: str) -> list[str]:
        trained = [n for n, r in self.runs.items() if n != "online" and r["metrics"].get("global_step") == 30]
        if not (cost.get("cache_build") and cached in cost and "online" in cost):
            return []
        n = len(trained)
        one_cache = cost["cache_build"]["seconds"] + n * cost[cached]["train_seconds"]
        online = n * cost["online"]["train_seconds"]
        cost["totals"] = {"runs": n, "one_cache_seconds": one_cache, "online_seconds": online}
        return ["", f"For the {n} 30-step runs of this page: one cache + {n} cached runs = "
                f"{one_cache / 60:.0f} min; {n} online runs = {online / 60:.0f} min "
                f"({online / one_cache:.2f}x), from the two timed runs above (each training loop with its held-out "
                "evaluations; benchmark scoring, the same for both, excluded)."]

    def models(self) -> None:
        for name, r in self.ev.items():
            h = r.get("heldout") or {}
            self.results["models"][name] = {
                "model": r.get("model"), "parameters": r.get("parameters"), "perplexity": h.get("perplexity"),
                "kl_to_teacher": h.get("kl_to_teacher"), "mean_acc": mean_acc(r),
                "tasks": {t: x.get(primary_metric(x)) for t, x in r.get("tasks", {}).items()}}


def toy_tables(out: Path) -> tuple[list[str], dict]:
    """docs/results-toy.md's tables (markdown lines) and results.json from the copies in `out`."""
    t = Toy(out)
    md = t.students() + t.depth_comparisons() + t.seeds() + t.cost()
    t.models()
    figure = plot_paired(t.results, out / "paired_differences.png")
    if figure is not None:
        md += ["", f"![Paired differences]({figure.name})", ""]
    return md, t.results

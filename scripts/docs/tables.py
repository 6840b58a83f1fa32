"""What both results pages' tables share: reading the copied result files, formatting numbers, the table of
models and the table of variants paired against a reference (pipeline.evaluate.metrics does the statistics)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.evaluate.metrics import paired_accuracy, paired_heldout, primary_metric, recovery_metrics

TASKS = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "piqa"]
TASK_LABEL = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "hellaswag": "HellaSwag", "winogrande": "Winogr.",
              "lambada_openai": "LAMBADA", "piqa": "PIQA"}
LABEL = {"ce_only": "CE only (fine-tune)", "logits": "logits KD (0.5 / 0.5)", "features": "features (0.4 / 0.4 / 0.2)",
         "advanced": "advanced (0.2 CE, 0.5 skew KL, 0.1 cos, 0.2 FDD)", "map_last": "last",
         "map_selected": "selected", "tail_renormalize": "renormalize",
         "features_x4": "features, 120 steps (4x tokens)"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def read_copies(out: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(eval JSONs by model name, run records by variant) of a results folder."""
    ev = {p.stem: load(p) for p in sorted((out / "evals").glob("*.json"))}
    runs = {p.name[: -len(".run.json")]: load(p) for p in sorted((out / "runs").glob("*.run.json"))}
    return ev, runs


def done_variants(ablation_dir: Path, out: Path) -> list[str]:
    """Copy each finished variant's eval JSONs and run record from one ablation's folder into `out`'s evals/
    and runs/; returns those variants in run order."""
    done = [r["variant"] for r in load(ablation_dir / "ablation.json")["rows"] if r["status"] == "done"]
    for v in done:
        shutil.copy2(ablation_dir / v / "eval" / "student.json", out / "evals" / f"{v}.json")
        shutil.copy2(ablation_dir / v / "eval" / "pruned.json", out / "evals" / f"pruned-{v}.json")
        shutil.copy2(ablation_dir / v / "run.json", out / "runs" / f"{v}.run.json")
    return done


def tokens_per_step(run: dict) -> int:
    t = run["config"]["training"]
    return int(t["per_device_train_batch_size"]) * int(t.get("gradient_accumulation_steps", 1)) * int(run["cache"]["seq_len"])


def divergence(run: dict) -> str:
    """The divergence a run's KL term measured (`loss.logits`: kl, skew_kl, ...): only KL curves carry the KL."""
    return run["config"]["loss"].get("logits", "kl")


def header(*names: str) -> list[str]:
    """A markdown table's head: the first column left-aligned, the others right-aligned."""
    return ["| " + " | ".join(names) + " |", "|---|" + "---:|" * (len(names) - 1)]


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


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
    return row(*cells)


def table_models(rows: list[tuple[str, dict]]) -> list[str]:
    return header("model", "params", "held-out PPL", "KL to teacher", *(TASK_LABEL[t] for t in TASKS),
                  "mean acc") + [model_row(n, r) for n, r in rows]


def paired(x: dict, y: dict) -> dict:
    """x - y paired: held-out NLL and KL over the same sequences, accuracy over the same items."""
    return {"nll": paired_heldout(x, y, "nll"), "kl": paired_heldout(x, y, "kl"), "acc": paired_accuracy(x, y)}


def compare(names: list[str], ref: str, ev: dict[str, dict], pruned: dict, teacher: dict, pair=paired,
            labels: dict = LABEL) -> tuple[list[str], dict]:
    """Rows of variants against `ref` (paired on the same sequences / items by `pair`) plus their recovery
    metrics."""
    lines = header("variant", "held-out PPL", "KL to teacher", "mean acc", "PPL recovery", "KL recovery",
                   "capability retention", f"ΔNLL vs {ref} (nats)", f"ΔKL vs {ref}", f"Δacc vs {ref} (points)")
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

"""Load and check what `distill report` reads, pull plot-ready series out of it, and write the markdown.

Inputs: run directories written by `distill train` (trainer_state.json's log history, run.json) and eval
JSONs written by `distill eval --out` (the eval contract: model, tasks, heldout). Everything is checked
here, before the recipe writes anything, so a bad input is one `PipelineError` line and no output.

Eval roles come from the file stem: `teacher.json`, `pruned.json`; any other stem is the recovered model
of that run (`student.json` preferred when a run's eval/ folder holds several). Files named with
`--eval` win over the run's own eval/ folder; with several runs only teacher and pruned can be shared.

The numbers in the tables come from `pipeline.evaluate.metrics` (recovery metrics, paired differences);
this module only formats them. Accuracies, paired differences and ratios are shown in percent.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluate.metrics import primary_metric, recovery_metrics

ROLES = ("teacher", "pruned", "recovered")
RECOVERED_STEM = "student"
LAYER_KEY = re.compile(r"_L(\d+)$")  # per mapped student block: loss_hidden_L<j>, eval_cos_L<j>
Series = tuple[list[int], list[float]]  # (steps, values)

FIGURES = {
    "loss_components.png": "Loss components",
    "hidden_loss_by_layer.png": "Feature (hidden-state) loss per mapped layer",
    "layer_cosine_heatmap.png": "Held-out cosine per mapped layer",
}


# ---------------------------------------------------------------------------------------------- run dirs
@dataclass
class Run:
    """One run directory: its log history split into train and eval entries (one per step), and run.json."""

    path: Path
    name: str
    run: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    global_step: int | None
    evals_by_role: dict[str, Path] = field(default_factory=dict)

    @property
    def layer_map(self) -> dict[int, int]:
        return {int(j): int(t) for j, t in (self.run.get("layer_map") or {}).items()}

    def layer_label(self, j: int) -> str:
        t = self.layer_map.get(j)
        return f"student block {j} -> teacher layer {t}" if t is not None else f"student block {j}"

    def row_label(self, j: int) -> str:
        """The heatmap's shorter form: 'block j -> layer t'."""
        t = self.layer_map.get(j)
        return f"block {j} -> layer {t}" if t is not None else f"block {j}"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except OSError as e:
        raise PipelineError(f"cannot read {what} {path}: {e.strerror}") from None


def split_history(log_history: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(train logging entries, evaluation entries), each sorted by step with one entry per step (the last
    logged: the Trainer evaluates twice at the last step, and a resumed run may log a step again)."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for entry in log_history:
        if not isinstance(entry, dict) or "step" not in entry:
            continue
        if "loss" in entry:
            train[int(entry["step"])] = entry
        elif "eval_loss" in entry:
            evals[int(entry["step"])] = entry
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def load_run(path: str | Path) -> Run:
    """Read and check one run directory (trainer_state.json required; run.json optional but must parse)."""
    p = Path(path)
    if not p.is_dir():
        raise PipelineError(f"run directory {p} does not exist")
    state_file = p / "trainer_state.json"
    if not state_file.is_file():
        raise PipelineError(f"{p} has no trainer_state.json: not a `distill train` run directory")
    state = _read_json(state_file, "trainer state")
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise PipelineError(f"{state_file} has no log_history list")
    run: dict[str, Any] = {}
    if (p / "run.json").is_file():
        run = _read_json(p / "run.json", "run summary")
        if not isinstance(run, dict):
            raise PipelineError(f"{p / 'run.json'} is not a JSON object")
    layer_map = run.get("layer_map") or {}
    if not isinstance(layer_map, dict) or not all(str(j).isdigit() and isinstance(t, int)
                                                  for j, t in layer_map.items()):
        raise PipelineError(f"{p / 'run.json'}: layer_map must map student block numbers to teacher layers")
    train, evals = split_history(state["log_history"])
    step = (run.get("metrics") or {}).get("global_step", state.get("global_step"))
    return Run(path=p, name=p.name, run=run, train=train, evals=evals, global_step=step)


def name_runs(runs: list[Run]) -> None:
    """Directory names, widened with parent folders until unique (a/train and b/train -> a/train, b/train)."""
    depth = 1
    while True:
        names = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(names)) == len(names) or depth >= max(len(r.path.resolve().parts) for r in runs):
            break
        depth += 1
    for r, n in zip(runs, names):
        r.name = n


# ---------------------------------------------------------------------------------------------- series
def component_series(run: Run) -> dict[str, dict[str, Series]]:
    """{component: {"train": (steps, values), "eval": (...)}} for the total ("loss") and every `loss_*` key
    without a layer suffix (ce, kl, hidden, and any later one such as fdd), in a stable order."""
    names: list[str] = []
    for entry in run.train:
        names += [k for k in entry if (k == "loss" or k.startswith("loss_")) and not LAYER_KEY.search(k)]
    for entry in run.evals:
        names += [k[len("eval_"):] for k in entry
                  if (k == "eval_loss" or k.startswith("eval_loss_")) and not LAYER_KEY.search(k)]
    order = ["loss", "loss_ce", "loss_kl", "loss_hidden"]
    unique = sorted(set(names), key=lambda k: (order.index(k) if k in order else len(order), k))
    out: dict[str, dict[str, Series]] = {}
    for name in unique:
        out[name] = {"train": _series(run.train, name), "eval": _series(run.evals, f"eval_{name}")}
    return out


def _series(entries: list[dict], key: str) -> Series:
    steps = [int(e["step"]) for e in entries if _number(e.get(key))]
    values = [float(e[key]) for e in entries if _number(e.get(key))]
    return steps, values


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def layer_series(entries: list[dict], prefix: str) -> dict[int, Series]:
    """{student block j: (steps, values)} of the keys `<prefix>_L<j>` (e.g. prefix "loss_hidden")."""
    head = prefix + "_L"
    blocks = sorted({int(k[len(head):]) for e in entries for k in e
                     if k.startswith(head) and k[len(head):].isdigit()})
    return {j: _series(entries, f"{prefix}_L{j}") for j in blocks}


def cosine_matrix(run: Run) -> tuple[list[int], list[int], np.ndarray]:
    """(student blocks = rows, eval steps = columns, held-out cosine [rows, cols]; NaN where not logged)."""
    per_block = layer_series(run.evals, "eval_cos")
    blocks = sorted(per_block)
    steps = [int(e["step"]) for e in run.evals if any(f"eval_cos_L{j}" in e for j in blocks)]
    matrix = np.full((len(blocks), len(steps)), np.nan)
    for r, j in enumerate(blocks):
        for s, v in zip(*per_block[j]):
            matrix[r, steps.index(s)] = v
    return blocks, steps, matrix


# ---------------------------------------------------------------------------------------------- eval JSONs
def load_eval(path: str | Path) -> dict[str, Any]:
    """Read one eval JSON and check the contract keys and value types; one-line error otherwise."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"eval file {p} does not exist")
    data = _read_json(p, "eval file")
    contract = "model and tasks and/or heldout"
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not (
            "tasks" in data or "heldout" in data):
        raise PipelineError(f"eval file {p} lacks the eval contract keys ({contract})")
    tasks = data.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise PipelineError(f"eval file {p}: tasks must be an object of task name -> result")
    for name, t in tasks.items():
        if not isinstance(t, dict) or not isinstance(t.get("n"), int) or not (
                _number(t.get("acc")) or _number(t.get("acc_norm"))):
            raise PipelineError(f"eval file {p}: task {name} lacks a numeric acc (or acc_norm) and an integer n")
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            if t.get(key) is not None and not _number(t[key]):
                raise PipelineError(f"eval file {p}: task {name} has a non-numeric {key}")
        items = t.get("items") or {}
        if not isinstance(items, dict) or any(not isinstance(v, list) or len(v) != t["n"] for v in items.values()):
            raise PipelineError(f"eval file {p}: task {name} items must be lists of n = {t['n']} results")
    heldout = data.get("heldout") or {}
    if not isinstance(heldout, dict):
        raise PipelineError(f"eval file {p}: heldout must be an object with perplexity and kl_to_teacher")
    for key in ("perplexity", "kl_to_teacher"):
        if heldout.get(key) is not None and not _number(heldout[key]):
            raise PipelineError(f"eval file {p}: heldout.{key} is not a number")
    return data


def eval_role(path: Path) -> str:
    """'teacher' | 'pruned' | 'recovered', from the file stem."""
    return path.stem if path.stem in ("teacher", "pruned") else "recovered"


def assign_evals(runs: list[Run], eval_files: list[str]) -> dict[Path, dict]:
    """Fill each run's evals_by_role (the --eval files over the run's own eval/*.json); returns every
    file's parsed content. Several recovered candidates in one eval/ folder: student.json, else an error."""
    shared: dict[str, Path] = {}
    for f in eval_files:
        p = Path(f)
        role = eval_role(p)
        if role == "recovered" and len(runs) > 1:
            raise PipelineError(f"--eval {p}: with several runs only teacher.json and pruned.json can be shared; "
                                f"put each run's own result in RUN_DIR/eval/{RECOVERED_STEM}.json")
        if role in shared:
            raise PipelineError(f"--eval {shared[role]} and {p} both give the {role} results")
        shared[role] = p
    loaded: dict[Path, dict] = {}
    for p in shared.values():
        loaded[p] = load_eval(p)
    for run in runs:
        own: dict[str, list[Path]] = {}
        for p in sorted((run.path / "eval").glob("*.json")):
            own.setdefault(eval_role(p), []).append(p)
            loaded[p] = load_eval(p)
        for role, paths in own.items():
            if len(paths) > 1:
                preferred = [p for p in paths if p.stem == RECOVERED_STEM]
                if not preferred:
                    raise PipelineError(f"{run.path / 'eval'} holds several recovered-model results "
                                        f"({', '.join(p.name for p in paths)}); name the one to report "
                                        f"{RECOVERED_STEM}.json or pass it with --eval")
                paths = preferred
            run.evals_by_role[role] = paths[0]
        run.evals_by_role.update(shared)
    return loaded


def table_metrics(run: Run, loaded: dict[Path, dict]) -> dict[str, Any] | None:
    """recovery_metrics(teacher, pruned, recovered) when all three roles have a file, else None.
    Raises PipelineError for results that cannot be compared (different item counts)."""
    if any(role not in run.evals_by_role for role in ROLES):
        return None
    teacher, pruned, model = (loaded[run.evals_by_role[r]] for r in ROLES)
    try:
        return recovery_metrics(teacher, pruned, model)
    except PipelineError as e:
        raise PipelineError(f"{run.name}: {e}") from None


def missing_eval_commands(run: Run) -> list[tuple[str, Path, str]]:
    """(role, expected path, the `distill eval` command that makes it) for each role without a file."""
    cfg = run.run.get("config") or {}
    cache = (run.run.get("cache") or {}).get("dir") or (cfg.get("cache") or {}).get("dir") or "CACHE_DIR"
    models = {
        "teacher": (cfg.get("teacher") or {}).get("model") or "TEACHER",
        "pruned": run.run.get("student_source") or (cfg.get("student") or {}).get("model") or "PRUNED_STUDENT",
        "recovered": str(run.path / "student"),
    }
    stems = {"teacher": "teacher", "pruned": "pruned", "recovered": RECOVERED_STEM}
    out = []
    for role in ROLES:
        if role not in run.evals_by_role:
            target = run.path / "eval" / f"{stems[role]}.json"
            out.append((role, target, f"distill eval --model {models[role]} --heldout {cache} --out {target}"))
    return out


# ---------------------------------------------------------------------------------------------- formatting
DASH = "—"


def fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return DASH
    return format(v, spec) if _number(v) else str(v)


def pct(v: float | None, digits: int = 2) -> str:
    """A ratio or accuracy in percent; None (no gap to recover, or not measured) -> 'n/a'."""
    return "n/a" if v is None else f"{round(100 * v, digits) + 0.0:.{digits}f}%"  # + 0.0: never "-0.00%"


def pm(value: float | None, stderr: float | None, scale: float = 100.0, unit: str = "") -> str:
    if value is None:
        return DASH
    s = f"{scale * value:.2f}"
    return s + (f" ± {scale * stderr:.2f}" if stderr is not None else "") + unit


def signed_pm(d: dict | None) -> str:
    """A paired difference in percentage points: '+1.23 ± 0.45 pp (n=100)'."""
    if not d or d.get("diff") is None:
        return DASH
    se = f" ± {100 * d['stderr']:.2f}" if d.get("stderr") is not None else ""
    n = f" (n={d['n']})" if d.get("n") is not None else ""
    return f"{100 * d['diff']:+.2f}{se} pp{n}"


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _loss_summary(run: Run) -> str:
    loss = (run.run.get("config") or {}).get("loss") or {}
    weights = [k for k in ("alpha", "beta", "gamma", "delta") if k in loss]  # the compound loss's weights first
    keys = weights + sorted(k for k in loss if k not in weights and loss[k] is not None)
    return ", ".join(f"{k} {loss[k]}" for k in keys) if loss else DASH


def _eval_loss(run: Run) -> tuple[float | None, float | None]:
    m = run.run.get("metrics") or {}
    before = m.get("eval_loss_before", run.evals[0]["eval_loss"] if run.evals and run.evals[0]["step"] == 0 else None)
    after = m.get("eval_loss_after", run.evals[-1]["eval_loss"] if run.evals else None)
    return before, after


def summary_lines(run: Run) -> list[str]:
    cfg = run.run.get("config") or {}
    before, after = _eval_loss(run)
    change = f" ({100 * (after - before) / before:+.1f}%)" if _number(before) and _number(after) and before else ""
    layer_map = ", ".join(f"{j}->{t}" for j, t in sorted(run.layer_map.items())) or DASH
    rows = [
        ["run directory", f"`{run.path}`"],
        ["mode", fmt(run.run.get("mode"))],
        ["student (before training)",
         f"`{run.run.get('student_source') or (cfg.get('student') or {}).get('model')}`"],
        ["teacher", f"`{(cfg.get('teacher') or {}).get('model')}`"],
        ["cache", f"`{(run.run.get('cache') or {}).get('dir') or (cfg.get('cache') or {}).get('dir')}`"],
        ["layer map (student block -> teacher layer)", layer_map],
        ["loss", _loss_summary(run)],
        ["optimizer steps", fmt(run.global_step, "d")],
        ["train loss (mean over the run)", fmt((run.run.get("metrics") or {}).get("train_loss"))],
        ["held-out loss before -> after", f"{fmt(before)} -> {fmt(after)}{change}"],
    ]
    return _table(["", ""], rows, ["---", "---"])


def _task_columns(results: list[dict]) -> list[tuple[str, str, int | None]]:
    """(task, primary metric, n) over the union of tasks, metric taken from the first file that has it."""
    cols: dict[str, tuple[str, int | None]] = {}
    for r in results:
        for name, t in (r.get("tasks") or {}).items():
            cols.setdefault(name, (primary_metric(t), t.get("n")))
    return [(name, m, n) for name, (m, n) in cols.items()]


def before_after_lines(run: Run, loaded: dict[Path, dict], metrics: dict[str, Any]) -> list[str]:
    """Table 6.1 (teacher / pruned / recovered) and the recovery metrics under it."""
    results = {role: loaded[run.evals_by_role[role]] for role in ROLES}
    tasks = _task_columns(list(results.values()))
    header = ["model", "eval file", "held-out PPL", "KL to teacher"] + [
        f"{name} ({metric}{f', n={n}' if n is not None else ''})" for name, metric, n in tasks]
    rows = []
    for role in ROLES:
        r = results[role]
        h = r.get("heldout") or {}
        cells = [role, f"`{run.evals_by_role[role].name}`", fmt(h.get("perplexity"), ".3f"),
                 fmt(h.get("kl_to_teacher"))]
        for name, metric, _ in tasks:
            t = (r.get("tasks") or {}).get(name) or {}
            cells.append(pm(t.get(metric), t.get(f"{metric}_stderr")))
        rows.append(cells)
    lines = _table(header, rows, ["---", "---"] + ["---:"] * (len(header) - 2))
    lines += ["", "Accuracies in percent ± standard error (lm-eval's primary metric: acc_norm when reported, "
                  "else acc). Held-out perplexity and KL(teacher || model) at T = 1 on the cache's held-out split.",
              "", "### Recovery", ""]
    md = metrics.get("mean_diff_vs_teacher")
    def value(key: str) -> str:
        return pct(metrics.get(key)) if key in metrics else DASH

    rec = [
        ["PPL retention", "ppl_teacher / ppl_recovered", value("ppl_retention")],
        ["PPL recovery", "(ppl_pruned - ppl_recovered) / (ppl_pruned - ppl_teacher)", value("ppl_recovery")],
        ["KL recovery", "(kl_pruned - kl_recovered) / kl_pruned", value("kl_recovery")],
        ["capability retention", "mean over tasks of acc_recovered / acc_teacher", value("capability_retention")],
        ["benchmark recovery", "mean over tasks of (acc_recovered - acc_pruned) / (acc_teacher - acc_pruned)",
         value("benchmark_recovery")],
        ["mean paired difference vs teacher", "mean over tasks of mean_i(recovered_i - teacher_i)",
         signed_pm({"diff": md["diff"], "stderr": md["stderr"]}) if md else DASH],
    ]
    lines += _table(["metric", "definition", "value"], rec, ["---", "---", "---:"])
    if metrics.get("tasks"):
        lines += ["", "Per task (paired differences over the same items, ± their standard error):", ""]
        rows = [[t["task"], t["metric"], fmt(t.get("n"), "d"), pct(t.get("retention")),
                 pct(t.get("recovery")) if "pruned" in t else DASH,
                 signed_pm(t.get("vs_teacher")), signed_pm(t.get("vs_pruned"))] for t in metrics["tasks"]]
        lines += _table(["task", "metric", "n", "retention", "recovery", "recovered - teacher", "recovered - pruned"],
                        rows, ["---", "---"] + ["---:"] * 5)
    lines += ["", "n/a: the ratio's denominator is zero (no gap between teacher and pruned); "
                  "—: not measured in these files."]
    return lines


def missing_lines(runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
        missing = missing_eval_commands(run)
        if not missing:
            continue
        names = ", ".join(f"{role} (`{path}`)" for role, path, _ in missing)
        lines += [f"Missing eval results for **{run.name}**: {names}. Make them with:", ""]
        lines += [f"    {cmd}" for _, _, cmd in missing]
        lines += [""]
    if lines:
        lines += ["(or pass teacher.json / pruned.json with `distill report ... --eval FILE`), then rerun "
                  "`distill report`."]
    return lines


def figure_lines(drawn: list[str], notes: dict[str, str]) -> list[str]:
    """Markdown for the figures: the image when it was drawn (relative link), then its note if any."""
    lines = []
    for name, title in FIGURES.items():
        if name not in drawn and name not in notes:
            continue
        lines += [f"### {title}", ""]
        if name in drawn:
            lines += [f"![{title}]({name})", ""]
        if name in notes:
            lines += [notes[name], ""]
    return lines


def single_report(run: Run, loaded: dict[Path, dict], metrics: dict | None, drawn: list[str],
                  notes: dict[str, str]) -> str:
    lines = [f"# Distillation report: {run.name}", "", "## Run", ""] + summary_lines(run)
    lines += ["", "## Training curves", "",
              "Solid: training loss at each logging step; dashed with markers: held-out (evaluation) loss. "
              "Per-layer values are for the mapped student blocks (`loss_hidden_L<j>`, `eval_cos_L<j>`).", ""]
    lines += figure_lines(drawn, notes)
    lines += ["## Before / after distillation (Table 6.1)", ""]
    if metrics is None:
        lines += missing_lines([run])
    else:
        lines += before_after_lines(run, loaded, metrics)
    return "\n".join(lines).rstrip() + "\n"


def comparison_report(runs: list[Run], loaded: dict[Path, dict], metrics: dict[str, dict | None],
                      drawn: list[str], notes: dict[str, str]) -> str:
    """One report for several runs: a row per run, overlaid curves, a heatmap per run."""
    lines = [f"# Distillation comparison: {len(runs)} runs", ""]
    header = ["run", "loss", "map", "steps", "held-out loss before", "held-out loss after", "held-out PPL",
              "KL to teacher", "PPL retention", "PPL recovery", "KL recovery", "capability retention",
              "benchmark recovery"]
    rows = []
    for run in runs:
        before, after = _eval_loss(run)
        rec_file = run.evals_by_role.get("recovered")
        h = (loaded[rec_file].get("heldout") or {}) if rec_file else {}
        m = metrics.get(run.name)

        def cell(key: str) -> str:
            return pct(m.get(key)) if m is not None and key in m else DASH

        rows.append([f"`{run.name}`", _loss_summary(run),
                     ", ".join(f"{j}->{t}" for j, t in sorted(run.layer_map.items())) or DASH,
                     fmt(run.global_step, "d"), fmt(before), fmt(after), fmt(h.get("perplexity"), ".3f"),
                     fmt(h.get("kl_to_teacher")), cell("ppl_retention"), cell("ppl_recovery"), cell("kl_recovery"),
                     cell("capability_retention"), cell("benchmark_recovery")])
    lines += _table(header, rows, ["---", "---", "---"] + ["---:"] * (len(header) - 3))
    refs = sorted({f"{role}: `{run.evals_by_role[role]}`" for run in runs for role in ("teacher", "pruned")
                   if role in run.evals_by_role})
    lines += ["", "Held-out PPL and KL are the recovered model's (its `eval/` results); the recovery metrics "
                  "need teacher, pruned and recovered results. Reference results: "
                  + ("; ".join(refs) if refs else "none") + ".", ""]
    missing = missing_lines(runs)
    if missing:
        lines += missing + [""]
    lines += ["## Training curves", "",
              "One colour per run. Solid: training loss; dashed with markers: held-out loss.", ""]
    lines += figure_lines(drawn, notes)
    return "\n".join(lines).rstrip() + "\n"

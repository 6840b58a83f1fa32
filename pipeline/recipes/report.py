"""`distill report RUN_DIR... [--out DIR] [--eval FILE ...]`: figures and report.md, top to bottom.

    check every input (run dirs, eval JSONs, the output folder) and compute the recovery metrics
    extract the curves and the cosine matrix from each run's log history
    draw the PNGs and write report.md into DIR.tmp, then swap it in as DIR (nothing half-written)

One run gives that run's report (Table 6.1 when teacher, pruned and recovered eval JSONs exist);
several give one comparison report (overlaid curves, a heatmap per run, a row per run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.errors import PipelineError
from pipeline.evaluate import plots
from pipeline.evaluate.report import (
    Run,
    assign_evals,
    comparison_report,
    component_series,
    cosine_matrix,
    layer_series,
    load_run,
    name_runs,
    single_report,
    table_metrics,
)
from pipeline.atomic import write_folder_atomically

REPORT_FILE = "report.md"


def default_out(run_dirs: list[str]) -> Path:
    """RUN_DIR/report for one run; `report/` beside the first run (its parent folder) for several."""
    first = Path(run_dirs[0])
    return first / "report" if len(run_dirs) == 1 else first.resolve().parent / "report"


def check_out(out: Path, runs: list[Run]) -> None:
    """The output folder is replaced whole: refuse anything that is not an earlier report or empty."""
    target = out.resolve()
    for run in runs:
        if target == run.path.resolve() or target in run.path.resolve().parents:
            raise PipelineError(f"--out {out} would replace run directory {run.path}; choose another folder")
    if target.exists():
        if not target.is_dir():
            raise PipelineError(f"--out {out} is a file, not a folder")
        if any(target.iterdir()) and not (target / REPORT_FILE).is_file():
            raise PipelineError(f"--out {out} is a non-empty folder without {REPORT_FILE}; refusing to replace it")


def _layer_data(run: Run) -> dict[int, dict]:
    train, evals = layer_series(run.train, "loss_hidden"), layer_series(run.evals, "eval_loss_hidden")
    return {j: {"label": run.layer_label(j), "teacher": run.layer_map.get(j),
                "train": train.get(j, ([], [])), "eval": evals.get(j, ([], []))}
            for j in sorted(set(train) | set(evals))}


def run_report(run_dirs: list[str], out: str | None = None, eval_files: list[str] | tuple[str, ...] = (),
               echo: Callable[[str], None] = print) -> Path:
    """Write report.md and its PNGs for one run, or a comparison report for several; returns the folder.

    Default folder: RUN_DIR/report for one run, else `report/` in the first run's parent folder. Eval JSONs
    come from each run's eval/ folder (teacher.json, pruned.json, student.json) and from `eval_files`
    (which win; with several runs only teacher.json and pruned.json may be given that way).
    """
    # 1. every input checked before anything is written
    if not run_dirs:
        raise PipelineError("give at least one run directory")
    resolved = [Path(d).resolve() for d in run_dirs]
    if len(set(resolved)) != len(resolved):
        twice = next(d for d, r in zip(run_dirs, resolved) if resolved.count(r) > 1)
        raise PipelineError(f"run directory {twice} is given twice")
    runs = [load_run(d) for d in run_dirs]
    name_runs(runs)
    loaded = assign_evals(runs, list(eval_files))
    metrics = {run.name: table_metrics(run, loaded) for run in runs}
    out_dir = Path(out) if out else default_out(run_dirs)
    check_out(out_dir, runs)

    # 2. plot-ready data from the log histories
    components = {run.name: component_series(run) for run in runs}
    layers = {run.name: d for run in runs if (d := _layer_data(run))}
    cosines = {}
    for run in runs:
        blocks, steps, matrix = cosine_matrix(run)
        if blocks and steps:
            cosines[run.name] = ([run.row_label(j) for j in blocks], steps, matrix)
    no_hidden = [run.name for run in runs if run.name not in layers]
    no_cos = [run.name for run in runs if run.name not in cosines]

    # 3. figures and report.md into DIR.tmp, swapped in whole
    notes: dict[str, str] = {}
    if no_hidden:
        which = "" if len(runs) == 1 else f" in {', '.join(no_hidden)}"
        notes["hidden_loss_by_layer.png"] = (f"No per-layer feature loss (`loss_hidden_L<j>`){which}: "
                                             "loss.gamma = 0 means no hidden-state loss.")
    if no_cos:
        which = "" if len(runs) == 1 else f" in {', '.join(no_cos)}"
        notes["layer_cosine_heatmap.png"] = (f"No held-out cosine (`eval_cos_L<j>`){which}: no hidden-state loss "
                                             "(loss.gamma = 0) or no evaluation.")

    def write(tmp: Path) -> None:
        drawn = []
        if any(components.values()):
            drawn.append(plots.plot_loss_components(components, tmp / "loss_components.png").name)
        if layers:
            drawn.append(plots.plot_layer_losses(layers, tmp / "hidden_loss_by_layer.png").name)
        if cosines:
            drawn.append(plots.plot_cosine_heatmaps(cosines, tmp / "layer_cosine_heatmap.png").name)
        if len(runs) > 1:
            text = comparison_report(runs, loaded, metrics, drawn, notes)
        else:
            text = single_report(runs[0], loaded, metrics[runs[0].name], drawn, notes)
        (tmp / REPORT_FILE).write_text(text)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    write_folder_atomically(out_dir, write)
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    echo(f"{out_dir}: {REPORT_FILE}, {', '.join(pngs) if pngs else 'no figures'} written")
    return out_dir

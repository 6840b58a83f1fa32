"""The report's figures: loss components, per-layer feature loss, and the layer-wise cosine heatmap.

Each function takes plain data (run name -> steps and values, as `pipeline.evaluate.report` extracts
them from trainer_state.json), draws one PNG with matplotlib's Agg backend (no display needed), and
returns its path. One run or several: several runs share the axes, one colour per run. Training values
are solid lines, held-out (evaluation) values dashed with markers, so the two are told apart in grey print.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 120
Series = tuple[list[int], list[float]]  # (steps, values)
TITLES = {
    "loss": "total loss (weighted sum)",
    "loss_ce": "CE (true next token)",
    "loss_kl": "logits loss (T² included)",
    "loss_hidden": "hidden-state loss (mean over mapped layers)",
}
ANNOTATE_CELLS = 120  # write the value in each heatmap cell up to this many cells per run


def _colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _draw(ax, series: Series, colour, held_out: bool) -> None:
    steps, values = series
    if not steps:
        return
    if held_out:
        ax.plot(steps, values, linestyle="--", marker="o", markersize=4, color=colour)
    else:  # a marker too when there are few points, so a one-step run still shows
        ax.plot(steps, values, linestyle="-", marker="." if len(steps) <= 20 else None, color=colour)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_below(fig, entries: list[tuple[str, object]]) -> None:
    """One legend under the panels: a line per (label, colour), then what solid and dashed mean. As many
    columns as fit the figure's width; the figure grows by the legend's rows so no panel shrinks."""
    handles = [Line2D([], [], color=c, linewidth=2) for _, c in entries]
    handles += [Line2D([], [], color="0.35", linestyle="-", marker="."),
                Line2D([], [], color="0.35", linestyle="--", marker="o", markersize=4)]
    labels = [label for label, _ in entries] + ["train", "held-out"]
    width_pt = fig.get_figwidth() * 72
    per_entry_pt = 5.6 * max(len(label) for label in labels) + 45  # ~9 pt text plus the handle
    ncol = max(1, min(len(labels), 4, int(width_pt // per_entry_pt)))
    rows = math.ceil(len(labels) / ncol)
    fig.set_figheight(fig.get_figheight() + 0.2 * rows)
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)


def _grid(n: int, ncols: int = 2) -> tuple[int, int]:
    ncols = min(ncols, n)
    return math.ceil(n / ncols), ncols


def plot_loss_components(runs: dict[str, dict[str, dict[str, Series]]], out: Path) -> Path:
    """runs: {run name: {component ("loss", "loss_ce", ...): {"train": series, "eval": series}}};
    one subplot per component (the union over runs), one colour per run."""
    components = list(dict.fromkeys(c for comps in runs.values() for c in comps))
    nrows, ncols = _grid(len(components))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows + 0.4),
                             squeeze=False, layout="constrained")
    colours = _colours(len(runs))
    for ax, comp in zip(axes.flat, components):
        for colour, comps in zip(colours, runs.values()):
            if comp in comps:
                _draw(ax, comps[comp]["train"], colour, held_out=False)
                _draw(ax, comps[comp]["eval"], colour, held_out=True)
        ax.set_title(TITLES.get(comp, comp.removeprefix("loss_")), fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss / eval_loss" if comp == "loss" else f"{comp} / eval_{comp}")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(components):]:
        ax.set_visible(False)
    fig.suptitle("Distillation loss components" + ("" if len(runs) > 1 else f": {next(iter(runs))}"), fontsize=13)
    _legend_below(fig, list(zip(runs, colours)) if len(runs) > 1 else [])
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_layer_losses(runs: dict[str, dict[int, dict]], out: Path) -> Path:
    """runs: {run name: {student block j: {"label": "student block j -> teacher layer t", "teacher": t,
    "train": series, "eval": series}}}. One run: one axis, a colour per block. Several: a subplot per
    student block, a colour per run (runs may map a block to different teacher layers: the legend says which)."""
    if len(runs) == 1:
        (name, blocks), = runs.items()
        fig, ax = plt.subplots(figsize=(7.5, 4.4), layout="constrained")
        colours = _colours(len(blocks))
        for colour, d in zip(colours, blocks.values()):
            _draw(ax, d["train"], colour, held_out=False)
            _draw(ax, d["eval"], colour, held_out=True)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss_hidden_L<j> / eval_loss_hidden_L<j>")
        ax.grid(alpha=0.3)
        fig.suptitle(f"Per-layer feature loss: {name}", fontsize=12)
        entries = [(d["label"], c) for d, c in zip(blocks.values(), colours)]
    else:
        all_blocks = sorted({j for blocks in runs.values() for j in blocks})
        nrows, ncols = _grid(len(all_blocks))
        fig, grid = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows + 0.4),
                                 squeeze=False, layout="constrained")
        colours = _colours(len(runs))
        for ax, j in zip(grid.flat, all_blocks):
            targets = sorted({blocks[j].get("teacher") for blocks in runs.values()
                              if j in blocks and blocks[j].get("teacher") is not None})
            for colour, blocks in zip(colours, runs.values()):
                if j in blocks:
                    _draw(ax, blocks[j]["train"], colour, held_out=False)
                    _draw(ax, blocks[j]["eval"], colour, held_out=True)
            mapped = f" -> teacher layer {', '.join(map(str, targets))}" if targets else ""
            ax.set_title(f"student block {j}{mapped}", fontsize=11)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"loss_hidden_L{j}")
            ax.grid(alpha=0.3)
        for ax in grid.flat[len(all_blocks):]:
            ax.set_visible(False)
        fig.suptitle("Per-layer feature loss", fontsize=13)
        entries = []
        for (name, blocks), colour in zip(runs.items(), colours):
            pairs = ", ".join(f"{j}->{d['teacher']}" for j, d in blocks.items() if d.get("teacher") is not None)
            entries.append((f"{name} (map {pairs})" if pairs else name, colour))
    _legend_below(fig, entries)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_cosine_heatmaps(runs: dict[str, tuple[list[str], list[int], np.ndarray]], out: Path) -> Path:
    """runs: {run name: (row labels "block j -> layer t", eval steps, cosine [rows, steps])}; one panel per run, one
    shared colour scale, values written in the cells when there are few enough."""
    finite = np.concatenate([m[np.isfinite(m)] for _, _, m in runs.values()] or [np.array([])])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    n = len(runs)
    widths = [max(3.5, 0.55 * len(steps) + 1.8) for _, steps, _ in runs.values()]
    height = max(2.6, 0.45 * max(len(rows) for rows, _, _ in runs.values()) + 1.9)
    fig, axes = plt.subplots(1, n, figsize=(sum(widths) + 1.4, height), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": widths})
    image = None
    for ax, (name, (rows, steps, matrix)) in zip(axes.flat, runs.items()):
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", vmin=lo, vmax=hi,
                          interpolation="nearest")
        ax.set_yticks(range(len(rows)), rows, fontsize=9)
        every = max(1, math.ceil(len(steps) / 16))
        ticks = list(range(0, len(steps), every))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=9, rotation=45 if len(ticks) > 8 else 0)
        ax.set_xlabel("evaluation at optimizer step")
        if ax is axes.flat[0]:
            ax.set_ylabel("student block -> teacher layer")
        ax.set_title(name if n > 1 else f"Held-out cosine(P_j(h_j), H_t): {name}", fontsize=11)
        if matrix.size <= ANNOTATE_CELLS:
            mid = (lo + hi) / 2
            for r in range(matrix.shape[0]):
                for c in range(matrix.shape[1]):
                    v = matrix[r, c]
                    if np.isfinite(v):
                        ax.text(c, r, f"{v:.3f}", ha="center", va="center", fontsize=8,
                                color="black" if v > mid else "white")
    if n > 1:
        fig.suptitle("Held-out cosine between projected student blocks and their teacher layers", fontsize=12)
    fig.colorbar(image, ax=list(axes.flat), label="cosine similarity", shrink=0.9)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_ablation(result: dict, out: Path) -> Path:
    """`distill ablate`'s comparison figure: held-out perplexity and KL to the teacher per finished variant
    (bars), with the teacher's and the untrained student's values as reference lines; one more panel of the
    mean benchmark accuracy when the ablation scored benchmarks. `result` is ablation.json's content."""
    rows = [r for r in result["rows"] if r.get("status") == "done"]
    names = [r["variant"] for r in rows]
    teacher, pruned = result["baseline"]["teacher"], result["baseline"].get("pruned") or {}
    panels = [("heldout_perplexity", "held-out perplexity", "perplexity (lower is better)"),
              ("heldout_kl", "KL(teacher || student), T = 1", "KL in nats/token (lower is better)")]
    if result.get("tasks"):
        panels.append(("mean_accuracy", f"mean accuracy over {len(result['tasks'])} tasks", "accuracy"))

    def value(metrics: dict, key: str):
        if key == "mean_accuracy":
            accs = [metrics.get(t) for t in result["tasks"] if metrics.get(t) is not None]
            return sum(accs) / len(accs) if accs else None
        return metrics.get(key)

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.35 * len(names) + 2.9), squeeze=False)
    colour = _colours(1)[0]
    for ax, (key, title, xlabel) in zip(axes[0], panels):
        vals = [value(r["metrics"], key) for r in rows]
        y = np.arange(len(names))
        ax.barh(y, [v if v is not None else 0 for v in vals], color=colour)
        for yi, v in zip(y, vals):
            if v is not None:
                ax.text(v, yi, f" {v:.3g}", va="center", fontsize=8)
        for ref, label, style in ((teacher, "teacher", "-"), (pruned, "pruned (untrained)", "--")):
            v = value(ref, key)
            if v is not None:
                ax.axvline(v, color="0.3", linestyle=style, linewidth=1, label=f"{label} {v:.3g}")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.suptitle(f"Ablation over one cache ({len(names)} variants)")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI, bbox_inches="tight")  # the legends sit below the axes, outside tight_layout
    plt.close(fig)
    return out

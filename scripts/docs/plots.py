"""The results pages' figures: paired differences with their error bars, held-out curves over training tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scripts.docs.tables import LABEL, divergence, tokens_per_step

CURVE_KEYS = ("eval_loss_ce", "eval_loss_kl")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
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


def plot_curves(curves: dict[str, list[dict]], runs: dict[str, dict], path: Path, labels: dict[str, str]
                ) -> Path | None:
    """Held-out CE (every variant) and KL (the distilled ones) against training tokens, one line per variant."""
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    others = []
    for i, v in enumerate(v for v in runs if v in curves):  # one color per variant in both panels
        tokens = tokens_per_step(runs[v])
        for ax, key in zip(axes, CURVE_KEYS):
            if key == "eval_loss_kl" and divergence(runs[v]) != "kl":
                others.append(labels.get(v, v))  # another divergence's scale: in the trend table only
                continue
            points = [(c["step"] * tokens / 1e5, c[key]) for c in curves[v] if key in c]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, color=colors[i % len(colors)], label=labels.get(v, v))
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

"""loss.png: the training and held-out loss against the step, and below them the held-out accuracies when
the task reports any (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path


def smoothed_minimum(smoothing: float, classes: int) -> float:
    """The lowest value of cross entropy with label smoothing ``smoothing`` over ``classes`` (torch's: that
    mass spread uniformly over every class): the entropy of the smoothed target."""
    import math
    if smoothing <= 0:
        return 0.0
    top, rest = 1 - smoothing + smoothing / classes, smoothing / classes
    return -top * math.log(top) - (classes - 1) * rest * math.log(rest)


def accuracy_keys(records: list[dict]) -> list[str]:
    """The held-out metrics drawn as accuracies: ``accuracy``, ``*_accuracy`` and ``exact_match`` (fractions)."""
    keys: list[str] = []
    for r in records:
        for k in r:
            if (k == "accuracy" or k.endswith("_accuracy") or k == "exact_match") and k not in keys:
                keys.append(k)
    return keys


def plot_losses(records: list[dict], path: Path, title: str,
                labels: tuple[str, str] = ("training loss", "held-out loss")) -> dict[str, list[str]]:
    """Write ``path``; ``labels`` name the two loss curves (what each loss is: they need not be the same
    quantity, e.g. label-smoothed training loss against plain held-out cross entropy). Returns the legend
    labels drawn, per panel ("loss" and, when there are accuracies, "accuracy")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    accuracies = accuracy_keys(records)
    panels = 2 if accuracies else 1
    fig, axes = plt.subplots(panels, 1, figsize=(6.4, 4 + 2.6 * (panels - 1)), dpi=100, sharex=True, squeeze=False)
    drawn: dict[str, list[str]] = {"loss": []}
    ax = axes[0][0]
    for points, label, style in ((train, labels[0], "-"), (val, labels[1], "o-")):
        if points:
            ax.plot(*zip(*points), style, label=textwrap.fill(label, 52), markersize=3)
            drawn["loss"].append(label)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")   # losses fall from the upper left: that corner is empty
    if accuracies:
        ax = axes[1][0]
        drawn["accuracy"] = []
        for key in accuracies:
            points = [(r["step"], 100 * r[key]) for r in records if key in r]
            label = f"held-out {key.replace('_', ' ')}"
            ax.plot(*zip(*points), "o-", label=label, markersize=3)
            drawn["accuracy"].append(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return drawn

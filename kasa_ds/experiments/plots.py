"""The comparisons as figures: evaluation curves per method (mean over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .stats import final_runs


def plot_methods(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in runs):
        curves = [r["curve"] for r in runs if r["method"] == method]
        steps = [p["step"] for p in curves[0]]
        for ax, key in zip(axes, ("accuracy", "loss")):
            values = torch.tensor([[p[key] for p in c] for c in curves])
            mean = values.mean(0)
            std = values.std(0) if len(curves) > 1 else torch.zeros_like(mean)
            ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
    for ax, key in zip(axes, ("eval accuracy", "eval loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(result: dict, path: Path) -> None:
    """Validation accuracy and training loss (mean over the final seeds, ±std band) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in final_runs(result).items():
        steps = [p["step"] for p in runs[0]["curve"]]
        losses = [smooth(r["train_loss"]) for r in runs]
        for ax, values, x in ((axes[0], [[p["val_accuracy"] for p in r["curve"]] for r in runs], steps),
                              (axes[1], losses, range(1, len(losses[0]) + 1))):
            v = torch.tensor(values)
            mean, std = v.mean(0), (v.std(0) if len(values) > 1 else torch.zeros(v.shape[1]))
            ax.plot(list(x), mean, label=method)
            ax.fill_between(list(x), mean - std, mean + std, alpha=0.15)
    for ax, label in zip(axes, ("validation accuracy", "training loss (moving mean of 10 steps)")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def smooth(values: list[float], width: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


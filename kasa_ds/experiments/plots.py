"""The comparisons as figures: evaluation curves per method (mean over seeds)."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .stats import final_runs


def plot_methods(runs: list[dict], path: Path) -> None:
    """Eval accuracy and loss of the method comparison (mean over seeds, ±std band) against steps."""
    fig, axes = figure()
    for method in dict.fromkeys(r["method"] for r in runs):
        curves = [r["curve"] for r in runs if r["method"] == method]
        steps = [p["step"] for p in curves[0]]
        for ax, key in zip(axes, ("accuracy", "loss")):
            band(ax, steps, [[p[key] for p in c] for c in curves], method)
    finish(fig, axes, ("eval accuracy", "eval loss"), path)


def plot(result: dict, path: Path) -> None:
    """Validation accuracy and training loss (mean over the final seeds, ±std band) against steps."""
    fig, axes = figure()
    for method, runs in final_runs(result).items():
        steps = [p["step"] for p in runs[0]["curve"]]
        losses = [smooth(r["train_loss"]) for r in runs]
        band(axes[0], steps, [[p["val_accuracy"] for p in r["curve"]] for r in runs], method)
        band(axes[1], list(range(1, len(losses[0]) + 1)), losses, method)
    finish(fig, axes, ("validation accuracy", "training loss (moving mean of 10 steps)"), path)


def figure():
    """A figure of two panels side by side, drawn off screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(11, 4))


def band(ax, x: list, values: list[list[float]], label: str) -> None:
    """The mean of ``values`` (one row per seed) against ``x``, with a ±std band."""
    v = torch.tensor(values)
    mean, std = v.mean(0), (v.std(0) if len(values) > 1 else torch.zeros(v.shape[1]))
    ax.plot(x, mean, label=label)
    ax.fill_between(x, mean - std, mean + std, alpha=0.15)


def finish(fig, axes, labels: tuple[str, str], path: Path) -> None:
    for ax, label in zip(axes, labels):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def smooth(values: list[float], width: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]

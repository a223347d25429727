"""PNG plots of a compare report (matplotlib, Agg backend): learning curves, final IQM,
probability of improvement and performance profiles, each with its 95% CI.

Input is the report dict of ``tilt.compare.report.write_report`` (already aggregated by rliable).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_learning_curves(curves: dict[str, dict], metric: str, path: Path) -> str:
    """IQM of eval/<metric> over training steps per method, with its CI band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, c in curves.items():
        (line,) = ax.plot(c["steps"], c["iqm"], marker="o", label=method)
        ax.fill_between(c["steps"], c["low"], c["high"], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="training step", ylabel=f"held-out {metric} (IQM)", title="learning curves (95% CI)")
    ax.legend()
    return _save(plt, fig, path)


def plot_intervals(stats: dict[str, Any], path: Path) -> str:
    """Final IQM and optimality gap per method as points with CI bars."""
    plt = _pyplot()
    methods = list(stats["iqm"])
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 0.6 * len(methods) + 1.6), sharey=True)
    for ax, key, label in ((axes[0], "iqm", "IQM (higher is better)"),
                           (axes[1], "optimality_gap", "optimality gap (lower is better)")):
        points = [stats[key][m]["point"] for m in methods]
        lows = [stats[key][m]["point"] - stats[key][m]["low"] for m in methods]
        highs = [stats[key][m]["high"] - stats[key][m]["point"] for m in methods]
        ax.errorbar(points, range(len(methods)), xerr=[lows, highs], fmt="o", capsize=4)
        ax.set(xlabel=label)
    axes[0].set_yticks(range(len(methods)), methods)
    return _save(plt, fig, path)


def plot_improvement(stats: dict[str, Any], path: Path) -> str:
    """P(method > baseline) with CI bars; 0.5 = no difference."""
    plt = _pyplot()
    poi = stats["improvement_vs_baseline"]
    methods = list(poi)
    fig, ax = plt.subplots(figsize=(6.4, 0.6 * len(methods) + 1.6))
    points = [poi[m]["point"] for m in methods]
    err = [[poi[m]["point"] - poi[m]["low"] for m in methods], [poi[m]["high"] - poi[m]["point"] for m in methods]]
    ax.errorbar(points, range(len(methods)), xerr=err, fmt="o", capsize=4)
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set_yticks(range(len(methods)), methods)
    ax.set(xlim=(0, 1), xlabel=f"P(method > {stats['baseline']})", title="probability of improvement (95% CI)")
    return _save(plt, fig, path)


def plot_profiles(profiles: dict[str, dict], metric: str, path: Path) -> str:
    """Performance profiles: fraction of runs with score > tau, with CI bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, p in profiles.items():
        (line,) = ax.plot(p["tau"], p["profile"], label=method)
        ax.fill_between(p["tau"], p["low"], p["high"], color=line.get_color(), alpha=0.2)
    ax.set(xlabel=f"{metric} threshold tau", ylabel="fraction of runs with score > tau",
           title="performance profiles (95% CI)", ylim=(0, 1.02))
    ax.legend()
    return _save(plt, fig, path)


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """Every plot the report has data for; returns the PNG file names written in ``out_dir``."""
    stats, metric = report["stats"], report["metric"]
    names = []
    if report.get("curves"):
        names.append(plot_learning_curves(report["curves"], metric, out_dir / "learning_curves.png"))
    names.append(plot_intervals(stats, out_dir / "final_iqm.png"))
    if stats["improvement_vs_baseline"]:
        names.append(plot_improvement(stats, out_dir / "improvement.png"))
    names.append(plot_profiles(stats["performance_profiles"], metric, out_dir / "performance_profiles.png"))
    return names

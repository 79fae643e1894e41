"""The run report's plot: reward-model accuracy, policy reward, KL and win-rate per round, or
over the run's wall time in continuous mode (its steps have no rounds to count)."""

from __future__ import annotations

from pathlib import Path


def plot_rounds(reports: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    continuous = any((r.get("live") or {}).get("mode") == "continuous" for r in reports)
    if continuous:
        rounds = [((r.get("live") or {}).get("elapsed_s") or 0.0) / 60.0 for r in reports]
    else:
        rounds = [r["round"] + 1 for r in reports]
    series = {
        "reward-model accuracy (held-out pairs)": [r["reward_model"].get("validation_accuracy") for r in reports],
        "policy reward (reward model)": [r.get("reward") for r in reports],
        "KL to reference (per sequence)": [r.get("kl") for r in reports],
        "win-rate vs initial policy (annotator rule)": [r.get("win_rate") for r in reports],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (title, values) in zip(axes.flat, series.items()):
        points = [(x, y) for x, y in zip(rounds, values) if y is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if "win-rate" in title:
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes since the run began (one point per training step)" if continuous else "round")
    fig.suptitle("hitl run (continuous)" if continuous else "hitl run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

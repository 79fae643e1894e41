"""What a search leaves in OUT: trials.jsonl as it goes, then the table, the plot, best.yaml."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback


class TrialLog(Callback):
    """Appends one line per trial event to OUT/trials.jsonl: start, complete, error."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, event: str, trial, **extra: Any) -> None:
        line = {"event": event, "trial": trial.trial_id, "time": time.time(), "values": _plain(trial.config), **extra}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write("start", trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write("complete", trial, last=_plain(trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write("error", trial)


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


@dataclass
class TrialRow:
    trial: str
    values: dict[str, Any]
    rounds: int
    objective: float  # the last reported value
    history: list[float] = field(default_factory=list)  # the objective after each round
    status: str = "complete"  # complete | stopped early | error


def rows_from(grid, metric: str, max_rounds: int) -> list[TrialRow]:
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        history = [float(v) for v in frame[metric]] if frame is not None and metric in frame else []
        metrics = result.metrics or {}
        rounds = int(metrics.get("round", len(history)))
        status = "error" if result.error else ("complete" if rounds >= max_rounds else "stopped early")
        values = {k: v for k, v in (result.config or {}).items()}
        rows.append(TrialRow(str(metrics.get("trial_id", Path(result.path).name)), values, rounds,
                             float(metrics.get(metric, math.nan)), history, status))
    return sorted(rows, key=lambda r: r.trial)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The highest objective among trials that ran every round (else among all reported)."""
    scored = [r for r in rows if not math.isnan(r.objective)]
    whole = [r for r in scored if r.status == "complete"]
    pool = whole or scored
    return max(pool, key=lambda r: r.objective) if pool else None


def write_results(out: Path, rows: list[TrialRow], metric: str, best: TrialRow | None, best_config: dict | None) -> str:
    """results.csv, results.md, search.png and best.yaml; returns the Markdown table."""
    import yaml

    names = sorted({k for r in rows for k in r.values})
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "rounds", metric, *names])
        for r in rows:
            w.writerow([r.trial, r.status, r.rounds, r.objective, *[r.values.get(n) for n in names]])
    header = f"| trial | status | rounds | {metric} | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (4 + len(names))]
    for r in rows:
        mark = " **best**" if best is not None and r.trial == best.trial else ""
        lines.append(f"| {r.trial}{mark} | {r.status} | {r.rounds} | {r.objective:.4f} | "
                     + " | ".join(_fmt(r.values.get(n)) for n in names) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    if best_config is not None:
        (out / "best.yaml").write_text(yaml.safe_dump(best_config, sort_keys=False), encoding="utf-8")
    _plot(out / "search.png", rows, metric, best)
    return table


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(path: Path, rows: list[TrialRow], metric: str, best: TrialRow | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        style = {"linewidth": 2.5} if best is not None and r.trial == best.trial else {"alpha": 0.6}
        left.plot(range(1, len(r.history) + 1), r.history, marker="o", label=r.trial, **style)
    left.set_xlabel("round")
    left.set_ylabel(metric)
    left.set_title("each trial, round by round (ASHA stops the weak ones)")
    if len(rows) <= 12:
        left.legend(fontsize=7)
    order = list(range(1, len(rows) + 1))
    right.bar(order, [r.objective for r in rows], color=["tab:green" if best is not None and r.trial == best.trial else "tab:gray" for r in rows])
    right.set_xlabel("trial")
    right.set_ylabel(f"last {metric}")
    right.set_title("last reported value")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Writes deploy/grafana/hitl.json, a Grafana dashboard of every series services/telemetry.py
defines (one panel per series, one row per role), so the dashboard and the code cannot drift:

    python deploy/grafana/make_dashboard.py        # rewrite hitl.json
    python deploy/grafana/make_dashboard.py --check   # exit 1 when hitl.json is not what it would write

Import hitl.json in Grafana (Dashboards > Import) and pick the Prometheus data source that
scrapes the Ray nodes' metrics ports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.telemetry import COORDINATOR, GENERATION, REWARD_MODEL, TRAINER  # noqa: E402

OUT = Path(__file__).with_name("hitl.json")
ROLES = (("Coordinator", "coordinator", COORDINATOR, "run"), ("Trainer group", "trainer", TRAINER, "rank"),
         ("Reward model", "reward_model", REWARD_MODEL, "replica"), ("Generation", "generation", GENERATION, "replica"))


def _expr(role: str, name: str, by: str) -> tuple[str, str]:
    metric = f"ray_hitl_{role}_{name}"
    if name == "latency_seconds":
        return (f"histogram_quantile(0.95, sum by (le, {by}) (rate({metric}_bucket[5m])))", f"p95 {{{{{by}}}}}")
    if name == "stage":
        return (f"max by (stage) ({metric})", "{{stage}}")
    return (f"max by ({by}) ({metric})", f"{{{{{by}}}}}")


def dashboard() -> dict:
    panels, y, pid = [], 0, 1
    for title, role, names, by in ROLES:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, (name, description) in enumerate(names.items()):
            expr, legend = _expr(role, name, by)
            panels.append({
                "type": "timeseries", "title": name.replace("_", " "), "description": description, "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 7, "w": 8, "x": 8 * (i % 3), "y": y + 7 * (i // 3)},
                "targets": [{"refId": "A", "expr": expr, "legendFormat": legend,
                             "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
            })
            pid += 1
        y += 7 * ((len(names) + 2) // 3)
    return {
        "title": "hitl: the loop", "uid": "hitl-loop", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s", "tags": ["hitl", "ray"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


def main() -> int:
    text = json.dumps(dashboard(), indent=2) + "\n"
    if "--check" in sys.argv:
        return 0 if OUT.exists() and OUT.read_text() == text else 1
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""deploy/grafana/hitl.json charts every series the roles export, and is what
deploy/grafana/make_dashboard.py writes (so it cannot drift from services/telemetry.py)."""

import json
import subprocess
import sys
from pathlib import Path

from services.telemetry import series_names

DASHBOARD = Path("deploy/grafana/hitl.json")


def test_the_dashboard_is_current():
    check = subprocess.run([sys.executable, "deploy/grafana/make_dashboard.py", "--check"], capture_output=True, text=True)
    assert check.returncode == 0, "deploy/grafana/hitl.json is stale: run python deploy/grafana/make_dashboard.py"


def test_every_series_has_a_panel():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for role, names in series_names().items():
        for name in names:
            assert name in exprs, f"{name} ({role}) has no panel"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))

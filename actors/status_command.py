"""`hitl status RUN_DIR` | `hitl status --address ADDR [RUN_ID]`: how a run is doing, on one screen.

    hitl status runs/local                      # the run directory's status.json and report.json
    hitl status --address ray://head:10001      # every run the cluster's coordinators have reported
    hitl status --json runs/local               # the status record itself
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from services.command_line import fail


@click.command("status")
@click.argument("target", required=False)
@click.option("--address", default=None, help="A Ray cluster: read the statuses its runs keep there (TARGET: a run id prefix).")
@click.option("--json", "as_json", is_flag=True, help="Print the status record as JSON.")
def status_command(target: str | None, address: str | None, as_json: bool) -> None:
    """Stage, round, policy version, feedback, the last figures and the last error of a run."""
    from actors.status import read_cluster_statuses, render

    if address is None:
        if not target:
            fail("give a RUN_DIR (or --address ADDR for runs on a cluster)")
        run_dir = Path(target)
        path = run_dir / "status.json"
        if not path.exists():
            fail(f"{run_dir}: no status.json here (not a run directory, or a run from before `hitl status`)")
        statuses = [json.loads(path.read_text())]
        report_path = run_dir / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else None
    else:
        import ray

        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        try:
            statuses = [s for s in read_cluster_statuses() if not target or s.get("run_id", "").startswith(target)]
        finally:
            ray.shutdown()
        if not statuses:
            fail(f"{address}: no run has reported a status" + (f" with an id starting {target!r}" if target else ""))
        report = None
    if as_json:
        click.echo(json.dumps(statuses if address else statuses[0], indent=2))
        return
    click.echo("\n\n".join(render(s, report) for s in statuses))

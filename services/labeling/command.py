"""The `hitl label` command (registered in hitl/cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from services.command_line import client_options, fail

_HELP = """Label tasks in this terminal, one key per judgement.

Pulls tasks of PROJECT leased to ANNOTATOR-ID, shows the prompt and the
candidates side by side (stacked when there are more than two), and submits
each judgement over gRPC. Every judgement is first written to a local journal
and resent with the same feedback_id until the server acks it, so a dropped
connection loses nothing: keep labeling offline with the tasks already pulled,
and what was not delivered when you quit is sent first next time.

\b
Keys (the left answer is A, the right one B):
  a / b      A / B is better (preference strength 0.5)
  A / B      Shift: A / B is clearly better (strength 1.0)
  t          tie            x   both bad
  1-9 Enter  ranking, best first ("312"; "3=12" ties 3 and 1)
  r          ratings on the task's scales, one number per aspect
  e          correction ($EDITOR when set, else typed here, ending with '.')
  f          flag: harmful / PII / spam / other (with a note)
  s          skip          ?   help          q   quit
\b
Lead time per task is measured and stored; --ask-confidence also asks for a
confidence 1-5 after each judgement (stored as 0.2-1.0).
"""


@click.command("label", help=_HELP)
@client_options
@click.option("--project", required=True, help="The project whose tasks to judge.")
@click.option("--annotator-id", required=True, envvar="HITL_ANNOTATOR", help="Who judges (or $HITL_ANNOTATOR).")
@click.option("--journal", type=click.Path(dir_okay=False), default=None,
              help="Journal of judgements (default ~/.cache/hitl/label-journal-ANNOTATOR.jsonl).")
@click.option("--prefetch", type=click.IntRange(1, 1000), default=5, show_default=True, help="Tasks pulled ahead (what can be labeled offline).")
@click.option("--lease-seconds", type=click.IntRange(0), default=0, help="Lease of each pulled task (default: the server's).")
@click.option("--guidelines-version", default="", help="Guidelines version stored with every judgement.")
@click.option("--ask-confidence", is_flag=True, help="Ask for a confidence 1-5 after each judgement.")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True, help="Show each task's candidates in random order (against position bias).")
@click.option("--flush-seconds", type=click.FloatRange(0), default=5.0, show_default=True, help="On quit, how long to wait for unsent judgements.")
def label(server, token, tls_ca, client_cert, client_key, project, annotator_id, journal, prefetch, lease_seconds,
          guidelines_version, ask_confidence, shuffle, flush_seconds) -> None:
    from services.labeling.journal import default_journal_path
    from services.labeling.terminal import SessionOptions, run_label

    if (client_cert is None) != (client_key is None):
        fail("--tls-cert and --tls-key must be given together")
    opts = SessionOptions(
        project=project,
        annotator_id=annotator_id,
        prefetch=prefetch,
        lease_seconds=lease_seconds,
        guidelines_version=guidelines_version,
        ask_confidence=ask_confidence,
        shuffle=shuffle,
        flush_seconds=flush_seconds,
    )
    path = Path(journal) if journal else default_journal_path(annotator_id)
    sys.exit(run_label(server=server, token=token, opts=opts, journal_path=path,
                       root_certificates=tls_ca, client_cert=client_cert, client_key=client_key))

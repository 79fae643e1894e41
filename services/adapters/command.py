"""`hitl adapters serve`: receivers for the webhooks of labeling tools (Argilla, Label Studio)."""

from __future__ import annotations

import logging

import click

from services.command_line import fail


@click.group()
def adapters() -> None:
    """Receivers for the webhooks of labeling tools (Argilla, Label Studio)."""


@adapters.command("serve")
@click.option("--feedback", "feedback_addr", default="127.0.0.1:50051", show_default=True, help="Feedback service address.")
@click.option("--token", envvar="HITL_TOKEN", default=None, help="Bearer token for the feedback service (or $HITL_TOKEN).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None, help="CA bundle: reach the service with TLS.")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP bind address.")
@click.option("--port", type=int, default=8088, show_default=True, help="HTTP port.")
@click.option("--project", default="default", show_default=True, help="Project of records whose payload names none.")
@click.option("--argilla-secret", envvar="HITL_ARGILLA_SECRET", default=None, help="Argilla webhook secret (whsec_...): verify signatures.")
@click.option("--label-studio-token", envvar="HITL_LABEL_STUDIO_TOKEN", default=None, help="Require 'Authorization: Token T' on Label Studio webhooks.")
def adapters_serve(feedback_addr: str, token: str | None, tls_ca: str | None, host: str, port: int, project: str,
                   argilla_secret: str | None, label_studio_token: str | None) -> None:
    """Serve POST /argilla and POST /label-studio until SIGINT/SIGTERM."""
    from aiohttp import web

    from services.adapters.app import make_app
    from services.feedback.client import Backoff, FeedbackClient

    if not argilla_secret:
        logging.getLogger("hitl.adapters").warning("no --argilla-secret: Argilla webhook signatures are not checked")
    # Argilla waits 20 s for an answer and then retries: give up on the service before that
    client = FeedbackClient(feedback_addr, token, root_certificates=tls_ca, timeout_s=10.0, backoff=Backoff(give_up_after_s=15.0))
    try:
        app = make_app(client, project=project, argilla_secret=argilla_secret, label_studio_token=label_studio_token)
    except ValueError as err:
        fail(str(err))
    try:
        web.run_app(app, host=host, port=port, print=lambda msg: click.echo(msg, err=True))
    finally:
        client.close()

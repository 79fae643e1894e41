"""What the `hitl` commands share: how a command fails, and the options and client of the
commands that talk to a feedback service."""

from __future__ import annotations

import sys

import click


def fail(message: str) -> None:
    """Print `error: message` and exit with status 2 (a usage or input error)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def client_options(fn):
    """--server, --token, --tls-ca, --tls-cert, --tls-key: how to reach a feedback service."""
    options = [
        click.option("--server", "server", default="127.0.0.1:50051", show_default=True, help="Service address."),
        click.option("--token", envvar="HITL_TOKEN", default=None, help="Bearer token (or $HITL_TOKEN)."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None, help="CA bundle: connect with TLS."),
        click.option("--tls-cert", "client_cert", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Client certificate (mutual TLS)."),
        click.option("--tls-key", "client_key", type=click.Path(exists=True, dir_okay=False), default=None, help="Client key (mutual TLS)."),
    ]
    for option in reversed(options):  # decorators apply bottom-up: --server comes first in --help
        fn = option(fn)
    return fn


def make_client(server: str, token: str | None, tls_ca: str | None, client_cert: str | None, client_key: str | None, **kw):
    """A `FeedbackClient` from the `client_options`."""
    from services.feedback.client import FeedbackClient

    if (client_cert is None) != (client_key is None):
        fail("--tls-cert and --tls-key must be given together")
    return FeedbackClient(server, token, root_certificates=tls_ca, client_cert=client_cert, client_key=client_key, **kw)

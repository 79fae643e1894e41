"""The `hitl label-web` command (registered in hitl/cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

_HELP = """Serve a labeling web page in front of the feedback service.

Annotators open http://HOST:PORT/, sign in (with their personal token from
--tokens-file; through a sign-in proxy with `auth: {mode: header}` in the config;
or, on a loopback address only, with a self-declared annotator id), and judge
the tasks of PROJECT leased to them: the prompt and the candidates side by
side, with buttons and the terminal session's keys (a/b, Shift for "clearly",
t tie, x both bad, digits then Enter a ranking, r ratings, e correction,
f flag, s skip, ? help). Every judgement carries the guidelines version and
a feedback_id made once in the browser; the page keeps it until the service
has stored it and resends it unchanged, so it is stored once.

Values come from --config FILE (YAML; unknown keys are errors) and from the
options below, which win over the file. Off a loopback address the page needs
tokens or a sign-in proxy, and TLS (--tls-cert-file/--tls-key-file) unless
--insecure-http says plain HTTP is meant (a TLS-terminating proxy in front).
"""


@click.command("label-web", help=_HELP)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file.")
@click.option("--server", default=None, help="Feedback service address (default 127.0.0.1:50051).")
@click.option("--token", envvar="HITL_TOKEN", default=None, help="Bearer token (or $HITL_TOKEN).")
@click.option("--project", default=None, help="The project whose tasks to judge.")
@click.option("--host", default=None, help="HTTP bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="HTTP port (default 8089).")
@click.option("--tls-ca", default=None, help="CA bundle: reach the service with TLS.")
@click.option("--tls-cert", default=None, help="Client certificate (mutual TLS).")
@click.option("--tls-key", default=None, help="Client key (mutual TLS).")
@click.option("--guidelines-file", default=None, help="Guidelines shown on the page (plain text).")
@click.option("--guidelines-version", default=None, help="Stored with every judgement (default: a digest of the guidelines).")
@click.option("--prefetch", type=int, default=None, help="Tasks leased ahead per annotator (default 2).")
@click.option("--lease-seconds", type=int, default=None, help="Lease of each pulled task (default: the service's).")
@click.option("--shuffle/--no-shuffle", default=None, help="Show candidates in random order per task (default on).")
@click.option("--tokens-file", default=None,
              help="Annotators' personal tokens (YAML, chmod 600): sign-in by token (auth.tokens_file).")
@click.option("--tls-cert-file", default=None, help="Serve the page over HTTPS with this certificate chain.")
@click.option("--tls-key-file", default=None, help="The HTTPS certificate's private key (chmod 600).")
@click.option("--insecure-http", is_flag=True, default=None, help="Plain HTTP off the loopback address, on purpose.")
def label_web(config_file: str | None, **options) -> None:
    from services.labeling.web.config import ConfigError, load_web_config, resolve_guidelines, server_ssl_context

    options["auth.tokens_file"] = options.pop("tokens_file")  # a key of the config's `auth` section
    try:
        cfg = load_web_config(Path(config_file) if config_file else None, options)
        guidelines = resolve_guidelines(cfg)
        ssl_context = server_ssl_context(cfg)
    except ConfigError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    serve(cfg, guidelines, ssl_context)


def serve(cfg, guidelines, ssl_context=None) -> None:
    """Run the page until SIGINT/SIGTERM (over HTTPS when `ssl_context` is given)."""
    from aiohttp import web

    from services.labeling.web.app import make_app, make_client

    client = make_client(cfg)
    try:
        app = make_app(cfg, client, guidelines)
        click.echo(f"labeling page for project {cfg.project!r} (guidelines {guidelines.version}, sign-in {cfg.auth.mode}); "
                   f"feedback service {cfg.server}", err=True)
        web.run_app(app, host=cfg.host, port=cfg.port, ssl_context=ssl_context, print=lambda msg: click.echo(msg, err=True))
    finally:
        client.close()

"""`hitl adapters serve`: receivers for the webhooks of labeling tools (Argilla, Label Studio).

Two ways to configure the routes:

* `--config FILE` (services/adapters/config.py): per route its credential (a file or a
  variable's name), the projects it may write and its tool users' annotator ids.
* The simple command line, without `--config`: one `--project` for both routes, tool users
  recorded as `<tool>:<user>`, a route served when its credential is given
  (`--argilla-secret[-file]`, `--label-studio-token[-file]`).

Everything is checked (configuration, credentials, TLS files, the outbox) before the port
is bound, and a failure exits with status 2 and a message naming the option.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from services.command_line import fail

log = logging.getLogger("hitl.adapters")

SERVER_OPTIONS = ("host", "port", "tls_cert", "tls_key", "insecure", "allow_unauthenticated", "outbox", "outbox_max_records")
ROUTE_OPTIONS = ("project", "argilla_secret", "argilla_secret_file", "label_studio_token", "label_studio_token_file")


@click.group()
def adapters() -> None:
    """Receivers for the webhooks of labeling tools (Argilla, Label Studio)."""


@adapters.command("serve")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Adapters configuration (YAML): routes (credential, projects, users) and the options below.")
@click.option("--feedback", "feedback_addr", default="127.0.0.1:50051", show_default=True, help="Feedback service address.")
@click.option("--token", envvar="HITL_TOKEN", default=None, help="Bearer token for the feedback service (or $HITL_TOKEN).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None, help="CA bundle: reach the service with TLS.")
@click.option("--host", default=None, help="HTTP bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="HTTP port (default 8088).")
@click.option("--tls-cert", default=None, help="PEM certificate: serve HTTPS (with --tls-key).")
@click.option("--tls-key", default=None, help="PEM private key of --tls-cert (others may not read it).")
@click.option("--insecure", is_flag=True, default=None, help="Serve plain HTTP off loopback on purpose (a TLS proxy in front).")
@click.option("--allow-unauthenticated", is_flag=True, default=None,
              help="Serve routes without a credential too; refused unless --host is a loopback address.")
@click.option("--outbox", default=None, help="Outbox file (SQLite; default hitl-data/adapters-outbox.db).")
@click.option("--outbox-max-records", type=click.IntRange(1), default=None,
              help="Most records the outbox holds before deliveries get 503 (default 100000).")
@click.option("--project", default=None, help="Without --config: the one project both routes write (default 'default').")
@click.option("--argilla-secret", envvar="HITL_ARGILLA_SECRET", default=None,
              help="Without --config: Argilla webhook secret (whsec_...) or $HITL_ARGILLA_SECRET; serves /argilla.")
@click.option("--argilla-secret-file", default=None, help="Without --config: a file holding the Argilla webhook secret.")
@click.option("--label-studio-token", envvar="HITL_LABEL_STUDIO_TOKEN", default=None,
              help="Without --config: require 'Authorization: Token T' (or $HITL_LABEL_STUDIO_TOKEN); serves /label-studio.")
@click.option("--label-studio-token-file", default=None, help="Without --config: a file holding the Label Studio token.")
def adapters_serve(config_path: str | None, feedback_addr: str, token: str | None, tls_ca: str | None, **options: Any) -> None:
    """Serve POST /argilla and POST /label-studio until SIGINT/SIGTERM."""
    from services.adapters.config import ConfigError, build_config, resolve, tls_context
    from services.adapters.outbox import Outbox, OutboxError

    try:
        cfg = build_config(config_values(click.get_current_context(), config_path, options))
        settings = resolve(cfg)
        ssl_context = tls_context(cfg)
        outbox = Outbox(settings.outbox, settings.outbox_max_records)
    except (ConfigError, OutboxError) as err:
        fail(str(err))
    _serve(cfg, settings, ssl_context, outbox, feedback_addr, token, tls_ca)


def config_values(ctx: click.Context, config_path: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The configuration's raw values: the file's, then the server options given here. Routes
    come from the file when there is one (a route option given too is refused, as it would
    be ignored), else from the simple options."""
    from services.adapters.config import ConfigError, read_config_file

    values = read_config_file(config_path) if config_path else {}
    values.update({k: options[k] for k in SERVER_OPTIONS if options[k] is not None})
    if config_path:
        given = [n for n in ROUTE_OPTIONS if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise ConfigError(f"{flags}: routes come from --config {config_path}; set them under its routes")
        return values
    values["routes"] = simple_routes(options)
    return values


def simple_routes(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Both routes, one project, `<tool>:<user>` annotators: the command line without --config."""
    from services.adapters.config import ConfigError

    routes = {}
    for key, direct, path in (("argilla", "argilla_secret", "argilla_secret_file"),
                              ("label_studio", "label_studio_token", "label_studio_token_file")):
        if options[direct] is not None and options[path] is not None:
            raise ConfigError(f"--{direct.replace('_', '-')} (or its variable) and --{path.replace('_', '-')}: give one")
        source = {"secret": options[direct]} if options[direct] is not None else {}
        if options[path] is not None:
            source = {"secret_file": options[path]}
        routes[key] = {"projects": [options["project"] or "default"], "map_unknown_users": "prefix", **source}
    return routes


def _serve(cfg, settings, ssl_context, outbox, feedback_addr: str, token: str | None, tls_ca: str | None) -> None:
    from aiohttp import web

    from services.adapters.app import make_app
    from services.adapters.config import ROUTES
    from services.feedback.client import Backoff, FeedbackClient

    for key, (tool, path, options) in ROUTES.items():
        route = settings.routes.get(tool)
        if route is None:
            log.warning("%s is not served: no credential (%s)", path, options)
        elif route.secret is None:
            log.warning("%s is served WITHOUT authentication (--allow-unauthenticated)", path)
        else:
            log.info("%s: projects %s", path, ", ".join(route.scope.projects))
    log.info("outbox %s holds %d records", settings.outbox, outbox.depth())
    # The forwarder does its own backoff: the client gives up soon so that failures get logged,
    # and the channel redials within seconds of the service coming back (gRPC's default grows to 2 min).
    client = FeedbackClient(feedback_addr, token, root_certificates=tls_ca, timeout_s=10.0, backoff=Backoff(give_up_after_s=5.0),
                            channel_options=(("grpc.max_reconnect_backoff_ms", 5000),))
    try:
        web.run_app(make_app(client, settings, outbox), host=cfg.host, port=cfg.port, ssl_context=ssl_context,
                    print=lambda msg: click.echo(msg, err=True))
    finally:
        client.close()
        outbox.close()

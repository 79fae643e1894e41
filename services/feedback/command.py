"""`hitl feedback …`: the feedback ingestion service and its data.

    hitl feedback serve [--store URL] [--port N] [--tokens FILE] [--tls-cert C --tls-key K [--tls-client-ca CA]]
    hitl feedback submit FILE.jsonl [--server ADDR] [--token T] [--stream]
    hitl feedback tasks load FILE.jsonl [--store URL]
    hitl feedback export --format hh-rlhf|ultrafeedback|jsonl|tasks-jsonl [--store URL] [--project P] [--output FILE]
    hitl feedback import --format hh-rlhf|ultrafeedback|jsonl|tasks-jsonl FILE [--store URL] [--project P] [--annotator-id A] [--tasks FILE]
    hitl feedback stats [--server ADDR] [--token T] [--project P]
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from services.command_line import client_options, fail, make_client
from services.feedback.config import DEFAULT_STORE, ConfigError, build_config


@click.group()
def feedback() -> None:
    """The feedback ingestion service and its data."""


@feedback.command()
@click.option("--store", default=None, help=f"Store URL (default {DEFAULT_STORE}).")
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="gRPC port (default 50051; 0 picks one).")
@click.option("--tokens", "tokens_file", default=None, help="Tokens file (YAML); without it every call is allowed.")
@click.option("--tls-cert", default=None, help="Server certificate (PEM).")
@click.option("--tls-key", default=None, help="Server private key (PEM).")
@click.option("--tls-client-ca", default=None, help="CA for client certificates: turns on mutual TLS.")
@click.option("--insecure", is_flag=True, default=None,
              help="Serve without TLS on a non-loopback --host on purpose (behind a TLS-terminating proxy).")
@click.option("--reflection", is_flag=True, default=None, help="Serve gRPC reflection.")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (default 9464; 0 picks one).")
@click.option("--metrics-keys", "metrics_keys_file", default=None,
              help="Bearer keys of the metrics endpoint, one per line (needed off the loopback address).")
@click.option("--no-metrics", is_flag=True, help="Do not serve metrics.")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None, help="Write the bound port here once serving.")
def serve(no_metrics: bool, ready_file: str | None, **options) -> None:
    """Run the feedback gRPC service until SIGINT/SIGTERM."""
    from services.feedback.auth import TokensFileError
    from services.feedback.server import serve_forever

    try:
        cfg = build_config({**options, "metrics_port": None} if no_metrics else options, keep_none=("metrics_port",) if no_metrics else ())
        asyncio.run(serve_forever(cfg, Path(ready_file) if ready_file else None))
    except (ConfigError, TokensFileError, FileNotFoundError) as err:
        fail(str(err))


@feedback.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@client_options
@click.option("--stream/--unary", default=True, show_default=True, help="StreamFeedback (resumable) or SubmitFeedback calls.")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=200, show_default=True)
def submit(path: str, server: str, token: str | None, tls_ca, client_cert, client_key, stream: bool, batch_size: int) -> None:
    """Submit records from a JSONL file (one FeedbackRecord in proto3 JSON per line)."""
    from hitl.feedback.v1 import feedback_pb2 as pb
    from services.feedback.client import FeedbackClientError, results_summary
    from services.feedback.jsonl import JsonlError, read_records

    try:
        records = list(read_records(Path(path)))
    except JsonlError as err:
        fail(str(err))
    with make_client(server, token, tls_ca, client_cert, client_key) as client:
        client.batch_size = batch_size
        try:
            results = client.stream(records).results if stream else client.submit(records)
        except FeedbackClientError as err:
            fail(str(err))
    for line, result in enumerate(results, start=1):
        if result.status == pb.RecordResult.STATUS_REJECTED:
            click.echo(f"{path}:{line}: rejected {result.feedback_id!r}: {result.field}: {result.reason}", err=True)
    summary = results_summary(results)
    click.echo(json.dumps(summary))
    if summary["rejected"]:
        sys.exit(1)


@feedback.group()
def tasks() -> None:
    """Labeling tasks."""


@tasks.command("load")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URL.")
def tasks_load(path: str, store: str) -> None:
    """Publish tasks from a JSONL file (one LabelingTask in proto3 JSON per line)."""
    from services.feedback.jsonl import JsonlError, read_tasks
    from services.feedback.store import open_store

    try:
        loaded = list(read_tasks(Path(path)))
    except JsonlError as err:
        fail(str(err))
    db = open_store(store)
    try:
        outcomes = db.add_tasks(loaded)
    finally:
        db.close()
    created = sum(o.created for o in outcomes)
    rejected = [(i, o.rejection) for i, o in enumerate(outcomes, start=1) if o.rejection]
    for line, rejection in rejected:
        click.echo(f"{path}: task {line}: {rejection.field}: {rejection.reason}", err=True)
    click.echo(json.dumps({"created": created, "existing": len(loaded) - created - len(rejected), "rejected": len(rejected)}))
    if rejected:
        sys.exit(1)


@feedback.command()
@click.option("--format", "fmt", type=click.Choice(["hh-rlhf", "ultrafeedback", "jsonl", "tasks-jsonl"]), required=True)
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URL.")
@click.option("--project", "projects", multiple=True, help="Only these projects (repeatable).")
@click.option("--after", type=int, default=0, show_default=True, help="Only records with seq above this watermark.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default="-", help="Output file (default stdout).")
def export(fmt: str, store: str, projects: tuple[str, ...], after: int, output: str) -> None:
    """Export pairs (hh-rlhf), ratings (ultrafeedback), raw records (jsonl) or tasks (tasks-jsonl)."""
    from services.feedback.export import export_lines
    from services.feedback.jsonl import write_lines
    from services.feedback.store import open_store

    db = open_store(store)
    try:
        with click.open_file(output, "w", encoding="utf-8") as out:
            n = write_lines(export_lines(db, fmt, list(projects) or None, after), out)
    finally:
        db.close()
    click.echo(f"wrote {n} lines", err=True)


@feedback.command("import")
@click.option("--format", "fmt", type=click.Choice(["hh-rlhf", "ultrafeedback", "jsonl", "tasks-jsonl"]), required=True)
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URL.")
@click.option("--project", default=None, help="hh-rlhf/ultrafeedback: the project to import into (default 'default'); jsonl/tasks-jsonl: import only this project.")
@click.option("--annotator-id", default=None, help="hh-rlhf/ultrafeedback: who the judgements are attributed to (default: the format's name).")
@click.option("--tasks", "tasks_path", type=click.Path(exists=True, dir_okay=False), default=None, help="jsonl: publish the tasks of this tasks-jsonl file first.")
def import_(fmt: str, path: str, store: str, project: str | None, annotator_id: str | None, tasks_path: str | None) -> None:
    """Import HH-RLHF, UltraFeedback, raw records (jsonl) or tasks (tasks-jsonl) into a store."""
    from services.feedback.formats import FormatError, import_file
    from services.feedback.store import open_store

    raw = fmt in ("jsonl", "tasks-jsonl")
    if raw and annotator_id is not None:
        fail(f"--annotator-id does not apply to --format {fmt} (records name their annotators)")
    if tasks_path is not None and fmt != "jsonl":
        fail("--tasks goes with --format jsonl")
    db = open_store(store)
    try:
        reports = []
        if tasks_path is not None:
            reports.append(import_file(db, "tasks-jsonl", Path(tasks_path), only_projects=[project] if project else None))
        if raw:
            reports.append(import_file(db, fmt, Path(path), only_projects=[project] if project else None))
        else:
            reports.append(import_file(db, fmt, Path(path), project=project or "default", annotator_id=annotator_id))
    except FormatError as err:
        fail(str(err))
    finally:
        db.close()
    summary: dict[str, int] = {}
    for report in reports:
        for error in report.errors:
            click.echo(error, err=True)
        for key, value in report.summary().items():
            summary[key] = summary.get(key, 0) + value
    click.echo(json.dumps(summary))
    if summary["errors"]:
        sys.exit(1)


@feedback.command()
@client_options
@click.option("--project", default="", help="One project (default: every project in scope).")
def stats(server: str, token: str | None, tls_ca, client_cert, client_key, project: str) -> None:
    """Print record counts and the watermark as JSON."""
    from google.protobuf import json_format

    from services.feedback.client import FeedbackClientError

    with make_client(server, token, tls_ca, client_cert, client_key) as client:
        try:
            reply = client.stats(project)
        except FeedbackClientError as err:
            fail(str(err))
    click.echo(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True), indent=2))


@feedback.command()
@client_options
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=5.0, show_default=True, help="Seconds to wait for the answer.")
@click.option("--tls-server-name", default=None, help="The name the server's certificate carries, when --server is another (e.g. 127.0.0.1 in a probe).")
@click.option("--liveness", is_flag=True, help="Ask whether the process serves at all (health service ''), not whether its store answers.")
def health(server: str, token: str | None, tls_ca, client_cert, client_key, timeout_s: float, tls_server_name: str | None, liveness: bool) -> None:
    """Exit 0 when the service answers SERVING to the standard gRPC health check (over TLS with
    --tls-ca): the readiness probe of a deployment whose port speaks TLS, which Kubernetes'
    own grpc probe cannot reach. The service is NOT_SERVING while its store's database does not
    answer; with --liveness the check asks only whether the process serves (a liveness probe
    must not restart a pod because its database is away)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.feedback.server import SERVICE_NAME

    overrides = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    client = make_client(server, token, tls_ca, client_cert, client_key, channel_options=overrides)
    try:
        stub = health_pb2_grpc.HealthStub(client._channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="" if liveness else SERVICE_NAME), timeout=timeout_s).status
    except grpc.RpcError as err:
        click.echo(f"{server}: {err.code().name}: {err.details()}", err=True)
        sys.exit(1)
    finally:
        client.close()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    click.echo(f"{server}: {name}")
    sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)

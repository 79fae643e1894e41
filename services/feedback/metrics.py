"""Prometheus metrics of the feedback service (one registry per server)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from services.exposure import key_matches


@dataclass
class FeedbackMetrics:
    registry: CollectorRegistry
    records: Counter  # labels: kind, result (accepted|duplicate|rejected), reason (rejected field or "")
    commit_seconds: Histogram  # one store transaction (group commit)
    commit_records: Histogram  # records per store transaction
    ack_seconds: Histogram  # labels: rpc; from receiving a batch to its result
    refused: Counter  # labels: reason (overloaded|closed|store|byte_budget); calls answered "retry later"
    followers: Gauge  # PullTasks calls with follow=true waiting for new tasks
    store_up: Gauge  # 1 while the store's database answers the health check, else 0
    throttled_seconds: Counter  # seconds streams were held back by their principal's byte budget

    @classmethod
    def create(cls) -> "FeedbackMetrics":
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            records=Counter(
                "hitl_feedback_records",
                "Feedback records by kind, result and rejection field",
                ["kind", "result", "reason"],
                registry=registry,
            ),
            commit_seconds=Histogram(
                "hitl_feedback_commit_seconds",
                "Latency of one durable store transaction",
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                registry=registry,
            ),
            commit_records=Histogram(
                "hitl_feedback_commit_records",
                "Records written per store transaction",
                buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
                registry=registry,
            ),
            ack_seconds=Histogram(
                "hitl_feedback_ack_seconds",
                "From a batch's arrival to its results",
                ["rpc"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            refused=Counter(
                "hitl_feedback_refused",
                "Calls answered with 'retry later' (RESOURCE_EXHAUSTED or UNAVAILABLE), by reason",
                ["reason"],
                registry=registry,
            ),
            followers=Gauge(
                "hitl_feedback_pull_followers",
                "PullTasks calls with follow=true that are open",
                registry=registry,
            ),
            throttled_seconds=Counter(
                "hitl_feedback_throttled_seconds",
                "Seconds streams were held back by their token's byte budget",
                registry=registry,
            ),
            store_up=Gauge(
                "hitl_feedback_store_up",
                "1 while the store's database answers the service's health check",
                registry=registry,
            ),
        )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        return None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _guarded(app, keys: tuple[str, ...] | None):
    """The metrics WSGI app behind `Authorization: Bearer <key>` (constant-time), when keys are set."""
    if keys is None:
        return app

    def guarded(environ, start_response):
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(presented.strip(), keys):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"metrics: missing or unknown bearer key\n"]
        return app(environ, start_response)

    return guarded


def serve_metrics(registry: CollectorRegistry, host: str, port: int, keys: tuple[str, ...] | None,
                  certfile: Path | None = None, keyfile: Path | None = None) -> WSGIServer:
    """Serve /metrics from a daemon thread: bearer keys when given, TLS with the server's certificate when given.

    prometheus_client's own server has no authentication, and the config refuses an
    unauthenticated endpoint off the loopback address (`metrics_keys_file`)."""
    server_class = _ThreadingServer
    if ":" in host:  # an IPv6 address ("::" for every interface)
        import socket

        server_class = type("_ThreadingServer6", (_ThreadingServer,), {"address_family": socket.AF_INET6})
    server = make_server(host.strip("[]"), port, _guarded(make_wsgi_app(registry), keys), server_class, handler_class=_QuietHandler)
    if certfile is not None and keyfile is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(certfile), str(keyfile))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server

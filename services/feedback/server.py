"""The feedback gRPC server: wiring, TLS, health, reflection, metrics, shutdown.

    hitl feedback serve --store sqlite:///hitl-data/feedback.db --port 50051

`FeedbackServer` is an asyncio object: `await start()`, `await stop()`. The
CLI runs it until SIGINT/SIGTERM; the coordinator can host it in a Ray actor.
Shutdown order: health turns NOT_SERVING, new calls are refused, running calls
get `shutdown_grace_seconds` to finish, the committer writes what is queued,
then the store closes. Nothing that was acked is lost at any point, because
nothing is acked before it is committed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hitl.feedback.v1 import feedback_pb2 as pb

from services.exposure import read_api_keys, redact_url
from services.feedback.auth import TokenAuth
from services.feedback.committer import GroupCommitter
from services.feedback.config import FeedbackServiceConfig
from services.feedback.metrics import FeedbackMetrics
from services.feedback.servicer import FeedbackServicer, request_parser, wire_request_parser
from services.feedback.store import FeedbackStore, open_store

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeedbackService"].full_name
_GC_YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections (CPython's default: 700)


class FeedbackServer:
    def __init__(self, cfg: FeedbackServiceConfig, store: FeedbackStore | None = None):
        self.cfg = cfg
        self._auth = TokenAuth.from_file(cfg.tokens_file) if cfg.tokens_file else None
        self._tls = _server_credentials(cfg) if cfg.tls else None
        self._own_store = store is None
        self.store = store if store is not None else open_store(cfg.store)
        self.metrics = FeedbackMetrics.create()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-reader")
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._committer: GroupCommitter | None = None
        self._servicer: FeedbackServicer | None = None
        self._metrics_http = None
        self._watch: asyncio.Task | None = None
        self.store_up = True
        self.port: int = 0
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    async def start(self) -> int:
        """Bind, start serving and return the bound port."""
        self._committer = GroupCommitter(
            self.store,
            self._writer,
            self.metrics,
            max_group_records=self.cfg.max_group_records,
            max_pending_records=self.cfg.max_pending_records,
        )
        self._committer.start()
        self._servicer = FeedbackServicer(
            self.cfg, self.store, self._committer, self._writer, self._readers, self._auth, self.metrics
        )
        limit = self.cfg.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", max(limit, 16 * 1024 * 1024)),
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", self.cfg.max_streams_per_connection),
            ],
            interceptors=[AuthenticateFirst(self._auth)] if self._auth is not None else None,
        )
        _add_servicer(self._servicer, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if self.cfg.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        bind = f"{self.cfg.host}:{self.cfg.port}"
        if self._tls is not None:
            self.port = self._server.add_secure_port(bind, self._tls)
        else:
            self.port = self._server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"could not bind {bind}")
        await self._server.start()
        await self._set_health(True)
        self._watch = asyncio.create_task(self._watch_store(), name="store-health")
        self._start_metrics()
        log.info(
            "feedback service on %s (%s, store %s, auth %s)",
            self.address,
            "TLS" if self._tls else "plaintext",
            self.cfg.store,
            "tokens" if self._auth else "off",
        )
        return self.port

    async def _set_health(self, up: bool) -> None:
        """The service's status follows the store; the server's own ("", liveness) stays SERVING until shutdown."""
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set(SERVICE_NAME, status)  # type: ignore[union-attr]
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)  # type: ignore[union-attr]
        self.metrics.store_up.set(1 if up else 0)

    async def _watch_store(self) -> None:
        """Health follows the store: NOT_SERVING while the database does not answer.

        A load balancer or Kubernetes probe then routes around this replica
        while its database is down, and back once it answers. Writes need no
        help to resume: the store reconnects on its own (`SqlStore._conn`);
        this only reports.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.store_check_seconds)
            try:
                await loop.run_in_executor(self._readers, self.store.ping)
                up, why = True, ""
            except Exception as err:  # noqa: BLE001 - any failure to answer is "down"
                up, why = False, str(err).splitlines()[0] if str(err) else type(err).__name__
            if up != self.store_up:
                self.store_up = up
                if up:
                    log.warning("store %s answers again: SERVING", redact_url(self.cfg.store))
                else:
                    log.warning("store %s does not answer (%s): NOT_SERVING", redact_url(self.cfg.store), why)
                await self._set_health(up)

    def _start_metrics(self) -> None:
        if self.cfg.metrics_port is None:
            return
        from services.feedback.metrics import serve_metrics

        keys = read_api_keys(self.cfg.metrics_keys_file, "metrics_keys_file") if self.cfg.metrics_keys_file else None
        server = serve_metrics(self.metrics.registry, self.cfg.host, self.cfg.metrics_port, keys,
                               certfile=self.cfg.tls_cert, keyfile=self.cfg.tls_key)
        self._metrics_http = server
        self.metrics_port = server.server_port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown; see the module docstring for the order."""
        if self._server is None:
            return
        grace = self.cfg.shutdown_grace_seconds if grace is None else grace
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._servicer is not None:
            self._servicer.begin_shutdown()
        await self._server.stop(grace)
        if self._committer is not None:
            await self._committer.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self._own_store:
            self.store.close()
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class AuthenticateFirst(grpc.aio.ServerInterceptor):
    """Refuse a call without a known bearer token before its request is read or parsed.

    gRPC reads and deserializes a request message before the handler runs, so a
    check in the handler alone would let anyone make the server parse up to
    `max_message_bytes` per call. An interceptor sees the call's metadata first:
    an unauthenticated call gets a handler of the same shape that takes the
    message as raw bytes and aborts. (The servicer still authenticates, for the
    principal's scopes; health and reflection stay open, as probes need.)
    """

    def __init__(self, auth: TokenAuth):
        self._auth = auth
        self._prefix = f"/{SERVICE_NAME}/"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        if self._auth.authenticate(handler_call_details.invocation_metadata) is not None:
            return handler
        return _refusing(handler)


_UNAUTHENTICATED = "missing or unknown bearer token (metadata 'authorization: Bearer <token>')"


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler shaped like `handler` that reads nothing it must parse and answers UNAUTHENTICATED."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    async def refuse_streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
        yield None  # pragma: no cover - abort raises

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse_streaming if handler.response_streaming else refuse, request_deserializer=None, response_serializer=None)


def _add_servicer(servicer: FeedbackServicer, server: grpc.aio.Server) -> None:
    """`pb_grpc.add_FeedbackServiceServicer_to_server`, except that the two ingest RPCs get
    requests that keep their bytes (`wire_request_parser`): records are stored as sent,
    not serialised again."""
    handlers = {
        "SubmitFeedback": grpc.unary_unary_rpc_method_handler(
            servicer.SubmitFeedback,
            request_deserializer=wire_request_parser(pb.SubmitFeedbackRequest),
            response_serializer=pb.SubmitFeedbackResponse.SerializeToString,
        ),
        "StreamFeedback": grpc.stream_stream_rpc_method_handler(
            servicer.StreamFeedback,
            request_deserializer=wire_request_parser(pb.FeedbackBatch),
            response_serializer=pb.BatchAck.SerializeToString,
        ),
        "PullTasks": grpc.unary_stream_rpc_method_handler(
            servicer.PullTasks,
            request_deserializer=request_parser(pb.PullTasksRequest),
            response_serializer=pb.LabelingTask.SerializeToString,
        ),
        "GetStats": grpc.unary_unary_rpc_method_handler(
            servicer.GetStats,
            request_deserializer=request_parser(pb.GetStatsRequest),
            response_serializer=pb.Stats.SerializeToString,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["FeedbackService"]
    assert set(handlers) == {m.name for m in service.methods}, "every RPC of the service has its handler"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service.full_name, handlers)


def _server_credentials(cfg: FeedbackServiceConfig) -> grpc.ServerCredentials:
    key = _read(cfg.tls_key, "tls_key")
    cert = _read(cfg.tls_cert, "tls_cert")
    ca = _read(cfg.tls_client_ca, "tls_client_ca") if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _read(path: Path | None, name: str) -> bytes:
    try:
        return Path(path).read_bytes()  # type: ignore[arg-type]
    except OSError as err:
        raise FileNotFoundError(f"{name}: cannot read {path}: {err.strerror}") from None


async def serve_forever(cfg: FeedbackServiceConfig, ready_file: Path | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    server = FeedbackServer(cfg)
    await server.start()
    # everything allocated so far lives as long as the process: keep it out of the
    # collector's full passes, which otherwise stall the event loop on a busy server
    gc.freeze()
    # Ingest allocates a few container objects per record (rows, outcomes), nearly all freed
    # within a group commit; with the default threshold (700) the young collection ran every few
    # records and scanned them while alive, ~5% of the server's CPU. A larger young generation
    # lets them die first. Cycles are still collected, a little later.
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, older, oldest)
    if ready_file is not None:
        ready_file.write_text(f"{server.port}\n")
    print(f"hitl feedback service listening on {server.address} (store {redact_url(cfg.store)})", flush=True)
    if server.metrics_port is not None:
        print(f"metrics on http://{cfg.host}:{server.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shutting down: finishing calls in progress", flush=True)
    await server.stop()

"""Configuration of the feedback service: one validated model, errors name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_STORE = "sqlite:///hitl-data/feedback.db"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


class FeedbackServiceConfig(BaseModel):
    """How `hitl feedback serve` (or the coordinator's service actor) runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = DEFAULT_STORE
    """Store URL: `sqlite:///path.db` (embedded default) or `postgresql://user@host:port/db[?schema=NAME]`."""
    host: str = "127.0.0.1"
    """Address to bind; `0.0.0.0` or `[::]` to listen on every interface."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""
    tokens_file: Path | None = None
    """YAML file of bearer tokens and their project scopes; without it every call is allowed,
    which only a loopback `host` permits."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server; enables TLS (with `tls_key`)."""
    tls_key: Path | None = None
    """PEM private key of the server."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    insecure: bool = False
    """Serve without TLS on a non-loopback `host` on purpose (e.g. behind a TLS-terminating
    proxy); without it such a server refuses to start unless TLS is set."""
    reflection: bool = False
    """Serve gRPC server reflection."""
    metrics_port: int | None = Field(9464, ge=0, le=65535)
    """Prometheus metrics over HTTP on this port (0 picks a free one; null turns metrics off)."""
    metrics_keys_file: Path | None = None
    """Bearer keys of the metrics endpoint (one per line; Prometheus' `authorization:
    credentials_file`); required when metrics are served on a non-loopback `host`. Metrics are
    served over TLS with the server's certificate when `tls_cert` is set."""
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request message accepted; larger ones fail with RESOURCE_EXHAUSTED."""
    max_batch_records: int = Field(1000, ge=1)
    """Most records in one SubmitFeedback call or stream batch."""
    max_group_records: int = Field(4096, ge=1)
    """Most records written in one store transaction (group commit across calls)."""
    max_pending_records: int = Field(100_000, ge=1)
    """Records queued for commit before new unary calls are refused as overloaded."""
    max_inflight_batches: int = Field(64, ge=1)
    """Unacked batches one stream may have in flight before the server stops reading it."""
    max_streams_per_principal: int = Field(64, ge=1)
    """Streams (StreamFeedback, following PullTasks) one token may hold open at once; a token's
    `max_streams` overrides it."""
    max_streams_per_connection: int = Field(100, ge=1)
    """Concurrent calls on one HTTP/2 connection (its MAX_CONCURRENT_STREAMS)."""
    max_bytes_per_second_per_principal: int = Field(64 * 1024 * 1024, ge=1024)
    """Average request bytes per second one token may send (a token bucket, bursts up to
    `max_message_bytes` x 4): a unary call over it gets RESOURCE_EXHAUSTED with
    `retry-after-ms`, a stream over it is read more slowly."""
    max_leases_per_principal: int = Field(1000, ge=1)
    """Unexpired task leases one token may hold at once (answered or not); a token's
    `max_leases` overrides it. Keeps one credential from leasing every open task."""
    default_lease_seconds: float = Field(600.0, gt=0)
    """Lease length of a pulled task when the request names none."""
    max_lease_seconds: float = Field(86_400.0, gt=0)
    """Longest lease a request may ask for."""
    follow_poll_seconds: float = Field(1.0, gt=0)
    """How often a following PullTasks stream looks for newly published tasks."""
    store_check_seconds: float = Field(1.0, gt=0)
    """How often the store's database is probed; health is NOT_SERVING while it does not answer."""
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    """On shutdown, how long running calls may take to finish."""

    @model_validator(mode="after")
    def _tls_pairs(self) -> "FeedbackServiceConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert, tls_key: must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: needs tls_cert and tls_key (mutual TLS is TLS first)")
        from services.exposure import check_exposure

        check_exposure(self.host, authenticated=self.tokens_file is not None or self.tls_client_ca is not None,
                       tls=self.tls_cert is not None, insecure=self.insecure, field="host",
                       auth="tokens_file (--tokens) or tls_client_ca (--tls-client-ca)",
                       tls_fields="tls_cert and tls_key (--tls-cert, --tls-key)", insecure_field="insecure (--insecure)")
        if self.metrics_port is not None:
            check_exposure(self.host, authenticated=self.metrics_keys_file is not None, tls=self.tls_cert is not None,
                           insecure=self.insecure, field="metrics_port", auth="metrics_keys_file (--metrics-keys)",
                           tls_fields="tls_cert and tls_key (--tls-cert, --tls-key)", insecure_field="insecure (--insecure)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def build_config(values: dict[str, Any], prefix: str = "", keep_none: tuple[str, ...] = ()) -> FeedbackServiceConfig:
    """Validate raw values (None means "the default", except for the fields in `keep_none`);
    a ConfigError names each wrong field with its dotted path."""
    try:
        return FeedbackServiceConfig(**{k: v for k, v in values.items() if v is not None or k in keep_none})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix)) from None


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        got = f" (got {e['input']!r})" if path and "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"{path}: {msg}{got}" if path else msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)

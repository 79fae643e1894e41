"""Configuration of `hitl label-web`: one validated model; errors name the field.

A YAML file (``--config``) and command-line options fill the same model; an
option given on the command line wins over the file. Unknown keys are errors.

    host: 0.0.0.0
    port: 8089
    server: feedback.internal:50051
    token: s3cret                      # or $HITL_TOKEN / --token
    project: chat-helpfulness
    tls_ca: ca.crt                     # TLS to the feedback service (optional)
    guidelines_file: guidelines.md     # or `guidelines: |` with the text itself
    guidelines_version: "2024-06-v3"   # stored with every judgement
    auth:                              # who the annotators are (auth.py)
      tokens_file: annotators.yaml     # personal tokens: mode `tokens` (chmod 600)
    tls_cert_file: page.crt            # HTTPS for the page itself
    tls_key_file: page.key

Everything about exposure is decided here, before anything binds: `auth.mode: open`
(a self-declared annotator id) only on a loopback host; any other host needs TLS
(`tls_cert_file`/`tls_key_file`) unless `insecure_http: true` says plain text is meant
(a TLS-terminating proxy in front). Secret files (tokens, the proxy's secret, the TLS
key) that others may read are refused. Relative paths in the file are relative to it.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from services.exposure import check_exposure, check_secret_file, is_loopback
from services.feedback.config import ConfigError, format_validation_error
from services.labeling.web.auth import AnnotatorTokens, Mode, read_annotator_tokens, read_proxy_secret

__all__ = ["AuthConfig", "ConfigError", "Guidelines", "LabelWebConfig", "load_web_config", "server_ssl_context"]

_MAX_ID_BYTES = 128
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")  # an RFC 9110 token
_PATH_KEYS = ("guidelines_file", "tls_cert_file", "tls_key_file")
_AUTH_PATH_KEYS = ("tokens_file", "proxy_secret_file")


def _check_id(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value or len(value.encode("utf-8")) > _MAX_ID_BYTES:
        raise ValueError(f"at most {_MAX_ID_BYTES} bytes of UTF-8, without NUL characters")
    return value


class AuthConfig(BaseModel):
    """How annotators prove who they are (auth.py): `tokens`, `header` or `open`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = "open"
    """`tokens` (personal tokens), `header` (a sign-in proxy's header), `open` (a self-declared
    id, loopback only). Default: `tokens` when `tokens_file` is set, else `open`."""
    tokens_file: Path | None = None
    """YAML: a list of {annotator_id, token} or a mapping annotator_id: token; others may not read it."""
    user_header: str = "X-Forwarded-User"
    """Header mode: the header in which the proxy names the signed-in annotator."""
    proxy_secret_header: str = "X-Hitl-Proxy-Secret"
    """Header mode: the header in which the proxy sends the shared secret."""
    proxy_secret_file: Path | None = None
    """Header mode: a file holding the shared secret (one word, 16+ characters); others may not read it."""
    session_ttl_seconds: int = Field(12 * 3600, ge=60, le=30 * 86400)
    """How long a sign-in lasts (tokens and open modes)."""
    max_sessions: int = Field(10_000, ge=1, le=1_000_000)
    """Most sessions kept; the oldest is dropped (signed out) first."""
    secure_cookie: bool | None = None
    """Mark the session cookie Secure; default: when this server serves TLS. Set true behind a
    TLS-terminating proxy, so the browser never sends the cookie over plain HTTP."""

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        """No mode given: `tokens` when there is a tokens file, so setting the file is enough."""
        if isinstance(data, dict) and data.get("mode") is None:
            data = {**data, "mode": "tokens" if data.get("tokens_file") is not None else "open"}
        return data

    @field_validator("user_header", "proxy_secret_header")
    @classmethod
    def _a_header_name(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError("a header name: letters, digits and -, at most 64 characters")
        return value


class LabelWebConfig(BaseModel):
    """How `hitl label-web` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    """HTTP bind address; `0.0.0.0` to listen on every interface (needs `auth` other than open, and TLS)."""
    port: int = Field(8089, ge=0, le=65535)
    """HTTP port; 0 picks a free one."""
    server: str = "127.0.0.1:50051"
    """The feedback service's gRPC address."""
    token: str | None = None
    """Bearer token for the feedback service; it stays in this server, never reaches the browser."""
    project: str
    """The project whose tasks are labeled."""
    tls_ca: Path | None = None
    """PEM CA bundle: reach the feedback service over TLS."""
    tls_cert: Path | None = None
    """PEM client certificate to the feedback service (mutual TLS, with `tls_key`)."""
    tls_key: Path | None = None
    """PEM client key to the feedback service (mutual TLS, with `tls_cert`)."""
    tls_server_name: str | None = None
    """Expected name in the service's certificate, when it differs from the address's host."""
    tls_cert_file: Path | None = None
    """PEM certificate chain of the page itself (with `tls_key_file`): serve HTTPS."""
    tls_key_file: Path | None = None
    """PEM private key of the page's certificate; others may not read it."""
    insecure_http: bool = False
    """Serve plain HTTP on a non-loopback `host` on purpose (a TLS-terminating proxy in front)."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """Who the annotators are: see AuthConfig and auth.py."""
    guidelines: str = ""
    """The labeling guidelines shown on the page (plain text)."""
    guidelines_file: Path | None = None
    """A file holding the guidelines instead (UTF-8 plain text)."""
    guidelines_version: str = ""
    """Stored with every judgement; default: `sha256:` and 12 hex digits of the guidelines text."""
    prefetch: int = Field(2, ge=1, le=100)
    """Tasks leased ahead per annotator."""
    lease_seconds: int = Field(0, ge=0)
    """Lease of each pulled task (0: the service's default)."""
    shuffle: bool = True
    """Show each task's candidates in random order (against position bias)."""
    call_timeout_seconds: float = Field(10.0, gt=0)
    """Deadline of each gRPC call made for a page request."""
    max_body_bytes: int = Field(256 * 1024, ge=16 * 1024, le=16 * 1024 * 1024)
    """Largest JSON body of a judgement, refused (413) before it is read. A correction's text is
    at most 64 KiB of UTF-8 on the service and JSON escapes can double it, hence 256 KiB."""
    max_annotators: int = Field(1000, ge=1, le=1_000_000)
    """Annotators whose held tasks and tallies this server keeps; the least recently active go first."""
    max_tasks_per_annotator: int = Field(1000, ge=1, le=1_000_000)
    """Finished task ids remembered per annotator (to refuse a second, different judgement of a task
    from another tab); the oldest are forgotten first. Also a cap on held tasks (>= `prefetch`)."""

    _tokens: AnnotatorTokens | None = PrivateAttr(default=None)
    _proxy_secret: bytes | None = PrivateAttr(default=None)

    @field_validator("project")
    @classmethod
    def _project_is_an_id(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("guidelines_version")
    @classmethod
    def _version_is_an_id(cls, value: str) -> str:
        return _check_id(value) if value else value

    @model_validator(mode="after")
    def _pairs(self) -> "LabelWebConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert, tls_key: must be given together")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file, tls_key_file: must be given together")
        if self.guidelines and self.guidelines_file is not None:
            raise ValueError("guidelines, guidelines_file: give one of them, not both")
        if self.prefetch > self.max_tasks_per_annotator:
            raise ValueError(f"max_tasks_per_annotator: must be at least prefetch ({self.prefetch})")
        return self

    @model_validator(mode="after")
    def _closed_by_default(self) -> "LabelWebConfig":
        """Refuse, before anything binds, a page that would let anyone act as anyone."""
        if self.auth.mode == "open" and not is_loopback(self.host):
            raise ValueError(
                f"auth.mode: open (a self-declared annotator id) is allowed only on a loopback host, not {self.host!r}: "
                "set auth.tokens_file (personal tokens) or auth.mode: header (behind a sign-in proxy), or bind 127.0.0.1")
        check_exposure(self.host, authenticated=True, tls=self.tls_cert_file is not None, insecure=self.insecure_http,
                       field="host", tls_fields="tls_cert_file and tls_key_file", insecure_field="insecure_http: true")
        return self

    @model_validator(mode="after")
    def _secrets(self) -> "LabelWebConfig":
        """Read the mode's secret files now, so a bad one stops the start naming its field."""
        auth = self.auth
        if auth.mode == "tokens":
            if auth.tokens_file is None:
                raise ValueError("auth.tokens_file: required when auth.mode is tokens")
            self._tokens = read_annotator_tokens(auth.tokens_file)
        if auth.mode == "header":
            if auth.proxy_secret_file is None:
                raise ValueError("auth.proxy_secret_file: required when auth.mode is header "
                                 "(the proxy's header is believed only beside this secret)")
            if auth.user_header.lower() == auth.proxy_secret_header.lower():
                raise ValueError("auth.user_header, auth.proxy_secret_header: must differ")
            self._proxy_secret = read_proxy_secret(auth.proxy_secret_file)
        if self.tls_cert_file is not None:
            _load_ssl_context(self)
        return self

    @property
    def annotator_tokens(self) -> AnnotatorTokens | None:
        """The tokens file's entries (tokens mode), as read when the config was checked."""
        return self._tokens

    @property
    def proxy_secret_digest(self) -> bytes | None:
        """The digest of the proxy's shared secret (header mode)."""
        return self._proxy_secret

    @property
    def secure_cookie(self) -> bool:
        """Whether the session cookie is marked Secure: as configured, else when TLS is served."""
        return self.auth.secure_cookie if self.auth.secure_cookie is not None else self.tls_cert_file is not None


def _load_ssl_context(cfg: LabelWebConfig) -> ssl.SSLContext:
    """The page's server-side TLS context (TLS 1.2 or later); ValueError names the fields."""
    assert cfg.tls_cert_file is not None and cfg.tls_key_file is not None
    check_secret_file(cfg.tls_key_file, "tls_key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"tls_cert_file, tls_key_file: cannot load them: {err}") from None
    return context


def server_ssl_context(cfg: LabelWebConfig) -> ssl.SSLContext | None:
    """The TLS context the page is served with, or None for plain HTTP; ConfigError names the field."""
    if cfg.tls_cert_file is None:
        return None
    try:
        return _load_ssl_context(cfg)
    except ValueError as err:
        raise ConfigError(f"invalid configuration:\n  {err}") from None


@dataclass(frozen=True)
class Guidelines:
    """The guidelines text shown on the page and the version stored with each judgement."""

    text: str
    version: str


def resolve_guidelines(cfg: LabelWebConfig) -> Guidelines:
    """Read the guidelines (file or text) and settle their version; ConfigError names the field."""
    text = cfg.guidelines
    if cfg.guidelines_file is not None:
        try:
            text = cfg.guidelines_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"invalid configuration:\n  guidelines_file: cannot read {cfg.guidelines_file}: {err}") from None
    version = cfg.guidelines_version or "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return Guidelines(text=text, version=version)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"invalid configuration:\n  {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration:\n  {path}: expected a mapping of keys, got {type(data).__name__}")
    _relative_to(path.parent, data, _PATH_KEYS)
    if isinstance(data.get("auth"), dict):
        data["auth"] = dict(data["auth"])
        _relative_to(path.parent, data["auth"], _AUTH_PATH_KEYS)
    return data


def _relative_to(base: Path, data: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Paths written in the config file are relative to it, not to where the command runs."""
    for key in keys:
        if isinstance(data.get(key), str):
            data[key] = str(base / data[key])


def _apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Command-line values over the file's; `auth.X` keys (e.g. from --tokens-file) go into `auth`."""
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("auth."):
            auth = values.get("auth")
            values["auth"] = {**(auth if isinstance(auth, dict) else {}), key.removeprefix("auth."): value}
        else:
            values[key] = value


def load_web_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> LabelWebConfig:
    """The file's values (if any) under the overrides that are not None; ConfigError names each bad field."""
    values = _read_yaml(Path(path)) if path is not None else {}
    _apply_overrides(values, overrides or {})
    try:
        return LabelWebConfig(**values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None

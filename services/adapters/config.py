"""Configuration of `hitl adapters serve`: one validated model (errors name the field),
checked with the credentials it names before anything binds, opens or connects.

    host: 0.0.0.0
    tls_cert: /etc/hitl/adapters/tls.crt
    tls_key: /etc/hitl/adapters/tls.key
    outbox: /var/lib/hitl/adapters-outbox.db
    routes:
      label_studio:
        secret_file: /etc/hitl/adapters/label-studio-token   # or secret_env: HITL_LABEL_STUDIO_TOKEN
        projects: [chat-helpfulness]                          # the first: payloads naming none
        users: {3: alice, "bob@example.com": bob}             # tool user id or email -> annotator id
      argilla:
        secret_env: HITL_ARGILLA_SECRET                       # the webhook's whsec_... secret
        projects: [chat-helpfulness, summaries]
        users: {ada: alice}
        map_unknown_users: prefix                             # unmapped users become argilla:<username>

Closed by default: a route without a credential is not served (404) unless
`allow_unauthenticated`, which only a loopback `host` accepts; off loopback at
least one route needs a credential, and TLS (`tls_cert`, `tls_key`) unless
`insecure`. Credentials are never written in this file: a file others may not
read (`secret_file`), or the name of an environment variable (`secret_env`).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictStr, ValidationError, field_validator, model_validator

from services.adapters import argilla
from services.adapters.common import Scope, UnknownUsers
from services.exposure import ExposureError, check_exposure, check_secret_file, is_loopback

DEFAULT_OUTBOX = Path("hitl-data/adapters-outbox.db")

# route key in the configuration -> (tool name in records, HTTP path, command-line options giving its credential)
ROUTES: dict[str, tuple[str, str, str]] = {
    "argilla": ("argilla", "/argilla", "--argilla-secret or --argilla-secret-file"),
    "label_studio": ("label-studio", "/label-studio", "--label-studio-token or --label-studio-token-file"),
}
AUTH_HINT = ("a route credential (--argilla-secret[-file], --label-studio-token[-file], "
             "or routes.<tool>.secret_file / secret_env in --config)")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field (and its option)."""


class RouteConfig(BaseModel):
    """One webhook route: who may post to it, what it may write, and as whom."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret_file: Path | None = None
    """File holding the credential (Argilla: the webhook secret `whsec_...`; Label Studio: the
    token of the `Authorization: Token ...` header); others may not read it."""
    secret_env: StrictStr | None = None
    """Name of the environment variable holding the credential (instead of `secret_file`)."""
    secret: SecretStr | None = Field(None, exclude=True, repr=False)
    """The credential itself: from the command line or its variable only, never from a file."""
    projects: list[StrictStr] = Field(min_length=1)
    """Projects this route may write; the first is the project of payloads naming none. A
    payload naming another one is refused (403)."""
    users: dict[str, StrictStr] = Field(default_factory=dict)
    """Tool user (Argilla username or id; Label Studio user id or email) -> hitl annotator id."""
    map_unknown_users: UnknownUsers = "refuse"
    """`refuse`: a user not in `users` is refused (403). `prefix`: its annotator id is
    `<tool>:<user>` (e.g. `label-studio:3`, `argilla:ada`)."""

    @field_validator("users", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        # YAML reads `3: alice` with an integer key: Label Studio user ids are numbers
        if isinstance(value, dict):
            return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _one_credential_source(self) -> "RouteConfig":
        given = [name for name in ("secret", "secret_file", "secret_env") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{', '.join(given)}: give one credential source, not {len(given)}")
        if any(not p for p in self.projects) or len(set(self.projects)) != len(self.projects):
            raise ValueError("projects: names must be non-empty and distinct")
        if any(not k or not v for k, v in self.users.items()):
            raise ValueError("users: tool users and annotator ids must be non-empty")
        return self

    @property
    def has_credential(self) -> bool:
        return self.secret is not None or self.secret_file is not None or self.secret_env is not None


class RoutesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    argilla: RouteConfig | None = None
    """POST /argilla (Standard Webhooks signatures, keyed with the secret)."""
    label_studio: RouteConfig | None = None
    """POST /label-studio (`Authorization: Token <secret>`)."""


class AdaptersConfig(BaseModel):
    """How `hitl adapters serve` runs; `--config FILE` and the command line fill it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: StrictStr = "127.0.0.1"
    """HTTP bind address; off loopback a credential and TLS (or `insecure`) are required."""
    port: int = Field(8088, ge=0, le=65535)
    """HTTP port (0 picks a free one)."""
    tls_cert: Path | None = None
    """PEM certificate chain: serve HTTPS (with `tls_key`)."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    insecure: bool = False
    """Serve plain HTTP off loopback on purpose (a TLS-terminating proxy in front)."""
    allow_unauthenticated: bool = False
    """Serve routes that have no credential; only a loopback `host` accepts it."""
    outbox: Path = DEFAULT_OUTBOX
    """SQLite file where accepted deliveries wait until the feedback service stored them."""
    outbox_max_records: int = Field(100_000, ge=1)
    """Most records the outbox holds; beyond, deliveries are answered 503 with Retry-After."""
    routes: RoutesConfig = Field(default_factory=RoutesConfig)

    @model_validator(mode="after")
    def _closed_by_default(self) -> "AdaptersConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert, tls_key (--tls-cert, --tls-key): give both or neither")
        loopback = is_loopback(self.host)
        if self.allow_unauthenticated and not loopback:
            raise ValueError(f"allow_unauthenticated (--allow-unauthenticated): only a loopback host may serve routes "
                             f"without a credential, and host is {self.host!r}; give each route a credential")
        check_exposure(self.host, authenticated=any(r.has_credential for r in self.present_routes().values()),
                       tls=self.tls_cert is not None, insecure=self.insecure, field="host", auth=AUTH_HINT,
                       tls_fields="tls_cert and tls_key (--tls-cert, --tls-key)", insecure_field="insecure (--insecure)")
        if not self.served_routes():
            raise ValueError(f"no route is served: give {AUTH_HINT}, or allow_unauthenticated "
                             "(--allow-unauthenticated) on a loopback host")
        return self

    def present_routes(self) -> dict[str, RouteConfig]:
        return {key: r for key in ROUTES if (r := getattr(self.routes, key)) is not None}

    def served_routes(self) -> dict[str, RouteConfig]:
        """The routes that answer: those with a credential, and the others when allowed."""
        return {key: r for key, r in self.present_routes().items() if r.has_credential or self.allow_unauthenticated}


def build_config(values: Mapping[str, Any]) -> AdaptersConfig:
    """Validate raw values; a ConfigError names each wrong field with its dotted path."""
    try:
        return AdaptersConfig.model_validate(dict(values))
    except ValidationError as err:
        raise ConfigError(_format(err)) from None


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        # inputs are not echoed: a misplaced credential must not reach a log
        lines.append(f"{path}: {msg}" if path else msg)
    return "invalid adapters configuration:\n  " + "\n  ".join(lines)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw values of a YAML configuration file; a credential written in it is refused."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: must be a mapping of settings")
    for key, route in (values.get("routes") or {}).items() if isinstance(values.get("routes"), dict) else ():
        if isinstance(route, dict) and "secret" in route:
            raise ConfigError(f"routes.{key}.secret: a credential is not written in the configuration; "
                              "use secret_file (a file others may not read) or secret_env (a variable's name)")
    return values


# --------------------------------------------------------------------------- resolved settings


@dataclass(frozen=True)
class Route:
    """A served route, its credential read: what a handler needs."""

    key: str  # "argilla" | "label_studio" (the configuration's name)
    tool: str  # "argilla" | "label-studio" (the records' name)
    secret: str | None  # None: served unauthenticated (allow_unauthenticated, loopback only)
    scope: Scope

    def __repr__(self) -> str:  # never print the credential
        return f"Route({self.key!r}, authenticated={self.secret is not None}, projects={list(self.scope.projects)})"


@dataclass(frozen=True)
class Settings:
    """Everything the app needs, validated: served routes, the outbox's place and bound."""

    routes: Mapping[str, Route]  # by tool name ("argilla", "label-studio")
    outbox: Path = DEFAULT_OUTBOX
    outbox_max_records: int = 100_000
    tolerance_s: float = argilla.TOLERANCE_S

    def disabled_reason(self, tool: str) -> str:
        """Why `tool`'s route does not answer, naming the options that enable it."""
        key = next(k for k, (t, _, _) in ROUTES.items() if t == tool)
        _, path, options = ROUTES[key]
        return (f"{path} is disabled: it has no credential; set {options} "
                f"(or routes.{key}.secret_file / secret_env in --config)")


def resolve(cfg: AdaptersConfig, environ: Mapping[str, str] | None = None) -> Settings:
    """Read each served route's credential (files checked, variables required) into Settings;
    a ConfigError names the field. Runs before the server binds."""
    environ = os.environ if environ is None else environ
    routes = {}
    for key, rc in cfg.served_routes().items():
        tool = ROUTES[key][0]
        where = f"routes.{key}"
        routes[tool] = Route(key, tool, read_credential(rc, key, environ),
                             Scope(tool, tuple(rc.projects), dict(rc.users), rc.map_unknown_users, where))
    return Settings(routes, cfg.outbox, cfg.outbox_max_records)


FLAGS = {("argilla", "secret"): "--argilla-secret", ("argilla", "secret_file"): "--argilla-secret-file",
         ("label_studio", "secret"): "--label-studio-token", ("label_studio", "secret_file"): "--label-studio-token-file"}


def field_name(key: str, name: str) -> str:
    """`routes.<key>.<name>`, with the command-line option that sets it when there is one."""
    flag = FLAGS.get((key, name))
    return f"routes.{key}.{name}" + (f" ({flag})" if flag else "")


def read_credential(rc: RouteConfig, key: str, environ: Mapping[str, str]) -> str | None:
    """The route's credential from its one source; an Argilla secret must be base64."""
    if rc.secret is not None:
        value, field = rc.secret.get_secret_value().strip(), field_name(key, "secret")
    elif rc.secret_file is not None:
        field = field_name(key, "secret_file")
        try:
            value = check_secret_file(rc.secret_file, field).read_text().strip()
        except (ExposureError, OSError) as err:
            raise ConfigError(str(err) if isinstance(err, ExposureError) else f"{field}: {err}") from None
    elif rc.secret_env is not None:
        value, field = environ.get(rc.secret_env, "").strip(), field_name(key, "secret_env")
        if not value:
            raise ConfigError(f"{field}: the variable {rc.secret_env} is not set or empty")
    else:
        return None
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{field}: the credential must be one non-empty word")
    if key == "argilla":
        try:
            argilla._secret_key(value)
        except ValueError as err:
            raise ConfigError(f"{field}: {err}") from None
    return value


def tls_context(cfg: AdaptersConfig) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain HTTP; a ConfigError names a bad file."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    try:
        check_secret_file(cfg.tls_key, "tls_key (--tls-key)")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (ExposureError, OSError, ssl.SSLError) as err:
        raise ConfigError(f"tls_cert, tls_key (--tls-cert, --tls-key): {err}") from None
    return context

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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.feedback.config import ConfigError, format_validation_error

__all__ = ["ConfigError", "Guidelines", "LabelWebConfig", "load_web_config"]

_MAX_ID_BYTES = 128


def _check_id(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value or len(value.encode("utf-8")) > _MAX_ID_BYTES:
        raise ValueError(f"at most {_MAX_ID_BYTES} bytes of UTF-8, without NUL characters")
    return value


class LabelWebConfig(BaseModel):
    """How `hitl label-web` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    """HTTP bind address; `0.0.0.0` to listen on every interface."""
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
    """PEM client certificate (mutual TLS, with `tls_key`)."""
    tls_key: Path | None = None
    """PEM client key (mutual TLS, with `tls_cert`)."""
    tls_server_name: str | None = None
    """Expected name in the service's certificate, when it differs from the address's host."""
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
        if self.guidelines and self.guidelines_file is not None:
            raise ValueError("guidelines, guidelines_file: give one of them, not both")
        return self


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
    if isinstance(data.get("guidelines_file"), str):
        data["guidelines_file"] = str(path.parent / data["guidelines_file"])  # relative to the config file
    return data


def load_web_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> LabelWebConfig:
    """The file's values (if any) under the overrides that are not None; ConfigError names each bad field."""
    values = _read_yaml(Path(path)) if path is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return LabelWebConfig(**values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None

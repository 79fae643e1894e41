"""Bearer-token authentication with per-project scopes.

The tokens file (YAML):

    tokens:
      - name: alice                 # shows up in logs
        token: "s3cret"             # or sha256: "<hex digest of the token>"
        projects: ["chat-helpfulness", "chat-safety"]   # or ["*"] for every project
        # annotators: omitted = only the annotator id `name` (a person's own token)
      - name: label-studio
        sha256: "<hex digest>"
        projects: ["chat-helpfulness"]
        annotators: ["*"]           # a tool that speaks for many people (map them in the tool)
        max_streams: 8              # optional: open streams at once (default: the server's)
        max_leases: 200             # optional: unexpired leases at once (default: the server's)
        require_lease: false        # optional: default true for named annotators, false for "*"

Calls carry `authorization: Bearer <token>` in their metadata. Tokens are
compared by their SHA-256 digest, so the file may hold digests only.

A token is a principal: it may write and read its projects, and write
judgements and lease tasks only as its annotator ids. Without `annotators`
a token speaks for one person, the annotator id `name`: identity comes
from the credential, and a tool that relays many people's judgements says
so explicitly with `["*"]` or a list. A token with named annotators has
its judgements accepted only on tasks they were handed (PullTasks): an id
cannot answer tasks nobody gave it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import yaml


class TokensFileError(ValueError):
    """The tokens file is malformed; the message names the entry and field."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, and which projects they may touch."""

    name: str
    projects: frozenset[str]
    all_projects: bool = False
    annotators: frozenset[str] = frozenset()
    all_annotators: bool = True
    max_streams: int | None = None  # None: the server's default
    max_leases: int | None = None
    require_lease: bool = False  # a judgement is accepted only on a task its annotator was handed

    def allows(self, project: str) -> bool:
        return self.all_projects or project in self.projects

    def speaks_for(self, annotator_id: str) -> bool:
        return self.all_annotators or annotator_id in self.annotators

    def first_foreign(self, annotator_ids: Iterable[str]) -> str | None:
        """The first annotator id this principal may not act as, or None."""
        if self.all_annotators:
            return None
        for annotator_id in annotator_ids:
            if annotator_id not in self.annotators:
                return annotator_id
        return None

    def first_denied(self, projects: Iterable[str]) -> str | None:
        for project in projects:
            if not self.allows(project):
                return project
        return None

    def scope(self) -> list[str] | None:
        """The projects in scope, or None for every project."""
        return None if self.all_projects else sorted(self.projects)


ANONYMOUS = Principal("anonymous", frozenset(), all_projects=True)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenAuth:
    """Maps presented bearer tokens to principals."""

    def __init__(self, principals_by_digest: dict[str, Principal]):
        self._by_digest = principals_by_digest

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenAuth":
        from services.exposure import ExposureError, check_secret_file

        try:
            check_secret_file(path, "tokens file")  # others may not read it (its group may: Kubernetes' fsGroup)
        except ExposureError as err:
            raise TokensFileError(str(err)) from None
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise TokensFileError(f"tokens file {path}: {err}") from None
        entries = raw.get("tokens") if isinstance(raw, dict) else None
        if not isinstance(entries, list) or not entries:
            raise TokensFileError(f"tokens file {path}: expected a non-empty list under 'tokens'")
        return cls(_parse_entries(entries, str(path)))

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal | None:
        """The principal for the call's bearer token, or None."""
        for key, value in metadata or ():
            if key.lower() != "authorization":
                continue
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            return self._by_digest.get(_digest(token.strip()))
        return None


def _parse_entries(entries: list, path: str) -> dict[str, Principal]:
    principals: dict[str, Principal] = {}
    for i, entry in enumerate(entries):
        where = f"tokens file {path}: tokens[{i}]"
        if not isinstance(entry, dict):
            raise TokensFileError(f"{where}: expected a mapping")
        unknown = set(entry) - {"name", "token", "sha256", "projects", "annotators", "max_streams", "max_leases", "require_lease"}
        if unknown:
            raise TokensFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        name = entry.get("name") or f"token-{i}"
        if ("token" in entry) == ("sha256" in entry):
            raise TokensFileError(f"{where}.token: give exactly one of 'token' or 'sha256'")
        digest = _digest(str(entry["token"])) if "token" in entry else str(entry["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise TokensFileError(f"{where}.sha256: expected 64 hex digits")
        projects = entry.get("projects")
        if not isinstance(projects, list) or not projects or not all(isinstance(p, str) and p for p in projects):
            raise TokensFileError(f"{where}.projects: expected a non-empty list of project names (or ['*'])")
        if digest in principals:
            raise TokensFileError(f"{where}.token: the same token appears twice")
        annotators = _annotators(entry, where)
        principals[digest] = Principal(
            name,
            frozenset(p for p in projects if p != "*"),
            all_projects="*" in projects,
            annotators=frozenset(a for a in annotators if a != "*"),
            all_annotators="*" in annotators,
            max_streams=_positive(entry, "max_streams", where),
            max_leases=_positive(entry, "max_leases", where),
            require_lease=_require_lease(entry, "*" in annotators, where),
        )
    return principals


def _annotators(entry: dict, where: str) -> list[str]:
    if "annotators" not in entry:
        if not entry.get("name"):
            raise TokensFileError(f"{where}.annotators: a token without a name must list the annotator ids it speaks for (or ['*'])")
        return [str(entry["name"])]
    annotators = entry["annotators"]
    if not isinstance(annotators, list) or not annotators or not all(isinstance(a, str) and a for a in annotators):
        raise TokensFileError(f"{where}.annotators: expected a non-empty list of annotator ids (or ['*'])")
    return annotators


def _require_lease(entry: dict, relays_anyone: bool, where: str) -> bool:
    """By default a person's token (named annotators) answers only tasks it leased; a tool that
    relays anyone (`["*"]`: webhooks, imports) does not lease, so it need not."""
    value = entry.get("require_lease", not relays_anyone)
    if not isinstance(value, bool):
        raise TokensFileError(f"{where}.require_lease: expected true or false, got {value!r}")
    return value


def _positive(entry: dict, key: str, where: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TokensFileError(f"{where}.{key}: expected a whole number >= 1, got {value!r}")
    return value

"""Who is at the labeling page: three sign-in modes, server-side sessions, the proxy's word.

The annotator id goes into every stored judgement and into annotator-quality figures, so
it must come from a credential, never from what the browser says about itself. The mode is
`auth.mode` in the config (config.py checks all of it before anything starts):

tokens (the default when `auth.tokens_file` is set)
    Each annotator has a personal token, in a YAML file that others may not read
    (`chmod 600`; its group may, for Kubernetes' fsGroup):

        - {annotator_id: alice, token: "at least 16 characters, one word"}
        - {annotator_id: bob, token: "..."}

    or the same as a mapping (`alice: "..."`). Make tokens with
    `python -c 'import secrets; print(secrets.token_urlsafe(32))'`. `POST /api/signin
    {"token": "..."}` compares the token's SHA-256 with every entry's in constant time
    (hmac.compare_digest, no early exit) and on a match opens a session.

open (the default without a tokens file; only on a loopback host)
    `POST /api/signin {"annotator_id": "alice"}`: the id typed is believed. For development
    on one machine; config.py refuses it on any other address.

    A session (tokens and open modes) is an opaque random id (secrets.token_urlsafe) in the
    cookie `hitl_session` (HttpOnly, SameSite=Strict, Secure when served over TLS), mapped in
    this server's memory to the annotator id until `auth.session_ttl_seconds` pass or the
    annotator signs out. The cookie carries no id, so a forged cookie signs in nobody. Only
    the SHA-256 of a session id is kept; at most `auth.max_sessions` are (the oldest goes
    first); a restart signs everyone out.

header (behind a sign-in proxy: oauth2-proxy, or any proxy that signs people in with OIDC)
    The proxy signs the annotator in and passes the id in a header (`auth.user_header`,
    default `X-Forwarded-User`). Anyone who reaches this server directly could send that
    header too, so it is believed only when the request also carries the shared secret of
    `auth.proxy_secret_file` in `auth.proxy_secret_header` (default `X-Hitl-Proxy-Secret`),
    compared in constant time; without it every API call is 401. No sign-in form, no session
    here: the proxy keeps the session.

    With oauth2-proxy (alpha config, `--alpha-config`), in front of `hitl label-web` bound to
    127.0.0.1 (or to a pod address with TLS, or `insecure_http: true` on a private network):

        upstreamConfig:
          upstreams: [{id: label-web, path: /, uri: "http://127.0.0.1:8089"}]
        injectRequestHeaders:
          - name: X-Forwarded-User
            values: [{claimSource: {claim: preferred_username}}]   # or email, user
          - name: X-Hitl-Proxy-Secret
            values: [{secretSource: {fromFile: /etc/hitl/label-web/proxy-secret}}]

    (before oauth2-proxy v7.14 the sources are not nested: `- claim: preferred_username`,
    `- fromFile: ...`). oauth2-proxy replaces, not appends to, a header it injects, so a
    browser cannot smuggle its own `X-Forwarded-User` through it. The label-web side:

        auth: {mode: header, proxy_secret_file: /etc/hitl/label-web/proxy-secret}

    The same secret file (mode 0600, one word of at least 16 characters) is read by both.
    Any other proxy works the same way (nginx: `auth_request` to the identity provider,
    `proxy_set_header X-Forwarded-User $user; proxy_set_header X-Hitl-Proxy-Secret "...";`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import yaml
from aiohttp import web

from services.exposure import ExposureError, check_secret_file

Mode = Literal["tokens", "header", "open"]
MODES: tuple[Mode, ...] = ("tokens", "header", "open")
COOKIE = "hitl_session"
MAX_ID_BYTES = 128
"""Longest annotator id, task id, token or session id (bytes of UTF-8), as on the service."""
MIN_SECRET_CHARS = 16
MAX_PROXY_SECRET_BYTES = 1024


def id_problem(value: object) -> str | None:
    """Why `value` cannot be an id (annotator, task), or None: checked before anything is stored."""
    if not isinstance(value, str) or not value.strip():
        return "required: a non-empty string"
    if value != value.strip():
        return "must not start or end with spaces"
    if "\x00" in value or len(value.encode("utf-8")) > MAX_ID_BYTES:
        return f"at most {MAX_ID_BYTES} bytes of UTF-8, without NUL characters"
    return None


def _secret_problem(value: object, max_bytes: int) -> str | None:
    """Why `value` cannot be a token or shared secret (the value itself is never in a message)."""
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS or any(c.isspace() for c in value):
        return f"a token is one word of at least {MIN_SECRET_CHARS} characters"
    if len(value.encode("utf-8")) > max_bytes:
        return f"a token is at most {max_bytes} bytes of UTF-8"
    return None


def digest(text: str) -> bytes:
    """SHA-256 of a secret: equal-length values for compare_digest, and no secret kept in memory."""
    return hashlib.sha256(text.encode("utf-8")).digest()


# -- the tokens file ----------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotatorTokens:
    """Each annotator's token (its digest) and id: one token signs in exactly one annotator."""

    entries: tuple[tuple[bytes, str], ...]

    def annotator_of(self, token: str) -> str | None:
        """The annotator whose token this is, or None; every entry is compared, in constant time."""
        given = digest(token)
        found = None
        for known, annotator in self.entries:
            if hmac.compare_digest(given, known) and found is None:
                found = annotator
        return found


def _token_pairs(raw: object, where: str) -> list[tuple[object, object]]:
    """(annotator_id, token) pairs of a tokens file: a list of mappings, or one mapping."""
    if isinstance(raw, dict):
        return list(raw.items())
    if not isinstance(raw, list):
        raise ExposureError(f"{where}: expected a list of {{annotator_id, token}} or a mapping annotator_id: token")
    pairs = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"annotator_id", "token"}:
            raise ExposureError(f"{where}: entry {i}: expected exactly the keys annotator_id and token")
        pairs.append((entry["annotator_id"], entry["token"]))
    return pairs


def read_annotator_tokens(path: str | Path, field: str = "auth.tokens_file") -> AnnotatorTokens:
    """The tokens file, checked: not readable by others, each id and token valid, no token twice."""
    p = check_secret_file(path, field)
    where = f"{field}: {p}"
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ExposureError(f"{where}: cannot read it: {err}") from None
    entries: list[tuple[bytes, str]] = []
    for i, (annotator, token) in enumerate(_token_pairs(raw, where)):
        problem = id_problem(annotator)
        if problem is not None:
            raise ExposureError(f"{where}: entry {i}: annotator_id: {problem}")
        problem = _secret_problem(token, MAX_ID_BYTES)
        if problem is not None:
            raise ExposureError(f"{where}: entry {i} ({annotator}): token: {problem}")
        if any(known == digest(token) for known, _ in entries):
            raise ExposureError(f"{where}: entry {i} ({annotator}): token: the same token appears twice")
        entries.append((digest(token), annotator))
    if not entries:
        raise ExposureError(f"{where}: holds no token")
    return AnnotatorTokens(tuple(entries))


def read_proxy_secret(path: str | Path, field: str = "auth.proxy_secret_file") -> bytes:
    """The digest of the proxy's shared secret (the file's one word), from a file others may not read."""
    p = check_secret_file(path, field)
    try:
        secret = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ExposureError(f"{field}: {p}: cannot read it: {err}") from None
    problem = _secret_problem(secret, MAX_PROXY_SECRET_BYTES)
    if problem is not None:
        raise ExposureError(f"{field}: {p}: {problem.replace('a token', 'the secret')}")
    return digest(secret)


# -- sessions ------------------------------------------------------------------------------


class Sessions:
    """Opaque session ids -> annotator ids, in memory: expiring, bounded, oldest evicted first.

    Only the digest of a session id is kept (a memory dump shows no usable cookie). Every
    session lives `ttl_s` from its opening, so insertion order is expiry order and expired
    ones are dropped from the front. Used from the event loop only (no lock needed)."""

    def __init__(self, ttl_s: float, max_sessions: int, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._by_digest: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_digest)

    def _drop_expired(self, now: float) -> None:
        while self._by_digest:
            key, (_, expires) = next(iter(self._by_digest.items()))
            if expires > now:
                return
            del self._by_digest[key]

    def open(self, annotator: str) -> str:
        """A new session id for `annotator`; the oldest session goes when there are too many."""
        now = self._clock()
        self._drop_expired(now)
        session_id = secrets.token_urlsafe(32)
        self._by_digest[digest(session_id)] = (annotator, now + self._ttl_s)
        while len(self._by_digest) > self._max:
            self._by_digest.popitem(last=False)
        return session_id

    def annotator_of(self, session_id: str | None) -> str | None:
        """Whose live session this is, or None (unknown, expired, or not a session id at all)."""
        if not session_id or len(session_id) > MAX_ID_BYTES:
            return None
        now = self._clock()
        self._drop_expired(now)
        found = self._by_digest.get(digest(session_id))
        return found[0] if found is not None else None

    def close(self, session_id: str | None) -> None:
        """Forget a session (sign-out): its cookie signs in nobody from now on."""
        if session_id and len(session_id) <= MAX_ID_BYTES:
            self._by_digest.pop(digest(session_id), None)


# -- who is asking ---------------------------------------------------------------------------


class Denied(Exception):
    """A request names nobody (401), or names them in a malformed way (400): field and reason."""

    def __init__(self, status: int, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason


@dataclass
class Gate:
    """Turns a request into an annotator id, by the configured mode; the only place that does."""

    mode: Mode
    sessions: Sessions
    tokens: AnnotatorTokens | None = None
    user_header: str = "X-Forwarded-User"
    secret_header: str = "X-Hitl-Proxy-Secret"
    proxy_secret: bytes | None = None  # its digest
    secure_cookie: bool = False
    session_ttl_s: int = 12 * 3600

    def annotator_of(self, request: web.Request) -> str:
        """The signed-in annotator; Denied (401) when there is none."""
        if self.mode == "header":
            return self._from_proxy(request)
        annotator = self.sessions.annotator_of(request.cookies.get(COOKIE))
        if annotator is None:
            raise Denied(401, "annotator_id", "sign in first")
        return annotator

    def _from_proxy(self, request: web.Request) -> str:
        """The proxy's user header, believed only with the proxy's secret beside it."""
        presented = request.headers.get(self.secret_header)
        assert self.proxy_secret is not None
        if presented is None or not hmac.compare_digest(digest(presented), self.proxy_secret):
            raise Denied(401, self.secret_header, "missing or wrong: open this page through the sign-in proxy")
        user = request.headers.get(self.user_header)
        if user is None or not user.strip():
            raise Denied(401, self.user_header, "the sign-in proxy named no annotator")
        problem = id_problem(user)
        if problem is not None:
            raise Denied(400, self.user_header, problem)
        return user

    def sign_in(self, body: dict[str, object]) -> str:
        """The annotator a sign-in body names, by the mode: a token's owner, or (open) the id typed."""
        if self.mode == "header":
            raise Denied(400, "auth.mode", "the sign-in proxy signs you in; this server has no sign-in form")
        if self.mode == "tokens":
            return self._token_owner(body)
        if set(body) != {"annotator_id"}:
            raise Denied(400, "body", 'expected {"annotator_id": "..."}')
        problem = id_problem(body["annotator_id"])
        if problem is not None:
            raise Denied(400, "annotator_id", problem)
        return str(body["annotator_id"])

    def _token_owner(self, body: dict[str, object]) -> str:
        """Whose token the body holds; a body naming an annotator is refused (the token names them)."""
        if set(body) != {"token"}:
            raise Denied(400, "body", 'expected {"token": "..."} (your personal token names you)')
        token = body["token"]
        if not isinstance(token, str) or not token:
            raise Denied(400, "token", "required: your personal token")
        if len(token.encode("utf-8")) > MAX_ID_BYTES:
            raise Denied(400, "token", f"at most {MAX_ID_BYTES} bytes of UTF-8")
        assert self.tokens is not None
        annotator = self.tokens.annotator_of(token)
        if annotator is None:
            raise Denied(401, "token", "not a token of this page")
        return annotator

    def set_cookie(self, response: web.StreamResponse, annotator: str) -> None:
        """Open a session for `annotator` and hand its id to the browser, where scripts cannot read it."""
        session_id = self.sessions.open(annotator)
        response.set_cookie(COOKIE, session_id, max_age=self.session_ttl_s, path="/", httponly=True,
                            samesite="Strict", secure=self.secure_cookie)

    def sign_out(self, request: web.Request, response: web.StreamResponse) -> None:
        """Forget the request's session on this server, and its cookie in the browser."""
        self.sessions.close(request.cookies.get(COOKIE))
        response.del_cookie(COOKIE, path="/", secure=self.secure_cookie, httponly=True, samesite="Strict")

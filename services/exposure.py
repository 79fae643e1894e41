"""What a network surface may expose, decided before it binds: shared by every server here.

    check_exposure("0.0.0.0", authenticated=False, tls=False, insecure=False, field="generation")
    keys = read_api_keys("/etc/hitl/generation/api-keys")      # refuses a file others can read
    key_matches(presented, keys)                                 # constant-time

The rule: on a loopback address a surface may run without authentication (only this machine
reaches it); on any other address it needs authentication, and TLS unless `insecure` says,
explicitly, that plain text is wanted (a TLS-terminating proxy in front, a private network).
Secret files (keys, tokens) must not be readable by others.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import stat
from pathlib import Path

LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


class ExposureError(ValueError):
    """A surface would start open to the network, or a secret file is unsafe; names the field."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only reaches this machine."""
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name: every address it resolves to must be a loopback one
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(host: str, authenticated: bool, tls: bool, insecure: bool, field: str,
                   auth: str | None = None, tls_fields: str | None = None, insecure_field: str | None = None) -> None:
    """Refuse to serve on a non-loopback `host` without authentication, or without TLS unless
    `insecure`. The message names what to set: `auth`, `tls_fields` and `insecure_field`
    (defaults: the generation server's fields under `field`)."""
    if is_loopback(host):
        return
    auth = auth or f"{field}.api_keys_file"
    tls_fields = tls_fields or f"{field}.tls_cert_file and {field}.tls_key_file"
    insecure_field = insecure_field or f"{field}.insecure_http: true"
    if not authenticated:
        raise ExposureError(f"{field}: listening on {host!r} (not a loopback address) needs authentication: "
                            f"set {auth}, or bind a loopback address")
    if not tls and not insecure:
        raise ExposureError(f"{field}: listening on {host!r} (not a loopback address) needs TLS: set "
                            f"{tls_fields}, or {insecure_field} to serve plain text on purpose "
                            "(e.g. behind a TLS-terminating proxy)")


def check_secret_file(path: str | os.PathLike, what: str) -> Path:
    """The file exists, is a regular file, and others (not the owner, not its group) may not
    read it. Group read is allowed: Kubernetes gives mounted secrets to the pod's `fsGroup`."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ExposureError(f"{what}: {p} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ExposureError(f"{what}: {p} is not a regular file")
    if st.st_mode & stat.S_IRWXO:
        raise ExposureError(f"{what}: {p} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                            f"chmod o-rwx {p}")
    return p


def read_api_keys(path: str | os.PathLike, what: str = "api_keys_file") -> tuple[str, ...]:
    """API keys, one per line (blank lines and `#` comments skipped); at least one, each at
    least 16 characters."""
    p = check_secret_file(path, what)
    keys = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if len(key) < 16 or any(c.isspace() for c in key):
            raise ExposureError(f"{what}: {p} line {n}: a key is one word of at least 16 characters")
        keys.append(key)
    if not keys:
        raise ExposureError(f"{what}: {p} holds no key")
    return tuple(keys)


def redact_url(url: str) -> str:
    """The URL with its password (``user:password@``) replaced by ``***``, for logs and messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def key_matches(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Whether `presented` is one of `keys`, compared in constant time (every key is compared)."""
    if presented is None:
        return False
    given = presented.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found

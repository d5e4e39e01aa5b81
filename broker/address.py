"""Broker URLs: the one place a URL is read for its password, its TLS settings and the route to it.

``redact(text)`` replaces the password of every URL in ``text`` (``redis://:secret@host`` and
``redis://user:secret@host`` become ``redis://:***@host``, ``redis://user:***@host``; a ``password=``
query argument becomes ``password=***``). Every log line, error and status line that may hold a broker
URL goes through it: the password never leaves the process that was given it.

``connection_options(url, ca_file)`` are the keyword arguments ``redis`` needs for ``url``: for a
``rediss://`` URL the server's certificate is verified (against ``ca_file``, else ``XSHARD_REDIS_CA_FILE``,
else the system's store) and its name checked against the host in the URL.

``local_address(url)`` is the address of this host's interface that reaches the broker: where the other
hosts of a deployment reach this one (the default serving address of its shard files).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import SettingError

log = logging.getLogger(__name__)

CA_FILE_ENV = "XSHARD_REDIS_CA_FILE"
SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379
MASK = "***"

# scheme://user:password@ : the password runs to the last '@' before the host (a '/' ends the authority)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<password>[^\s/]*)@")
_QUERY = re.compile(r"(?P<head>[?&]password=)[^&\s'\"]*", re.IGNORECASE)


def redact(text: object) -> str:
    """``text`` (a URL, a log line, an error message) with every URL password replaced by ``***``."""
    out = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", str(text))
    return _QUERY.sub(lambda m: f"{m.group('head')}{MASK}", out)


def has_password(url: str) -> bool:
    return redact(url) != url


def check_url(url: str) -> str:
    """``url`` if its scheme is one redis speaks; else a ``SettingError`` naming it without its password."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise SettingError(f"broker URL must start with redis://, rediss:// or unix://, got {redact(url)!r}")
    return url


def ca_file_setting(ca_file: str | os.PathLike[str] | None = None) -> str:
    """The CA file to verify a ``rediss://`` broker with: ``ca_file``, else ``XSHARD_REDIS_CA_FILE``, else ""."""
    return str(ca_file) if ca_file else os.environ.get(CA_FILE_ENV, "")


def connection_options(url: str, ca_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis.from_url(url, ...)``: TLS verification for ``rediss://``."""
    if urlsplit(check_url(url)).scheme != "rediss":
        return {}
    ca = ca_file_setting(ca_file)
    opts: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if ca:
        if not Path(ca).is_file():
            raise SettingError(f"CA file {ca} (for {redact(url)}) does not exist; set {CA_FILE_ENV} or --redis-ca-file")
        opts["ssl_ca_certs"] = ca
    return opts


def url_host(address: str) -> str:
    """An address as it goes in a URL's authority (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


def local_address(url: str) -> str:
    """The address of this host's interface on the route to the broker of ``url`` (127.0.0.1 for a local
    socket). A UDP socket is connected, which sends nothing: the kernel only picks the route."""
    parts = urlsplit(check_url(url))
    if parts.scheme == "unix" or not parts.hostname:
        return "127.0.0.1"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            parts.hostname, parts.port or DEFAULT_PORT, 0, socket.SOCK_DGRAM
        )[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(addr)
            return str(s.getsockname()[0])
    except OSError as e:
        raise SettingError(f"no route from this host to the broker at {redact(url)}: {e}") from e

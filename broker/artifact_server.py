"""Serving shard files by hash to the other hosts, and announcing them (``artifacts``).

``ArtifactServer`` is a read-only HTTP server with one route, ``GET /<64 hex digits>``: the file
``<digest>.onnx`` of one directory, streamed with ``sendfile``. The name opened is built from the digest
matched in the request, never from the request's path; anything else is 404, and nothing is written.

``Holding`` is what a holder (a worker, a coordinator) runs: the server, bound where the other hosts
reach it, and a loop that announces every hash-named file of the directory with a TTL, refreshed every
``refresh_s`` (at once after ``announce_now``), withdrawn on close. A broker outage only delays the next
announcement: the TTL lapses and fetchers skip this holder until it announces again.

Where it listens (``serving_address``): ``XSHARD_ARTIFACT_URL`` (or the caller's override) is the URL
announced, and the server binds every interface on its port; by default it binds the local address of
the route to the broker (``address.local_address``) on a free port and announces that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from .address import local_address, url_host
from .artifacts import ArtifactIndex, artifact_path, held_hashes
from .errors import BrokerUnavailable, SettingError
from .streams import Broker

log = logging.getLogger(__name__)

ARTIFACT_URL_ENV = "XSHARD_ARTIFACT_URL"
_ROUTE = re.compile(r"^/([0-9a-f]{64})$")
ANNOUNCE_TIMEOUT_S = 5.0
WITHDRAW_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class ServingAddress:
    """Where the server binds and the base URL it announces (empty: ``http://<bound host>:<port>``)."""

    bind_host: str
    bind_port: int
    announced_url: str = ""


def serving_address(broker_url: str, override: str = "") -> ServingAddress:
    """The override (``XSHARD_ARTIFACT_URL`` when not given) announced as is, served on every interface
    at its port; else the local address of the route to the broker, on a free port."""
    url = override or os.environ.get(ARTIFACT_URL_ENV, "")
    if not url:
        return ServingAddress(local_address(broker_url), 0)
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise SettingError(f"artifact URL must be http://host:port, got {url!r} ({ARTIFACT_URL_ENV} or --artifact-url)")
    return ServingAddress("0.0.0.0", parts.port, url.rstrip("/"))


class ArtifactServer:
    """Serves ``directory``'s ``<sha256>.onnx`` files at ``/<sha256>``, read-only, in a daemon thread."""

    def __init__(self, directory: Path, host: str, port: int = 0) -> None:
        self.directory = directory
        self.served: Counter[str] = Counter()  # digest -> complete responses sent
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("artifact http: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.respond(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                server.respond(self, body=False)

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise SettingError(f"cannot serve shard files on {host}:{port}: {e}") from e
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="xshard-artifacts", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"

    def respond(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        m = _ROUTE.match(handler.path)
        if m is None:
            handler.send_error(HTTPStatus.NOT_FOUND)
            return
        sha256 = m.group(1)
        try:
            f = open(artifact_path(self.directory, sha256), "rb")  # noqa: SIM115 (closed below)
        except OSError:
            handler.send_error(HTTPStatus.NOT_FOUND)
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            handler.send_response(HTTPStatus.OK)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Content-Length", str(size))
            handler.send_header("Cache-Control", "no-store")
            handler.end_headers()
            if not body:
                return
            with contextlib.suppress(OSError):  # the fetcher went away: its problem, not the server's
                handler.connection.sendfile(f)
                with self._lock:
                    self.served[sha256] += 1
                log.info("served shard file %s (%d bytes) to %s", sha256[:12], size, handler.client_address[0])

    def start(self) -> ArtifactServer:
        self._thread.start()
        log.info("serving shard files of %s at %s", self.directory, self.url)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


@dataclass(frozen=True, slots=True)
class HoldingSettings:
    ttl_ms: int = 6000  # a holder not heard of for this long is skipped by fetchers
    refresh_s: float = 2.0

    def __post_init__(self) -> None:
        if not (self.ttl_ms > 0 and 0 < self.refresh_s * 1000 < self.ttl_ms):
            raise SettingError(f"holding: need 0 < refresh_s ({self.refresh_s}) < ttl_ms ({self.ttl_ms}) / 1000")


class Holding:
    """Serve a shard directory by hash and keep announcing it; ``async with`` or ``start``/``close``."""

    def __init__(
        self,
        broker: Broker,
        holder_id: str,
        directory: Path,
        where: ServingAddress,
        settings: HoldingSettings | None = None,
    ) -> None:
        self.index = ArtifactIndex(broker)
        self.holder_id = holder_id
        self.directory = directory
        self.where = where
        self.settings = settings or HoldingSettings()
        self.server: ArtifactServer | None = None
        self._announced: list[str] = []
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        if self.server is None:
            raise SettingError("holding not started")
        return self.where.announced_url or self.server.url

    async def start(self) -> Holding:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.server = ArtifactServer(self.directory, self.where.bind_host, self.where.bind_port).start()
        with contextlib.suppress(BrokerUnavailable):  # the loop tries again
            await self._announce()
        self._task = asyncio.get_running_loop().create_task(self._announce_until_stopped())
        return self

    async def __aenter__(self) -> Holding:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def announce_now(self) -> None:
        """Announce at once (a file was just added), without waiting for the next refresh."""
        self._wake.set()

    async def _announce(self) -> None:
        held = held_hashes(self.directory)
        await asyncio.wait_for(
            self.index.announce(self.holder_id, self.url, held, self.settings.ttl_ms), ANNOUNCE_TIMEOUT_S
        )
        if held != self._announced:
            log.info("holder %s announces %d shard file(s) at %s", self.holder_id, len(held), self.url)
        self._announced = held

    async def _announce_until_stopped(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.refresh_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                await self._announce()
            except (BrokerUnavailable, TimeoutError) as e:
                why = str(e) or f"no answer within {ANNOUNCE_TIMEOUT_S}s"
                log.warning("holder %s: announcing shard files failed (%s); trying again", self.holder_id, why)

    async def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.server is not None:
            with contextlib.suppress(BrokerUnavailable, TimeoutError):
                await asyncio.wait_for(self.index.withdraw(self.holder_id, self._announced), WITHDRAW_TIMEOUT_S)
            self.server.close()
            self.server = None

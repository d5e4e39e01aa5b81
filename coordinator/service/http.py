"""The coordinator's HTTP side (``xshard coordinator --http HOST:PORT``): a small asyncio server, GET only.

/              the live status page (``page.html``): refreshes itself from /status.json; the history
               report's plots below it when the coordinator has ``--db``
/status.json   the fleet status (``status.FleetStatus``) and this coordinator's warm managers
/metrics       Prometheus text exposition (``metrics.ServiceMetrics``)
/report        the history report (``xshard report``'s page) of ``--db``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from importlib import resources
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

from coordinator.history.report import NoHistory, load, render_html
from coordinator.history.store import HistoryError

if TYPE_CHECKING:
    from coordinator.service.service import CoordinatorService

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 16 * 1024
HTML = "text/html; charset=utf-8"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:8080`` = all interfaces); ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host or "0.0.0.0", int(port)


class StatusServer:
    def __init__(self, service: CoordinatorService, host: str, port: int) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._page = resources.files("coordinator.service").joinpath("page.html").read_text()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("coordinator %s: status page on http://%s:%d/", self.service.service_id, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), READ_TIMEOUT_S)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            method, path = self._request_line(head)
            status, ctype, body = await self._route(method, path)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        except ValueError:
            status, ctype, body = 400, "text/plain", b"bad request\n"
        head_out = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head_out.encode() + body)
            await writer.drain()
        writer.close()

    @staticmethod
    def _request_line(head: bytes) -> tuple[str, str]:
        if len(head) > MAX_REQUEST_BYTES:
            raise ValueError("request head too large")
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            raise ValueError("malformed request line")
        return parts[0], parts[1].split("?", 1)[0]

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        if path == "/":
            return 200, HTML, self._render_page().encode()
        if path == "/status.json":
            return 200, "application/json", json.dumps(self.snapshot(), default=str).encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.service.metrics.exposition()
        if path == "/report":
            return await self._report()
        return 404, "text/plain", b"not found\n"

    def _render_page(self) -> str:
        interval_ms = int(self.service.settings.status_interval_s * 1000)
        has_db = "true" if self.service.db_path else "false"
        return self._page.replace("__REFRESH_MS__", str(interval_ms)).replace("__HAS_DB__", has_db)

    def snapshot(self) -> dict[str, Any]:
        s = self.service
        managers = [
            {"key": w.key.label(), "coordinator_id": w.manager.coordinator_id, "users": w.users}
            for w in s.pool.entries()
        ]
        return {
            "service_id": s.service_id,
            "namespace": s.settings.namespace,
            "fleet": s.fleet.as_dict() if s.fleet else None,
            "managers": managers,
        }

    async def _report(self) -> tuple[int, str, bytes]:
        db = self.service.db_path
        if not db:
            return 404, "text/plain", b"this coordinator has no --db\n"
        try:
            html = await asyncio.to_thread(lambda: render_html(load(db), db))
        except NoHistory as e:
            return 200, HTML, f"<p>{e}</p>".encode()
        except HistoryError as e:
            return 500, "text/plain", f"{e}\n".encode()
        return 200, HTML, html.encode()

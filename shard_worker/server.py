"""Static HTTP server for the shard page: page files, onnxruntime-web assets and shard ONNX files.

Serves on 127.0.0.1 only, with COOP/COEP headers so the page is cross-origin isolated (WASM threads).
Routes: ``/`` and ``/<page file>`` from ``web/``, ``/ort/<file>`` from onnxruntime-web's ``dist``,
``/shards/<sha256>.onnx`` from the shared shard cache, with a shard's external data files
``/shards/<sha256>.data`` (``broker.shardfiles``). Files are streamed in chunks, never read whole: a data
file can be gigabytes.
"""

from __future__ import annotations

import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
_SHARD = re.compile(r"^/shards/([0-9a-f]{64}\.(?:onnx|data))$")
CHUNK_BYTES = 4 * 2**20
_FILE = re.compile(r"^[A-Za-z0-9_.\-]+$")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".map": "application/json",
}


class StaticServer:
    """A threaded HTTP server on a free loopback port."""

    def __init__(self, ort_dir: Path, shard_dir: Path) -> None:
        self.ort_dir = ort_dir
        self.shard_dir = shard_dir
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("http: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = server.resolve(self.path.split("?", 1)[0].split("#", 1)[0])
                if path is None or not path.is_file():
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                with path.open("rb") as f:
                    while block := f.read(CHUNK_BYTES):
                        self.wfile.write(block)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="xshard-http", daemon=True)

    def resolve(self, url_path: str) -> Path | None:
        if url_path in ("/", "/index.html"):
            return WEB_DIR / "index.html"
        m = _SHARD.match(url_path)
        if m:
            return self.shard_dir / m.group(1)
        if url_path.startswith("/ort/"):
            name = url_path[len("/ort/") :]
            return self.ort_dir / name if _FILE.match(name) else None
        name = url_path.lstrip("/")
        return WEB_DIR / name if _FILE.match(name) else None

    def start(self) -> StaticServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

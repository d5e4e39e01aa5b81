"""The WebSocket bridge between a worker and its page.

The page connects to ``ws://127.0.0.1:PORT/bridge?token=T`` (a per-launch random token; any other
connection is refused). Text frames are JSON control messages; tensors travel in binary frames::

    [u32 LE header length][JSON header][pad to 8][tensor bytes, each padded to 8]

``header["tensors"]`` lists ``{name, dtype, shape, offset, length}`` with offsets from the data start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .errors import BridgeClosed, BridgeTimeout, PageError

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 60.0
_U32 = struct.Struct("<I")


def _align8(n: int) -> int:
    return (n + 7) & ~7


def encode_frame(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    metas, arrays, offset = [], [], 0
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        metas.append(
            {"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": offset, "length": a.nbytes}
        )
        arrays.append((offset, a))
        offset = _align8(offset + a.nbytes)
    head = json.dumps({**header, "tensors": metas}, separators=(",", ":")).encode()
    base = _align8(4 + len(head))
    frame = bytearray(base + offset)
    _U32.pack_into(frame, 0, len(head))
    frame[4 : 4 + len(head)] = head
    view = memoryview(frame)
    for off, a in arrays:
        view[base + off : base + off + a.nbytes] = a.reshape(-1).view(np.uint8).data
    return bytes(frame)


def decode_frame(frame: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (head_len,) = _U32.unpack_from(frame, 0)
    header = json.loads(frame[4 : 4 + head_len])
    base = _align8(4 + head_len)
    tensors = {}
    for t in header.get("tensors", []):
        dtype = np.dtype(t["dtype"]).newbyteorder("<")
        shape = [int(d) for d in t["shape"]]
        if math.prod(shape) * dtype.itemsize != t["length"]:
            raise PageError(f"page sent tensor {t['name']} with {t['length']} bytes for {t['dtype']}{shape}")
        start = base + t["offset"]
        tensors[t["name"]] = np.frombuffer(frame, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
    return header, tensors


@dataclass(frozen=True, slots=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    kernel_ms: float
    provider: str
    adapter: str


class Bridge:
    """Serves one page connection; request/response over the WebSocket with ids."""

    def __init__(self) -> None:
        self.token = secrets.token_urlsafe(24)
        self.port = 0
        self.capabilities: dict[str, Any] = {}
        self.choice: dict[str, Any] = {}
        self._server: Server | None = None
        self._conn: ServerConnection | None = None
        self._hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self.closed = asyncio.Event()
        self.close_reason = ""

    async def start(self) -> Bridge:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            max_size=None,
            process_request=self._check,
            compression=None,
            ping_interval=None,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        return self

    def _check(self, conn: ServerConnection, request: Request) -> Response | None:
        query = parse_qs(urlparse(request.path).query)
        if query.get("token", [""])[0] != self.token or self._conn is not None:
            return conn.respond(HTTPStatus.FORBIDDEN, "bad token or already connected\n")
        return None

    async def _handle(self, conn: ServerConnection) -> None:
        self._conn = conn
        try:
            async for raw in conn:
                self._dispatch(raw)
        except ConnectionClosed:
            pass
        finally:
            self._lost(f"page bridge closed (code {conn.close_code})")

    def _dispatch(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            header, tensors = decode_frame(raw)
            fut = self._pending.pop(int(header["id"]), None)
            if fut and not fut.done():
                fut.set_result(RunResult(tensors, float(header["kernel_ms"]), header["provider"], header["adapter"]))
            return
        msg = json.loads(raw)
        op = msg.get("op")
        if op == "hello":
            self.capabilities = msg["caps"]
            self.choice = msg.get("choice") or {}
            if not self._hello.done():
                self._hello.set_result(msg["caps"])
        elif op == "fatal":
            if not self._hello.done():
                self._hello.set_exception(PageError(f"page failed to start: {msg.get('message')}"))
        elif op in ("ok", "error"):
            fut = self._pending.pop(int(msg["id"]), None)
            if fut and not fut.done():
                if op == "ok":
                    fut.set_result(msg.get("result"))
                else:
                    fut.set_exception(PageError(str(msg.get("message"))))

    def _lost(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        for fut in [*self._pending.values(), self._hello]:
            if not fut.done():
                fut.set_exception(BridgeClosed(reason))
        self._pending.clear()

    async def wait_hello(self, timeout_s: float = HELLO_TIMEOUT_S) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(asyncio.shield(self._hello), timeout_s)
        except TimeoutError as e:
            raise BridgeTimeout(f"page did not connect within {timeout_s}s") from e

    async def _call(self, send: Any, timeout_s: float, what: str) -> Any:
        if self._conn is None or self.closed.is_set():
            raise BridgeClosed(self.close_reason or "page not connected")
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._conn.send(send(rid))
            return await asyncio.wait_for(fut, timeout_s)
        except ConnectionClosed as e:
            raise BridgeClosed(f"page bridge closed during {what}") from e
        except TimeoutError as e:
            raise BridgeTimeout(f"page did not answer {what} within {timeout_s}s") from e
        finally:
            self._pending.pop(rid, None)

    async def request(self, op: str, timeout_s: float, **fields: Any) -> Any:
        return await self._call(lambda rid: json.dumps({"op": op, "id": rid, **fields}), timeout_s, op)

    async def run(
        self, key: str, tensors: dict[str, np.ndarray], timeout_s: float, fail: str | None = None
    ) -> RunResult:
        header: dict[str, Any] = {"op": "run", "key": key}
        if fail:
            header["fail"] = fail
        result: RunResult = await self._call(
            lambda rid: encode_frame({**header, "id": rid}, tensors), timeout_s, f"run {key}"
        )
        return result

    async def close(self) -> None:
        self._lost("bridge closed by worker")
        if self._conn is not None:
            await self._conn.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

"""The WebSocket bridge between a worker and its page.

The page connects to ``ws://127.0.0.1:PORT/bridge?token=T`` (a per-launch random token; any other
connection is refused). Text frames are JSON control messages; tensors travel in binary frames::

    [u32 LE header length][JSON header][pad to 8][tensor bytes, each padded to 8]

``header["tensors"]`` lists ``{name, dtype, shape, offset, length}`` with offsets from the data start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from broker.clock import now_ms

from .errors import BridgeClosed, BridgeTimeout, PageError, StepFailed

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
class Step:
    """One session a page run executes: ``key``; what it keeps of its inputs and outputs for the next step
    (``carry``; None: all its outputs); an injected fault (``fail``, tests only)."""

    key: str
    carry: tuple[str, ...] | None = None
    fail: str | None = None
    states: tuple[dict[str, Any], ...] = ()  # in a session: the KV-cache slots the page feeds and keeps

    def as_json(self) -> dict[str, Any]:
        body = {"key": self.key, "carry": None if self.carry is None else list(self.carry), "fail": self.fail}
        return {**body, "states": list(self.states)} if self.states else body


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step measured in the page (instants in epoch ms on the page's clock)."""

    kernel_ms: float
    provider: str
    adapter: str
    fed_ms: float = 0.0
    ran_ms: float = 0.0
    read_ms: float = 0.0

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> StepResult:
        if m.get("fault_refused"):
            log.error("page refused an injected fault: %s", m["fault_refused"])
        return cls(
            float(m["kernel_ms"]),
            str(m["provider"]),
            str(m["adapter"]),
            float(m.get("fed_ms", 0.0)),
            float(m.get("ran_ms", 0.0)),
            float(m.get("read_ms", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class RunResult:
    """A page run: the last step's carried tensors, each step's measures, and when the frames moved
    (``send_ms``, ``sent_ms``, ``result_ms`` on the worker's clock; ``page_*`` on the page's)."""

    outputs: dict[str, np.ndarray]
    steps: tuple[StepResult, ...]
    page_recv_ms: float = 0.0
    page_sent_ms: float = 0.0
    send_ms: float = 0.0
    sent_ms: float = 0.0
    result_ms: float = 0.0

    @property
    def kernel_ms(self) -> float:
        return sum(s.kernel_ms for s in self.steps)

    @property
    def provider(self) -> str:
        return self.steps[-1].provider if self.steps else ""

    @property
    def adapter(self) -> str:
        return self.steps[-1].adapter if self.steps else ""


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
            self._dispatch_frame(raw)
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

    def _dispatch_frame(self, raw: bytes) -> None:
        """A binary reply: a run's result, or a later step's failure with the tensors that step was given."""
        header, tensors = decode_frame(raw)
        fut = self._pending.pop(int(header["id"]), None)
        if fut is None or fut.done():
            return
        if header.get("op") == "echo":
            fut.set_result(tensors)
            return
        steps = tuple(StepResult.from_json(m) for m in header.get("steps") or ())
        if header.get("op") == "error":
            fut.set_exception(StepFailed(str(header.get("message")), int(header["step"]), tensors, steps))
            return
        recv, sent = float(header.get("recv_ms", 0.0)), float(header.get("sent_ms", 0.0))
        fut.set_result(RunResult(tensors, steps, recv, sent, result_ms=now_ms()))

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

    async def _call(self, send: Any, timeout_s: float, what: str, marks: list[float] | None = None) -> Any:
        """Send ``send(id)`` and wait for the reply with that id; ``marks`` gets the instant it was written."""
        if self._conn is None or self.closed.is_set():
            raise BridgeClosed(self.close_reason or "page not connected")
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._conn.send(send(rid))
            if marks is not None:
                marks.append(now_ms())
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
        """Run one loaded session on ``tensors``; the result holds all its outputs."""
        return await self.run_steps((Step(key, None, fail),), tensors, timeout_s)

    async def run_steps(
        self,
        steps: Sequence[Step],
        tensors: dict[str, np.ndarray],
        timeout_s: float,
        session: dict[str, Any] | None = None,
    ) -> RunResult:
        """Run loaded sessions one after another inside the page, the tensors carried between them there;
        with ``session`` ({id, fresh, limit, ttl_ms}) each step's KV cache is fed and kept in the page.

        A failure of the first step is a PageError; of a later one, a StepFailed holding that step's inputs."""
        header: dict[str, Any] = {"op": "run", "steps": [s.as_json() for s in steps]}
        if session is not None:
            header["session"] = session
        marks: list[float] = []

        def frame(rid: int) -> bytes:
            marks.append(now_ms())
            return encode_frame({**header, "id": rid}, tensors)

        result: RunResult = await self._call(frame, timeout_s, f"run {steps[0].key}", marks)
        return dataclasses.replace(result, send_ms=marks[0], sent_ms=marks[1])

    async def echo(self, tensors: dict[str, np.ndarray], timeout_s: float) -> dict[str, np.ndarray]:
        """Send ``tensors`` in a frame the page sends straight back (benchmarks: a page round trip's floor)."""
        echoed: dict[str, np.ndarray] = await self._call(
            lambda rid: encode_frame({"op": "echo", "id": rid}, tensors), timeout_s, "echo"
        )
        return echoed

    async def close(self) -> None:
        self._lost("bridge closed by worker")
        if self._conn is not None:
            await self._conn.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

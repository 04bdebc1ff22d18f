"""A fault-injection HTTP proxy for tests: it sits between a client and a real MLflow server.

The proxy listens on 127.0.0.1 only and runs an asyncio loop on its own thread, so sync tests can
drive it. It understands enough HTTP/1.1 for keep-alive clients such as ``requests.Session``: it
reads a request head and its body (``Content-Length`` or chunked), forwards it on a fresh upstream
connection, reads the answer (``Content-Length``, chunked or close-delimited) and relays it to the
client with a ``Content-Length``, keeping the client connection open.

``set()`` changes what it does to the requests that follow:

- ``pass``: forward the request (after ``latency`` seconds).
- ``refuse``: close the listening socket, so connects are refused; open client connections are
  reset too, so a pooled connection cannot slip past. Leaving the mode listens again on the port.
- ``reset``: read the request, then reset the connection (RST) without answering.
- ``stall``: read the request and never answer. A stalled connection is reset when ``set()`` is
  called again, or at ``stop()``.
- ``http``: answer with ``status``, an optional ``Retry-After`` and an MLflow JSON error body,
  without forwarding (after ``latency`` seconds). With ``body`` (bytes), that body is the answer
  instead, sent as ``content_type``: an HTML login page with a 401, an empty 200, a truncated
  JSON document.
- ``commit_then_reset``: forward the request (after ``latency`` seconds) and read the server's
  answer, then reset the client connection: the server committed, the client sees a failure.
- ``late``: forward the request after ``latency`` seconds, even if the client has hung up
  meanwhile (a queue in front of the server: it commits what the client gave up on). Unlike
  ``pass``, the latency applies only to the requests the mode applies to (``path``, ``method``,
  ``count``); the others are forwarded at once.
- ``redirect``: answer ``status`` (301, 302, 303, 307 or 308) with a ``Location`` header:
  ``location`` when given, else this proxy's own URL for the same path and query (with
  ``count``, a redirect a client may follow back to the proxy, which then forwards it).

``method``, when given, applies the mode only to requests with that method (``POST``: a proxy or
a permission that refuses writes and lets reads through). ``body_limit``, when given, answers
every request whose body is larger with an HTML 413 page, whatever the mode (nginx's
``client_max_body_size``), without forwarding it.

``count`` applies the mode to the next ``count`` requests only, then the proxy goes back to
``pass``. ``path``, when given, applies the mode only to requests whose path contains it (with
``exact_path``, only to those whose path, without the query string, is ``path``); the others
are forwarded, and do not count.

``requests`` counts every request read, ``forwarded`` those that reached the server, and
``paths`` the requests read per path (without the query string), whatever the mode, and
``made_up`` the answers the proxy made up itself (an error page, a 413, a redirect) by status.
``in_flight`` is the number of forwarded requests the server has not answered yet (a client
that gave up does not end a request the server is still working on). ``handling`` is the number
of requests read whose fate is not settled yet (waiting out ``latency``, forwarded, or being
answered): 0 once everything a client sent, even a client now gone, has reached the server or
been refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

__all__ = ["FaultProxy"]

MODES = frozenset(
    {"pass", "refuse", "reset", "stall", "http", "commit_then_reset", "redirect", "late"}
)

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_ERROR_CODES = {
    400: "INVALID_PARAMETER_VALUE",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    409: "RESOURCE_ALREADY_EXISTS",
    429: "REQUEST_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    404: "Not Found",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_MAX_HEAD = 64 * 1024
_CONTROL_TIMEOUT = 10.0


class _ProtocolError(Exception):
    """Raised when a peer sends something this proxy cannot frame."""


@dataclass(slots=True)
class _Message:
    """One HTTP request or response: the first line, the headers and the whole body."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def wants_close(self) -> bool:
        connection = (self.header("Connection") or "").lower()
        if "close" in connection:
            return True
        return self.start.rstrip().endswith("HTTP/1.0") and "keep-alive" not in connection


@dataclass(frozen=True, slots=True)
class _Settings:
    latency: float = 0.0
    mode: str = "pass"
    status: int = 503
    retry_after: str | None = None
    count: int | None = None
    path: str | None = None
    body: bytes | None = None
    content_type: str = "text/html; charset=utf-8"
    method: str | None = None
    body_limit: int | None = None
    location: str | None = None
    exact_path: bool = False


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]] | None:
    """The first line and headers of a message; None at a clean end of stream."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise _ProtocolError("connection closed inside a message head") from None
    except asyncio.LimitOverrunError:
        raise _ProtocolError("message head too long") from None
    lines = raw.decode("latin-1").split("\r\n")
    start = lines[0]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _ProtocolError(f"bad header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return start, headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _ProtocolError(f"bad chunk size {size_text!r}") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def _read_body(
    reader: asyncio.StreamReader, message: _Message, *, until_close: bool
) -> bytes:
    if "chunked" in (message.header("Transfer-Encoding") or "").lower():
        return await _read_chunked(reader)
    length = message.header("Content-Length")
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise _ProtocolError(f"bad Content-Length {length!r}") from None
        return await reader.readexactly(size)
    if until_close:
        return await reader.read()
    return b""


async def _read_request(reader: asyncio.StreamReader) -> _Message | None:
    head = await _read_head(reader)
    if head is None:
        return None
    message = _Message(head[0], head[1], b"")
    message.body = await _read_body(reader, message, until_close=False)
    return message


async def _read_response(reader: asyncio.StreamReader, method: str) -> _Message:
    while True:
        head = await _read_head(reader)
        if head is None:
            raise _ProtocolError("upstream closed the connection without answering")
        message = _Message(head[0], head[1], b"")
        parts = message.start.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if 100 <= status < 200:  # an interim answer: the real one follows
            continue
        if method == "HEAD" or status in (204, 304):
            return message
        message.body = await _read_body(reader, message, until_close=True)
        return message


def _serialise(start: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [start, *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _page(status: int, body: bytes) -> bytes:
    """An HTML error page, as a proxy in front of the server sends one."""
    headers = [("Content-Type", "text/html"), ("Content-Length", str(len(body)))]
    return _serialise(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", headers, body)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST instead of a FIN, as a crashed peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A test-only TCP/HTTP proxy in front of ``127.0.0.1:upstream_port`` that injects faults.

    Use it as a context manager, or ``start()`` and ``stop()``. ``requests`` counts the HTTP
    requests it read (every mode), ``forwarded`` those that reached the server.
    """

    def __init__(self, upstream_port: int, *, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        # Bound now (not listening yet), so the port is ours and ``uri`` is known at once.
        self._listen_sock: socket.socket | None = self._bind(port or 0)
        self.port: int = int(self._listen_sock.getsockname()[1])
        self.uri = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self.forwarded = 0
        self.paths: Counter[str] = Counter()
        # The answers the proxy made up itself (an error page, a 413, a redirect), by status.
        self.made_up: Counter[int] = Counter()
        self.in_flight = 0
        self.handling = 0  # requests read whose answer (or fate) is not settled yet
        self._settings = _Settings()
        self._left: int | None = None  # requests the mode still applies to, None: no limit
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._release: asyncio.Event | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    @staticmethod
    def _bind(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return sock

    def start(self) -> FaultProxy:
        """Start serving on a background thread; returns self."""
        if self._closed:
            raise RuntimeError("a stopped FaultProxy cannot be started again")
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name=f"fault-proxy-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._begin(), loop).result(_CONTROL_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _begin(self) -> None:
        self._release = asyncio.Event()
        if self._settings.mode != "refuse":
            await self._listen()

    def stop(self) -> None:
        """Reset every connection, stop listening and end the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            with contextlib.suppress(RuntimeError, TimeoutError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(_CONTROL_TIMEOUT)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
            thread.join(_CONTROL_TIMEOUT)
        if self._listen_sock is not None:
            self._listen_sock.close()
            self._listen_sock = None
        with self._changed:
            self._changed.notify_all()

    async def _shutdown(self) -> None:
        await self._unlisten()
        self._drop_clients()
        tasks = list(self._clients.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- settings --------------------------------------------------------------------------------

    def set(
        self,
        *,
        latency: float = 0.0,
        mode: str = "pass",
        status: int = 503,
        retry_after: str | None = None,
        count: int | None = None,
        path: str | None = None,
        body: bytes | None = None,
        content_type: str = "text/html; charset=utf-8",
        method: str | None = None,
        body_limit: int | None = None,
        location: str | None = None,
        exact_path: bool = False,
    ) -> None:
        """Apply ``mode`` (and ``latency``) to the requests that follow; see the module docstring.

        Stalled connections are reset by any call. When this returns, the new mode is in force.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        if latency < 0:
            raise ValueError("latency cannot be negative")
        if count is not None and count < 0:
            raise ValueError("count cannot be negative")
        if mode == "refuse" and (count is not None or path is not None):
            raise ValueError("mode 'refuse' refuses connections, not requests: no count or path")
        if not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        if body is not None and mode != "http":
            raise ValueError("a body is only sent in mode 'http'")
        if mode == "redirect" and status not in (301, 302, 303, 307, 308):
            raise ValueError("mode 'redirect' needs a redirect status")
        if body_limit is not None and body_limit < 0:
            raise ValueError("body_limit cannot be negative")
        settings = _Settings(
            latency,
            mode,
            status,
            retry_after,
            count,
            path,
            body,
            content_type,
            method.upper() if method else None,
            body_limit,
            location,
            exact_path,
        )
        if count == 0:
            settings = _Settings(latency=latency, body_limit=body_limit)
        loop = self._loop
        if loop is None or self._closed:
            self._settings, self._left = settings, settings.count
            return
        asyncio.run_coroutine_threadsafe(self._apply(settings), loop).result(_CONTROL_TIMEOUT)

    async def _apply(self, settings: _Settings) -> None:
        self._settings, self._left = settings, settings.count
        if self._release is not None:
            self._release.set()
        self._release = asyncio.Event()
        if settings.mode == "refuse":
            await self._unlisten()
            self._drop_clients()
        else:
            await self._listen()

    def wait_until(self, predicate: Callable[[FaultProxy], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds, checked whenever a counter changes; False at the
        timeout. For tests: ``proxy.wait_until(lambda p: p.requests >= 3, 30)``."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self) or self._closed, timeout) and (
                predicate(self)
            )

    def _bump(
        self,
        *,
        requests: int = 0,
        forwarded: int = 0,
        path: str | None = None,
        in_flight: int = 0,
        handling: int = 0,
        made_up: int | None = None,
    ) -> None:
        with self._changed:
            self.handling += handling
            if made_up is not None:
                self.made_up[made_up] += 1
            if path is not None:
                self.paths[path.split("?", 1)[0]] += 1
            self.requests += requests
            self.forwarded += forwarded
            self.in_flight += in_flight
            self._changed.notify_all()

    def _mode_for(self, path: str, method: str) -> _Settings:
        """The settings for one request, counting it against ``count`` if the mode applies."""
        settings = self._settings
        latency = 0.0 if settings.mode == "late" else settings.latency
        plain = _Settings(latency=latency, body_limit=settings.body_limit)
        if settings.path is None:
            other_path = False
        elif settings.exact_path:
            other_path = path.split("?", 1)[0] != settings.path
        else:
            other_path = settings.path not in path
        if (
            settings.mode == "pass"
            or other_path
            or (settings.method is not None and settings.method != method)
        ):
            return plain
        if self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self._settings, self._left = plain, None
        return settings

    # -- listening -------------------------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is not None:
            return
        sock = self._listen_sock if self._listen_sock is not None else self._bind(self.port)
        self._listen_sock = None
        sock.listen(128)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._serve, sock=sock)

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # closes the listening socket now: connects are refused from here on

    def _drop_clients(self) -> None:
        for writer in list(self._clients):
            _reset(writer)

    # -- one client connection --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[writer] = task
        try:
            await self._converse(reader, writer)
        except Exception:  # a peer broke off or sent what cannot be framed: drop the connection
            _reset(writer)
        except asyncio.CancelledError:  # stop(): end quietly (asyncio 3.11 logs a cancelled
            _reset(writer)  # connection task as an error)
        finally:
            self._clients.pop(writer, None)
            if not writer.transport.is_closing():
                writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await _read_request(reader)
            if request is None:
                return
            parts = request.start.split(" ")
            method = parts[0].upper()
            path = parts[1] if len(parts) > 1 else "/"
            settings = self._mode_for(path, method)
            self._bump(requests=1, path=path, handling=1)
            try:
                mode = settings.mode
                if settings.body_limit is not None and len(request.body) > settings.body_limit:
                    mode = "too_large"
                if mode in ("reset", "refuse"):
                    _reset(writer)
                    return
                if mode == "stall":
                    await self._stall(reader)
                    _reset(writer)
                    return
                if settings.latency > 0:
                    await asyncio.sleep(settings.latency)
                    if writer.transport.is_closing() and mode != "late":
                        return  # reset meanwhile ("refuse"): nothing to answer
                if mode == "http":
                    response = self._error_response(settings)
                    self._bump(made_up=settings.status)
                elif mode == "too_large":
                    response = _page(
                        413, b"<html><body><h1>413 Request Entity Too Large</h1></body>"
                    )
                    self._bump(made_up=413)
                elif mode == "redirect":
                    self._bump(made_up=settings.status)
                    location = settings.location or f"{self.uri}{path}"
                    response = _serialise(
                        f"HTTP/1.1 {settings.status} {_REASONS[settings.status]}",
                        [("Location", location), ("Content-Length", "0")],
                        b"",
                    )
                else:
                    try:
                        response = await self._forward(request, method)
                    except (OSError, _ProtocolError, asyncio.IncompleteReadError):
                        _reset(writer)  # the server is down or broke off: the client sees the same
                        return
                    if mode == "commit_then_reset":
                        _reset(writer)
                        return
                if writer.transport.is_closing():  # "late": the client hung up meanwhile
                    return
                writer.write(response)
                await writer.drain()
                if request.wants_close():
                    writer.close()
                    return
            finally:
                self._bump(handling=-1)

    async def _stall(self, reader: asyncio.StreamReader) -> None:
        """Wait until the stall is lifted or the client hangs up."""
        release = self._release
        assert release is not None
        lifted = asyncio.ensure_future(release.wait())
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({lifted, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (lifted, hangup):
                waiter.cancel()
            await asyncio.gather(lifted, hangup, return_exceptions=True)

    @staticmethod
    def _error_response(settings: _Settings) -> bytes:
        status = settings.status
        if settings.body is not None:
            body, content_type = settings.body, settings.content_type
        else:
            code = _ERROR_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
            body = json.dumps(
                {
                    "error_code": code,
                    "message": f"fault injected by FaultProxy: HTTP {status}",
                }
            ).encode()
            content_type = "application/json"
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
        ]
        if settings.retry_after is not None:
            headers.append(("Retry-After", settings.retry_after))
        start = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"
        return _serialise(start, headers, body)

    async def _forward(self, request: _Message, method: str) -> bytes:
        """Send one request upstream on a fresh connection; the answer, framed for the client."""
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        try:
            headers = [
                (name, value)
                for name, value in request.headers
                if name.lower() not in _HOP_BY_HOP and name.lower() != "host"
            ]
            headers.append(("Host", f"127.0.0.1:{self.upstream_port}"))
            if request.body or method in ("POST", "PUT", "PATCH"):
                headers.append(("Content-Length", str(len(request.body))))
            headers.append(("Connection", "close"))
            upstream_writer.write(_serialise(request.start, headers, request.body))
            await upstream_writer.drain()
            self._bump(forwarded=1, in_flight=1)
            try:
                response = await _read_response(upstream_reader, method)
            finally:
                self._bump(in_flight=-1)
        finally:
            upstream_writer.close()
            with contextlib.suppress(OSError):
                await upstream_writer.wait_closed()
        out = [(n, v) for n, v in response.headers if n.lower() not in _HOP_BY_HOP]
        length = response.header("Content-Length") if method == "HEAD" else None
        out.append(("Content-Length", length or str(len(response.body))))
        status_line = response.start
        if not status_line.startswith("HTTP/1.1"):
            status_line = "HTTP/1.1" + status_line[status_line.find(" ") :]
        return _serialise(status_line, out, response.body)

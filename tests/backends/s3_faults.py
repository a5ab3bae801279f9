"""A reverse proxy in front of the moto server that injects S3 failures on the wire
and shapes the link like a real one.

Requests matching a :class:`Fault` get an S3 error response (503 SlowDown,
500 InternalError, 403 AccessDenied ...), a connection reset, a delay or a
stall, instead of (or before) being forwarded; every request is logged with
its start and end time so tests can count attempts and see overlap. A
:class:`Link` adds latency to every request, caps bandwidth per connection
and in total, and answers a seeded random fraction of requests with 503
SlowDown; :meth:`Link.limit` is the throughput its caps allow at best.

``python s3_faults.py UPSTREAM [--latency S] [--per-connection B/S] [--total B/S]
[--slowdown F] [--seed N]`` serves a shaped proxy in a process of its own (printing its URL),
so that a benchmark's link does not share the client's interpreter.
"""

from __future__ import annotations

import argparse
import http.client
import math
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Buffer = bytes | memoryview  # a request body: a view of the connection's buffer, or bytes
_HOP_HEADERS = ("transfer-encoding", "connection", "content-length", "date", "server")
ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}


@dataclass
class Fault:
    """Inject ``action`` into the first ``times`` requests matching ``method`` and ``pattern``.

    ``action`` is an HTTP status (503, 500, 403), ``"reset"`` (close the
    connection without answering), ``"lost"`` (forward the request, then close
    the connection without passing the reply on), ``"delay"`` (wait ``delay`` seconds, then
    forward), ``"stall"`` (read half the request's body, then stop reading and never
    answer), ``"stall-reply"`` (forward, then send half the reply and stop sending) or
    ``"garbage"`` (answer 200 with a web page, as a server that is no S3 would, forwarding
    nothing) or ``"key-errors"`` (answer a DeleteObjects request 200, each of its keys
    listed as not deleted with the S3 error ``code``, deleting nothing);
    a stalled connection hangs until the proxy closes. ``pattern`` is a regex searched
    in the path with its query.
    """

    method: str
    pattern: str
    action: int | str
    times: int = 1_000_000
    delay: float = 0.0
    code: str = "AccessDenied"  # (key-errors)
    hits: int = 0
    at: list[float] = field(default_factory=list)  # when each hit's request arrived (time.monotonic)


MiB = 1 << 20


@dataclass(frozen=True)
class Link:
    """How the proxy shapes the link: ``latency`` seconds added to every request (before
    it is forwarded: one round trip), ``per_connection`` and ``total`` bytes per second
    in each direction (None: no cap; full duplex, so uploads and downloads each get
    them), and a ``slowdown`` fraction of requests answered 503 SlowDown, drawn from a
    random generator seeded with ``seed``."""

    latency: float = 0.0
    per_connection: float | None = None
    total: float | None = None
    slowdown: float = 0.0
    seed: int = 0

    def best_time(self, sizes: Sequence[int], connections: int) -> float:
        """The least time the caps allow to move requests of ``sizes`` bytes over at most
        ``connections`` connections: no sooner than the total cap moves every byte, than
        the connections get through every request's latency and bytes side by side, nor
        than the largest request alone; SlowDown answers add requests that carry their
        bytes in vain (their expected share)."""
        if not sizes:
            return 0.0
        per = self.per_connection or math.inf
        retried = 1 / (1 - self.slowdown)  # expected sends of a request answered 503 a fraction of the time
        nbytes = sum(sizes) * retried
        busy = sum(self.latency + size / per for size in sizes) * retried
        return max(
            nbytes / (self.total or math.inf), busy / max(1, connections), self.latency + max(sizes) / per
        )

    def limit(self, sizes: Sequence[int], connections: int) -> float:
        """The link's limit for those requests: their bytes over :meth:`best_time` (bytes/s)."""
        best = self.best_time(sizes, connections)
        return sum(sizes) / best if best > 0 else math.inf


class _Pace:
    """A token bucket without a burst: each ``take(n)`` reserves the next ``n / rate`` seconds."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.free_at = time.monotonic()
        self.lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """The time at which ``n`` more bytes have gone through."""
        if self.rate is None:
            return 0.0
        with self.lock:
            self.free_at = max(self.free_at, time.monotonic()) + n / self.rate
            return self.free_at


_CHUNK = 256 << 10  # bytes per paced read or send: 10 ms at 25 MiB/s


class _Server(ThreadingHTTPServer):
    """The proxy's listening server, whose connections take in no more than a paced read
    ahead of the link: a real link acknowledges a byte only once it has carried it, but a
    receive buffer the kernel grows (to megabytes, as it does under 256 KiB reads) would
    acknowledge a slow link's last megabytes seconds before the link delivers them, and
    the client would see its whole body gone while the link still carries it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gone: list[object] = []  # clients that went away mid-request or between requests

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CHUNK)  # accepted ones inherit it
        super().server_bind()

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that closed or reset its connection (a request cancelled, a connection
        dropped from its pool: what a fault proxy sees all the time) is counted, not
        reported; any other error, the upstream's included (:class:`UpstreamError`), is
        printed with its traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            self.gone.append(client_address)  # list.append is atomic: handler threads share it
            return
        super().handle_error(request, client_address)


class UpstreamError(RuntimeError):
    """The server behind the proxy failed to take a request or to answer it."""


class _Upstream(http.client.HTTPConnection):
    """The connection to the server behind the proxy, whose failures are errors of their own
    (:class:`UpstreamError`), not a client's going away."""

    def send(self, data: object) -> None:
        try:
            super().send(data)  # type: ignore[arg-type]
        except OSError as exc:
            raise UpstreamError(f"sending to {self.host}:{self.port}: {exc!r}") from exc

    def reply(self) -> tuple[http.client.HTTPResponse, bytes]:
        """The response and its body."""
        try:
            response = self.getresponse()
            return response, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamError(f"the reply of {self.host}:{self.port}: {exc!r}") from exc


@dataclass
class Logged:
    method: str
    path: str
    status: int | str
    start: float
    end: float
    headers: dict[str, str] = field(default_factory=dict)  # the request's, names in lower case


@dataclass
class FaultProxy:
    """The proxy: ``url`` to use as the S3 endpoint, ``faults`` to arm, ``log`` to inspect."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[Logged] = field(default_factory=list)
    link: Link = field(default_factory=Link)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._random = random.Random(self.link.seed)
        self._total_up, self._total_down = _Pace(self.link.total), _Pace(self.link.total)
        target = urlsplit(self.upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.up, self.down = _Pace(proxy.link.per_connection), _Pace(proxy.link.per_connection)
                self.buffer = memoryview(bytearray())  # request bodies, reused (no fresh pages)

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _read(self, n: int) -> memoryview:
                """``n`` bytes of the request (fewer if it ends sooner), at the pace the link
                allows: read straight into the connection's buffer (valid until its next
                request), a pace reserved for each read."""
                if len(self.buffer) < n:
                    self.buffer = memoryview(bytearray(n))
                got = 0
                while got < n:
                    read = self.rfile.readinto(self.buffer[got : min(n, got + _CHUNK)])
                    if not read:
                        break
                    got += read
                    _sleep_until(max(self.up.reserve(read), proxy._total_up.reserve(read)))
                return self.buffer[:got]

            def _send(self, data: bytes) -> None:
                """Send ``data`` at the pace the link allows."""
                view = memoryview(data)
                for pos in range(0, len(data), _CHUNK):
                    piece = view[pos : pos + _CHUNK]
                    _sleep_until(max(self.down.reserve(len(piece)), proxy._total_down.reserve(len(piece))))
                    self.wfile.write(piece)

            def _body(self) -> Buffer:
                if self._chunked():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(bytes(self._read(size)))  # the buffer is reused
                        self.rfile.readline()
                return self._read(int(self.headers.get("Content-Length") or 0))

            def _logged(self, status: int | str, start: float) -> Logged:
                headers = {k.lower(): v for k, v in self.headers.items()}
                return Logged(self.command, self.path, status, start, time.monotonic(), headers)

            def _hang(self) -> str:
                """Stall: hold the connection, doing nothing, until the proxy closes."""
                proxy._closing.wait()
                self.close_connection = True
                return "stalled"

            def _handle(self) -> None:
                start = time.monotonic()
                fault = proxy._match(self.command, self.path)
                status: int | str
                if fault is not None and fault.action == "stall":
                    self._read(int(self.headers.get("Content-Length") or 0) // 2)
                    status = self._hang()
                    with proxy._lock:
                        proxy.log.append(self._logged(status, start))
                    return
                if fault is None and proxy.link.slowdown and proxy._draw() < proxy.link.slowdown:
                    fault = Fault(self.command, "", 503)
                if fault is None and not self._chunked():
                    status = self._forward(None)  # passed on as the link delivers it
                    with proxy._lock:
                        proxy.log.append(self._logged(status, start))
                    return
                body = self._body()
                time.sleep(proxy.link.latency)
                if fault is not None and fault.action == "delay":
                    time.sleep(fault.delay)
                    fault = None
                if fault is None or fault.action == "stall-reply":
                    status = self._forward(body, stall=fault is not None)
                elif fault.action in ("reset", "lost"):
                    if fault.action == "lost":  # the store acts on the request; the reply never comes
                        self._forward(body, answer=False)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    status = fault.action
                else:
                    if fault.action == "garbage":
                        status, kind = 200, "text/html"
                        payload = b"<html><body>It works!</body></html>"
                    elif fault.action == "key-errors":
                        status, kind = 200, "application/xml"
                        errors = "".join(
                            f"<Error><Key>{key}</Key><Code>{fault.code}</Code><Message>injected</Message></Error>"
                            for key in re.findall(r"<Key>(.*?)</Key>", bytes(body).decode())
                        )
                        payload = (
                            '<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult '
                            f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{errors}</DeleteResult>'
                        ).encode()
                    else:
                        assert isinstance(fault.action, int)
                        code, message = ERRORS[fault.action]
                        status, kind = fault.action, "application/xml"
                        payload = (
                            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                            f"<Message>{message}</Message><RequestId>injected</RequestId></Error>"
                        ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    status = fault.action
                with proxy._lock:
                    proxy.log.append(self._logged(status, start))

            def _chunked(self) -> bool:
                return self.headers.get("Transfer-Encoding", "").lower() == "chunked"

            def _stream(self, conn: _Upstream) -> None:
                """Send the request upstream as the link delivers its body (the server takes
                it in meanwhile, as it would from a real link), its last piece (or, without
                a body, its headers' end) after the latency: the server has the whole request
                no sooner than a latency after the link delivered it."""
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    conn.putheader(key, value)
                n, got = int(self.headers.get("Content-Length") or 0), 0
                if not n:
                    time.sleep(proxy.link.latency)
                conn.endheaders()
                while got < n:
                    piece = self._read(min(_CHUNK, n - got))
                    if not piece:
                        raise ConnectionError("the client closed the connection mid-request")
                    got += len(piece)
                    if got == n:
                        time.sleep(proxy.link.latency)
                    conn.send(piece)

            def _forward(self, body: Buffer | None, answer: bool = True, stall: bool = False) -> int | str:
                """Forward the request (``body``: as read, or None to pass it on as it arrives)
                and pass the reply on (none unless ``answer``; half of it, then a stall, if
                ``stall``)."""
                conn = _Upstream(target.hostname, target.port, timeout=60)
                try:
                    if body is None:
                        self._stream(conn)
                    else:
                        headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                        if body or "Content-Length" in self.headers:
                            headers["Content-Length"] = str(len(body))
                        conn.request(self.command, self.path, body=body, headers=headers)
                    resp, data = conn.reply()
                    if not answer:
                        return resp.status
                    self.send_response(resp.status)
                    for key, value in resp.getheaders():
                        if key.lower() not in _HOP_HEADERS:
                            self.send_header(key, value)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if stall:
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        return self._hang()
                    if self.command != "HEAD":
                        self._send(data)
                    return resp.status
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _draw(self) -> float:
        with self._lock:
            return self._random.random()

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == method and re.search(fault.pattern, path) and fault.hits < fault.times:
                    fault.hits += 1
                    fault.at.append(time.monotonic())
                    return fault
        return None

    def requests(self, method: str, pattern: str) -> list[Logged]:
        """The logged requests matching ``method`` and ``pattern``, in order."""
        with self._lock:
            return [r for r in self.log if r.method == method and re.search(pattern, r.path)]

    @property
    def gone(self) -> int:
        """How many clients closed or reset their connection mid-request or between requests."""
        return len(self._server.gone)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()


def _sleep_until(deadline: float) -> None:
    wait = deadline - time.monotonic()
    if wait > 0:
        time.sleep(wait)


def main() -> None:
    """Serve a proxy shaped as the arguments say in front of UPSTREAM until killed."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("upstream")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--per-connection", type=float, default=None)
    parser.add_argument("--total", type=float, default=None)
    parser.add_argument("--slowdown", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    link = Link(args.latency, args.per_connection, args.total, args.slowdown, args.seed)
    proxy = FaultProxy(args.upstream, link=link)
    print(proxy.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

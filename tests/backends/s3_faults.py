"""A reverse proxy in front of the moto server that injects S3 failures on the wire.

Requests matching a :class:`Fault` get an S3 error response (503 SlowDown,
500 InternalError, 403 AccessDenied ...), a connection reset, or a delay,
instead of (or before) being forwarded; every request is logged with its
start and end time so tests can count attempts and see overlap.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

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
    the connection without passing the reply on) or ``"delay"`` (wait ``delay`` seconds, then
    forward). ``pattern`` is a regex searched in the path with its query.
    """

    method: str
    pattern: str
    action: int | str
    times: int = 1_000_000
    delay: float = 0.0
    hits: int = 0


@dataclass
class Logged:
    method: str
    path: str
    status: int | str
    start: float
    end: float


@dataclass
class FaultProxy:
    """The proxy: ``url`` to use as the S3 endpoint, ``faults`` to arm, ``log`` to inspect."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[Logged] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        target = urlsplit(self.upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                start = time.monotonic()
                body = self._body()
                fault = proxy._match(self.command, self.path)
                if fault is not None and fault.action == "delay":
                    time.sleep(fault.delay)
                    fault = None
                if fault is None:
                    status: int | str = self._forward(body)
                elif fault.action in ("reset", "lost"):
                    if fault.action == "lost":  # the store acts on the request; the reply never comes
                        self._forward(body, answer=False)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    status = fault.action
                else:
                    assert isinstance(fault.action, int)
                    code, message = ERRORS[fault.action]
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>injected</RequestId></Error>"
                    ).encode()
                    self.send_response(fault.action)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    status = fault.action
                with proxy._lock:
                    proxy.log.append(Logged(self.command, self.path, status, start, time.monotonic()))

            def _forward(self, body: bytes, answer: bool = True) -> int:
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                    if body or "Content-Length" in self.headers:
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if not answer:
                        return resp.status
                    self.send_response(resp.status)
                    for key, value in resp.getheaders():
                        if key.lower() not in _HOP_HEADERS:
                            self.send_header(key, value)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return resp.status
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == method and re.search(fault.pattern, path) and fault.hits < fault.times:
                    fault.hits += 1
                    return fault
        return None

    def requests(self, method: str, pattern: str) -> list[Logged]:
        """The logged requests matching ``method`` and ``pattern``, in order."""
        with self._lock:
            return [r for r in self.log if r.method == method and re.search(pattern, r.path)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

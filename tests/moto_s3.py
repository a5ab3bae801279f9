"""The moto S3 server of the tests and benchmarks, and what a client needs to use it.

It is moto's own WSGI application (``moto.server``'s), hosted in werkzeug's threaded
server as ``moto.server`` hosts it, in one process (moto keeps its objects in that
process's memory), with one difference: a request body of known length is read in one
piece (:class:`WholeBodies`). werkzeug's request otherwise reads the body in 64 KiB pieces
and copies each twice more: in a profile of a save that took about an eighth of the
server's time beyond the socket reads themselves (docs/benchmarks.md, "S3 through a shaped
link"). ``python tests/moto_s3.py PORT`` serves it in a process of its own (what the
benchmarks run)."""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["MOTO_CREDENTIALS", "WholeBodies", "moto_app", "s3_client", "serve_in_thread"]

#: What the moto server accepts, as torchstow storage options (``key``, ``secret``).
MOTO_CREDENTIALS = {"key": "testing", "secret": "testing"}

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the moto server at ``endpoint``."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=MOTO_CREDENTIALS["key"],
        aws_secret_access_key=MOTO_CREDENTIALS["secret"],
        region_name="us-east-1",
    )


class WholeBodies:
    """A WSGI middleware that reads a request body of known length in one read before
    ``app`` sees it, as a stream that ends with it (``wsgi.input_terminated``): werkzeug's
    request then takes those bytes as they are, without its 64 KiB loop. A body cut short
    (the client went away) is answered 400, as werkzeug answers it."""

    def __init__(self, app: App) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH")
        if length and "wsgi.input_terminated" not in environ:  # (chunked bodies are terminated)
            body = environ["wsgi.input"].read(int(length))
            if len(body) < int(length):
                from werkzeug.exceptions import ClientDisconnected

                return ClientDisconnected()(environ, start_response)
            environ["wsgi.input"] = io.BytesIO(body)  # shares the bytes: no copy
            environ["wsgi.input_terminated"] = True
        return self.app(environ, start_response)


def moto_app() -> App:
    """moto's WSGI application (every service, chosen by the request, as ``moto.server``
    serves them), behind :class:`WholeBodies`."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return WholeBodies(DomainDispatcherApplication(create_backend_app))


def _server(port: int) -> Any:
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    return make_server("127.0.0.1", port, moto_app(), threaded=True, request_handler=MotoRequestHandler)


@contextmanager
def serve_in_thread(port: int) -> Iterator[str]:
    """The server on 127.0.0.1:``port`` in a thread of this process; yields its URL."""
    server = _server(port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join()


def grow_heap(nbytes: int) -> None:
    """Touch ``nbytes`` of this process's heap once and free them: where the allocator keeps
    freed memory (the benchmarks' server: see ``bench_s3.moto_server``), the first requests
    then find pages already there, as every later one does, instead of faulting in the
    first gigabytes that the server's copies of a save take."""
    heap = bytearray(nbytes)
    heap[::4096] = bytes(len(range(0, nbytes, 4096)))  # one byte a page: every page is mapped
    del heap


if __name__ == "__main__":
    if "MOTO_S3_GROW_HEAP" in os.environ:
        grow_heap(int(os.environ["MOTO_S3_GROW_HEAP"]))
    _server(int(sys.argv[1])).serve_forever()

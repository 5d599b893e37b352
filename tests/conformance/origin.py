"""A static web origin on 127.0.0.1: the album page's own site, apart from the API's.

:func:`serving_directory` serves a folder with the standard library's
``http.server`` in a thread on a free loopback port and yields its base URL. The
answers carry no CORS headers, so a page on any other origin cannot read them with
``fetch`` (the suite uses one such origin as the control for its CORS checks).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["serving_directory"]


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without writing an access log to stderr, never cached."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@contextmanager
def serving_directory(root: Path) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` serving the files under *root* until the block ends."""
    handler = partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

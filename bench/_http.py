"""A lean HTTP/1.1 client on Trio sockets, for the load generator.

httpx costs about a millisecond of CPU per request; on a 2-core machine that the
service shares, the generator's own CPU would then decide the numbers. Requests here
are prebuilt bytes, responses are parsed just far enough to know the status, whether
``Retry-After`` was sent, the ``source`` of a classification and where the body ends
(``Content-Length`` or chunked). Connections are kept alive and reused.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import trio

__all__ = [
    "SOURCES",
    "Connection",
    "ProtocolError",
    "Response",
    "build_request",
    "json_request",
    "multipart_request",
]

#: ``data.source`` values, coded as small ints in the samples (0: none found).
SOURCES: tuple[str, ...] = ("", "cache", "llm", "local")
_SOURCE_RE = re.compile(rb'"source"\s*:\s*"(\w+)"')
_MAX_HEADER_BYTES = 64 * 1024


class ProtocolError(Exception):
    """The server closed the connection or sent something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Response:
    """What the generator keeps of one response."""

    status: int
    retry_after: bool
    source: int
    body: bytes
    keep_alive: bool


def build_request(
    method: str,
    path: str,
    *,
    host: str,
    body: bytes = b"",
    content_type: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The bytes of one HTTP/1.1 request with ``Content-Length`` (keep-alive)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: xintu-bench"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_request(
    path: str, payload: object, *, host: str, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A POST of *payload* as JSON."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return build_request(
        "POST", path, host=host, body=body, content_type="application/json", headers=headers
    )


def multipart_request(
    path: str,
    files: Sequence[tuple[str, str, bytes]],
    *,
    host: str,
    fields: Sequence[tuple[str, str]] = (),
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A multipart/form-data POST of *files* (field name, filename, bytes) and *fields*."""
    boundary = "xintubench" + secrets.token_hex(8)
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, filename, data in files:
        head = (
            f"--{boundary}\r\nContent-Disposition: form-data; "
            f'name="{name}"; filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return build_request(
        "POST",
        path,
        host=host,
        body=body,
        content_type=f"multipart/form-data; boundary={boundary}",
        headers=headers,
    )


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self.last_used = trio.current_time()
        self.usable = True
        self.requests = 0

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        """Connect to *host*:*port* (TCP_NODELAY is Trio's default)."""
        return cls(await trio.open_tcp_stream(host, port))

    async def aclose(self) -> None:
        self.usable = False
        await self._stream.aclose()

    async def request(self, payload: bytes, *, keep_body: bool = False) -> Response:
        """Send *payload* and read one whole response."""
        await self._stream.send_all(payload)
        head = await self._read_head()
        status, headers = _parse_head(head)
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = await self._read_chunked()
        else:
            body = await self._read_exactly(int(headers.get(b"content-length", b"0")))
        keep_alive = headers.get(b"connection", b"").lower() != b"close"
        self.usable = keep_alive
        self.last_used = trio.current_time()
        self.requests += 1
        match = _SOURCE_RE.search(body, 0, 4096)
        source = 0
        if match is not None:
            name = match.group(1).decode()
            source = SOURCES.index(name) if name in SOURCES else len(SOURCES)
        return Response(
            status=status,
            retry_after=b"retry-after" in headers,
            source=source,
            body=body if keep_body else b"",
            keep_alive=keep_alive,
        )

    async def _fill(self) -> None:
        data = await self._stream.receive_some(65536)
        if not data:
            self.usable = False
            raise ProtocolError("connection closed by the server")
        self._buf += data

    async def _read_head(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                return head
            if len(self._buf) > _MAX_HEADER_BYTES:
                raise ProtocolError("response head too large")
            await self._fill()

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _read_line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    async def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int(((await self._read_line()).split(b";")[0]).strip() or b"0", 16)
            if size == 0:
                while await self._read_line():  # trailers, then the empty line
                    pass
                return b"".join(chunks)
            chunks.append(await self._read_exactly(size))
            await self._read_line()


def _parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers

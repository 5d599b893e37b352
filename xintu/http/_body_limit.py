"""Request bodies within ``server.max_body_bytes``, and uploads cut off when over it.

:class:`LimitedRequest` replaces the app's request class with one whose body
(:class:`CountingBody`) counts every byte received against ``MAX_CONTENT_LENGTH``:
Quart's own check counts only the bytes buffered at the moment, and the multipart
parser consumes the buffer as it goes, so a chunked upload without
``Content-Length`` was read (and spooled to disk) whole before any limit applied.
Now it is cut off with 413 as soon as it passes ``server.max_body_bytes``, and
:func:`close_cut_off_uploads` lets Hypercorn close the connection instead of
reading the rest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import IO

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from quart.formparser import FormDataParser
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.datastructures import iter_multi_items
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import default_stream_factory

__all__ = ["CountingBody", "LimitedRequest", "close_cut_off_uploads"]


class CountingBody(TrioBody):
    """A request body whose limit counts every byte received, not just those buffered."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        super().__init__(expected_content_length, max_content_length)
        self._received = 0

    def append(self, data: bytes) -> None:
        if not data or self._must_raise is not None:
            return
        self._received += len(data)
        limit = self._max_content_length
        if limit is not None and self._received > limit:
            self._data.clear()
            self._must_raise = RequestEntityTooLarge()
            self.set_complete()
            return
        super().append(data)

    async def __anext__(self) -> bytes:
        try:
            return await super().__anext__()
        except StopAsyncIteration:
            # Cut off while a reader waited: an error, not the end of the body.
            if self._must_raise is not None:
                raise self._must_raise from None
            raise


class LimitedRequest(TrioRequest):
    """Counts every body byte (:class:`CountingBody`) and closes the spooled files
    of multipart parts that did not make it into ``request.files`` (the body went
    over a limit or was malformed part-way): Quart closes only the files it keeps,
    and left the others to the garbage collector."""

    body_class = CountingBody

    def make_form_data_parser(self) -> FormDataParser:
        spooled: list[IO[bytes]] = []
        self._spooled = spooled

        def stream_factory(
            total_content_length: int | None,
            content_type: str | None,
            filename: str | None,
            content_length: int | None = None,
        ) -> IO[bytes]:
            stream = default_stream_factory(
                total_content_length, content_type, filename, content_length
            )
            spooled.append(stream)
            return stream

        return self.form_data_parser_class(
            max_content_length=self.max_content_length,
            max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts,
            cls=self.parameter_storage_class,
            stream_factory=stream_factory,
        )

    async def _load_form_data(self) -> None:
        try:
            await super()._load_form_data()
        finally:
            # Parts of a body that failed (or was given up silently as malformed)
            # are in no FileStorage; the request closes only those it keeps.
            kept = {id(f.stream) for _, f in iter_multi_items(self._files or ())}
            for stream in getattr(self, "_spooled", ()):
                if id(stream) not in kept:
                    stream.close()


# Bound on the shielded last send of a response (normally microseconds).
_FINAL_SEND_TIMEOUT_S = 5.0

_AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


def close_cut_off_uploads(inner: _AsgiApp) -> _AsgiApp:
    """Let Hypercorn close a connection whose request body was refused unread.

    A response sent before the whole body arrived (413, 401, 429) leaves Hypercorn
    to close the connection, as HTTP/1.1 requires, from inside the app's last
    ``send``. But quart-trio cancels the app's tasks as soon as the request ends,
    which cancels that close half-way: the connection stayed open and Hypercorn
    read and discarded the rest of the upload, however long. Shielding the last
    send (bounded) lets the close finish, so the upload is cut off at the limit.
    """

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return

        async def send_last_shielded(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True), trio.move_on_after(_FINAL_SEND_TIMEOUT_S):
                    await send(message)
                return
            await send(message)

        await inner(scope, receive, send_last_shielded)

    return app

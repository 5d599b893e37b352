"""Test helpers: the service on a real Hypercorn server, and a model that really decodes.

:func:`real_server` serves *config* on ``127.0.0.1`` (a free port) with
:func:`xintu._serve.serve_in_process`, yields the base URL and stops the server by
cancellation when the block ends. :class:`DecodingModel` runs the real decoder
(format allowlist, pixel limit, truncation checks) and answers with the fake model's
classification, so the hostile-input tests need no ONNX model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from xintu import Config
from xintu._config import ImagesConfig
from xintu._serve import serve_in_process
from xintu.actors import LocalModel
from xintu.vision import decode_image

from .fakes import FakeDecoded, FakeModel

__all__ = ["DecodingModel", "open_raw", "real_server"]


@asynccontextmanager
async def real_server(config: Config, model: LocalModel[Any]) -> AsyncIterator[str]:
    """The service on Hypercorn at ``http://127.0.0.1:<free port>``."""
    config = config.replace(server={"bind": "127.0.0.1:0", "drain_delay_s": 0.0})
    async with trio.open_nursery() as nursery:
        serve = partial(serve_in_process, config, model_factory=lambda _c: model)
        with trio.fail_after(30):
            binds: list[str] = await nursery.start(serve)
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()


async def open_raw(base: str) -> trio.SocketStream:
    """A raw TCP connection to the server at *base*, for tests that write HTTP by hand."""
    host, port = base.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


class DecodingModel(FakeModel):
    """The real decoder in front of the fake classification."""

    def __init__(self, images: ImagesConfig) -> None:
        super().__init__()
        self._images = images

    def prepare(self, data: bytes) -> FakeDecoded:
        decode_image(data, self._images)  # raises the client errors under test
        return super().prepare(data)

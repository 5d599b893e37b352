"""The async client, on ``httpx.AsyncClient``: works under Trio and asyncio (via AnyIO)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import anyio
import httpx

from ._base import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_SERVER,
    OnResult,
    Settings,
    answer_json,
    as_inputs,
    request_headers,
    transport_error,
)
from ._errors import XintuClientError
from ._protocol import (
    CHECK_CACHE,
    MAX_UPLOAD_FILES,
    Emit,
    Flow,
    Hash,
    ImageInput,
    Post,
    Read,
    RetryState,
    classify_flow,
    hash_file,
    window_flow,
    windows,
)
from ._types import BatchItem, ClassifyResult, RetryPolicy

__all__ = ["AsyncClient"]


class AsyncClient:
    """An async Xintu client, for Trio or asyncio.

    ::

        async with AsyncClient("http://127.0.0.1:8000") as client:
            items = await client.classify_many(paths, concurrency=8)

    File reads and hashing run in worker threads; retries sleep with the running
    event loop's clock (so Trio's ``autojump_clock`` makes them instant in tests).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        *,
        api_key: str | None = None,
        user_id: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        max_batch_files: int = MAX_UPLOAD_FILES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = Settings(
            base_url,
            api_key=api_key,
            user_id=user_id,
            retry=retry,
            max_batch_files=max_batch_files,
            max_batch_bytes=max_batch_bytes,
            headers=headers,
        )
        self._http = httpx.AsyncClient(
            base_url=self._settings.base_url,
            headers=self._settings.headers,
            timeout=timeout_s,
            transport=transport,
        )

    # --- lifetime ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the API ---------------------------------------------------------------------------

    async def classify(self, image: ImageInput, *, filename: str | None = None) -> ClassifyResult:
        """Classify one photo (bytes or a path): hash it, ask check-cache, upload on a miss."""
        result: ClassifyResult = await self._drive(classify_flow(image, filename), None)
        return result

    async def check_cache(self, image_hash: str) -> ClassifyResult | None:
        """The cached answer for *image_hash* (SHA-256 hex), or ``None``; uploads nothing."""
        body, rid = await self._post(Post(CHECK_CACHE, json={"image_hash": image_hash.lower()}))
        if not body.get("cached") or not isinstance(body.get("data"), Mapping):
            return None
        return ClassifyResult.from_data(
            body["data"], image_hash=image_hash.lower(), from_cache=True, request_id=rid
        )

    async def classify_many(
        self,
        images: Iterable[ImageInput],
        *,
        concurrency: int = 4,
        on_result: OnResult | None = None,
    ) -> list[BatchItem]:
        """Classify many photos; one :class:`BatchItem` per input, in input order.

        The same protocol as :meth:`Client.classify_many`, with at most
        *concurrency* requests in flight. *on_result* is called in the event loop,
        once per input, as each outcome arrives. Cancelling the call abandons the
        work in flight; outcomes already handed to *on_result* stand.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        inputs = as_inputs(images)
        items: list[BatchItem | None] = [None] * len(inputs)
        limiter = anyio.CapacityLimiter(concurrency)
        settings = self._settings

        def emit(item: BatchItem) -> None:
            items[item.index] = item
            if on_result is not None:
                on_result(item)

        async def work(window: range) -> None:
            async with limiter:
                flow = window_flow(
                    [inputs[i] for i in window],
                    max_batch_files=settings.max_batch_files,
                    max_batch_bytes=settings.max_batch_bytes,
                )
                await self._drive(flow, emit)

        async with anyio.create_task_group() as tg:
            for window in windows(len(inputs), concurrency):
                tg.start_soon(work, window)
        return [item for item in items if item is not None]

    async def ready(self) -> dict[str, Any]:
        """``GET /readyz``: ``{"ready": bool, "checks": {...}}`` (also when not ready)."""
        try:
            response = await self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        if response.status_code == 503:
            body = response.json()
            if isinstance(body, dict):
                return body
        return answer_json(response)[0]

    # --- the driver --------------------------------------------------------------------------

    async def _drive(self, flow: Flow, emit: OnResult | None) -> Any:
        outcome: Any = None
        failure: BaseException | None = None
        while True:
            try:
                op = flow.send(outcome) if failure is None else flow.throw(failure)
            except StopIteration as done:
                return done.value
            outcome, failure = None, None
            try:
                if isinstance(op, Post):
                    outcome = await self._post(op)
                elif isinstance(op, Hash):
                    outcome = await anyio.to_thread.run_sync(hash_file, op.path)
                elif isinstance(op, Read):
                    outcome = await anyio.to_thread.run_sync(op.path.read_bytes)
                elif isinstance(op, Emit):
                    if emit is not None:
                        emit(op.item)
            except (XintuClientError, OSError) as exc:
                failure = exc

    async def _post(self, op: Post) -> tuple[dict[str, Any], str | None]:
        state = RetryState(self._settings.retry, anyio.current_time())
        while True:
            state.attempts += 1
            try:
                response = await self._http.post(
                    op.path,
                    json=op.json,
                    files=op.files,
                    data=op.data,
                    headers=request_headers(op, state),
                )
                return answer_json(response)
            except httpx.TransportError as exc:
                error: XintuClientError = transport_error(exc)
            except XintuClientError as exc:
                error = exc
            delay = state.delay(error, anyio.current_time())
            if delay is None:
                raise error
            await anyio.sleep(delay)

"""The blocking client, on ``httpx.Client``; ``classify_many`` uses worker threads."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

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

__all__ = ["Client"]


class _Stopped(Exception):
    """classify_many was abandoned by its caller: workers stop at their next step."""


class Client:
    """A blocking Xintu client.

    ::

        with Client("http://127.0.0.1:8000") as client:
            result = client.classify("cat.jpg")
            print(result.category, result.confidence, result.source)

    Safe to share between threads (as ``httpx.Client`` is). See :class:`RetryPolicy`
    for retries; every POST carries an ``Idempotency-Key`` reused by its retries.
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
        transport: httpx.BaseTransport | None = None,
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
        self._http = httpx.Client(
            base_url=self._settings.base_url,
            headers=self._settings.headers,
            timeout=timeout_s,
            transport=transport,
        )

    # --- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the API -------------------------------------------------------------------------

    def classify(self, image: ImageInput, *, filename: str | None = None) -> ClassifyResult:
        """Classify one photo (bytes or a path): hash it, ask check-cache, upload on a miss."""
        result: ClassifyResult = self._drive(classify_flow(image, filename), None, None)
        return result

    def check_cache(self, image_hash: str) -> ClassifyResult | None:
        """The cached answer for *image_hash* (SHA-256 hex), or ``None``; uploads nothing."""
        body, rid = self._post(Post(CHECK_CACHE, json={"image_hash": image_hash.lower()}))
        if not body.get("cached") or not isinstance(body.get("data"), Mapping):
            return None
        return ClassifyResult.from_data(
            body["data"], image_hash=image_hash.lower(), from_cache=True, request_id=rid
        )

    def classify_many(
        self,
        images: Iterable[ImageInput],
        *,
        concurrency: int = 4,
        on_result: OnResult | None = None,
    ) -> list[BatchItem]:
        """Classify many photos; one :class:`BatchItem` per input, in input order.

        Hashes locally, asks ``batch-check-cache`` (100 hashes a request), then
        uploads each missing photo once through the batch endpoint (20 files a
        request), with at most *concurrency* requests in flight. A failure is
        recorded on its item, never raised. *on_result* is called in this thread,
        once per input, as each outcome arrives.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        inputs = as_inputs(images)
        items: list[BatchItem | None] = [None] * len(inputs)
        parts = windows(len(inputs), concurrency)
        inbox: queue.SimpleQueue[BatchItem | None] = queue.SimpleQueue()
        stop = threading.Event()
        settings = self._settings

        def work(window: range) -> None:
            try:
                flow = window_flow(
                    [inputs[i] for i in window],
                    max_batch_files=settings.max_batch_files,
                    max_batch_bytes=settings.max_batch_bytes,
                )
                self._drive(flow, inbox.put, stop)
            finally:
                inbox.put(None)

        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="xintu-client")
        try:
            futures = [pool.submit(work, window) for window in parts]
            finished = 0
            while finished < len(parts):
                message = inbox.get()
                if message is None:
                    finished += 1
                    continue
                items[message.index] = message
                if on_result is not None:
                    on_result(message)
            for future in futures:
                future.result()  # a bug in a worker surfaces here
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        return [item for item in items if item is not None]

    def ready(self) -> dict[str, Any]:
        """``GET /readyz``: ``{"ready": bool, "checks": {...}}`` (also when not ready)."""
        try:
            response = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        if response.status_code == 503:
            body = response.json()
            if isinstance(body, dict):
                return body
        return answer_json(response)[0]

    # --- the driver ------------------------------------------------------------------------

    def _drive(
        self,
        flow: Flow,
        emit: Callable[[BatchItem], object] | None,
        stop: threading.Event | None,
    ) -> Any:
        outcome: Any = None
        failure: BaseException | None = None
        while True:
            try:
                op = flow.send(outcome) if failure is None else flow.throw(failure)
            except StopIteration as done:
                return done.value
            except _Stopped:
                return None
            outcome, failure = None, None
            try:
                if stop is not None and stop.is_set():
                    raise _Stopped
                if isinstance(op, Post):
                    outcome = self._post(op)
                elif isinstance(op, Hash):
                    outcome = hash_file(op.path)
                elif isinstance(op, Read):
                    outcome = op.path.read_bytes()
                elif isinstance(op, Emit):
                    if emit is not None:
                        emit(op.item)
            except (XintuClientError, OSError, _Stopped) as exc:
                failure = exc

    def _post(self, op: Post) -> tuple[dict[str, Any], str | None]:
        state = RetryState(self._settings.retry, time.monotonic())
        while True:
            state.attempts += 1
            try:
                response = self._http.post(
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
            delay = state.delay(error, time.monotonic())
            if delay is None:
                raise error
            time.sleep(delay)

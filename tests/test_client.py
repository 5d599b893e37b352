"""The client library: against the real app over loopback HTTP, and on scripted transports.

The real-server tests run Hypercorn's trio worker in a background thread
(:func:`running_server`) with :class:`tests.fakes.FakeModel`, so the answers and
the model's call counts are exact. Retry and error paths use ``httpx.MockTransport``;
the async ones run on Trio's autojump clock, so ``Retry-After`` waits take no time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import xintu.client
from xintu import Config, load_config
from xintu.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadImageError,
    BadRequestError,
    BatchItem,
    Client,
    ConflictError,
    DeadlineExceededError,
    FileUnreadable,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RetryPolicy,
    ServerBusy,
    ServerError,
    TransportError,
    UnsupportedFormatError,
    ValidationError,
    XintuClientError,
)

from .fakes import FakeModel, fake_category


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a real server in a background thread ------------------------------------------------


@contextlib.contextmanager
def running_server(config: Config, model: object) -> Iterator[str]:
    """Serve the real app on ``127.0.0.1:0`` in a thread; yields the base URL.

    *model* replaces the local classifier; ``None`` keeps the real ONNX one.

    Hypercorn's trio worker runs in its own ``trio.run`` with a shutdown trigger
    set from this thread on exit (signal handlers need the main thread, so
    ``serve_in_process`` itself is not used here).
    """
    from hypercorn.trio import serve

    from xintu._serve import hypercorn_config
    from xintu.http import create_app

    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        factory = None if model is None else (lambda _c: model)
        app = create_app(config, model_factory=factory)  # type: ignore[arg-type]
        stop = trio.Event()
        box["token"] = trio.lowlevel.current_trio_token()
        box["stop"] = stop
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(serve, app, hypercorn_config(config), shutdown_trigger=stop.wait)
            )
            box["base"] = binds[0]
            started.set()

    def thread() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            box["error"] = exc
        finally:
            started.set()

    t = threading.Thread(target=thread, name="xintu-test-server", daemon=True)
    t.start()
    assert started.wait(60), "server did not start"
    if "error" in box:
        raise box["error"]
    try:
        yield str(box["base"])
    finally:
        trio.from_thread.run_sync(box["stop"].set, trio_token=box["token"])
        t.join(30)
        assert not t.is_alive(), "server did not stop"
        if "error" in box:
            raise box["error"]


def server_config(tmp_path: Path) -> Config:
    return load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        server={"bind": "127.0.0.1:0", "graceful_timeout_s": 2.0, "drain_delay_s": 0.0},
        store={"writer_flush_ms": 1},
        ratelimit={"rate_per_s": 0.0},
    )


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def server(tmp_path: Path, model: FakeModel) -> Iterator[str]:
    with running_server(server_config(tmp_path), model) as base:
        yield base


# --- the public surface ------------------------------------------------------------------


def test_all_is_exact() -> None:
    assert set(xintu.client.__all__) == {
        "APIError",
        "AsyncClient",
        "AuthenticationError",
        "BadImageError",
        "BadRequestError",
        "BatchItem",
        "ClassifyResult",
        "Client",
        "ConflictError",
        "DeadlineExceededError",
        "FileUnreadable",
        "ImageInput",
        "NotFoundError",
        "PayloadTooLargeError",
        "RateLimitedError",
        "RetryLater",
        "RetryPolicy",
        "ServerBusy",
        "ServerError",
        "TransportError",
        "UnsupportedFormatError",
        "ValidationError",
        "XintuClientError",
        "hash_file",
    }
    public = {n for n in dir(xintu.client) if not n.startswith("_")}
    assert public == set(xintu.client.__all__)


# --- against the real service ------------------------------------------------------------


def test_classify_uploads_once_then_answers_from_cache(server: str, model: FakeModel) -> None:
    with Client(server) as client:
        first = client.classify(b"photo-1")
        again = client.classify(b"photo-1")
    assert first.category == fake_category(b"photo-1").value
    assert first.image_hash == sha(b"photo-1")
    assert (first.source, first.from_cache, first.model) == ("local", False, "fake-model")
    assert first.confidence == 0.5
    assert first.description == "fake"
    assert first.request_id
    assert first.raw["local_inference_result"] == {"rule": "fake"}
    assert (again.source, again.from_cache) == ("cache", True)
    assert again.category == first.category
    assert model.prepared[b"photo-1"] == 1  # the second call uploaded nothing


def test_classify_a_path_and_check_cache(server: str, tmp_path: Path) -> None:
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(b"a cat")
    with Client(server) as client:
        assert client.check_cache(sha(b"a cat")) is None
        result = client.classify(photo)
        hit = client.check_cache(sha(b"a cat").upper())
        assert client.ready()["ready"] is True
    assert hit is not None
    assert (hit.category, hit.from_cache, hit.source) == (result.category, True, "cache")


def test_bad_image_raises_typed_error(server: str) -> None:
    with Client(server) as client, pytest.raises(BadImageError) as info:
        client.classify(b"bad bytes")
    err = info.value
    assert (err.status, err.error_code, err.message) == (400, "invalid_image", "not an image")
    assert err.request_id
    assert len(err.request_id) == 32


def test_missing_file_raises_file_unreadable(server: str, tmp_path: Path) -> None:
    with Client(server) as client, pytest.raises(FileUnreadable) as info:
        client.classify(tmp_path / "nope.jpg")
    assert info.value.message == f"{tmp_path / 'nope.jpg'}: No such file or directory"


def _many_inputs(tmp_path: Path) -> list[bytes | Path]:
    """45 inputs: bytes and paths, a duplicate pair, a bad image, a missing file."""
    inputs: list[bytes | Path] = []
    for i in range(40):
        if i % 2:
            path = tmp_path / f"p{i:02d}.jpg"
            path.write_bytes(f"photo {i}".encode())
            inputs.append(path)
        else:
            inputs.append(f"photo {i}".encode())
    inputs += [b"photo 0", b"bad one", tmp_path / "missing.jpg", b"photo 2", b"photo 41"]
    return inputs


def _check_many(items: list[BatchItem], inputs: list[bytes | Path], model: FakeModel) -> None:
    assert [i.index for i in items] == list(range(len(inputs)))
    for item, source in zip(items, inputs, strict=True):
        data = source if isinstance(source, bytes) else None
        if isinstance(source, Path) and source.exists():
            data = source.read_bytes()
        if data is None:
            assert isinstance(item.error, FileUnreadable)
            assert item.image_hash is None
            assert item.name == str(source)
        elif data.startswith(b"bad"):
            assert isinstance(item.error, BadImageError)
            assert item.error.error_code == "invalid_image"
            assert item.image_hash == sha(data)
        else:
            assert item.result is not None, item
            assert item.result.category == fake_category(data).value
            assert item.image_hash == item.result.image_hash == sha(data)
    # Every distinct photo reached the model at most once (cache and dedupe).
    assert max(model.prepared.values()) == 1


def test_classify_many_checks_cache_then_uploads_misses(
    server: str, tmp_path: Path, model: FakeModel
) -> None:
    inputs = _many_inputs(tmp_path)
    seen: list[int] = []
    with Client(server) as client:
        known = client.classify(b"photo 4")
        items = client.classify_many(
            inputs, concurrency=1, on_result=lambda i: seen.append(i.index)
        )
    assert sorted(seen) == list(range(len(inputs)))
    _check_many(items, inputs, model)
    assert items[4].result is not None
    assert (items[4].result.from_cache, items[4].result.source) == (True, "cache")
    assert items[4].result.category == known.category
    assert items[0].result is not None
    assert items[0].result.from_cache is False
    assert items[40].result == items[0].result  # the duplicate shares the upload


async def test_async_client_under_trio(server: str, tmp_path: Path, model: FakeModel) -> None:
    inputs = _many_inputs(tmp_path)
    with trio.fail_after(30):
        async with AsyncClient(server) as client:
            one = await client.classify(b"photo 41")
            items = await client.classify_many(inputs, concurrency=4)
            assert (await client.ready())["ready"] is True
            assert await client.check_cache(sha(b"photo 41")) is not None
    assert one.from_cache is False
    _check_many(items, inputs, model)
    assert items[44].result is not None
    assert items[44].result.from_cache is True


def test_async_client_under_asyncio(server: str, model: FakeModel) -> None:
    async def main() -> tuple[Any, Any]:
        async with AsyncClient(server) as client:
            first = await asyncio.wait_for(client.classify(b"asyncio photo"), 30)
            many = await asyncio.wait_for(
                client.classify_many([b"asyncio photo", b"another"], concurrency=2), 30
            )
            return first, many

    first, many = asyncio.run(main())
    assert first.category == fake_category(b"asyncio photo").value
    assert [i.result.from_cache for i in many] == [True, False]
    assert model.prepared[b"asyncio photo"] == 1


# --- on a scripted transport -------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]
CAT = sha(b"cat")


def answer(data: bytes, *, cached: bool = False, rid: str = "r1") -> dict[str, Any]:
    return {
        "category": "pets",
        "confidence": 0.9,
        "description": "a cat",
        "local_inference_result": None,
        "image_hash": sha(data),
        "source": "cache" if cached else "local",
        "provider": None,
        "model": "m",
    }


def err(status: int, code: str, *, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"success": False, "error": f"said {code}", "error_code": code, "request_id": "rq"}
    return httpx.Response(status, json=body, headers=headers)


class Script:
    """A scripted server: records every request, answers from a queue, then with *rest*."""

    def __init__(self, *answers: httpx.Response | Exception, rest: Handler | None = None) -> None:
        self.answers = list(answers)
        self.rest = rest
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.answers:
            a = self.answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return a
        assert self.rest is not None, f"unexpected {request.method} {request.url}"
        return self.rest(request)

    def keys(self) -> list[str]:
        return [r.headers["Idempotency-Key"] for r in self.requests]

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]


def miss() -> httpx.Response:
    return httpx.Response(200, json={"success": True, "cached": False, "from_cache": False})


def classified(data: bytes = b"cat") -> httpx.Response:
    return httpx.Response(
        200,
        json={"success": True, "data": answer(data), "from_cache": False, "request_id": "r2"},
    )


def sync_client(script: Script, **kwargs: Any) -> Client:
    return Client("http://xintu.test", transport=httpx.MockTransport(script), **kwargs)


def async_client(script: Script, **kwargs: Any) -> AsyncClient:
    return AsyncClient("http://xintu.test", transport=httpx.MockTransport(script), **kwargs)


def test_503_is_retried_with_the_same_idempotency_key() -> None:
    script = Script(
        miss(),
        err(503, "overloaded", retry_after="0"),
        err(503, "overloaded", retry_after="0"),
        classified(),
    )
    with sync_client(script) as client:
        result = client.classify(b"cat")
    assert result.category == "pets"
    assert script.paths() == [
        "/api/v1/classify/check-cache",
        "/api/v1/classify",
        "/api/v1/classify",
        "/api/v1/classify",
    ]
    keys = script.keys()
    assert keys[1] == keys[2] == keys[3]  # one logical request, one key
    assert keys[0] != keys[1]  # another logical request, another key
    assert len(keys[0]) == 32


def test_a_retried_upload_resends_the_same_bytes() -> None:
    """The server fingerprints keyed requests by their bytes: a retry after a lost
    answer, or after 409 (first attempt still in flight), must be byte-identical."""
    script = Script(
        miss(),
        httpx.ReadError("connection reset"),
        err(409, "idempotency_key_in_flight", retry_after="0"),
        classified(),
    )
    with sync_client(script, retry=RetryPolicy(backoff_base_s=0.0)) as client:
        assert client.classify(b"cat", filename="cat.jpg").category == "pets"
    uploads = script.requests[1:]
    assert [r.url.path for r in uploads] == ["/api/v1/classify"] * 3
    assert len({r.headers["Idempotency-Key"] for r in uploads}) == 1
    assert len({r.headers["Content-Type"] for r in uploads}) == 1
    for r in uploads:
        r.read()
    assert uploads[0].content == uploads[1].content == uploads[2].content
    assert b'filename="cat.jpg"' in uploads[0].content
    assert sha(b"cat").encode() in uploads[0].content  # the claimed image_hash


def test_409_gives_up_with_a_conflict_error() -> None:
    script = Script(rest=lambda _r: err(409, "idempotency_key_in_flight", retry_after="0"))
    with sync_client(script, retry=RetryPolicy(max_attempts=2)) as client:
        with pytest.raises(ConflictError) as info:
            client.check_cache(CAT)
    assert (info.value.status, info.value.error_code) == (409, "idempotency_key_in_flight")
    assert len(script.requests) == 2


def test_429_gives_up_after_max_attempts_with_the_servers_words() -> None:
    script = Script(rest=lambda _r: err(429, "rate_limited", retry_after="0"))
    with sync_client(script, retry=RetryPolicy(max_attempts=3)) as client:
        with pytest.raises(RateLimitedError) as info:
            client.check_cache(CAT)
    e = info.value
    assert (e.status, e.error_code, e.request_id, e.message) == (
        429,
        "rate_limited",
        "rq",
        "said rate_limited",
    )
    assert e.retry_after_s == 0.0
    assert len(script.requests) == 3
    assert len(set(script.keys())) == 1


async def test_retry_waits_for_retry_after(autojump_clock: object) -> None:
    script = Script(err(503, "draining", retry_after="7"), miss())
    async with async_client(script) as client:
        t0 = trio.current_time()
        assert await client.check_cache(CAT) is None
        assert trio.current_time() - t0 == pytest.approx(7.0)
    assert len(script.requests) == 2


async def test_retry_gives_up_when_retry_after_exceeds_the_budget(autojump_clock: object) -> None:
    script = Script(rest=lambda _r: err(503, "overloaded", retry_after="30"))
    policy = RetryPolicy(max_attempts=10, max_total_s=20.0)
    async with async_client(script, retry=policy) as client:
        t0 = trio.current_time()
        with pytest.raises(ServerBusy) as info:
            await client.check_cache(CAT)
        assert trio.current_time() == t0  # no wait was started
    assert len(script.requests) == 1
    assert info.value.retry_after_s == 30.0


async def test_backoff_without_retry_after_stays_within_the_total_budget(
    autojump_clock: object,
) -> None:
    script = Script(rest=lambda _r: err(503, "overloaded"))
    policy = RetryPolicy(max_attempts=100, max_total_s=5.0, backoff_base_s=1.0)
    async with async_client(script, retry=policy) as client:
        t0 = trio.current_time()
        with pytest.raises(ServerBusy):
            await client.check_cache(CAT)
        assert trio.current_time() - t0 <= 5.0
    assert 2 <= len(script.requests) < 10


def test_retry_after_as_http_date() -> None:
    script = Script(err(503, "overloaded", retry_after="Wed, 21 Oct 2015 07:28:00 GMT"), miss())
    with sync_client(script) as client:
        assert client.check_cache(CAT) is None  # a date in the past: retry at once
    assert len(script.requests) == 2


def test_connection_failures_are_retried_then_raised() -> None:
    boom = httpx.ConnectError("connection refused")
    script = Script(boom, miss())
    policy = RetryPolicy(backoff_base_s=0.0)
    with sync_client(script, retry=policy) as client:
        assert client.check_cache(CAT) is None
    script = Script(rest=lambda _r: (_ for _ in ()).throw(httpx.ConnectError("refused")))
    with sync_client(script, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.0)) as client:
        with pytest.raises(TransportError) as info:
            client.check_cache(CAT)
    assert info.value.message == "no answer from the server: refused"
    assert info.value.status is None
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    ("response", "cls", "code"),
    [
        (err(400, "bad_request"), BadRequestError, "bad_request"),
        (err(418, "teapot"), APIError, "teapot"),
        (err(400, "invalid_image"), BadImageError, "invalid_image"),
        (err(401, "unauthorized"), AuthenticationError, "unauthorized"),
        (err(404, "not_found"), NotFoundError, "not_found"),
        (err(413, "payload_too_large"), PayloadTooLargeError, "payload_too_large"),
        (err(415, "unsupported_format"), UnsupportedFormatError, "unsupported_format"),
        (err(422, "image_hash_mismatch"), ValidationError, "image_hash_mismatch"),
        (err(504, "deadline_exceeded"), DeadlineExceededError, "deadline_exceeded"),
        (err(500, "internal_error"), ServerError, "internal_error"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), ServerError, None),
    ],
)
def test_errors_are_typed_and_not_retried(
    response: httpx.Response, cls: type[XintuClientError], code: str | None
) -> None:
    script = Script(response)
    with sync_client(script) as client, pytest.raises(cls) as info:
        client.check_cache(CAT)
    assert type(info.value) is cls
    assert info.value.status == response.status_code
    assert info.value.error_code == code
    if code is None:
        assert info.value.message == "<html>Bad Gateway</html>"
    assert len(script.requests) == 1


def test_api_key_and_user_id_headers() -> None:
    script = Script(miss())
    with sync_client(script, api_key="s3cret", user_id="u7") as client:
        client.check_cache(CAT)
    request = script.requests[0]
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert request.headers["X-User-ID"] == "u7"
    assert json.loads(request.content) == {"image_hash": CAT}
    script = Script(miss())
    with sync_client(script) as client:
        client.check_cache(CAT)
    assert "Authorization" not in script.requests[0].headers


class FakeBatchServer:
    """Answers batch-check-cache (some hashes known) and the batch endpoint, recording both."""

    def __init__(self, known: set[str], *, refuse_over: int | None = None) -> None:
        self.known = known
        self.refuse_over = refuse_over
        self.checks: list[list[str]] = []
        self.uploads: list[list[str]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    def _answer(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/batch-check-cache"):
            hashes = json.loads(request.content)["image_hashes"]
            assert 1 <= len(hashes) <= 100
            self.checks.append(hashes)
            items = [
                {"image_hash": h, "cached": h in self.known}
                | ({"data": {"category": "foods", "confidence": 1, "source": "cache"}})
                for h in hashes
            ]
            for item in items:
                if not item["cached"]:
                    del item["data"]
            return httpx.Response(200, json={"success": True, "items": items})
        assert request.url.path.endswith("/batch")
        request.read()
        body = request.content
        claimed = json.loads(body.split(b'name="image_hashes"\r\n\r\n')[1].split(b"\r\n")[0])
        if self.refuse_over is not None and len(body) > self.refuse_over:
            return err(413, "payload_too_large")
        assert 1 <= len(claimed) <= 20
        self.uploads.append(claimed)
        items = [
            {"index": i, "success": True, "data": {"category": "pets", "confidence": 0.5}}
            for i in range(len(claimed))
        ]
        return httpx.Response(200, json={"success": True, "items": items})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return self._answer(request)

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(1)  # virtual time: lets other requests pile up
            return self._answer(request)
        finally:
            self.in_flight -= 1


def test_classify_many_chunks_checks_by_100_and_uploads_by_20() -> None:
    photos = [f"p{i}".encode() for i in range(250)]
    known = {sha(p) for p in photos[::5]}
    fake = FakeBatchServer(known)
    client = Client("http://xintu.test", transport=httpx.MockTransport(fake))
    with client:
        items = client.classify_many(photos, concurrency=1)
    assert [len(c) for c in fake.checks] == [100, 100, 50]
    assert all(len(u) <= 20 for u in fake.uploads)
    uploaded = [h for u in fake.uploads for h in u]
    assert sorted(uploaded) == sorted({sha(p) for p in photos} - known)
    assert [i.result.category for i in items if i.result] == [
        "foods" if sha(p) in known else "pets" for p in photos
    ]
    assert all(i.result.from_cache == (sha(p) in known) for i, p in zip(items, photos, strict=True))


def test_classify_many_splits_by_bytes_and_on_413() -> None:
    photos = [bytes([i]) * 1000 for i in range(10)]
    fake = FakeBatchServer(set())
    with Client(
        "http://xintu.test", transport=httpx.MockTransport(fake), max_batch_bytes=3000
    ) as client:
        items = client.classify_many(photos, concurrency=1)
    assert [len(u) for u in fake.uploads] == [3, 3, 3, 1]
    assert all(i.ok for i in items)

    fake = FakeBatchServer(set(), refuse_over=2500)  # the server's limit is lower
    with Client("http://xintu.test", transport=httpx.MockTransport(fake)) as client:
        items = client.classify_many(photos, concurrency=1)
    assert all(i.ok for i in items)
    assert sorted(h for u in fake.uploads for h in u) == sorted(sha(p) for p in photos)
    assert max(len(u) for u in fake.uploads) <= 2


async def test_classify_many_bounds_requests_in_flight(autojump_clock: object) -> None:
    photos = [f"p{i}".encode() for i in range(400)]
    fake = FakeBatchServer(set())
    transport = httpx.MockTransport(fake.handle_async)
    async with AsyncClient("http://xintu.test", transport=transport) as client:
        items = await client.classify_many(photos, concurrency=3)
    assert fake.most_in_flight == 3
    assert len(items) == 400
    assert all(i.ok for i in items)


async def test_classify_many_reports_a_failed_batch_on_each_item(autojump_clock: object) -> None:
    script = Script(
        httpx.Response(200, json={"success": True, "items": []}),
        rest=lambda _r: err(413, "payload_too_large"),
    )
    async with async_client(script) as client:
        items = await client.classify_many([b"a", b"b", b"a"])
    assert [type(i.error) for i in items] == [PayloadTooLargeError] * 3
    assert [i.image_hash for i in items] == [sha(b"a"), sha(b"b"), sha(b"a")]


def test_client_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"max_batch_files must be 1\.\.20"):
        Client(max_batch_files=21)
    with Client() as client, pytest.raises(ValueError, match="concurrency must be at least 1"):
        client.classify_many([b"x"], concurrency=0)
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        RetryPolicy(max_attempts=0)

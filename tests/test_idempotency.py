"""``Idempotency-Key``: replays byte for byte, 422 on reuse, 409 while in flight,
5xx not stored, per-client scope, TTL and abandoned claims, on SQLite and MariaDB.

The property test runs random sequences of requests, retries and replays and checks
that every replay equals the first answer and that the store's counters are exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client
from werkzeug.datastructures import FileStorage, Headers

from xintu import Config, load_config
from xintu.http import XintuApp, create_app
from xintu.http._idempotency import Idempotency, _fingerprint

from .fakes import FakeDecoded, FakeModel

V1 = "/api/v1/classify"
REPLAYED = "Idempotency-Replayed"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(data: bytes) -> FileStorage:
    return FileStorage(io.BytesIO(data), filename="p.jpg", content_type="image/jpeg")


def multipart(data: bytes, boundary: str = "fixed-boundary") -> tuple[bytes, dict[str, str]]:
    """A multipart body with a fixed boundary: a retry sends the same bytes."""
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            'filename="p.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture
def service_config(tmp_path: Path, store_url: str) -> Config:
    return load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"url": store_url, "writer_flush_ms": 1},
        ratelimit={"rate_per_s": 0.0, "burst": 1, "max_clients": 1},
    )


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
async def app(service_config: Config, model: FakeModel) -> AsyncIterator[XintuApp]:
    app = create_app(service_config, model_factory=lambda _c: model)
    with trio.fail_after(30):
        async with app.test_app():
            yield app


@pytest.fixture
def client(app: XintuApp) -> Client:
    return app.test_client()


def layer(app: XintuApp) -> Idempotency:
    found = app.extensions["xintu.idempotency"]
    assert isinstance(found, Idempotency)
    return found


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str
    headers: Headers

    def json(self) -> Any:
        return json.loads(self.body)


async def post(
    client: Client, data: bytes, key: str | None = None, *, path: str = V1, **headers: str
) -> Answer:
    body, hdrs = multipart(data)
    if key is not None:
        hdrs["Idempotency-Key"] = key
    resp = await client.post(path, data=body, headers=hdrs | headers)
    return Answer(resp.status_code, await resp.get_data(), resp.content_type or "", resp.headers)


async def check(client: Client, image_hash: str, key: str | None = None, **headers: str) -> Answer:
    hdrs = dict(headers)
    if key is not None:
        hdrs["Idempotency-Key"] = key
    resp = await client.post(f"{V1}/check-cache", json={"image_hash": image_hash}, headers=hdrs)
    return Answer(resp.status_code, await resp.get_data(), resp.content_type or "", resp.headers)


async def flushed(app: XintuApp) -> None:
    with trio.fail_after(10):
        await app.runtime.writer.wait_idle()


# --- replay, reuse, scope ----------------------------------------------------------------


async def test_retry_is_replayed_byte_for_byte_and_runs_nothing(
    app: XintuApp, client: Client, model: FakeModel
) -> None:
    with trio.fail_after(20):
        first = await post(client, b"photo-a", "key-1")
        assert first.status == 200
        assert REPLAYED not in first.headers
        again = await post(client, b"photo-a", "key-1")
        assert again.status == 200
        assert again.body == first.body
        assert again.content_type == first.content_type == "application/json"
        assert again.headers[REPLAYED] == "true"
        assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]
        assert again.json()["request_id"] == first.json()["request_id"]
        assert model.prepared[b"photo-a"] == 1
        await flushed(app)
        entry = await app.store.get(sha(b"photo-a"))
        assert entry is not None
        assert entry.hit_count == 0  # the replay was not a cache hit
        assert await app.store.get_request_log(again.headers["X-Request-ID"]) is None
        stats = layer(app).statistics()
        assert (stats.claimed, stats.completed, stats.replayed) == (1, 1, 1)


async def test_same_key_different_request_is_422(client: Client) -> None:
    with trio.fail_after(20):
        assert (await post(client, b"photo-b", "key-2")).status == 200
        for answer in (
            await post(client, b"photo-c", "key-2"),  # another body
            await post(client, b"photo-b", "key-2", path=f"{V1}/batch"),  # another path
            await check(client, sha(b"photo-b"), "key-2"),  # another endpoint and type
        ):
            assert answer.status == 422
            assert answer.json() == {
                "success": False,
                "error": "this Idempotency-Key was already used for a different request",
                "error_code": "idempotency_key_reused",
                "request_id": answer.headers["X-Request-ID"],
            }


async def test_a_new_multipart_boundary_is_a_different_request(client: Client) -> None:
    with trio.fail_after(20):
        body, headers = multipart(b"photo-d", "boundary-one")
        first = await client.post(V1, data=body, headers=headers | {"Idempotency-Key": "k"})
        assert first.status_code == 200
        body, headers = multipart(b"photo-d", "boundary-two")
        second = await client.post(V1, data=body, headers=headers | {"Idempotency-Key": "k"})
        assert second.status_code == 422


async def test_keys_are_scoped_per_client(client: Client) -> None:
    with trio.fail_after(20):
        alice = await post(client, b"photo-e", "shared-key", **{"X-User-ID": "alice"})
        bob = await post(client, b"photo-e", "shared-key", **{"X-User-ID": "bob"})
        assert alice.status == bob.status == 200
        assert REPLAYED not in bob.headers  # Bob's key is his own: his request ran
        assert bob.json()["from_cache"] is True
        bob_other = await post(client, b"photo-f", "shared-key", **{"X-User-ID": "carol"})
        assert bob_other.status == 200
        replay = await post(client, b"photo-e", "shared-key", **{"X-User-ID": "alice"})
        assert replay.body == alice.body


async def test_json_endpoints_are_covered_too(app: XintuApp, client: Client) -> None:
    with trio.fail_after(20):
        await post(client, b"photo-g")
        await flushed(app)
        first = await check(client, sha(b"photo-g"), "check-1")
        again = await check(client, sha(b"photo-g"), "check-1")
        assert again.body == first.body
        assert again.headers[REPLAYED] == "true"
        await flushed(app)
        entry = await app.store.get(sha(b"photo-g"))
        assert entry is not None
        assert entry.hit_count == 1


async def test_client_errors_are_stored_and_replayed(client: Client, model: FakeModel) -> None:
    with trio.fail_after(20):
        first = await post(client, b"bad image bytes", "key-bad")
        assert first.status == 400
        again = await post(client, b"bad image bytes", "key-bad")
        assert (again.status, again.body) == (400, first.body)
        assert again.headers[REPLAYED] == "true"
        assert model.prepared[b"bad image bytes"] == 1


async def test_get_requests_ignore_the_header(client: Client) -> None:
    with trio.fail_after(20):
        for _ in range(2):
            resp = await client.get("/openapi.json", headers={"Idempotency-Key": "k"})
            assert resp.status_code == 200
            assert REPLAYED not in resp.headers


@pytest.mark.parametrize(
    "key",
    ["", " ", "has space", "tab\tkey", "x" * 256, "caf\u00e9", "new\nline"],
)
async def test_malformed_keys_are_422(client: Client, key: str) -> None:
    with trio.fail_after(20):
        try:
            answer = await post(client, b"photo-h", key)
        except ValueError:  # the test client itself refuses a header with a newline
            return
        assert answer.status == 422
        assert answer.json()["error"] == "Idempotency-Key must be 1 to 255 visible ASCII characters"


async def test_longest_and_oddest_valid_keys(client: Client) -> None:
    with trio.fail_after(20):
        for key in ("x" * 255, "!", '"quoted"', "~:/?#[]@"):
            assert (await post(client, b"photo-i", key)).status == 200
            assert (await post(client, b"photo-i", key)).headers[REPLAYED] == "true"


async def test_two_key_headers_are_422(client: Client) -> None:
    with trio.fail_after(20):
        body, headers = multipart(b"photo-j")
        resp = await client.post(
            V1,
            data=body,
            headers=[*headers.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        )
        assert resp.status_code == 422
        assert (await resp.get_json())["error"] == "send one Idempotency-Key header, not several"


# --- in flight, failures, cancellation ---------------------------------------------------


class GatedModel(FakeModel):
    """Waits at ``gate`` for images starting with ``b"slow"``; signals ``entered``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.entered = trio.Event()

    def prepare(self, data: bytes) -> FakeDecoded:
        if data.startswith(b"slow"):
            trio.from_thread.run_sync(self.entered.set)
            trio.from_thread.run(self.gate.wait)
        return super().prepare(data)


@pytest.fixture
def gated() -> GatedModel:
    return GatedModel()


@pytest.fixture
async def gated_app(service_config: Config, gated: GatedModel) -> AsyncIterator[XintuApp]:
    app = create_app(service_config, model_factory=lambda _c: gated)
    with trio.fail_after(30):
        async with app.test_app():
            yield app


async def test_retry_while_in_flight_is_409_then_replayed(
    gated_app: XintuApp, gated: GatedModel
) -> None:
    client = gated_app.test_client()
    answers: list[Answer] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                answers.append(await post(client, b"slow-1", "k-flight"))

            nursery.start_soon(first)
            await gated.entered.wait()
            conflict = await post(client, b"slow-1", "k-flight")
            assert conflict.status == 409
            assert conflict.headers["Retry-After"] == "1"
            assert conflict.json()["error_code"] == "idempotency_key_in_flight"
            reused = await post(client, b"slow-2", "k-flight")
            assert reused.status == 422  # a different request is refused even now
            gated.gate.set()
    replay = await post(client, b"slow-1", "k-flight")
    assert replay.body == answers[0].body
    assert replay.headers[REPLAYED] == "true"
    assert layer(gated_app).statistics().in_flight_conflicts == 1


async def test_5xx_is_not_stored_and_the_key_is_free_again(
    gated_app: XintuApp, gated: GatedModel
) -> None:
    with trio.fail_after(20):
        client = gated_app.test_client()
        timed_out = await post(client, b"slow-3", "k-504", **{"X-Deadline-Ms": "50"})
        assert timed_out.status == 504
        gated.gate.set()
        retry = await post(client, b"slow-3", "k-504")
        assert retry.status == 200
        assert REPLAYED not in retry.headers
        replay = await post(client, b"slow-3", "k-504")
        assert replay.body == retry.body
        stats = layer(gated_app).statistics()
        assert (stats.released, stats.completed) == (1, 1)


async def test_a_draining_503_is_not_stored(app: XintuApp, client: Client) -> None:
    with trio.fail_after(20):
        app.runtime.begin_drain()
        refused = await post(client, b"photo-k", "k-503")
        assert refused.status == 503
        assert layer(app).statistics().released == 1


async def test_client_that_gives_up_releases_its_key(
    gated_app: XintuApp, gated: GatedModel
) -> None:
    client = gated_app.test_client()
    with trio.fail_after(10):
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post, client, b"slow-4", "k-gone")
                await gated.entered.wait()
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()  # the client disconnects
        gated.gate.set()
        retry = await post(client, b"slow-4", "k-gone")
    assert retry.status == 200  # not 409: the claim was released
    assert REPLAYED not in retry.headers
    assert layer(gated_app).statistics().released == 1


async def test_streamed_batch_is_recorded_and_replayed(client: Client) -> None:
    with trio.fail_after(20):
        boundary = "b"
        parts = (
            b"".join(
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
                    f'filename="{i}.jpg"\r\n\r\n'
                ).encode()
                + data
                + b"\r\n"
                for i, data in enumerate([b"s1", b"s2", b"bad s3"])
            )
            + f"--{boundary}--\r\n".encode()
        )
        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Accept": "application/x-ndjson",
            "Idempotency-Key": "k-stream",
        }
        first = await client.post(f"{V1}/batch", data=parts, headers=headers)
        first_body = await first.get_data()
        assert first.status_code == 200
        assert len(first_body.splitlines()) == 4
        again = await client.post(f"{V1}/batch", data=parts, headers=headers)
        assert await again.get_data() == first_body
        assert again.headers[REPLAYED] == "true"
        assert again.content_type == "application/x-ndjson"


# --- expiry and abandoned claims ---------------------------------------------------------


class WallClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_keys_expire_after_the_ttl(app: XintuApp, client: Client) -> None:
    with trio.fail_after(20):
        clock = WallClock()
        layer(app).now = clock  # type: ignore[method-assign]
        ttl = app.xintu_config.idempotency.ttl_s
        assert (await post(client, b"photo-l", "k-ttl")).status == 200
        clock.now += timedelta(seconds=ttl - 1)
        assert (await post(client, b"photo-m", "k-ttl")).status == 422
        clock.now += timedelta(seconds=2)
        fresh = await post(client, b"photo-m", "k-ttl")
        assert fresh.status == 200
        assert REPLAYED not in fresh.headers


async def test_abandoned_claim_is_taken_over_after_the_lease(app: XintuApp, client: Client) -> None:
    """A claim left in flight by a process that died: 409 until lease_s, then free."""
    with trio.fail_after(20):
        clock = WallClock()
        layer(app).now = clock  # type: ignore[method-assign]
        lease = app.xintu_config.idempotency.lease_s
        # Another replica claimed the key with this very request, then died.
        guard = app.extensions["xintu.guard"]
        scope = guard.identify(peer="<local>", forwarded_for=[], authorization=None, user_id="dana")
        scope = scope.identity
        body, headers = multipart(b"photo-n")
        fingerprint = _fingerprint("POST", V1, b"", headers["Content-Type"], body)
        claimed = await app.store.idempotency_begin(
            scope, "k-dead", fingerprint, now=clock.now, ttl_s=3600
        )
        assert claimed is None
        user = {"X-User-ID": "dana"}
        assert (await post(client, b"photo-n", "k-dead", **user)).status == 409
        clock.now += timedelta(seconds=lease + 1)
        taken = await post(client, b"photo-n", "k-dead", **user)
        assert taken.status == 200
        assert layer(app).statistics().taken_over == 1
        assert (await post(client, b"photo-n", "k-dead", **user)).headers[REPLAYED] == "true"


# --- the property ------------------------------------------------------------------------

IMAGES = [b"img-0", b"img-1", b"img-2", b"bad img-3"]
STEP = st.tuples(
    st.sampled_from(["classify", "check"]),
    st.integers(0, len(IMAGES) - 1),
    st.one_of(st.none(), st.sampled_from(["k0", "k1", "k2"])),
    st.sampled_from(["u1", "u2"]),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(STEP, min_size=1, max_size=12))
async def test_replays_equal_first_answers_and_counters_are_exact(
    service_config: Config, steps: list[tuple[str, int, str | None, str]]
) -> None:
    # An app per example (async fixtures do not mix with @given); the store outlives
    # it, so each example salts its images and keys.
    app = create_app(service_config, model_factory=lambda _c: FakeModel())
    with trio.fail_after(60):
        async with app.test_app():
            await _run_steps(app, app.test_client(), steps)


async def _run_steps(
    app: XintuApp, client: Client, steps: list[tuple[str, int, str | None, str]]
) -> None:
    salt = uuid.uuid4().hex.encode()
    images = [(b"bad " if d.startswith(b"bad") else b"") + salt + d for d in IMAGES]
    first: dict[tuple[str, str], tuple[tuple[str, int], Answer]] = {}
    known: set[int] = set()
    hits: Counter[int] = Counter()
    logged: list[str] = []
    with trio.fail_after(60):
        for kind, i, key, user in steps:
            salted = None if key is None else f"{key}-{salt.decode()}"
            fingerprint = (kind, i)
            prior = first.get((user, salted)) if salted else None
            if kind == "classify":
                answer = await post(client, images[i], salted, **{"X-User-ID": user})
            else:
                answer = await check(client, sha(images[i]), salted, **{"X-User-ID": user})
            if prior is not None and prior[0] == fingerprint:
                assert answer.headers.get(REPLAYED) == "true"
                assert (answer.status, answer.body, answer.content_type) == (
                    prior[1].status,
                    prior[1].body,
                    prior[1].content_type,
                )
                continue
            if prior is not None:
                assert answer.status == 422
                continue
            assert REPLAYED not in answer.headers
            bad = images[i].startswith(b"bad")
            if kind == "classify":
                assert answer.status == (400 if bad else 200)
                if not bad:
                    assert answer.json()["from_cache"] is (i in known)
                    if i in known:
                        hits[i] += 1
                    known.add(i)
                    logged.append(answer.json()["request_id"])
            else:
                assert answer.status == 200
                assert answer.json()["cached"] is (i in known)
                if i in known:
                    hits[i] += 1
            if salted is not None:
                first[(user, salted)] = (fingerprint, answer)
        await app.runtime.writer.wait_idle()
    for i in known:
        entry = await app.store.get(sha(images[i]))
        assert entry is not None
        assert entry.hit_count == hits[i], (i, steps)
    for rid in logged:
        assert await app.store.get_request_log(rid) is not None

"""``Idempotency-Key``: replays byte for byte, 422 on reuse, 409 while in flight,
5xx not stored, per-client scope, TTL and abandoned claims, on SQLite and MariaDB;
the fingerprint is what the request means (multipart fields and files, the JSON
value), not its bytes (boundary, part headers, key order, whitespace).

One property test runs random sequences of requests, retries and replays and checks
that every replay equals the first answer and that the store's counters are exact;
another checks that two multipart bodies, built with any boundaries and part
headers, have the same fingerprint exactly when they carry the same parts.
Retries by real clients (curl, requests) are in test_idempotency_outside.
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
from xintu.http._fingerprint import fingerprint as _fingerprint
from xintu.http._idempotency import Idempotency

from .fakes import FakeDecoded, FakeModel

V1 = "/api/v1/classify"
REPLAYED = "Idempotency-Replayed"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(data: bytes) -> FileStorage:
    return FileStorage(io.BytesIO(data), filename="p.jpg", content_type="image/jpeg")


def multipart(data: bytes, boundary: str = "fixed-boundary") -> tuple[bytes, dict[str, str]]:
    """A multipart body with one ``image`` file, as the album app sends it."""
    return form([Part("image", data, "p.jpg", ("Content-Type: image/jpeg",))], boundary)


@dataclass(frozen=True)
class Part:
    """One part of a multipart body: a file if it has a filename, else a field."""

    name: str
    data: bytes
    filename: str | None = None
    headers: tuple[str, ...] = ()  # more part headers, as clients add them


def form(
    parts: list[Part], boundary: str = "fixed-boundary", *, preamble: bytes = b""
) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of *parts* and its Content-Type header."""
    body = preamble
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        head = "".join(f"{h}\r\n" for h in (f"Content-Disposition: {disposition}", *part.headers))
        body += f"--{boundary}\r\n{head}\r\n".encode() + part.data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
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
                "detail": "this Idempotency-Key was already used for a different request",
            }


async def test_the_upload_built_again_with_a_new_boundary_is_replayed(
    client: Client, model: FakeModel
) -> None:
    """Every standard client picks a new random boundary for a retry."""
    with trio.fail_after(20):
        body, headers = multipart(b"photo-d", "boundary-one")
        first = await client.post(V1, data=body, headers=headers | {"Idempotency-Key": "k"})
        assert first.status_code == 200
        # Another boundary, and the file's Content-Type guessed otherwise.
        body, headers = form([Part("image", b"photo-d", "p.jpg")], "----WebKitFormBoundaryX")
        again = await client.post(V1, data=body, headers=headers | {"Idempotency-Key": "k"})
        assert again.status_code == 200
        assert again.headers[REPLAYED] == "true"
        assert await again.get_data() == await first.get_data()
        assert model.prepared[b"photo-d"] == 1
        body, headers = multipart(b"photo-d2", "boundary-three")
        other = await client.post(V1, data=body, headers=headers | {"Idempotency-Key": "k"})
        assert other.status_code == 422


async def test_a_large_upload_built_again_is_replayed(client: Client) -> None:
    """Over 256 KiB the body is parsed on a worker thread."""
    with trio.fail_after(20):
        photo = b"large-" + bytes(range(256)) * 2048
        answers = []
        for boundary in ("one", "two"):
            body, headers = multipart(photo, boundary)
            assert len(body) > 256 * 1024
            resp = await client.post(V1, data=body, headers=headers | {"Idempotency-Key": "big"})
            answers.append((resp.status_code, await resp.get_data(), resp.headers))
        assert answers[0][0] == answers[1][0] == 200
        assert answers[1][1] == answers[0][1]
        assert answers[1][2][REPLAYED] == "true"


async def test_a_form_over_the_app_limits_is_fingerprinted_by_its_bytes(client: Client) -> None:
    """A field over MAX_FORM_MEMORY_SIZE: the app answers 413; the same bytes get that
    answer replayed, the same fields under another boundary are another request."""
    with trio.fail_after(20):
        parts = [Part("image", b"photo-o", "p.jpg"), Part("image_hash", b"0" * 70_000)]
        answers = []
        for boundary in ("one", "one", "two"):
            body, headers = form(parts, boundary)
            resp = await client.post(V1, data=body, headers=headers | {"Idempotency-Key": "big"})
            answers.append((resp.status_code, resp.headers.get(REPLAYED)))
        assert answers == [(413, None), (413, "true"), (422, None)]


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


# --- the fingerprint: what the request means ---------------------------------------------

JPEG = ("Content-Type: image/jpeg",)
CAT, DOG, OWL = b"cat-bytes", b"dog-bytes", b"owl-bytes"
HASHES = '["' + "a" * 64 + '", null]'


def fp(body: bytes, content_type: str, *, path: str = V1, **kwargs: Any) -> str:
    return _fingerprint("POST", path, b"", content_type, body, **kwargs)


def fp_form(parts: list[Part], boundary: str = "fixed-boundary", **kwargs: Any) -> str:
    body, headers = form(parts, boundary)
    return fp(body, headers["Content-Type"], **kwargs)


BATCH = [
    Part("images", CAT, "cat.jpg", JPEG),
    Part("images", DOG, "dog.jpg", JPEG),
    Part("image_hashes", HASHES.encode()),
]


def test_the_boundary_and_part_headers_do_not_count() -> None:
    base = fp_form(BATCH)
    bare = [Part(p.name, p.data, p.filename) for p in BATCH]  # no part Content-Type
    octet = [
        Part(p.name, p.data, p.filename, ("Content-Type: application/octet-stream",)) for p in BATCH
    ]
    fields_first = [BATCH[2], BATCH[0], BATCH[1]]  # requests sends fields before files
    body, _ = form(BATCH, "x", preamble=b"a preamble\r\n")
    assert {
        base,
        fp_form(BATCH, "------------------------d74496d66958873e"),  # curl
        fp_form(BATCH, "----WebKitFormBoundary7MA4YWxkTrZu0gW"),  # browsers
        fp_form(bare, "8e2b4d3c5a6f"),  # requests
        fp_form(octet, "d2a5f0b1-okhttp"),
        fp_form(fields_first, "x"),
        fp(body + b"an epilogue", 'Multipart/Form-Data; boundary="x"; charset=utf-8'),
    } == {base}


def test_what_the_handler_sees_counts() -> None:
    batch_body, headers = form(BATCH)
    batch_type = headers["Content-Type"]

    def replaced(i: int, part: Part) -> list[Part]:
        return [part if j == i else p for j, p in enumerate(BATCH)]

    variants = {
        "base": fp_form(BATCH),
        "file content": fp_form(replaced(1, Part("images", OWL, "dog.jpg", JPEG))),
        "filename": fp_form(replaced(1, Part("images", DOG, "owl.jpg", JPEG))),
        "no filename": fp_form(replaced(1, Part("images", DOG, "", JPEG))),
        "field value": fp_form(replaced(2, Part("image_hashes", b"[null, null]"))),
        "field name": fp_form(replaced(2, Part("image_hash", HASHES.encode()))),
        "images order": fp_form([BATCH[1], BATCH[0], BATCH[2]]),
        "one image less": fp_form([BATCH[0], BATCH[2]]),
        "one image more": fp_form([*BATCH, Part("images", OWL, "owl.jpg")]),
        "no field": fp_form(BATCH[:2]),
        "a file, not a field": fp_form([*BATCH[:2], Part("image_hashes", HASHES.encode(), "h")]),
        "path": fp_form(BATCH, path=f"{V1}/batch"),
        "method": _fingerprint("PUT", V1, b"", batch_type, batch_body),
        "query": _fingerprint("POST", V1, b"x=1", batch_type, batch_body),
    }
    assert len(set(variants.values())) == len(variants), variants


def test_json_counts_by_its_value() -> None:
    value = {"image_hash": "ab" * 32, "user_id": "ann", "tags": [1, 2.5, None, "\u00e9"]}
    base = fp(json.dumps(value).encode(), "application/json")
    same = {
        fp(json.dumps(value, separators=(",", ":")).encode(), "application/json"),
        fp(json.dumps(dict(reversed(value.items())), indent=4).encode(), "application/json"),
        fp(json.dumps(value, ensure_ascii=False).encode(), "Application/JSON; charset=utf-8"),
        fp(json.dumps(value).encode("utf-16"), "application/json"),  # json.loads reads it too
        fp(
            b"\n " + json.dumps(value).replace("ann", "\\u0061nn").encode() + b" \n",
            "application/json",
        ),
    }
    assert same == {base}
    different = {
        fp(json.dumps(value | {"user_id": "bob"}).encode(), "application/json"),
        fp(json.dumps(value | {"tags": [2.5, 1, None, "\u00e9"]}).encode(), "application/json"),
        fp(json.dumps(value | {"extra": None}).encode(), "application/json"),
        fp(json.dumps(value).encode(), "application/problem+json"),  # another media type
        fp(json.dumps(value).encode(), ""),  # not JSON by its type: raw bytes
        fp(json.dumps(value).encode(), "text/plain"),
    }
    assert len(different | {base}) == 7
    # +json types are parsed too; anything else counts by its bytes.
    compact = json.dumps(value, separators=(",", ":")).encode()
    assert fp(compact, "application/x+json") == fp(json.dumps(value).encode(), "application/x+json")
    assert fp(compact, "text/plain") != fp(json.dumps(value).encode(), "text/plain")


def test_json_over_the_apps_limit_counts_by_its_bytes() -> None:
    """The handlers refuse a JSON body over server.max_json_bytes unparsed (413)."""
    value = {"image_hash": "ab" * 32, "user_id": "ann"}
    one = json.dumps(value).encode()
    two = json.dumps(dict(reversed(value.items()))).encode()
    assert len(one) == len(two)
    at, over = {"max_json_bytes": len(one)}, {"max_json_bytes": len(one) - 1}
    assert fp(one, "application/json", **at) == fp(two, "application/json", **at)
    assert fp(one, "application/json", **over) != fp(two, "application/json", **over)
    assert fp(one, "application/json", **over) == fp(one, "application/json", **over)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"a": 1', b"", b"\xff\xfe{", b"[" * 100_000 + b"]" * 100_000],
)
def test_a_body_that_is_not_json_counts_by_its_bytes(body: bytes) -> None:
    assert fp(body, "application/json") == fp(body, "application/json")
    assert fp(body, "application/json") != fp(body + b" ", "application/json")
    assert fp(body, "application/json") != fp(body, "application/json; charset=utf-8")


def test_a_form_that_does_not_parse_counts_by_its_bytes() -> None:
    whole, headers = form(BATCH, "one")
    cut = whole.removesuffix(b"--one--\r\n")  # no closing boundary
    other_cut = form(BATCH, "two")[0].removesuffix(b"--two--\r\n")
    no_disposition = whole.replace(b"Content-Disposition", b"Content-Dispositio", 1)
    bad_header = whole.replace(b"image/jpeg", b"image/\xff", 1)
    for body, content_type in (
        (cut, headers["Content-Type"]),
        (no_disposition, headers["Content-Type"]),
        (bad_header, headers["Content-Type"]),
        (whole, "multipart/form-data"),  # no boundary
        (whole, "multipart/form-data; boundary=wrong"),
        (whole, "multipart/form-data; boundary=caf\u00e9"),
    ):
        assert fp(body, content_type) == fp(body, content_type)
        assert fp(body, content_type) != fp(body + b"\r\n", content_type)
        assert fp(body, content_type) != fp_form(BATCH, "one")
    assert fp(cut, headers["Content-Type"]) != fp(other_cut, "multipart/form-data; boundary=two")


def test_a_form_over_the_limits_counts_by_its_bytes() -> None:
    big = [Part("image_hash", b"0" * 1001), Part("image", CAT, "c.jpg")]
    many = [Part("images", CAT, f"{i}.jpg") for i in range(5)]
    for parts, limits in (
        (big, {"max_form_memory_size": 1000}),
        (many, {"max_form_parts": 4}),
    ):
        assert fp_form(parts, "one") == fp_form(parts, "two")  # no limits: parsed
        assert fp_form(parts, "one", **limits) != fp_form(parts, "two", **limits)
        assert fp_form(parts, "one", **limits) == fp_form(parts, "one", **limits)
    # At the limit, still parsed.
    assert fp_form(big, "one", max_form_memory_size=1001) == fp_form(big, "two")
    assert fp_form(many, "one", max_form_parts=5) == fp_form(many, "two")


def test_a_large_form_is_read_across_slices() -> None:
    """Parts and boundaries that straddle the decoder's 64 KiB slices."""
    for size in (65_536 - 60, 65_536 - 3, 65_536, 65_536 * 2 + 17):
        parts = [Part("image_hash", b"h"), Part("images", b"x" * size, "a"), Part("images", b"y")]
        assert fp_form(parts, "one") == fp_form(parts, "a-much-longer-boundary-two")
        longer = [parts[0], Part("images", b"x" * (size + 1), "a"), parts[2]]
        assert fp_form(parts, "one") != fp_form(longer, "one")


NAMES = st.sampled_from(["image", "images", "image_hash", "image_hashes"])
PARTS = st.lists(
    st.one_of(
        st.builds(Part, NAMES, st.text(max_size=8).map(str.encode)),
        st.builds(Part, NAMES, st.binary(max_size=24), st.text("ab.\u00e9 -_", max_size=6)),
    ),
    max_size=5,
)
PART_HEADERS = st.sampled_from(
    [(), JPEG, ("Content-Type: application/octet-stream",), ("X-Extra: 1",)]
)


def _canonical(parts: list[Part]) -> list[tuple[bool, str, str | None, bytes]]:
    ordered = sorted(parts, key=lambda p: (p.filename is not None, p.name))
    return [(p.filename is not None, p.name, p.filename, p.data) for p in ordered]


@settings(max_examples=300, deadline=None)
@given(
    parts=st.tuples(PARTS, PARTS),
    shuffle=st.randoms(use_true_random=False),
    noise=st.lists(PART_HEADERS, min_size=10, max_size=10),
    boundaries=st.tuples(st.uuids(), st.uuids()),
)
def test_fingerprints_agree_exactly_when_the_parts_do(
    parts: tuple[list[Part], list[Part]],
    shuffle: Any,
    noise: list[tuple[str, ...]],
    boundaries: tuple[uuid.UUID, uuid.UUID],
) -> None:
    a, b = parts
    roll = shuffle.random()
    if roll < 0.6:
        # Another client's rendering of a: other part headers, and the names in
        # another order (each name's parts in the same order), or all parts shuffled.
        b = [Part(p.name, p.data, p.filename, noise[i]) for i, p in enumerate(a)]
        if roll < 0.4:
            rank = {(p.filename is None, p.name): shuffle.random() for p in b}
            b.sort(key=lambda p: rank[(p.filename is None, p.name)])
        else:
            shuffle.shuffle(b)
    same = _canonical(a) == _canonical(b)
    fa = fp_form(a, f"{boundaries[0].hex}-a")
    fb = fp_form(b, f"{boundaries[1].hex}-b")
    assert (fa == fb) is same


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

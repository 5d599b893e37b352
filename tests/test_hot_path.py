"""check-cache served below Quart (:mod:`xintu.http._hot`): the same answers, refusals,
request log rows, metrics and log lines as through Quart, and Quart for every
request it does not take.

The Quart test client sends no ``Content-Length``; the real-server tests send what
HTTP clients send. Without the fast path the first test fails (Quart serves every
check-cache); the others check that nothing a client or an operator sees changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from structlog.testing import capture_logs

from xintu import Config, load_config
from xintu.http import XintuApp, create_app

from .fakes import FakeModel
from .serving import open_raw, real_server
from .test_ops import metric

V1 = "/api/v1/classify"
CHECK = f"{V1}/check-cache"
KEY = "hot-path-key"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_for(tmp_path: Path, **sections: Any) -> Config:
    return load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"writer_flush_ms": 1},
        **sections,
    )


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[XintuApp]:
    app = create_app(config_for(tmp_path), model_factory=lambda _c: FakeModel())
    async with app.test_app():
        yield app


async def _seed(app: XintuApp, data: bytes) -> str:
    """Classify *data* once (through Quart, an upload) and return its hash."""
    client = app.test_client()
    resp = await client.post(V1, files={"image": _upload(data)}, headers={"X-User-ID": "seeder"})
    assert resp.status_code == 200, await resp.get_data()
    return sha(data)


def _upload(data: bytes) -> Any:
    import io

    from werkzeug.datastructures import FileStorage

    return FileStorage(io.BytesIO(data), filename="p.jpg", content_type="image/jpeg")


class _QuartCalls:
    """Counts the requests Quart itself handled (``app.handle_request``)."""

    def __init__(self, app: XintuApp, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        inner = app.handle_request

        async def counted(request: Any) -> Any:
            self.paths.append(f"{request.path}?{request.query_string.decode()}")
            return await inner(request)

        monkeypatch.setattr(app, "handle_request", counted)


async def test_check_cache_is_answered_below_quart(
    app: XintuApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = await _seed(app, b"below")
    quart = _QuartCalls(app, monkeypatch)
    client = app.test_client()
    resp = await client.post(CHECK, json={"image_hash": h})
    assert resp.status_code == 200
    assert (await resp.get_json())["cached"] is True
    assert quart.paths == []
    # Every request it does not take, Quart serves: a query string, an Origin, an
    # Idempotency-Key, another path or method.
    await client.post(f"{CHECK}?evidence=true", json={"image_hash": h})
    await client.post(CHECK, json={"image_hash": h}, headers={"Origin": "https://a.example"})
    await client.post(CHECK, json={"image_hash": h}, headers={"Idempotency-Key": "k1"})
    await client.post(f"{V1}/batch-check-cache", json={"image_hashes": [h]})
    await client.get(CHECK)
    assert quart.paths == [
        f"{CHECK}?evidence=true",
        f"{CHECK}?",
        f"{CHECK}?",
        f"{V1}/batch-check-cache?",
        f"{CHECK}?",
    ]


async def test_same_answer_row_and_metrics_as_through_quart(app: XintuApp) -> None:
    """The fast path's answer against Quart's (``?evidence=false`` is served by
    Quart and asks for the same answer): status, headers, body, the request log
    row, the hit count and the request metric."""
    h = await _seed(app, b"twice")
    client = app.test_client()
    with capture_logs() as logs:
        fast = await client.post(CHECK, json={"image_hash": h}, headers={"X-User-ID": "u1"})
        slow = await client.post(
            f"{CHECK}?evidence=false", json={"image_hash": h}, headers={"X-User-ID": "u1"}
        )
    assert fast.status_code == slow.status_code == 200
    assert sorted(fast.headers.keys()) == sorted(slow.headers.keys())
    assert fast.headers["Vary"] == slow.headers["Vary"] == "Origin"
    fast_body, slow_body = await fast.get_json(), await slow.get_json()
    assert fast.headers["X-Request-ID"] == fast_body["request_id"]
    for body in (fast_body, slow_body):
        del body["request_id"], body["timestamp"]
    assert fast_body == slow_body
    lines = [e for e in logs if e["event"] == "request"]
    assert [line["route"] for line in lines] == [CHECK, CHECK]
    for line in lines:
        line.pop("request_id", None)  # bound by contextvars, when captured
        del line["latency_ms"]
    assert lines[0] == lines[1]
    assert lines[0]["user_id"] == "u1"
    assert lines[0]["source"] == "cache"

    with trio.fail_after(5):
        await app.runtime.writer.wait_idle()
    fast_row = await app.store.get_request_log(fast.headers["X-Request-ID"])
    slow_row = await app.store.get_request_log(slow.headers["X-Request-ID"])
    assert fast_row is not None
    assert slow_row is not None
    assert fast_row.image_hash == h
    assert fast_row.user_id == "u1"
    assert (
        (fast_row.from_cache, fast_row.source, fast_row.category)
        == (
            slow_row.from_cache,
            slow_row.source,
            slow_row.category,
        )
        == (True, "cache", slow_row.category)
    )
    scrape = await (await client.get("/metrics")).get_data(as_text=True)
    assert (
        metric(scrape, "xintu_http_requests_total", route=CHECK, method="POST", status="200") == 2.0
    )


async def test_errors_answered_as_quart_answers_them(app: XintuApp) -> None:
    client = app.test_client()
    bad_json = await client.post(CHECK, data=b"{nope", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400
    assert (await bad_json.get_json())["error_code"] == "bad_request"
    bad_hash = await client.post(CHECK, json={"image_hash": "xyz"})
    assert bad_hash.status_code == 422
    assert (await bad_hash.get_json())["error_code"] == "validation_failed"
    assert bad_hash.headers["X-Request-ID"] == (await bad_hash.get_json())["request_id"]
    # No Content-Length (the test client) and over server.max_json_bytes: refused
    # as soon as the limit is passed, the rest left unread.
    limit = app.xintu_config.server.max_json_bytes
    big = await client.post(CHECK, data=b" " * (limit + 1))
    assert big.status_code == 413
    assert big.headers["Connection"] == "close"


async def test_a_bad_body_user_id_is_refused_beside_a_good_header(app: XintuApp) -> None:
    """The header names the user, and the body's user_id is over the documented 128
    characters: 422 on both paths (schemathesis found it answered 200 when the
    header's value short-circuited the body's check)."""
    client = app.test_client()
    body = {"image_hash": "a" * 64, "user_id": "u" * 129}
    for path in (CHECK, f"{CHECK}?evidence=false"):
        resp = await client.post(path, json=body, headers={"X-User-ID": "H"})
        assert resp.status_code == 422, path
        assert (await resp.get_json())["error_code"] == "validation_failed"


async def test_body_timeout_and_disconnect(tmp_path: Path) -> None:
    """Driven on the ASGI callable: a body that does not come in time is a 408; a
    client that goes away before its body gets nothing and leaves no log line."""
    config = config_for(tmp_path, server={"body_timeout_s": 0.2})
    app = create_app(config, model_factory=lambda _c: FakeModel())
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHECK,
        "raw_path": CHECK.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-length", b"80"), (b"content-type", b"application/json")],
        "client": ("192.0.2.9", 4000),
    }
    async with app.test_app():
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async def never() -> Any:
            await trio.sleep_forever()

        with trio.fail_after(5):
            await app.asgi_app(scope, never, send)  # type: ignore[arg-type]
        assert sent[0]["status"] == 408
        assert json.loads(sent[1]["body"])["error_code"] == "request_timeout"

        async def gone() -> Any:
            return {"type": "http.disconnect"}

        sent.clear()
        with capture_logs() as logs:
            await app.asgi_app(scope, gone, send)  # type: ignore[arg-type]
        assert sent == []
        assert [e for e in logs if e["event"] == "request"] == []


async def test_real_server_keys_rate_limit_and_keep_alive(tmp_path: Path) -> None:
    """Over HTTP/1.1 (Content-Length, keep-alive): 401 with its challenge, 200 with
    the key, 429 with Retry-After past the bucket, all on one connection."""
    config = config_for(
        tmp_path,
        security={"api_key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]},
        ratelimit={"rate_per_s": 0.001, "burst": 2},
    )
    async with real_server(config, FakeModel()) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            body = {"image_hash": "a" * 64}
            no_key = await client.post(CHECK, json=body)
            assert no_key.status_code == 401
            assert no_key.headers["WWW-Authenticate"] == 'Bearer realm="xintu"'
            auth = {"Authorization": f"Bearer {KEY}"}
            ok = await client.post(CHECK, json=body, headers=auth)
            assert ok.status_code == 200
            assert ok.json() | {"request_id": "", "timestamp": ""} == {
                "success": True,
                "cached": False,
                "data": None,
                "from_cache": False,
                "request_id": "",
                "timestamp": "",
            }
            assert ok.headers["X-Request-ID"] == ok.json()["request_id"]
            assert "connection" not in ok.headers
            await client.post(CHECK, json=body, headers=auth)
            limited = await client.post(CHECK, json=body, headers=auth)
            assert limited.status_code == 429
            assert int(limited.headers["Retry-After"]) >= 1
            assert limited.json()["error_code"] == "rate_limited"
        # A Content-Length that is no number is Quart's to refuse, as before.
        stream = await open_raw(base)
        await stream.send_all(
            f"POST {CHECK} HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n".encode()
        )
        with trio.fail_after(5):
            reply = await stream.receive_some(65536)
        assert reply.startswith(b"HTTP/1.1 400")
        await stream.aclose()

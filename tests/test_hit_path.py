"""The hit path's own cost (issue 14): the per-request work that is skipped or done
once, and the behaviour that must stay the same.

Each test fails without its change: the request log line written without the
stdlib round trip and dropped before any processor below the level, Quart-CORS
left out of requests without ``Origin``, the request metrics' children looked up
once, the peer's address parsed once.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import quart_cors
import structlog

from xintu._config import LogConfig
from xintu._log import configure_logging
from xintu._metrics import Metrics
from xintu.http import _identity
from xintu.http._identity import TrustedProxies

from .test_guard import check_cache, make_config, serving

# --- the request log line -----------------------------------------------------------------


def _counting_processor(calls: list[str]) -> Any:
    def count(_logger: Any, method: str, event_dict: Any) -> Any:
        calls.append(method)
        return event_dict

    return count


def test_an_event_below_the_level_runs_no_processor() -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(level="warning", format="json"), stream)
    calls: list[str] = []
    structlog.get_config()["processors"].insert(0, _counting_processor(calls))
    log = structlog.get_logger("xintu.test")
    log.info("request", status=200)
    log.debug("detail")
    assert calls == []
    log.warning("kept", n=1)
    assert calls == ["warning"]
    assert json.loads(stream.getvalue())["event"] == "kept"


def test_json_line_written_without_a_log_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our events are rendered once and written as one line: no ``LogRecord``, no
    root logger; the stdlib's own records still arrive through the handler, and
    both lines have the shape they had (key order included)."""
    stream = io.StringIO()
    configure_logging(LogConfig(level="info", format="json"), stream)
    records: list[logging.LogRecord] = []
    handle = logging.Logger.handle

    def counting_handle(self: logging.Logger, record: logging.LogRecord) -> None:
        records.append(record)
        handle(self, record)

    monkeypatch.setattr(logging.Logger, "handle", counting_handle)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id="r1")
    structlog.get_logger("xintu.http").info("request", method="POST", status=200, user_id=None)
    assert records == []
    logging.getLogger("hypercorn.error").warning("foreign %s", "line")
    assert [r.name for r in records] == ["hypercorn.error"]
    ours, foreign = (json.loads(line) for line in stream.getvalue().splitlines())
    structlog.contextvars.clear_contextvars()
    assert list(ours) == [
        "method", "status", "user_id", "event", "request_id", "level", "logger", "timestamp"
    ]  # fmt: skip
    assert (ours["event"], ours["level"], ours["logger"], ours["user_id"]) == (
        "request", "info", "xintu.http", None
    )  # fmt: skip
    assert ours["timestamp"].endswith("Z")
    assert list(foreign) == ["event", "request_id", "level", "logger", "timestamp"]
    assert (foreign["event"], foreign["logger"]) == ("foreign line", "hypercorn.error")


def test_exception_events_keep_their_traceback() -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(level="info", format="json"), stream)
    log = structlog.get_logger("xintu.http")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("unhandled_error", request_id="r2")
    event = json.loads(stream.getvalue())
    assert (event["event"], event["level"], event["request_id"]) == (
        "unhandled_error", "error", "r2"
    )  # fmt: skip
    assert "ValueError: boom" in event["exception"]


def test_a_closed_stream_never_fails_the_caller() -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(level="info", format="json"), stream)
    stream.close()
    structlog.get_logger("xintu.http").info("request")  # no exception


# --- CORS ----------------------------------------------------------------------------------


async def test_cors_work_only_for_cross_origin_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied: list[str | None] = []
    apply = quart_cors._apply_cors

    def counting_apply(origin: str | None, *args: Any, **kw: Any) -> Any:
        applied.append(origin)
        return apply(origin, *args, **kw)

    monkeypatch.setattr(quart_cors, "_apply_cors", counting_apply)
    async with serving(make_config(tmp_path)) as (_app, client):
        plain = await check_cache(client)
        assert applied == []  # fails while every request went through Quart-CORS
        # What Quart-CORS answers without Origin: Vary: Origin and nothing else.
        assert plain.headers.get("Vary") == "Origin"
        assert not [h for h, _v in plain.headers.items() if h.lower().startswith("access-control-")]
        cross = await check_cache(client, headers={"Origin": "https://album.example"})
        assert applied == ["https://album.example"]
        assert cross.headers["Access-Control-Allow-Origin"] == "*"
        assert "X-Request-ID" in cross.headers["Access-Control-Expose-Headers"]
        refused = await client.get("/metrics-nope", headers={"Origin": "https://a.example"})
        assert refused.status_code == 404
        assert refused.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_listed_origins_unchanged(tmp_path: Path) -> None:
    config = make_config(tmp_path, api={"cors_origins": ["https://album.example"]})
    async with serving(config) as (_app, client):
        ok = await check_cache(client, headers={"Origin": "https://album.example"})
        other = await check_cache(client, headers={"Origin": "https://evil.example"})
        plain = await check_cache(client)
    assert ok.headers["Access-Control-Allow-Origin"] == "https://album.example"
    assert "Access-Control-Allow-Origin" not in other.headers
    for resp in (ok, other, plain):
        assert "Origin" in resp.headers.get("Vary", "")


# --- metrics and the guard -----------------------------------------------------------------


def test_request_metrics_look_their_children_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    lookups: list[tuple[str, ...]] = []
    for family in (metrics.request_seconds, metrics.requests):
        labels = family.labels

        def counting(*values: str, _labels: Any = labels) -> Any:
            lookups.append(values)
            return _labels(*values)

        monkeypatch.setattr(family, "labels", counting)
    for _ in range(3):
        metrics.observe_request("/api/v1/classify/check-cache", "POST", 200, "cache", 0.002)
    metrics.observe_request("/api/v1/classify/check-cache", "POST", 429, "none", 0.001)
    assert len(lookups) == 4  # two per distinct (route, method, status, source)
    hist = metrics.request_seconds.labels("/api/v1/classify/check-cache", "POST", "cache")
    assert hist._sum.get() == pytest.approx(0.006)
    assert metrics.requests.labels("/api/v1/classify/check-cache", "POST", "200")._value.get() == 3


def test_peer_address_parsed_once_and_memo_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    parse = _identity._parse_address

    def counting(text: str) -> Any:
        parsed.append(text)
        return parse(text)

    monkeypatch.setattr(_identity, "_parse_address", counting)
    monkeypatch.setattr(_identity, "_PEER_MEMO", 2)
    proxies = TrustedProxies([])
    assert [proxies.client_ip("::ffff:198.51.100.7", ["203.0.113.1"]) for _ in range(3)] == [
        "198.51.100.7"
    ] * 3
    assert parsed == ["::ffff:198.51.100.7"]
    assert proxies.client_ip("<local>", []) == "<local>"  # not an IP: as it came
    assert proxies.client_ip("198.51.100.8", []) == "198.51.100.8"
    assert len(proxies._peers) <= 2
    assert TrustedProxies(["10.0.0.0/8"]).client_ip("10.0.0.2", ["203.0.113.1"]) == "203.0.113.1"

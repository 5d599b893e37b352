"""The benchmark harness's arithmetic: percentiles, lateness, summaries, schedules, parsing.

No timing assertions: these check the math and the parsing on fixed inputs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from PIL import Image

from bench._http import Connection, build_request, json_request
from bench._loadgen import (
    SAMPLE_DTYPE,
    STATUS_CONNECT_ERROR,
    STATUS_UNFINISHED,
    poisson_schedule,
    uniform_schedule,
)
from bench._photos import distinct, jpeg, sha256
from bench._report import Row, loop_lag_row
from bench._services import logged_latencies_ms, parse_metrics
from bench._stats import breakdown, histogram_window, lateness, percentiles, summarize, timeline


def _samples(n: int) -> np.ndarray:
    rows = np.zeros(n, dtype=SAMPLE_DTYPE)
    rows["intended"] = np.arange(n) * 0.01
    rows["started"] = rows["intended"]
    rows["sent"] = rows["intended"]
    rows["done"] = rows["intended"] + 0.002
    rows["status"] = 200
    return rows


def test_percentiles_are_nearest_rank() -> None:
    got = percentiles(np.arange(1, 101, dtype=float))
    assert got == {
        "count": 100,
        "p50": 50.0,
        "p90": 90.0,
        "p99": 99.0,
        "p999": 100.0,
        "max": 100.0,
        "mean": 50.5,
    }


def test_percentiles_ignore_nan_and_handle_empty() -> None:
    assert percentiles([np.nan, 3.0])["p99"] == 3.0
    empty = percentiles([])
    assert empty["count"] == 0
    assert empty["p99"] is None
    assert empty["max"] is None


def test_lateness_on_time() -> None:
    rows = _samples(1000)
    rows["started"] += 0.001
    rows["sent"] += 0.001
    got = lateness(rows)
    assert got["p99_ms"] == pytest.approx(1.0)
    assert got["generator_lagged"] is False


def test_waiting_for_a_connection_is_not_generator_lag() -> None:
    rows = _samples(1000)
    rows["sent"] += 0.050  # every connection busy: the server's doing
    got = lateness(rows)
    assert got["generator_lagged"] is False
    assert got["client_wait_p99_ms"] == pytest.approx(50.0)


def test_lateness_flags_a_late_share() -> None:
    rows = _samples(1000)
    rows["started"][:20] += 0.011  # 2 % of the requests 11 ms late
    got = lateness(rows)
    assert got["share_over_10ms"] == pytest.approx(0.02)
    assert got["generator_lagged"] is True


def test_lateness_flags_p99_alone() -> None:
    rows = _samples(1000)
    rows["started"][:15] += 0.006  # 1.5 % at 6 ms: P99 over 5 ms, none over 10 ms
    got = lateness(rows)
    assert got["share_over_10ms"] == 0.0
    assert got["p99_ms"] == pytest.approx(6.0)
    assert got["generator_lagged"] is True


def test_lateness_ignores_requests_never_started() -> None:
    rows = _samples(10)
    rows["started"][0] = np.nan
    rows["sent"][0] = np.nan
    assert lateness(rows)["p50_ms"] == 0.0


def test_summarize_splits_accepted_refused_and_errors() -> None:
    rows = _samples(10)
    rows["status"][:6] = 200
    rows["status"][6:8] = 503
    rows["retry_after"][6] = True
    rows["status"][8] = 500
    rows["status"][9] = STATUS_CONNECT_ERROR
    rows["done"][6:8] = rows["intended"][6:8] + 0.0005
    got = summarize(rows, duration_s=2.0)
    assert (got["accepted"], got["refused"], got["errors"]) == (6, 2, 2)
    assert got["goodput_rps"] == 3.0
    assert got["refused_rps"] == 1.0
    assert got["offered_rps"] == 5.0
    assert got["refused_with_retry_after"] == 1
    assert got["status_counts"] == {"200": 6, "500": 1, "503": 2, "connect_error": 1}
    assert got["latency_accepted_ms"]["max"] == pytest.approx(2.0)
    assert got["latency_refused_ms"]["max"] == pytest.approx(0.5)


def test_summarize_window_selects_by_intended_time() -> None:
    rows = _samples(100)  # intended 0.00 .. 0.99
    rows["status"][50:] = STATUS_UNFINISHED
    got = summarize(rows, start=0.0, end=0.5)
    assert got["requests"] == 50
    assert got["errors"] == 0
    assert got["goodput_rps"] == 100.0
    later = summarize(rows, start=0.5, end=1.0)
    assert later["status_counts"] == {"unfinished": 50}


def test_latency_counts_from_the_intended_time() -> None:
    rows = _samples(1)
    rows["started"] = 0.3  # the generator was late
    rows["sent"] = 0.5  # and waited for a connection: both are part of the latency
    rows["done"] = 0.6
    assert summarize(rows, duration_s=1.0)["latency_accepted_ms"]["p50"] == pytest.approx(600.0)


def test_timeline_bins() -> None:
    rows = _samples(100)  # one second of 100 req/s
    rows["status"][::10] = 503
    series = timeline(rows, bin_s=0.5)
    assert series["t"] == [0.25, 0.75]
    assert series["offered_rps"] == [100.0, 100.0]
    assert sum(series["goodput_rps"]) + sum(series["refused_rps"]) == 200.0
    assert series["p50"] == [2.0, 2.0]


def test_breakdown_splits_lateness_connection_and_the_rest() -> None:
    rows = _samples(100)
    rows["started"] += 0.001  # 1 ms late
    rows["sent"] = rows["started"] + 0.004  # 4 ms opening a connection
    rows["done"] = rows["sent"] + 0.010  # 10 ms for the rest
    rows["done"][0] = np.nan  # no answer: left out
    got = breakdown(rows)
    assert got["late_ms"]["count"] == 99
    assert got["late_ms"]["p99"] == pytest.approx(1.0)
    assert got["connection_ms"]["p50"] == pytest.approx(4.0)
    assert got["rest_ms"]["p99"] == pytest.approx(10.0)
    assert got["total_ms"]["max"] == pytest.approx(15.0)


_LAG = "xintu_event_loop_lag_seconds"
_BOUNDS = ("0.001", "0.01", "0.1", "1.0", "+Inf")


def _scrape(cumulative: tuple[int, ...], total_s: float) -> dict[str, float]:
    """A scrape of the lag histogram: cumulative counts per bound and the sum."""
    text = "\n".join(
        [f"# HELP {_LAG} lag", f"# TYPE {_LAG} histogram"]
        + [f'{_LAG}_bucket{{le="{le}"}} {n}.0' for le, n in zip(_BOUNDS, cumulative, strict=True)]
        + [f"{_LAG}_count {cumulative[-1]}.0", f"{_LAG}_sum {total_s}", "xintu_other 3.0"]
    )
    return parse_metrics(text, (_LAG,))


def test_parse_metrics_keeps_the_samples_asked_for() -> None:
    got = _scrape((1, 2, 3, 4, 4), 0.5)
    assert got[f'{_LAG}_bucket{{le="0.01"}}'] == 2.0
    assert got[f"{_LAG}_sum"] == 0.5
    assert "xintu_other" not in got
    assert not any(k.startswith("#") for k in got)


def test_histogram_window_is_the_difference_of_two_scrapes() -> None:
    """100 wakes between the scrapes: 90 within 1 ms, 8 in (1, 10] ms, 2 in
    (100 ms, 1 s]; P50 and P99 interpolated within their buckets as PromQL does."""
    before = _scrape((10, 10, 10, 10, 10), 0.005)
    after = _scrape((100, 108, 108, 110, 110), 0.005 + 0.9)
    got = histogram_window(before, after, _LAG)
    assert got["count"] == 100
    assert got["mean"] == pytest.approx(9.0)
    assert got["p50"] == pytest.approx(50 / 90 * 1.0, abs=1e-3)
    assert got["p99"] == pytest.approx(100.0 + (99 - 98) / 2 * 900.0)
    assert (got["max_over"], got["max_upto"]) == (100.0, 1000.0)
    assert got["over"] == {"1": 10, "10": 2, "100": 2, "1000": 0}


def test_histogram_window_open_bucket_and_missing_histogram() -> None:
    before = _scrape((0, 0, 0, 0, 0), 0.0)
    after = _scrape((0, 0, 0, 0, 1), 7.0)
    got = histogram_window(before, after, _LAG)
    assert (got["max_over"], got["max_upto"]) == (1000.0, None)
    assert got["p99"] == 1000.0  # a quantile in the open bucket: its lower bound
    assert histogram_window({}, after, _LAG)["count"] == 0  # not scraped: nothing
    assert histogram_window(before, before, _LAG)["p99"] is None  # no wake between
    assert loop_lag_row("lag", histogram_window(before, before, _LAG)).value is None
    row = loop_lag_row("lag", got, "at rest", 2.0)
    assert row.value == 1000.0
    assert "largest over 1,000 ms" in row.note
    assert "1 over 1 s" in row.note


def test_logged_latencies_are_the_request_events_asked_for(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    lines = [
        {
            "event": "request",
            "route": "/api/v1/classify",
            "status": 503,
            "latency_ms": 0.3,
            "image_hash": None,
        },
        {"event": "request", "route": "/api/v1/classify", "status": 200, "latency_ms": 900},
        {"event": "request", "route": "/healthz", "status": 503, "latency_ms": 1.0},
        {"event": "runtime_ready", "route": "/api/v1/classify", "status": 503},
        {
            "event": "request",
            "route": "/api/v1/classify",
            "status": 503,
            "latency_ms": 20,
            "image_hash": "ab12",
        },
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json {\n")
    assert logged_latencies_ms(log, route="/api/v1/classify", status=503) == [0.3, 20.0]
    # Refused after the body was hashed (the line has an image_hash), and from the headers.
    assert logged_latencies_ms(log, route="/api/v1/classify", status=503, hashed=True) == [20.0]
    assert logged_latencies_ms(log, route="/api/v1/classify", status=503, hashed=False) == [0.3]
    assert logged_latencies_ms(tmp_path / "none.log", route="/", status=200) == []


def test_schedules() -> None:
    uniform = uniform_schedule([(1.0, 10.0), (0.5, 100.0)])
    assert len(uniform) == 60
    assert np.all(np.diff(uniform) > 0)
    assert uniform[10] == 1.0
    poisson = poisson_schedule([(2.0, 50.0), (1.0, 500.0)], seed=1)
    assert np.all(np.diff(poisson) >= 0)
    assert poisson[0] >= 0.0
    assert poisson[-1] < 3.0
    second = np.count_nonzero(poisson >= 2.0)
    assert 400 < second < 600
    assert np.array_equal(poisson, poisson_schedule([(2.0, 50.0), (1.0, 500.0)], seed=1))


def test_row_ratio() -> None:
    assert Row("x", 50.0, "req/s", "base", 200.0).ratio == 0.25
    assert Row("x", None, "req/s", "base", 200.0).ratio is None
    assert Row("x", 5.0, "ms").as_dict()["ratio"] is None


def test_distinct_photos_differ_in_hash_not_in_pixels() -> None:
    base = jpeg(np.full((60, 80, 3), 128, dtype=np.uint8), (80, 60), seed=1)
    copies = distinct([base], 3, salt="t")
    assert len({sha256(c) for c in copies}) == 3
    pixels = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB")) for c in copies]
    assert all(np.array_equal(pixels[0], p) for p in pixels[1:])


async def _respond(raw: bytes, request: bytes) -> tuple[list[int], bytes]:
    client, server = trio.testing.memory_stream_pair()
    conn = Connection(client)  # type: ignore[arg-type]
    statuses: list[int] = []
    received = bytearray()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                while len(received) < len(request):
                    received.extend(await server.receive_some(65536))
                await server.send_all(raw)  # both answers at once: the second stays buffered
                while len(received) < 2 * len(request):
                    received.extend(await server.receive_some(65536))

            nursery.start_soon(serve)
            for _ in range(2):
                statuses.append((await conn.request(request, keep_body=True)).status)
    return statuses, bytes(received)


async def test_connection_reads_content_length_and_chunked_bodies() -> None:
    request = build_request("GET", "/x", host="h")
    raw = (
        b"HTTP/1.1 503 \r\nRetry-After: 1\r\ncontent-length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"so\r\n10\r\nurce":"local"}  \r\n0\r\n\r\n'
    )
    statuses, received = await _respond(raw, request)
    assert statuses == [503, 200]
    assert received == request * 2


async def test_connection_parses_source_and_retry_after() -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = Connection(client)  # type: ignore[arg-type]
    body = b'{"success":true,"data":{"category":"pets","source":"cache"}}'
    await server.send_all(
        b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with trio.fail_after(5):
        resp = await conn.request(json_request("/p", {"a": 1}, host="h"))
    assert (resp.status, resp.source, resp.retry_after, resp.keep_alive) == (200, 1, False, True)


def test_the_process_tree_includes_children_started_from_threads() -> None:
    """The service's local model processes are started from a Trio worker thread:
    the harness's CPU and memory readings must include them."""
    import os
    import subprocess
    import threading

    from bench._services import process_tree

    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(subprocess.Popen(["sleep", "5"])))
    thread.start()
    thread.join()
    try:
        assert started[0].pid in process_tree(os.getpid())
    finally:
        started[0].kill()
        started[0].wait()

"""Slow and greedy clients against the real server (Hypercorn on 127.0.0.1).

Each test holds raw sockets so that it controls exactly what the server sees:
headers that never end, a body that trickles, a connection that goes silent,
more connections than the cap. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from xintu import Config, _connections, load_config
from xintu.errors import ConfigError

from .fakes import FakeModel
from .serving import open_raw, real_server
from .test_ops import metric

V1 = "/api/v1/classify"


# The head of an upload that declares a 1,000-byte body; the tests send it slowly.
_UPLOAD_HEAD = (
    b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 1000\r\n\r\n"
)


def slow_config(tmp_path: Path, **server: Any) -> Config:
    return load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"writer_flush_ms": 1},
        ratelimit={"rate_per_s": 0.0, "burst": 1, "max_clients": 1},
        server=server,
    )


async def _held_connection(base: str) -> trio.SocketStream:
    """A keep-alive connection that has been served once, so it holds a slot."""
    stream = await open_raw(base)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while not reply.endswith(b'{"status":"ok"}'):
        reply += await stream.receive_some(65536)
    assert reply.startswith(b"HTTP/1.1 200 ")
    return stream


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    reply = b""
    try:
        while data := await stream.receive_some(65536):
            reply += data
    except trio.BrokenResourceError:  # a reset also ends it
        pass
    return reply


def _split(reply: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    return metric((await client.get("/metrics")).text, name)


async def test_connections_over_the_cap_get_a_503_and_are_closed(tmp_path: Path) -> None:
    config = slow_config(tmp_path, max_connections=3, keep_alive_s=30.0)
    with trio.fail_after(30):
        async with real_server(config, FakeModel()) as base:
            held = [await _held_connection(base) for _ in range(3)]

            extra = await open_raw(base)
            async with extra:
                await extra.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = await _read_until_closed(extra)
            status, headers, body = _split(reply)
            assert status == b"HTTP/1.1 503 Service Unavailable"
            assert headers["connection"] == "close"
            assert headers["retry-after"] == "1"
            answer = json.loads(body)
            assert answer["success"] is False
            assert answer["error_code"] == "overloaded"

            # A slot freed is a slot for the next client (once the server has
            # seen the close: retried until then).
            await held.pop().aclose()
            async with httpx.AsyncClient(base_url=base) as client:
                for _ in range(200):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                    await trio.sleep(0.05)
                else:
                    raise AssertionError("the freed slot never became free")
                assert await _metric(client, "xintu_connections_refused_total") >= 1.0
                assert await _metric(client, "xintu_connections_open") == 3.0  # 2 + this
            for stream in held:
                await stream.aclose()


async def test_past_the_refusals_in_progress_a_connection_is_closed_unanswered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answering a refusal holds a descriptor for a moment; a flood beyond the
    refusals in progress is closed at once (here the bound is set to zero)."""
    monkeypatch.setattr(_connections, "_MAX_REFUSING", 0)
    config = slow_config(tmp_path, max_connections=1, keep_alive_s=30.0)
    with trio.fail_after(30):
        async with real_server(config, FakeModel()) as base:
            held = await _held_connection(base)
            extra = await open_raw(base)
            async with extra:
                await extra.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await _read_until_closed(extra) == b""
            await held.aclose()


async def test_headers_that_never_end_are_cut_off_and_others_are_served(
    tmp_path: Path,
) -> None:
    """Slowloris: ten connections trickle header lines. Each is closed once
    ``keep_alive_s`` has passed without complete headers, while a normal client
    keeps being answered."""
    config = slow_config(tmp_path, max_connections=50, keep_alive_s=1.0)
    sent_lines: list[int] = []
    answers: list[int] = []
    done = trio.Event()

    async def loris(base: str) -> None:
        stream = await open_raw(base)
        lines = 0
        async with stream:
            try:
                await stream.send_all(b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\n")
                for i in range(100):  # up to 10 s: far past the 1 s allowed
                    await stream.send_all(b"X-Slow-%d: y\r\n" % i)
                    lines += 1
                    await trio.sleep(0.1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            else:
                raise AssertionError("the server kept a header-less connection for 10 s")
        sent_lines.append(lines)

    async def good_client(base: str) -> None:
        async with httpx.AsyncClient(base_url=base) as client:
            while not done.is_set():
                answers.append((await client.get("/healthz")).status_code)
                await trio.sleep(0.05)

    with trio.fail_after(30):
        async with real_server(config, FakeModel()) as base:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(good_client, base)
                async with trio.open_nursery() as lorises:
                    for _ in range(10):
                        lorises.start_soon(loris, base)
                done.set()
    assert len(sent_lines) == 10
    assert max(sent_lines) < 100
    assert len(answers) >= 5
    assert set(answers) == {200}


async def test_a_trickled_body_gets_408_after_the_body_timeout(tmp_path: Path) -> None:
    config = slow_config(tmp_path, body_timeout_s=1.0)
    sent = 0

    async def trickle(stream: trio.SocketStream) -> None:
        nonlocal sent
        try:
            for _ in range(100):  # one byte every 0.1 s: up to 10 s
                await stream.send_all(b"x")
                sent += 1
                await trio.sleep(0.1)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(30):
        async with real_server(config, FakeModel()) as base:
            stream = await open_raw(base)
            async with stream:
                await stream.send_all(_UPLOAD_HEAD)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle, stream)
                    reply = await _read_until_closed(stream)
                    nursery.cancel_scope.cancel()
    status, headers, body = _split(reply)
    assert status.startswith(b"HTTP/1.1 408")
    assert headers["connection"] == "close"
    assert json.loads(body)["error_code"] == "request_timeout"
    assert sent < 100


async def test_a_silent_client_mid_body_is_dropped_after_the_read_timeout(
    tmp_path: Path,
) -> None:
    config = slow_config(tmp_path).replace(
        server={"request_deadline_s": 0.5, "read_timeout_s": 1.0, "body_timeout_s": 60.0}
    )
    with trio.fail_after(30):
        async with real_server(config, FakeModel()) as base:
            stream = await open_raw(base)
            async with stream:
                await stream.send_all(_UPLOAD_HEAD + b"--b\r\n")
                started = trio.current_time()
                await _read_until_closed(stream)  # then nothing more is sent
                waited = trio.current_time() - started
            assert waited < 20  # far below body_timeout_s: the read timeout hung up
            async with httpx.AsyncClient(base_url=base) as client:
                assert (await client.get("/readyz")).status_code == 200


def test_a_read_timeout_within_the_deadline_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"server\.read_timeout_s.*request_deadline_s"):
        load_config(env={}, server={"request_deadline_s": 30.0, "read_timeout_s": 30.0})
    # The deadline and the idempotency record's two store calls: 10 + 2 x 5 s.
    with pytest.raises(ConfigError, match=r"\(20\), got 20$"):
        load_config(env={"XINTU_SERVER_READ_TIMEOUT_S": "20"})
    assert load_config(env={"XINTU_SERVER_READ_TIMEOUT_S": "20.5"}).server.read_timeout_s == 20.5
    with pytest.raises(ConfigError, match=r"server\.max_connections"):
        load_config(env={"XINTU_SERVER_MAX_CONNECTIONS": "lots"})


async def test_the_deadline_starts_when_the_body_has_arrived(tmp_path: Path) -> None:
    """An upload slower than the deadline (a phone on a weak network) is classified:
    the deadline bounds the classification, ``body_timeout_s`` the upload."""
    config = slow_config(tmp_path, request_deadline_s=0.5, body_timeout_s=60.0)
    part = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="slow.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + b"slow photo bytes " * 40 + b"\r\n--b--\r\n"
    )
    head = (
        b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: " + str(len(part)).encode() + b"\r\n\r\n"
    )
    with trio.fail_after(30):
        async with real_server(config, FakeModel()) as base:
            stream = await open_raw(base)
            async with stream:
                await stream.send_all(head)
                started = trio.current_time()
                for i in range(0, len(part), len(part) // 5 + 1):  # over about 1.2 s
                    await stream.send_all(part[i : i + len(part) // 5 + 1])
                    await trio.sleep(0.3)
                reply = await _read_until_closed(stream)
            assert trio.current_time() - started > 1.0  # slower than the deadline
    status, _headers, body = _split(reply)
    assert status == b"HTTP/1.1 200 ", body
    assert json.loads(body)["success"] is True


async def test_the_listen_backlog_is_the_setting(tmp_path: Path) -> None:
    """The kernel's accept queue, as the kernel reports it (``ss``: Send-Q of a
    listening socket): Hypercorn's default of 100 overflowed under bursts."""
    config = slow_config(tmp_path, listen_backlog=777)
    with trio.fail_after(30):
        async with real_server(config, FakeModel()) as base:
            port = base.rsplit(":", 1)[1]
            result = await trio.run_process(
                ["ss", "-ltnH", f"sport = :{port}"], capture_stdout=True
            )
    fields = result.stdout.decode().split()
    assert fields[0] == "LISTEN"
    assert int(fields[2]) == 777

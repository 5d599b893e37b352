"""Who gets in: API keys, admin keys, trusted proxies, rate limits, and no leaked secrets.

The token bucket runs on an injected clock (no sleeping); the HTTP tests use the
real app with the fake model on a SQLite store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as Client

from xintu import Config, load_config
from xintu.errors import ConfigError
from xintu.http import XintuApp, create_app
from xintu.http._auth import KeyRing, bearer_token
from xintu.http._guard import Guard
from xintu.http._identity import TrustedProxies
from xintu.http._ratelimit import RateLimiter

from .fakes import FakeModel
from .test_ops import metric

API_KEY = "xk-live-7f3a0c2e9b14d85e"  # what a client sends
ADMIN_KEY = "xk-admin-4d1e8b77c0a2f953"
OTHER_KEY = "xk-live-not-configured"
V1 = "/api/v1/classify"
HASH = "0" * 64


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_config(tmp_path: Path, **sections: Any) -> Config:
    return load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"writer_flush_ms": 1},
        **sections,
    )


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[XintuApp, Client]]:
    app = create_app(config, model_factory=lambda _c: FakeModel())
    with trio.fail_after(30):
        async with app.test_app():
            yield app, app.test_client()


def guard_of(app: XintuApp) -> Guard:
    guard = app.extensions["xintu.guard"]
    assert isinstance(guard, Guard)
    return guard


async def check_cache(client: Client, **kw: Any) -> Any:
    return await client.post(f"{V1}/check-cache", json={"image_hash": HASH}, **kw)


# --- units -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proxies", "peer", "xff", "expected"),
    [
        ([], "198.51.100.7", ["203.0.113.1"], "198.51.100.7"),  # no proxies: header ignored
        (["10.0.0.0/8"], "198.51.100.7", ["203.0.113.1"], "198.51.100.7"),  # untrusted peer
        (["10.0.0.0/8"], "10.0.0.2", ["203.0.113.1"], "203.0.113.1"),
        # The client forged the leftmost entries; the rightmost untrusted one is real.
        (["10.0.0.0/8"], "10.0.0.2", ["1.2.3.4, 203.0.113.1, 10.9.9.9"], "203.0.113.1"),
        (["10.0.0.0/8"], "10.0.0.2", ["1.2.3.4", "203.0.113.1, 10.9.9.9"], "203.0.113.1"),
        (["10.0.0.0/8"], "10.0.0.2", ["10.1.1.1, 10.2.2.2"], "10.1.1.1"),  # all trusted
        (["10.0.0.0/8"], "10.0.0.2", [], "10.0.0.2"),  # a proxy's own request
        (["10.0.0.0/8"], "10.0.0.2", ["garbage, 10.3.3.3"], "10.3.3.3"),  # stops at junk
        (["10.0.0.0/8"], "10.0.0.2", ["203.0.113.1:4711"], "203.0.113.1"),
        (["10.0.0.0/8"], "10.0.0.2", ["[2001:db8::1]:443"], "2001:db8::1"),
        (["10.0.0.2"], "::ffff:10.0.0.2", ["203.0.113.1"], "203.0.113.1"),  # mapped v4 peer
        (["2001:db8::/32"], "2001:db8::5", ["2001:db8::6, 198.51.100.1"], "198.51.100.1"),
        (["10.0.0.0/8"], "<local>", ["203.0.113.1"], "<local>"),  # not an IP peer
    ],
)
def test_client_ip(proxies: list[str], peer: str, xff: list[str], expected: str) -> None:
    assert TrustedProxies(proxies).client_ip(peer, xff) == expected


def test_bad_proxy_entry_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        TrustedProxies(["10.0.0.0/8", "proxy.internal"])
    assert str(info.value) == (
        "security.trusted_proxies: not an IP address or network: 'proxy.internal'"
    )


def test_key_ring_matches_digests_only() -> None:
    ring = KeyRing([sha256_hex(API_KEY).upper(), sha256_hex(ADMIN_KEY)], setting="s")
    assert ring.match(API_KEY.encode()) == bytes.fromhex(sha256_hex(API_KEY))
    assert ring.match(ADMIN_KEY.encode()) is not None
    assert ring.match(OTHER_KEY.encode()) is None
    assert ring.match(sha256_hex(API_KEY).encode()) is None  # the digest is not the key
    assert not KeyRing([], setting="s")


@pytest.mark.parametrize("bad", ["abc", "g" * 64, sha256_hex("x")[:-1]])
def test_key_ring_refuses_what_is_not_a_digest(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^security\.api_key_sha256: each entry must be"):
        KeyRing([bad], setting="security.api_key_sha256")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", b"abc"),
        ("bearer   abc  ", b"abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("Bearer \u00e9t\u00e9", "\u00e9t\u00e9".encode("latin-1")),
        ("Bearer \u20ac", None),
    ],
)
def test_bearer_token(header: str | None, token: bytes | None) -> None:
    assert bearer_token(header) == token


def test_token_bucket_burst_refill_and_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, max_clients=10, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert limiter.acquire("b") == 0.0  # each client has its own bucket
    clock.now += 0.25
    assert limiter.acquire("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.acquire("a") == 0.0
    clock.now += 100  # refills up to the burst, not beyond
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0
    assert (limiter.admitted, limiter.limited) == (8, 3)


def test_bucket_table_is_bounded_least_recent_first() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1.0, burst=1, max_clients=3, clock=clock)
    for name in "abc":
        assert limiter.acquire(name) == 0.0
    assert limiter.acquire("a") > 0  # a is now the most recent
    assert limiter.acquire("d") == 0.0  # evicts b, the least recently seen
    assert len(limiter) == 3
    assert limiter.evicted == 1
    assert limiter.acquire("a") > 0  # still tracked
    assert limiter.acquire("b") == 0.0  # forgotten: a full bucket again


def test_rate_zero_disables_limiting() -> None:
    limiter = RateLimiter(rate_per_s=0.0, burst=1, max_clients=1)
    assert all(limiter.acquire(str(i)) == 0.0 for i in range(1000))
    assert len(limiter) == 0


# --- API keys over HTTP --------------------------------------------------------------


def keyed(tmp_path: Path, *, api: bool = True, admin: bool = True, **more: Any) -> Config:
    security = {
        "api_key_sha256": [sha256_hex(API_KEY)] if api else [],
        "admin_key_sha256": [sha256_hex(ADMIN_KEY)] if admin else [],
    }
    return make_config(tmp_path, security=security, **more)


async def test_no_keys_configured_everything_open(tmp_path: Path) -> None:
    async with serving(make_config(tmp_path)) as (_app, client):
        for path in ("/readyz", "/openapi.json", "/metrics", "/api/v1/stats"):
            resp = await client.get(path)
            assert resp.status_code == 200, path
        assert (await check_cache(client)).status_code == 200


async def test_api_key_required_everywhere_but_healthz(tmp_path: Path) -> None:
    async with serving(keyed(tmp_path)) as (app, client):
        assert (await client.get("/healthz")).status_code == 200
        for method, path in [("GET", "/readyz"), ("GET", "/openapi.json"), ("POST", V1)]:
            resp = await client.open(path, method=method)
            body = await resp.get_json()
            assert resp.status_code == 401, path
            message = "a valid API key is required (Authorization: Bearer KEY)"
            assert body == {
                "success": False,
                "error": message,
                "error_code": "unauthorized",
                "request_id": resp.headers["X-Request-ID"],
                "detail": message,
            }
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="xintu"'
        resp = await check_cache(client, headers=bearer(OTHER_KEY))
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="xintu", error="invalid_token"'
        resp = await check_cache(client, headers={"Authorization": f"Basic {API_KEY}"})
        assert resp.status_code == 401
        resp = await check_cache(client, headers={"Authorization": f"bearer {API_KEY}"})
        assert resp.status_code == 200
        resp = await check_cache(client, headers=bearer(ADMIN_KEY))  # admin keys work too
        assert resp.status_code == 200
        assert (await client.get("/readyz", headers=bearer(API_KEY))).status_code == 200
        assert guard_of(app).statistics().unauthorized == 5


async def test_admin_endpoints_need_the_admin_key(tmp_path: Path) -> None:
    async with serving(keyed(tmp_path)) as (app, client):
        for path in ("/metrics", "/api/v1/stats", "/admin", "/admin/anything"):
            resp = await client.get(path)
            assert resp.status_code == 401, path
            resp = await client.get(path, headers=bearer(API_KEY))
            body = await resp.get_json()
            assert resp.status_code == 403, path
            assert body["error_code"] == "forbidden"
            assert body["error"] == "this endpoint needs an admin API key"
            assert "WWW-Authenticate" not in resp.headers
        assert (await client.get("/metrics", headers=bearer(ADMIN_KEY))).status_code == 200
        assert (await client.get("/api/v1/stats", headers=bearer(ADMIN_KEY))).status_code == 200
        # Past the guard, an unknown admin path is an ordinary 404.
        assert (await client.get("/admin/x", headers=bearer(ADMIN_KEY))).status_code == 404
        assert guard_of(app).statistics().forbidden == 4


async def test_admin_keys_alone_protect_only_admin_endpoints(tmp_path: Path) -> None:
    async with serving(keyed(tmp_path, api=False)) as (_app, client):
        assert (await check_cache(client)).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        resp = await client.get("/metrics")
        assert resp.status_code == 401
        assert (await resp.get_json())["error"] == (
            "an admin API key is required (Authorization: Bearer KEY)"
        )
        assert (await client.get("/metrics", headers=bearer(API_KEY))).status_code == 401
        assert (await client.get("/metrics", headers=bearer(ADMIN_KEY))).status_code == 200


async def test_api_keys_alone_let_any_key_reach_admin_endpoints(tmp_path: Path) -> None:
    async with serving(keyed(tmp_path, admin=False)) as (_app, client):
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=bearer(API_KEY))).status_code == 200


def test_malformed_digest_stops_the_app_from_being_built(tmp_path: Path) -> None:
    config = make_config(tmp_path, security={"api_key_sha256": [API_KEY]})
    with pytest.raises(ConfigError, match=r"^security\.api_key_sha256: "):
        create_app(config, model_factory=lambda _c: FakeModel())


# --- rate limiting over HTTP ---------------------------------------------------------


def limited(tmp_path: Path, **security: Any) -> Config:
    return make_config(
        tmp_path,
        ratelimit={"rate_per_s": 1.0, "burst": 2, "max_clients": 100},
        security=security,
    )


async def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    clock = FakeClock()
    async with serving(limited(tmp_path)) as (app, client):
        guard_of(app).limiter.clock = clock
        statuses = [(await check_cache(client)).status_code for _ in range(2)]
        assert statuses == [200, 200]
        resp = await check_cache(client)
        body = await resp.get_json()
        assert resp.status_code == 429
        assert resp.headers["Retry-After"] == "1"
        assert body["error_code"] == "rate_limited"
        assert body["request_id"] == resp.headers["X-Request-ID"]
        # Probes are never limited.
        for _ in range(5):
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
        clock.now += 0.4
        resp = await client.get("/openapi.json")
        assert resp.status_code == 429
        assert resp.headers["Retry-After"] == "1"  # 0.6 s, rounded up to whole seconds
        clock.now += 0.6
        assert (await client.get("/openapi.json")).status_code == 200
        assert guard_of(app).statistics().rate_limited == 2


async def test_buckets_per_user_per_ip_and_per_key(tmp_path: Path) -> None:
    clock = FakeClock()
    async with serving(limited(tmp_path)) as (app, client):
        guard_of(app).limiter.clock = clock
        for user in ("alice", "bob"):
            codes = [
                (await check_cache(client, headers={"X-User-ID": user})).status_code
                for _ in range(3)
            ]
            assert codes == [200, 200, 429], user
        # Without X-User-ID the client is its address: a bucket of its own.
        peer = {"client": ("198.51.100.20", 40000)}
        codes = [(await check_cache(client, scope_base=peer)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        other = {"client": ("198.51.100.21", 40000)}
        assert (await check_cache(client, scope_base=other)).status_code == 200


async def test_with_api_keys_a_new_user_id_is_no_new_bucket(tmp_path: Path) -> None:
    clock = FakeClock()
    config = limited(tmp_path, api_key_sha256=[sha256_hex(API_KEY)])
    async with serving(config) as (app, client):
        guard_of(app).limiter.clock = clock
        codes = [
            (
                await check_cache(client, headers=bearer(API_KEY) | {"X-User-ID": f"u{i}"})
            ).status_code
            for i in range(3)
        ]
        assert codes == [200, 200, 429]
        # Unauthenticated requests are limited by address, before the 401.
        peer = {"client": ("203.0.113.50", 1)}
        codes = [
            (await check_cache(client, headers={"X-User-ID": f"u{i}"}, scope_base=peer)).status_code
            for i in range(3)
        ]
        assert codes == [401, 401, 429]


async def test_forwarded_for_counts_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    clock = FakeClock()
    config = limited(tmp_path, trusted_proxies=["10.0.0.0/8"])
    async with serving(config) as (app, client):
        guard_of(app).limiter.clock = clock
        proxy = {"client": ("10.0.0.2", 1)}
        # Behind the proxy: two clients, two buckets.
        for ip in ("203.0.113.1", "203.0.113.2"):
            headers = {"X-Forwarded-For": f"6.6.6.6, {ip}"}
            codes = [
                (await check_cache(client, headers=headers, scope_base=proxy)).status_code
                for _ in range(3)
            ]
            assert codes == [200, 200, 429], ip
        # A direct client cannot pick its address with the header.
        direct = {"client": ("198.51.100.9", 1)}
        codes = [
            (
                await check_cache(
                    client, headers={"X-Forwarded-For": f"192.0.2.{i}"}, scope_base=direct
                )
            ).status_code
            for i in range(3)
        ]
        assert codes == [200, 200, 429]


async def test_rate_limit_zero_disables_it(tmp_path: Path) -> None:
    config = make_config(tmp_path, ratelimit={"rate_per_s": 0.0, "burst": 1, "max_clients": 1})
    async with serving(config) as (_app, client):
        codes = {(await client.get("/openapi.json")).status_code for _ in range(20)}
        assert codes == {200}


# --- metrics -------------------------------------------------------------------------


async def test_refusals_and_idempotency_outcomes_are_in_metrics(tmp_path: Path) -> None:
    config = keyed(tmp_path, ratelimit={"rate_per_s": 0.001, "burst": 3, "max_clients": 100})
    async with serving(config) as (_app, client):

        async def check(headers: dict[str, str]) -> int:
            body = {"image_hash": HASH}
            return (await client.post(f"{V1}/check-cache", json=body, headers=headers)).status_code

        user = bearer(API_KEY)
        assert await check({}) == 401
        assert (await client.get("/metrics", headers=user)).status_code == 403
        once = {**user, "Idempotency-Key": "k-1"}
        assert await check(once) == 200
        assert await check(once) == 200  # replayed
        assert await check(user) == 429  # the burst of 3 is spent
        text = (await (await client.get("/metrics", headers=bearer(ADMIN_KEY))).get_data()).decode()
    assert metric(text, "xintu_guard_refusals_total", reason="unauthorized") == 1
    assert metric(text, "xintu_guard_refusals_total", reason="forbidden") == 1
    assert metric(text, "xintu_guard_refusals_total", reason="rate_limited") == 1
    assert metric(text, "xintu_ratelimit_clients") >= 2
    assert metric(text, "xintu_idempotency_keys_total", outcome="claimed") == 1
    assert metric(text, "xintu_idempotency_keys_total", outcome="completed") == 1
    assert metric(text, "xintu_idempotency_keys_total", outcome="replayed") == 1


# --- secrets -------------------------------------------------------------------------


async def test_keys_never_appear_in_logs_errors_or_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    config = keyed(tmp_path)
    seen: list[str] = []
    async with serving(config) as (_app, client):
        for headers in (bearer(API_KEY), bearer(ADMIN_KEY), bearer(OTHER_KEY), {}):
            for method, path, kw in [
                ("POST", f"{V1}/check-cache", {"json": {"image_hash": HASH}}),
                ("POST", f"{V1}/check-cache", {"json": {"image_hash": "nope"}}),
                ("POST", V1, {"data": b"junk"}),
                ("GET", "/metrics", {}),
                ("GET", "/api/v1/stats", {}),
                ("GET", "/readyz", {}),
            ]:
                resp = await client.open(path, method=method, headers=headers, **kw)
                seen.append(json.dumps(dict(resp.headers)))
                seen.append((await resp.get_data()).decode("utf-8", "replace"))
    out = capsys.readouterr()
    seen += [out.out, out.err, caplog.text, json.dumps(config.redacted())]
    text = "\n".join(seen)
    for secret in (API_KEY, ADMIN_KEY, OTHER_KEY, sha256_hex(API_KEY), sha256_hex(ADMIN_KEY)):
        assert secret not in text
    assert "xintu_" in text  # the metrics were in what was searched


async def test_album_page_shell_needs_no_key(tmp_path: Path) -> None:
    """The page and its assets hold no data; its API calls carry the key."""
    key = "k-page"
    config = load_config(
        env={},
        data={"dir": str(tmp_path)},
        security={"api_key_sha256": [hashlib.sha256(key.encode()).hexdigest()]},
    )
    app = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        client = app.test_client()
        page = await client.get("/")
        assert page.status_code == 200
        stats = await client.get("/api/v1/stats")
        assert stats.status_code == 401

"""Secrets never leak: a full run on a real server with every kind of secret set at once.

The service runs on Hypercorn over loopback (:func:`tests.serving.real_server`) with
API keys and an admin key, a MariaDB store whose URL carries a password (a user and a
database made for this test), and two LLM providers with API keys in front of the fake
upstream, one with a key the upstream refuses. Traffic goes to every route with and
without keys, valid and invalid, and the LLM fails in several ways (401, 500 with
retries, a garbage answer, breakers opening) before it answers. Everything the
process emits is captured: the structlog/stdlib output at DEBUG (JSON and console
renderers), stdout/stderr at the file-descriptor level, pytest's log capture, every
response's status, headers and body (``/metrics``, ``/readyz``, ``/api/v1/stats``,
``/openapi.json`` included). Then no secret may appear anywhere: not the raw keys,
not their SHA-256 digests, not the DSN password (raw or percent-encoded), not the
LLM keys; nor a 16-character piece of any of them (a truncated leak).

The store reaches MariaDB through a loopback TCP proxy that the test cuts near the
end, so readiness, store reads and the writer report a store failure (with the URL)
while the password is in play. The full run is done once per log renderer.

Then a store URL with a password that points at a closed port: the service started
in-process and as ``python -m xintu serve`` (JSON and console logs), and
``xintu config show``: the store error is reported, the password is not. Last,
``repr(config)`` holds no secret either (SECURITY.md: ``Config.redacted()`` is the
only rendering of the configuration), since tracebacks that show locals print it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
from PIL import Image

from xintu import Config, load_config
from xintu._log import configure_logging, reset_logging
from xintu.cli import main as cli_main
from xintu.store._mysql import MySQLSettings
from xintu.testing.fakellm import FakeLlm, run_fake_llm

from .backends import TcpProxy, mysql_admin, mysql_execute, mysql_url_of
from .serving import DecodingModel, real_server

V1 = "/api/v1/classify"
RUN_TIMEOUT_S = 90.0
REPO = Path(__file__).resolve().parent.parent


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def png(seed: int) -> bytes:
    """A small real PNG, distinct per seed."""
    img = Image.new("RGB", (40, 30), (seed % 256, (seed * 7) % 256, (seed * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def dsn_password() -> str:
    """Long and random, with characters that percent-encoding changes."""
    return f"Pw{secrets.token_urlsafe(24)}@:/%#?{secrets.token_hex(8)}"


@dataclass
class Secrets:
    """Every secret of the run, and where each came from (for the failure message)."""

    named: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, value: str) -> str:
        self.named[name] = value
        return value

    def needles(self) -> dict[str, str]:
        """What must never be seen: each secret, lower-cased, and 16-character pieces."""
        out: dict[str, str] = {}
        for name, value in self.named.items():
            low = value.lower()
            out[name] = low
            if len(low) >= 32:
                out[f"{name}[:16]"] = low[:16]
                out[f"{name}[-16:]"] = low[-16:]
        return out

    def find_in(self, text: str) -> list[str]:
        """The secrets found in *text*, each with a little context.

        Also searched: *text* without colour codes, whitespace and box drawing, so
        that a secret a console renderer wrapped over several lines is found too.
        """
        found: dict[str, str] = {}
        for variant, hay in (("", text), ("unwrapped ", _unwrap(text))):
            low = hay.lower()
            for name, needle in self.needles().items():
                at = low.find(needle)
                if at >= 0 and name not in found:
                    context = hay[max(0, at - 120) : at + 80]
                    found[name] = f"{name} at {variant}{at}: ...{context!r}..."
        return list(found.values())


_DECORATION = re.compile(r"\x1b\[[0-9;]*m|[\s\u2500-\u257f\u2770-\u2775]+")


def _unwrap(text: str) -> str:
    return _DECORATION.sub("", text)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@dataclass
class Seen:
    """Everything the run emitted, by where it came from."""

    parts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, text: str) -> None:
        self.parts.append((where, text))

    def response(self, label: str, resp: httpx.Response) -> None:
        head = f"{resp.status_code} {resp.reason_phrase}\n" + "\n".join(
            f"{k}: {v}" for k, v in resp.headers.multi_items()
        )
        self.add(f"{label} headers", head)
        self.add(f"{label} body", resp.content.decode("utf-8", "replace"))

    def text(self) -> str:
        return "\n".join(text for _, text in self.parts)

    def assert_clean(self, secret: Secrets) -> None:
        leaks = [f"{where}: {hit}" for where, text in self.parts for hit in secret.find_in(text)]
        assert not leaks, "secrets leaked:\n" + "\n".join(leaks)


# --- fixtures ------------------------------------------------------------------------


@dataclass(frozen=True)
class MySQLAccount:
    user: str
    password: str
    database: str
    server: MySQLSettings  # root's, for inspection

    def url(self, port: int) -> str:
        settings = MySQLSettings(self.server.host, port, self.user, self.password, self.database)
        return mysql_url_of(settings)


@pytest.fixture
async def mysql_account(_mysql_database: MySQLSettings) -> AsyncIterator[MySQLAccount]:
    """A MariaDB user with a long random password, and a fresh database it owns.

    ``_mysql_database`` (tests/backends.py) skips the test when the server cannot be
    reached, or fails it when ``CI=true``. Both are dropped afterwards.
    """
    server = _mysql_database.with_database("")
    suffix = secrets.token_hex(5)
    account = MySQLAccount(f"xs_{suffix}", dsn_password(), f"xintu_secret_{suffix}", server)
    try:
        with trio.fail_after(10):
            async with mysql_admin(server) as conn:
                await conn.execute(
                    f"CREATE DATABASE `{account.database}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
                await conn.execute(
                    f"CREATE USER '{account.user}'@'%%' IDENTIFIED BY %s", (account.password,)
                )
                await conn.execute(
                    f"GRANT ALL PRIVILEGES ON `{account.database}`.* TO '{account.user}'@'%'"
                )
        yield account
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(10):
            async with mysql_admin(server) as conn:
                await conn.execute(f"DROP USER IF EXISTS '{account.user}'@'%'")
                await conn.execute(f"DROP DATABASE IF EXISTS `{account.database}`")


@pytest.fixture
async def fake() -> AsyncIterator[FakeLlm]:
    async with run_fake_llm() as fake:
        yield fake


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    try:
        yield stream
    finally:
        reset_logging()


# --- the full run --------------------------------------------------------------------


def full_config(
    tmp_path: Path, secret: Secrets, store_url: str, fake: FakeLlm, log_format: str
) -> Config:
    env = {
        "XINTU_LLM_PROVIDERS": "primary,backup",
        # The upstream refuses this key: 401 on every call, never retried.
        "XINTU_LLM_PRIMARY_KIND": "openai",
        "XINTU_LLM_PRIMARY_BASE_URL": fake.openai_base_url,
        "XINTU_LLM_PRIMARY_API_KEY": secret.named["llm primary api key (refused)"],
        "XINTU_LLM_PRIMARY_MODEL": "fake-vl",
        # The upstream's own key: 500s, garbage, then answers.
        "XINTU_LLM_BACKUP_KIND": "anthropic",
        "XINTU_LLM_BACKUP_BASE_URL": fake.anthropic_base_url,
        "XINTU_LLM_BACKUP_API_KEY": secret.named["llm backup api key"],
        "XINTU_LLM_BACKUP_MODEL": "fake-claude",
    }
    return load_config(
        env=env,
        data={"dir": str(tmp_path / "data")},
        store={"url": store_url, "writer_flush_ms": 1, "query_timeout_s": 2.0},
        security={
            "api_key_sha256": [secret.named["api key sha256"]],
            "admin_key_sha256": [secret.named["admin key sha256"]],
        },
        # Much traffic from one address: keep the rate limiter out of the way.
        ratelimit={"rate_per_s": 0.0},
        # A store outage fails readiness here, so that its reason is rendered too.
        server={"ready_without_store": False},
        log={"level": "debug", "format": log_format},
        llm={
            "retry_max_attempts": 3,
            "retry_initial_s": 0.01,
            "retry_max_s": 0.02,
            "breaker_min_calls": 2,
            "breaker_failure_ratio": 0.5,
            "breaker_open_s": 0.3,
            "breaker_half_open_probes": 1,
            "fallback_reserve_s": 0.5,
            "timeout_s": 5.0,
        },
    )


async def drive_llm(client: httpx.AsyncClient, key: str, fake: FakeLlm, seen: Seen) -> list[str]:
    """Photos through the LLM chain while it fails in every way, then answers."""
    sources: list[str] = []

    async def classify(seed: int) -> None:
        resp = await client.post(V1, headers=bearer(key), files={"image": ("p.png", png(seed))})
        seen.response(f"llm photo {seed}", resp)
        assert resp.status_code == 200, resp.text
        sources.append(resp.json()["data"]["source"])

    b = fake.behaviour
    # primary: 401. backup: 500, 500 (retried), its breaker opens: local fallback.
    b.error_mode, b.error_status, b.fail_next = "status", 500, 2
    await classify(1)
    # primary's second 401 opens its breaker; backup is open: local fallback.
    await classify(2)
    await trio.sleep(0.35)  # both half-open
    # A garbage answer from backup's probe: open again.
    b.error_mode, b.fail_next = "malformed", 1
    await classify(3)
    await trio.sleep(0.35)
    # Healthy upstream: primary's probe is refused again, backup's probe answers.
    for seed in range(4, 10):
        await classify(seed)
        if sources[-1] == "llm":
            break
        await trio.sleep(0.35)
    return sources


async def drive_routes(
    client: httpx.AsyncClient, keys: dict[str, str], secret: Secrets, seen: Seen
) -> None:
    """Every route, with each key and without, valid requests and invalid ones."""
    auths: dict[str, dict[str, str]] = {
        "api key": bearer(keys["api"]),
        "admin key": bearer(keys["admin"]),
        "wrong key": bearer(keys["wrong"]),
        "hash as key": bearer(secret.named["api key sha256"]),
        "basic scheme": {"Authorization": f"Basic {keys['api']}"},
        "no key": {},
    }
    good = png(100)
    good_hash = hashlib.sha256(good).hexdigest()
    junk = b"this is not an image at all"
    for n, (who, headers) in enumerate(auths.items()):
        idem = {"Idempotency-Key": f"secrets-{n}"}
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", V1, {"files": {"image": ("good.png", good)}, "headers": idem}),
            ("POST", V1, {"files": {"image": ("good.png", good)}, "headers": idem}),  # replay
            ("POST", V1, {"files": {"image": ("junk.png", junk)}}),
            ("POST", V1, {"files": {"image": ("p.png", png(101))}, "data": {"image_hash": "0"}}),
            ("POST", V1, {"content": b"not multipart"}),
            (
                "POST",
                f"{V1}/batch",
                {"files": [("images", ("a.png", good)), ("images", ("b.bin", junk))]},
            ),
            (
                "POST",
                f"{V1}/batch",
                {
                    "files": [("images", ("c.png", png(102)))],
                    "headers": {"Accept": "application/x-ndjson"},
                },
            ),
            ("POST", f"{V1}/check-cache", {"json": {"image_hash": good_hash}}),
            ("POST", f"{V1}/check-cache", {"json": {"image_hash": "nope"}}),
            ("POST", f"{V1}/check-cache", {"content": b"{not json"}),
            (
                "POST",
                f"{V1}/batch-check-cache",
                {"json": {"image_hashes": [good_hash, "0" * 64], "user_id": "alice"}},
            ),
            ("POST", f"{V1}/batch-check-cache", {"json": {"image_hashes": []}}),
            ("GET", "/metrics", {}),
            ("GET", "/api/v1/stats", {}),
            ("GET", "/readyz", {}),
            ("GET", "/healthz", {}),
            ("GET", "/openapi.json", {}),
            ("GET", "/", {}),
            ("GET", "/admin/nothing", {}),
            ("GET", "/no/such/route", {}),
            ("DELETE", V1, {}),
        ]
        for method, path, kw in requests:
            kw = dict(kw)
            kw["headers"] = {"X-User-ID": "alice", **headers, **kw.get("headers", {})}
            resp = await client.request(method, path, **kw)
            seen.response(f"{who} {method} {path}", resp)


def logged_events(logs: str) -> set[str]:
    """The event names in JSON lines or console lines."""
    events = set()
    for line in strip_ansi(logs).splitlines():
        if line.startswith("{"):
            events.add(json.loads(line)["event"])
        elif m := re.match(r"\S+ \[\w+\s*\] (\S+)", line):
            events.add(m.group(1))
    return events


@pytest.mark.mysql
@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_no_secret_in_anything_a_full_run_emits(
    log_format: str,
    tmp_path: Path,
    mysql_account: MySQLAccount,
    fake: FakeLlm,
    captured_logs: io.StringIO,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = time.monotonic()
    secret = Secrets()
    keys = {
        "api": secret.add("api key", f"xk-live-{secrets.token_urlsafe(24)}"),
        "admin": secret.add("admin key", f"xk-admin-{secrets.token_urlsafe(24)}"),
        "wrong": secret.add("unconfigured key", f"xk-live-{secrets.token_urlsafe(24)}"),
    }
    secret.add("api key sha256", sha256_hex(keys["api"]))
    secret.add("admin key sha256", sha256_hex(keys["admin"]))
    secret.add("unconfigured key sha256", sha256_hex(keys["wrong"]))
    secret.add("dsn password", mysql_account.password)
    secret.add("dsn password (url-encoded)", quote(mysql_account.password, safe=""))
    llm_key = secret.add("llm backup api key", f"sk-fake-{secrets.token_urlsafe(32)}")
    secret.add("llm primary api key (refused)", f"sk-wrong-{secrets.token_urlsafe(32)}")
    fake.behaviour.api_key = llm_key

    seen = Seen()
    caplog.set_level("DEBUG")
    proxy = TcpProxy(mysql_account.server.host, mysql_account.server.port)
    with trio.fail_after(RUN_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            # The store reaches MariaDB through a proxy the test can cut (an outage).
            await nursery.start(proxy.run)
            store_url = mysql_account.url(proxy.port)
            assert quote(mysql_account.password, safe="") in store_url
            config = full_config(tmp_path, secret, store_url, fake, log_format)
            configure_logging(config.log, captured_logs)
            async with (
                real_server(config, DecodingModel(config.images)) as base,
                httpx.AsyncClient(base_url=base, timeout=30) as client,
            ):
                ready = await client.get("/readyz", headers=bearer(keys["api"]))
                seen.response("readyz at start", ready)
                assert ready.status_code == 200, ready.text

                sources = await drive_llm(client, keys["api"], fake, seen)
                await drive_routes(client, keys, secret, seen)
                metrics = await client.get("/metrics", headers=bearer(keys["admin"]))
                seen.response("metrics", metrics)
                stats = await client.get("/api/v1/stats", headers=bearer(keys["admin"]))
                seen.response("stats", stats)

                # The store goes away mid-run: readiness, reads and writes report it.
                proxy.stop()
                down = await client.get("/readyz", headers=bearer(keys["admin"]))
                seen.response("readyz, store down", down)
                for seed in (200, 201):
                    resp = await client.post(
                        V1, headers=bearer(keys["api"]), files={"image": ("x.png", png(seed))}
                    )
                    seen.response(f"classify, store down {seed}", resp)
                resp = await client.post(
                    f"{V1}/check-cache",
                    headers=bearer(keys["api"]),
                    json={"image_hash": sha256_hex("never seen")},
                )
                seen.response("check-cache, store down", resp)
                with trio.move_on_after(10):
                    while "store_write_failed" not in captured_logs.getvalue():  # noqa: ASYNC110
                        await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    rows = await mysql_execute(
        mysql_url_of(mysql_account.server.with_database(mysql_account.database)),
        "SELECT COUNT(*) FROM image_classification_cache",
    )
    logs = captured_logs.getvalue()
    out = capfd.readouterr()
    seen.add("structlog/stdlib logs", logs)
    seen.add("stdout", out.out)
    seen.add("stderr", out.err)
    seen.add("caplog", caplog.text)
    seen.add("caplog messages", "\n".join(repr(r.msg) for r in caplog.records))
    seen.add("config.redacted()", json.dumps(config.redacted()))

    # Not vacuous: the secrets were in use, and what was searched holds the evidence.
    assert rows[0][0] > 0, "nothing reached the password-protected database"
    fake_stats = fake.stats()
    assert fake_stats["by_status"].get("401", 0) >= 2, fake_stats
    assert fake_stats["by_status"].get("500", 0) >= 2, fake_stats
    assert fake_stats["by_status"].get("200", 0) >= 1, fake_stats
    assert "llm" in sources, sources
    assert "local" in sources, sources
    assert metrics.status_code == 200
    assert "xintu_" in metrics.text
    assert stats.status_code == 200, stats.text
    assert down.status_code == 503, down.text
    assert "unreachable" in down.text, down.text
    assert f"{mysql_account.user}:***@" in down.text  # the URL was shown, redacted
    events = logged_events(logs)
    expected = {
        "request",
        "guard_keys",
        "store_migrated",
        "llm_pool_ready",
        "llm_provider_failed",
        "llm_fallback",
        "breaker_opened",
        "store_write_failed",
    }
    assert expected <= events, f"missing log events: {expected - events}"
    statuses = {
        int(text.split()[0]) for where, text in seen.parts if where.endswith(" headers") and text
    }
    assert {200, 400, 401, 403, 404, 405, 422, 503} <= statuses, statuses

    seen.assert_clean(secret)
    assert time.monotonic() - started < RUN_TIMEOUT_S


# --- a store that cannot be reached --------------------------------------------------


def closed_store_secrets() -> tuple[Secrets, str, str]:
    secret = Secrets()
    password = secret.add("dsn password", dsn_password())
    secret.add("dsn password (url-encoded)", quote(password, safe=""))
    user = f"xs_{secrets.token_hex(4)}"
    # Port 1 on loopback: nothing listens there (binding it needs root).
    url = f"mysql://{user}:{quote(password, safe='')}@127.0.0.1:1/xintu_secret"
    return secret, user, url


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_unreachable_store_reports_the_error_not_the_password(
    log_format: str,
    tmp_path: Path,
    captured_logs: io.StringIO,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret, user, url = closed_store_secrets()
    seen = Seen()
    caplog.set_level("DEBUG")
    config = load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"url": url, "query_timeout_s": 1.0},
        log={"level": "debug", "format": log_format},
    )
    configure_logging(config.log, captured_logs)
    with trio.fail_after(30):
        # The app may refuse to start, or start unready: either way, look at what it says.
        try:
            async with (
                real_server(config, DecodingModel(config.images)) as base,
                httpx.AsyncClient(base_url=base, timeout=10) as client,
            ):
                probes: list[tuple[str, str, dict[str, Any]]] = [
                    ("GET", "/readyz", {}),
                    ("GET", "/healthz", {}),
                    ("GET", "/metrics", {}),
                    ("GET", "/api/v1/stats", {}),
                    ("POST", V1, {"files": {"image": ("p.png", png(1))}}),
                    ("POST", f"{V1}/check-cache", {"json": {"image_hash": "0" * 64}}),
                ]
                for method, path, kw in probes:
                    resp = await client.request(method, path, **kw)
                    seen.response(f"{method} {path}", resp)
        except Exception as exc:  # its text is under test too
            seen.add("startup error", f"{exc!r}\n{exc}")
            for sub in getattr(exc, "exceptions", ()):
                seen.add("startup error (part)", f"{sub!r}\n{sub}")

    # `xintu config show` with the URL in the environment.
    reset_logging()
    monkeypatch.setenv("XINTU_STORE_URL", url)
    monkeypatch.setenv("XINTU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("XINTU_CONFIG", raising=False)
    assert cli_main(["config", "show"]) == 0
    out = capfd.readouterr()
    seen.add("stdout", out.out)
    seen.add("stderr", out.err)
    assert f'url = "mysql://{user}:***@127.0.0.1:1/xintu_secret"  # env' in out.out

    logs = captured_logs.getvalue()
    seen.add("structlog/stdlib logs", logs)
    seen.add("caplog", caplog.text)
    seen.add("caplog messages", "\n".join(repr(r.msg) for r in caplog.records))
    seen.add("config.redacted()", json.dumps(config.redacted()))
    # The failure was reported (logged), with the URL redacted.
    assert f"{user}:***@127.0.0.1:1" in strip_ansi(logs), logs
    seen.assert_clean(secret)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_xintu_serve_process_with_an_unreachable_store(log_format: str, tmp_path: Path) -> None:
    """``python -m xintu serve``, logs on stderr: the store error, never the password."""
    secret, user, url = closed_store_secrets()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XINTU_")}
    env.update(
        XINTU_STORE_URL=url,
        XINTU_STORE_QUERY_TIMEOUT_S="1",
        XINTU_DATA_DIR=str(tmp_path / "data"),
        XINTU_LOG_LEVEL="debug",
        XINTU_LOG_FORMAT=log_format,
        XINTU_SERVER_DRAIN_DELAY_S="0",
        XINTU_SERVER_GRACEFUL_TIMEOUT_S="1",
        PYTHONUNBUFFERED="1",
    )
    out = bytearray()
    with subprocess.Popen(
        [sys.executable, "-m", "xintu", "serve", "--bind", "127.0.0.1:0"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        try:
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), False)
            # Until it gives up (exits) or serves anyway (then it is stopped).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                out += proc.stdout.read() or b""
                if b"Running on" in out:
                    proc.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.05)
            proc.wait(timeout=20)
            os.set_blocking(proc.stdout.fileno(), True)
            out += proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    text = out.decode("utf-8", "replace")
    seen = Seen()
    seen.add("process output", text)
    plain = strip_ansi(text)
    assert "serving" in plain, text
    assert f"{user}:***@127.0.0.1:1" in plain, text  # the store error was reported
    seen.assert_clean(secret)


def test_config_repr_hides_secrets(tmp_path: Path) -> None:
    """SECURITY.md: ``Config.redacted()`` is the only rendering of the configuration.

    A ``repr`` is a rendering too: tracebacks that show locals (structlog's console
    renderer with rich installed), debuggers and error reporters print it.
    """
    secret, _user, url = closed_store_secrets()
    api = secret.add("api key sha256", sha256_hex(secrets.token_urlsafe(24)))
    admin = secret.add("admin key sha256", sha256_hex(secrets.token_urlsafe(24)))
    llm_key = secret.add("llm api key", f"sk-{secrets.token_urlsafe(32)}")
    config = load_config(
        env={
            "XINTU_LLM_PROVIDERS": "up",
            "XINTU_LLM_UP_BASE_URL": "http://127.0.0.1:9/v1",
            "XINTU_LLM_UP_API_KEY": llm_key,
            "XINTU_LLM_UP_MODEL": "m",
        },
        data={"dir": str(tmp_path)},
        store={"url": url},
        security={"api_key_sha256": [api], "admin_key_sha256": [admin]},
    )
    seen = Seen()
    seen.add("repr(config)", repr(config))
    seen.add("repr(config.store)", repr(config.store))
    seen.add("repr(config.security)", repr(config.security))
    seen.add("str(config)", str(config))
    seen.assert_clean(secret)

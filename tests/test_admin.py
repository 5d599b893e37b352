"""``/admin/reclassify`` and ``/admin/purge``: in process, from outside with curl, and
through ``xintu admin``."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from PIL import Image
from quart.typing import TestClientProtocol as Client
from werkzeug.datastructures import FileStorage

from xintu import Config, load_config
from xintu.cli import main
from xintu.http import XintuApp, create_app
from xintu.testing.fakellm import run_fake_llm

from .conformance import curl_or_skip
from .fakes import FakeModel
from .llm_service import fake_env
from .serving import DecodingModel, real_server

V1 = "/api/v1/classify"
ADMIN_KEY = "admin-secret-key"
API_KEY = "ordinary-key"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def photo(n: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (n * 60 % 256, 30, 90)).save(out, "JPEG")
    return out.getvalue()


def config_for(tmp_path: Path, env: dict[str, str] | None = None, **sections: Any) -> Config:
    return load_config(
        env=env or {},
        data={"dir": str(tmp_path / "data")},
        store={"writer_flush_ms": 1},
        ratelimit={"rate_per_s": 0.0, "burst": 1, "max_clients": 1},
        **sections,
    )


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[XintuApp, Client]]:
    app = create_app(config, model_factory=lambda _c: FakeModel())
    async with app.test_app():
        yield app, app.test_client()


async def upload(client: Client, data: bytes) -> dict[str, Any]:
    resp = await client.post(V1, files={"image": FileStorage(io.BytesIO(data), filename="p")})
    assert resp.status_code == 200
    body: dict[str, Any] = await resp.get_json()
    return body


async def test_purge_deletes_the_entry_and_its_spooled_bytes(tmp_path: Path) -> None:
    """A local answer's entry, its alias and its spooled photo go; a check-cache then
    misses, and the photo is classified again when uploaded again."""
    async with serving(config_for(tmp_path)) as (app, client):
        data = photo(1)
        alias = sha(b"the original photo")
        resp = await client.post(
            V1,
            files={"image": FileStorage(io.BytesIO(data), filename="p")},
            form={"image_hash": alias},
            headers={"X-User-ID": "u1"},
        )
        assert resp.status_code == 200
        await app.runtime.writer.wait_idle()
        # Local only (no LLM): nothing to upgrade to, so nothing is spooled here;
        # spool it as if an LLM were configured, to see the purge delete it.
        assert await app.runtime.upgrades.spool.put(sha(data), data)
        resp = await client.post("/admin/purge", json={"image_hash": sha(data)})
        body = await resp.get_json()
        assert resp.status_code == 200
        assert (body["purged"], body["image_hash"]) == (True, sha(data))
        miss = await (
            await client.post(f"{V1}/check-cache", json={"image_hash": sha(data)})
        ).get_json()
        assert miss["cached"] is False
        by_alias = await (
            await client.post(
                f"{V1}/check-cache", json={"image_hash": alias}, headers={"X-User-ID": "u1"}
            )
        ).get_json()
        assert by_alias["cached"] is False
        assert await app.store.get(sha(data)) is None
        assert await app.runtime.upgrades.spool.get(sha(data)) is None
        again = await (await client.post("/admin/purge", json={"image_hash": sha(data)})).get_json()
        assert again["purged"] is False
        assert (await upload(client, data))["from_cache"] is False


async def test_reclassify_by_source_replaces_local_answers(tmp_path: Path) -> None:
    """The LLM refuses the first upload, so the local model answers and its bytes are
    spooled; an operator's re-classification of the local entries queues it, the LLM's
    answer replaces it; an entry without spooled bytes is reported as such."""
    async with run_fake_llm(fail_next=1, error_status=400) as fake:
        env = fake_env(fake.openai_base_url)
        async with serving(config_for(tmp_path, env)) as (app, client):
            data = photo(2)
            assert (await upload(client, data))["data"]["source"] == "local"
            await app.runtime.writer.wait_idle()
            with trio.fail_after(10):
                while await app.runtime.upgrades.spool.get(sha(data)) is None:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            resp = await client.post("/admin/reclassify", json={"source": "local"})
            body = await resp.get_json()
            assert resp.status_code == 200
            assert {k: body[k] for k in ("matched", "queued", "no_bytes", "dropped")} == {
                "matched": 1,
                "queued": 1,
                "no_bytes": 0,
                "dropped": 0,
            }
            with trio.fail_after(10):
                while app.runtime.upgrades.statistics().upgraded < 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await app.runtime.writer.wait_idle()
            entry = await app.store.get(sha(data))
            assert entry is not None
            assert entry.classification.model == "fake-vl"
            # Now an llm answer, without spooled bytes: asked again by hash, none.
            unknown = sha(b"never seen")
            resp = await client.post(
                "/admin/reclassify", json={"image_hashes": [sha(data), unknown]}
            )
            body = await resp.get_json()
            assert (body["matched"], body["queued"], body["no_bytes"]) == (2, 0, 2)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"image_hashes": ["a" * 64], "source": "local"}, "give image_hashes or a query"),
        ({"source": "cache"}, "source must be 'local' or 'llm'"),
        ({"limit": 0}, "limit must be an integer from 1 to 10000"),
        ({"since": "yesterday"}, "since must be an ISO 8601 date or time"),
        ({"source": "local", "user_id": "u"}, "unknown field 'user_id'"),
        ({"image_hashes": ["a" * 64] * 501}, "image_hashes must be a list of 1 to 500 hashes"),
        ({"image_hashes": ["xyz"]}, "image_hashes[0] must be 64 hexadecimal characters"),
        # An empty query would re-classify the oldest entries of every source.
        ({}, "give image_hashes or a query with at least one of source, since, until"),
        ({"limit": 10}, "give image_hashes or a query with at least one of source, since"),
    ],
)
async def test_reclassify_refuses_bad_input(
    tmp_path: Path, body: dict[str, Any], message: str
) -> None:
    async with serving(config_for(tmp_path)) as (_app, client):
        resp = await client.post("/admin/reclassify", json=body)
        answer = await resp.get_json()
    assert resp.status_code == 422
    assert answer["error"].startswith(message)


async def test_admin_endpoints_need_an_admin_key_when_admin_keys_are_set(
    tmp_path: Path,
) -> None:
    security = {
        "api_key_sha256": [sha(API_KEY.encode())],
        "admin_key_sha256": [sha(ADMIN_KEY.encode())],
    }
    h = sha(b"x")
    async with serving(config_for(tmp_path, security=security)) as (_app, client):
        none = await client.post("/admin/purge", json={"image_hash": h})
        ordinary = await client.post(
            "/admin/purge", json={"image_hash": h}, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        admin = await client.post(
            "/admin/purge",
            json={"image_hash": h},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
    assert (none.status_code, ordinary.status_code, admin.status_code) == (401, 403, 200)


def test_the_cli_refuses_to_reclassify_everything(capsys: Any) -> None:
    """``xintu admin reclassify`` with no hash and no query sends nothing."""
    argv = ["admin", "reclassify", "--server", "http://127.0.0.1:9", "--limit", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "at least one of --source, --since, --until" in err
    assert "cannot reach" not in err


async def test_a_recheck_answer_after_a_purge_is_dropped(tmp_path: Path) -> None:
    """An LLM recheck of the photo, under way when its entry was purged, answers
    afterwards: its answer does not bring the entry back."""
    from xintu._types import Category, Classification, Source

    async with serving(config_for(tmp_path)) as (app, client):
        data = photo(3)
        await upload(client, data)
        await app.runtime.writer.wait_idle()
        resp = await client.post("/admin/purge", json={"image_hash": sha(data)})
        assert (await resp.get_json())["purged"] is True
        late = Classification(
            category=Category.PETS, confidence=0.9, source=Source.LLM, model="fake-vl"
        )
        await app.runtime._recheck_done(sha(data), late)  # the LLM pool's on_recheck
        await app.runtime.writer.wait_idle()
        assert await app.store.get(sha(data)) is None
        miss = await (
            await client.post(f"{V1}/check-cache", json={"image_hash": sha(data)})
        ).get_json()
        assert miss["cached"] is False
        assert await app.runtime.upgrades.spool.get(sha(data)) is None


async def test_a_service_without_an_llm_makes_no_spool_directory(tmp_path: Path) -> None:
    async with serving(config_for(tmp_path)) as (_app, client):
        assert (await upload(client, photo(4)))["success"] is True
    assert (tmp_path / "data").is_dir()
    assert not (tmp_path / "data" / "spool").exists()


def test_openapi_describes_the_admin_endpoints(tmp_path: Path) -> None:
    from xintu.http._openapi import openapi_document

    doc = openapi_document(config_for(tmp_path, security={"admin_key_sha256": [sha(b"k")]}))
    purge = doc["paths"]["/admin/purge"]["post"]
    assert set(purge["responses"]) == {
        "200",
        "400",
        "401",
        "403",
        "408",
        "409",
        "413",
        "422",
        "429",
        "503",
    }
    schema = doc["paths"]["/admin/reclassify"]["post"]["requestBody"]["content"]
    by_hashes, by_query = schema["application/json"]["schema"]["oneOf"]
    assert by_hashes["properties"]["image_hashes"]["maxItems"] == 500
    assert by_query["properties"]["source"]["enum"] == ["local", "llm"]
    # An empty query is refused: at least one of source, since, until.
    assert {tuple(r["required"]) for r in by_query["anyOf"]} == {
        ("source",),
        ("since",),
        ("until",),
    }


# --- from outside ---------------------------------------------------------------------


@pytest.fixture
def curl_path() -> str:
    return curl_or_skip()


async def test_curl_purges_an_entry_and_the_cli_too(
    tmp_path: Path, curl_path: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """With an admin key: curl purges one entry over HTTP; ``xintu admin purge`` the
    other, reading the key from XINTU_ADMIN_KEY; a wrong key is an error exit."""
    config = config_for(tmp_path, security={"admin_key_sha256": [sha(ADMIN_KEY.encode())]})
    first, second = photo(5), photo(6)
    async with real_server(config, DecodingModel(config.images)) as base:
        app_client = _Http(base)
        for data in (first, second):
            assert (await app_client.upload(data))["success"] is True
        with trio.fail_after(30):
            done = await trio.run_process(
                [
                    curl_path,
                    "--silent",
                    "--show-error",
                    "--noproxy",
                    "*",
                    "-H",
                    f"Authorization: Bearer {ADMIN_KEY}",
                    "-H",
                    "Content-Type: application/json",
                    "--data",
                    json.dumps({"image_hash": sha(first)}),
                    f"{base}/admin/purge",
                ],
                capture_stdout=True,
            )
        assert json.loads(done.stdout)["purged"] is True
        monkeypatch.setenv("XINTU_ADMIN_KEY", ADMIN_KEY)
        argv = ["admin", "purge", sha(second), "--server", base]
        assert await trio.to_thread.run_sync(main, argv) == 0
        out = capsys.readouterr().out  # the server's log lines are there too
        assert f'"image_hash": "{sha(second)}",\n  "purged": true' in out
        monkeypatch.setenv("XINTU_ADMIN_KEY", "wrong")
        assert await trio.to_thread.run_sync(main, argv) == 1
        assert "401" in capsys.readouterr().err
        for data in (first, second):
            assert (await app_client.check(sha(data)))["cached"] is False


class _Http:
    def __init__(self, base: str) -> None:
        self.base = base

    async def upload(self, data: bytes) -> dict[str, Any]:
        import httpx

        async with httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(f"{self.base}{V1}", files={"image": ("p.jpg", data)})
        result: dict[str, Any] = resp.json()
        return result

    async def check(self, image_hash: str) -> dict[str, Any]:
        import httpx

        async with httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(
                f"{self.base}{V1}/check-cache", json={"image_hash": image_hash}
            )
        result: dict[str, Any] = resp.json()
        return result

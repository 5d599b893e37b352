"""Client-named photos (DESIGN §2): the original album app's hash-of-the-original flow.

The app hashes the ORIGINAL photo, asks check-cache with that hash and, on a miss,
uploads a resized copy with ``image_hash`` = the original's hash. The server
classifies and caches the uploaded bytes under their own SHA-256 and makes the
client's hash an alias of that entry: in the uploader's scope (mode ``alias``), for
everyone (``shared``), or refuses it (``verify``, see test_service.py).

Real app, real stores (SQLite and MariaDB), the fake model (answers by the bytes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as Client

from xintu import Config, load_config
from xintu.http import XintuApp, create_app

from .fakes import FakeModel, fake_category
from .test_service import multipart, upload

V1 = "/api/v1/classify"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def original(n: int) -> bytes:
    """The 'original photo' the app hashes; never uploaded."""
    return f"original photo {n}".encode()


def resized(n: int) -> bytes:
    """The resized copy the app uploads in its place."""
    return f"resized copy {n}".encode()


Serving = Callable[..., AbstractAsyncContextManager[tuple[XintuApp, Client]]]


@pytest.fixture
def serving(tmp_path: Path, store_url: str) -> Serving:
    @asynccontextmanager
    async def serve(
        mode: str = "alias", model: FakeModel | None = None
    ) -> AsyncIterator[tuple[XintuApp, Client]]:
        config: Config = load_config(
            env={},
            data={"dir": str(tmp_path / "data")},
            store={"url": store_url, "writer_flush_ms": 1},
            api={"client_hash_mode": mode},
        )
        fake = model or FakeModel()
        app = create_app(config, model_factory=lambda _c: fake)
        async with app.test_app():
            yield app, app.test_client()

    return serve


async def upload_as(client: Client, user: str | None, data: bytes, claimed: str) -> Any:
    headers = {"X-User-ID": user} if user else {}
    resp = await client.post(
        V1, files={"image": upload(data)}, form={"image_hash": claimed}, headers=headers
    )
    assert resp.status_code == 200, await resp.get_data()
    return await resp.get_json()


async def check(client: Client, user: str | None, image_hash: str) -> Any:
    headers = {"X-User-ID": user} if user else {}
    resp = await client.post(f"{V1}/check-cache", json={"image_hash": image_hash}, headers=headers)
    assert resp.status_code == 200
    return await resp.get_json()


async def batch_check(client: Client, user: str | None, hashes: list[str]) -> Any:
    headers = {"X-User-ID": user} if user else {}
    resp = await client.post(
        f"{V1}/batch-check-cache", json={"image_hashes": hashes}, headers=headers
    )
    assert resp.status_code == 200
    return await resp.get_json()


async def settle(app: XintuApp, *, forget: bool = True) -> None:
    """Let the writer commit; with *forget*, empty this process's memory so that the
    next lookup is answered by the store (as another replica would be)."""
    with trio.fail_after(5):
        await app.runtime.writer.wait_idle()
    if forget:
        app.runtime.cache.lru.clear()
        app.runtime.cache._aliases.clear()


@pytest.mark.parametrize("from_store", [False, True], ids=["memory", "store"])
async def test_the_originals_hash_hits_after_a_resized_upload(
    serving: Serving, from_store: bool
) -> None:
    model = FakeModel()
    async with serving(model=model) as (app, client):
        body = await check(client, "alice", sha(original(1)))
        assert body["cached"] is False

        up = await upload_as(client, "alice", resized(1), sha(original(1)))
        assert up["success"] is True
        assert up["from_cache"] is False
        # Cached under the bytes' own hash: verified, as for every upload.
        assert up["data"]["image_hash"] == sha(resized(1))
        assert up["data"]["category"] == fake_category(resized(1)).value
        await settle(app, forget=from_store)

        body = await check(client, "alice", sha(original(1)))
        assert body["cached"] is True
        assert body["from_cache"] is True
        assert body["data"]["category"] == up["data"]["category"]
        assert body["data"]["image_hash"] == sha(resized(1))
        # Another client cannot see alice's name for it...
        assert (await check(client, "bob", sha(original(1))))["cached"] is False
        # ...but everyone sees the verified entry.
        assert (await check(client, "bob", sha(resized(1))))["cached"] is True
        assert model.prepared[resized(1)] == 1

        await settle(app, forget=False)
        entry = await app.store.get(sha(resized(1)))
        assert entry is not None
        assert entry.hit_count == 2  # alice's hit by alias, bob's by hash


async def test_batch_flow_by_the_originals_hashes(serving: Serving) -> None:
    async with serving() as (app, client):
        hashes = [sha(original(n)) for n in range(3)]
        body = await batch_check(client, "alice", hashes)
        assert [i["cached"] for i in body["items"]] == [False, False, False]
        assert all(i["data"] is None for i in body["items"])

        # The misses are resized and sent to /batch with the originals' hashes.
        payload, headers = multipart(
            [("images", f"IMG_{n}.jpg", resized(n)) for n in range(3)],
            {"image_hashes": json.dumps(hashes)},
        )
        resp = await client.post(
            f"{V1}/batch", data=payload, headers=headers | {"X-User-ID": "alice"}
        )
        out = await resp.get_json()
        assert resp.status_code == 200
        assert out["success_count"] == 3
        assert isinstance(out["total_processing_time_ms"], int)
        assert all(isinstance(i["processing_time_ms"], int) for i in out["items"])
        await settle(app)

        body = await batch_check(client, "alice", [*hashes, sha(b"never seen")])
        assert [i["cached"] for i in body["items"]] == [True, True, True, False]
        assert body["cached_count"] == 3
        assert [i["data"]["category"] for i in body["items"][:3]] == [
            fake_category(resized(n)).value for n in range(3)
        ]
        assert body["items"][3]["data"] is None
        body = await batch_check(client, "bob", hashes)
        assert body["cached_count"] == 0


async def test_an_alias_never_replaces_a_verified_entry(serving: Serving) -> None:
    # Two byte strings the fake model files under different categories.
    real, fake = (
        b"real photo",
        next(
            d
            for d in (f"poison {i}".encode() for i in range(100))
            if fake_category(d) != fake_category(b"real photo")
        ),
    )
    async with serving(mode="shared") as (app, client):
        await upload_as(client, "alice", real, sha(real))
        # mallory names her upload with the hash of alice's photo.
        await upload_as(client, "mallory", fake, sha(real))
        await settle(app)
        for user in ("alice", "mallory", None):
            body = await check(client, user, sha(real))
            assert body["data"]["category"] == fake_category(real).value


async def test_shared_mode_makes_aliases_visible_to_everyone(serving: Serving) -> None:
    async with serving(mode="shared") as (app, client):
        await upload_as(client, "alice", resized(7), sha(original(7)))
        await settle(app)
        for user in ("bob", None):
            body = await check(client, user, sha(original(7)))
            assert body["cached"] is True
            assert body["data"]["category"] == fake_category(resized(7)).value


async def test_without_a_user_id_the_scope_is_the_address(serving: Serving) -> None:
    async with serving() as (app, client):
        await upload_as(client, None, resized(3), sha(original(3)))
        await settle(app)
        assert (await check(client, None, sha(original(3))))["cached"] is True
        # A user id names a different scope than the bare address.
        assert (await check(client, "carol", sha(original(3))))["cached"] is False


async def test_the_user_id_in_the_body_scopes_like_the_header(serving: Serving) -> None:
    async with serving() as (app, client):
        await upload_as(client, "dave", resized(4), sha(original(4)))
        await settle(app)
        resp = await client.post(
            f"{V1}/check-cache", json={"image_hash": sha(original(4)), "user_id": "dave"}
        )
        assert (await resp.get_json())["cached"] is True

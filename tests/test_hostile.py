"""Hostile input through the HTTP API: nasty files, oversized and malformed bodies, fuzzing.

Every nasty file has its expected status; limits are enforced while reading (a
chunked 200 MB upload is cut off at the body limit, on a real Hypercorn server);
Hypothesis-generated multipart bodies, JSON bodies and headers never get a 5xx,
and a well-behaved client keeps being served throughout.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from quart.typing import TestClientProtocol as Client

from xintu import Config, load_config
from xintu.http import XintuApp, create_app

from .serving import DecodingModel, open_raw, real_server
from .test_decode import bomb_png

V1 = "/api/v1/classify"
MAX_IMAGE = 300_000
MAX_PIXELS = 4_000_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).convert(mode)


def solid(w: int, h: int, colour: Any = (200, 30, 30), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h), colour)


def hostile_config(tmp_path: Path, **server: Any) -> Config:
    return load_config(
        env={},
        data={"dir": str(tmp_path / "data")},
        store={"writer_flush_ms": 1},
        server={"max_body_bytes": 1_000_000, **server},
        images={"max_image_bytes": MAX_IMAGE, "max_pixels": MAX_PIXELS},
        ratelimit={"rate_per_s": 0.0, "burst": 1, "max_clients": 1},
    )


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[XintuApp, Client]]:
    app = create_app(config, model_factory=lambda c: DecodingModel(c.images))
    with trio.fail_after(30):
        async with app.test_app():
            yield app, app.test_client()


def multipart(
    parts: list[tuple[str, str | None, bytes]], boundary: str = "hostile-boundary"
) -> tuple[bytes, dict[str, str]]:
    out = io.BytesIO()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# --- the nasty-file corpus ---------------------------------------------------------------


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("payload.sh", "#!/bin/sh\necho pwned\n")
    return buf.getvalue()


def _polyglot() -> bytes:
    return encode(solid(64, 64), "JPEG") + _zip()


def _png_16_bit() -> bytes:
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def _animated(fmt: str) -> bytes:
    frames = [solid(48, 48, c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)


def _heif() -> bytes:
    import pillow_heif

    buf = io.BytesIO()
    pillow_heif.from_pillow(solid(64, 48)).save(buf, quality=90)
    return buf.getvalue()


_JPEG = encode(noise(400, 300), "JPEG", quality=90)
_PNG = encode(noise(120, 90), "PNG")

# name -> (file name, bytes, expected status, expected error_code or None)
CORPUS: dict[str, tuple[str, bytes, int, str | None]] = {
    "jpeg": ("a.jpg", _JPEG, 200, None),
    "truncated-jpeg": ("a.jpg", _JPEG[: len(_JPEG) // 2], 400, "invalid_image"),
    "jpeg-header-only": ("a.jpg", _JPEG[:200], 400, "invalid_image"),
    "truncated-png": ("a.png", _PNG[: len(_PNG) // 2], 400, "invalid_image"),
    "decompression-bomb-png": (
        "bomb.png",
        bomb_png(100_000, 100_000),
        413,
        "image_too_many_pixels",
    ),
    "huge-declared-dimensions": ("big.png", bomb_png(20_000, 20_000), 413, "image_too_many_pixels"),
    "just-over-the-pixel-limit": (
        "wide.png",
        encode(solid(2001, 2000), "PNG"),
        413,
        "image_too_many_pixels",
    ),
    "zero-width-png": ("zero.png", bomb_png(0, 16), 400, "invalid_image"),
    "zero-bytes": ("empty.jpg", b"", 400, "bad_request"),
    "one-byte": ("one.jpg", b"\xff", 400, "invalid_image"),
    "random-bytes": ("r.jpg", random.Random(7).randbytes(4000), 400, "invalid_image"),
    "text-named-jpg": ("notes.jpg", b"just some text\n" * 50, 400, "invalid_image"),
    "html": ("page.jpg", b"<html><script>alert(1)</script></html>", 400, "invalid_image"),
    "svg": ("v.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', 400, "invalid_image"),
    "pdf": ("doc.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", 400, "invalid_image"),
    "zip": ("a.jpg", _zip(), 400, "invalid_image"),
    "polyglot-jpeg-zip": ("a.jpg", _polyglot(), 200, None),
    "png-named-jpg": ("photo.jpg", encode(solid(64, 64), "PNG"), 200, None),
    "cmyk-jpeg": ("cmyk.jpg", encode(solid(64, 64, (0, 255, 255, 0), "CMYK"), "JPEG"), 200, None),
    "16-bit-png": ("deep.png", _png_16_bit(), 200, None),
    "animated-gif": ("anim.gif", _animated("GIF"), 200, None),
    "animated-webp": ("anim.webp", _animated("WEBP"), 200, None),
    "heif": ("a.heic", _heif(), 200, None),
    "grayscale-with-alpha": ("la.png", encode(solid(32, 32, (10, 128), "LA"), "PNG"), 200, None),
    "ico-not-accepted": ("a.ico", encode(solid(32, 32), "ICO"), 415, "unsupported_format"),
    "tga-not-accepted": ("a.tga", encode(solid(32, 32), "TGA"), 415, "unsupported_format"),
    "ppm-not-accepted": ("a.jpg", encode(solid(32, 32), "PPM"), 415, "unsupported_format"),
    "over-the-image-byte-limit": (
        "big.bmp",
        encode(noise(330, 330), "BMP"),
        413,
        "payload_too_large",
    ),
}


async def test_every_nasty_file_gets_its_status(tmp_path: Path) -> None:
    assert len(CORPUS["over-the-image-byte-limit"][1]) > MAX_IMAGE
    assert len(CORPUS["just-over-the-pixel-limit"][1]) < MAX_IMAGE
    async with serving(hostile_config(tmp_path)) as (_app, client):
        for name, (filename, data, status, code) in CORPUS.items():
            body, headers = multipart([("image", filename, data)])
            resp = await client.post(V1, data=body, headers=headers)
            answer = await resp.get_json()
            assert resp.status_code == status, (name, answer)
            if code is None:
                assert answer["success"] is True, name
                assert answer["data"]["image_hash"] == sha(data)
            else:
                assert answer["error_code"] == code, (name, answer)
                assert set(answer) == {"success", "error", "error_code", "request_id", "detail"}
                assert "Traceback" not in answer["error"]
                assert "/" not in answer["error"], name  # no paths in client messages
        # The service still answers after the whole corpus.
        assert (await client.get("/readyz")).status_code == 200


async def test_the_corpus_in_one_batch_answers_each_item(tmp_path: Path) -> None:
    names = [n for n in CORPUS if len(CORPUS[n][1]) < 120_000][:20]
    parts = [("images", CORPUS[n][0], CORPUS[n][1]) for n in names]
    async with serving(hostile_config(tmp_path)) as (_app, client):
        body, headers = multipart(parts)
        resp = await client.post(f"{V1}/batch", data=body, headers=headers)
        answer = await resp.get_json()
    assert resp.status_code == 200, answer
    for name, item in zip(names, answer["items"], strict=True):
        expected_ok = CORPUS[name][2] == 200
        assert item["success"] is expected_ok, (name, item)
        if not expected_ok:
            assert item["error_code"] == CORPUS[name][3], (name, item)


async def test_the_same_bad_file_twice_in_a_batch_fails_each_item_alike(tmp_path: Path) -> None:
    """Singleflight hands one failure to every waiter: each must get its own 400, not a
    500 for all but the first (found by schemathesis)."""
    bad = CORPUS["truncated-jpeg"][1]
    async with serving(hostile_config(tmp_path)) as (_app, client):
        body, headers = multipart([("images", "a.jpg", bad), ("images", "b.jpg", bad)])
        resp = await client.post(f"{V1}/batch", data=body, headers=headers)
        answer = await resp.get_json()
        assert resp.status_code == 200, answer
        assert [item["error_code"] for item in answer["items"]] == ["invalid_image"] * 2


# --- multipart and body limits -----------------------------------------------------------


async def test_multipart_limits(tmp_path: Path) -> None:
    config = hostile_config(tmp_path)
    async with serving(config) as (_app, client):
        # More parts than MAX_FORM_PARTS.
        body, headers = multipart([(f"f{i}", None, b"x") for i in range(65)])
        resp = await client.post(V1, data=body, headers=headers)
        assert resp.status_code == 413
        assert (await resp.get_json())["error_code"] == "payload_too_large"
        # A text field over MAX_FORM_MEMORY_SIZE.
        jpeg = CORPUS["jpeg"][1]
        body, headers = multipart([("image", "a.jpg", jpeg), ("image_hash", None, b"a" * 400_000)])
        resp = await client.post(V1, data=body, headers=headers)
        assert resp.status_code == 413
        # Too many images in a batch.
        body, headers = multipart([("images", f"{i}.jpg", jpeg[:10]) for i in range(21)])
        resp = await client.post(f"{V1}/batch", data=body, headers=headers)
        assert resp.status_code == 422
        # The body limit as declared by Content-Length.
        body, headers = multipart([("image", "a.jpg", b"\xff" * 1_100_000)])
        resp = await client.post(V1, data=body, headers=headers)
        assert resp.status_code == 413
        assert (await resp.get_json())["error"] == "request body too large"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n\r\n"),  # no boundary
        ("multipart/form-data; boundary=x", b"not multipart at all"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="image'),
        ("multipart/form-data; boundary=x", b""),
        ("application/x-www-form-urlencoded", b"image=abc"),
        ("application/json", b'{"image": "abc"}'),
        ("text/plain", b"\x00\x01\x02"),
    ],
)
async def test_malformed_uploads_are_400(tmp_path: Path, content_type: str, body: bytes) -> None:
    async with serving(hostile_config(tmp_path)) as (_app, client):
        resp = await client.post(V1, data=body, headers={"Content-Type": content_type})
        answer = await resp.get_json()
    assert resp.status_code == 400, answer
    assert answer["error_code"] == "bad_request"


async def test_chunked_huge_upload_is_cut_off_at_the_limit(tmp_path: Path) -> None:
    """200 MB streamed without Content-Length: 413 once the body passes the limit, and
    the connection is closed, so the rest is neither read nor buffered."""
    config = hostile_config(tmp_path)
    limit = config.server.max_body_bytes
    sent = 0
    reply = b""
    write_error: Exception | None = None

    async def upload(stream: trio.SocketStream) -> None:
        nonlocal sent, write_error
        head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        chunk = b"\xff" * (1 << 20)
        try:
            await stream.send_all(b"%x\r\n%s\r\n" % (len(head), head))
            for _ in range(200):
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            await stream.send_all(b"0\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            write_error = exc

    async def read_reply(stream: trio.SocketStream) -> None:
        nonlocal reply
        while data := await stream.receive_some(65536):  # until the server closes
            reply += data

    with trio.fail_after(30):
        async with real_server(config, DecodingModel(config.images)) as base:
            stream = await open_raw(base)
            async with stream:
                await stream.send_all(
                    b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\n"
                    b"Transfer-Encoding: chunked\r\n"
                    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(upload, stream)
                    nursery.start_soon(read_reply, stream)
            async with httpx.AsyncClient(base_url=base) as client:
                assert (await client.get("/readyz")).status_code == 200  # still serving
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 "
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error_code"] == "payload_too_large"
    assert write_error is not None  # the server hung up on the upload
    # What got through is the limit plus what the sockets' buffers held.
    assert sent < limit + 32 * (1 << 20), sent


async def test_declared_huge_upload_is_refused_before_reading(tmp_path: Path) -> None:
    config = hostile_config(tmp_path)
    with trio.fail_after(30):
        async with real_server(config, DecodingModel(config.images)) as base:
            stream = await open_raw(base)
            async with stream:
                await stream.send_all(
                    b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: 209715200\r\n\r\n"
                )
                reply = b""
                while b"\r\n\r\n" not in reply:
                    reply += await stream.receive_some(65536)
            assert reply.startswith(b"HTTP/1.1 413 ")


async def test_a_refusal_before_the_body_arrives_says_connection_close(tmp_path: Path) -> None:
    """Hypercorn closes a connection whose request body was not read in full. The
    response must say so, or a keep-alive client (httpx, browsers) sends its next
    request into the closing socket and gets "server disconnected"."""
    config = hostile_config(tmp_path)
    with trio.fail_after(30):
        async with real_server(config, DecodingModel(config.images)) as base:
            stream = await open_raw(base)
            async with stream:
                await stream.send_all(
                    b"POST /api/v1/classify HTTP/1.1\r\nHost: x\r\n"
                    b"X-Deadline-Ms: soon\r\n"
                    b"Content-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: 1000\r\n\r\n--b\r\n"  # the rest never comes
                )
                reply = b""
                while data := await stream.receive_some(65536):  # until the server closes
                    reply += data
            head = reply.partition(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 422 ")
            assert b"\r\nconnection: close" in head

            # A request whose body was read keeps its connection open.
            async with httpx.AsyncClient(base_url=base) as client:
                photo = encode(solid(8, 8, (1, 2, 3)), "PNG")
                resp = await client.post(V1, files={"image": ("p.png", photo)})
                assert resp.status_code == 200
                assert resp.headers.get("connection") != "close"
                bad = await client.post(V1, headers={"X-Deadline-Ms": "soon"}, content=b"x")
                assert bad.status_code == 422  # the body was complete: nothing to close


# --- fuzzing -----------------------------------------------------------------------------

_NAMES = st.sampled_from(["image", "images", "image_hash", "image_hashes", "user_id", "x"])
_SMALL_IMAGES = [CORPUS[n][1] for n in ("jpeg", "png-named-jpg", "truncated-jpeg", "zero-bytes")]
_PAYLOADS = st.one_of(st.binary(max_size=600), st.sampled_from(_SMALL_IMAGES))
_PART = st.tuples(
    _NAMES,
    st.one_of(st.none(), st.text(max_size=30)),
    _PAYLOADS,
    st.lists(st.tuples(st.sampled_from(["Content-Type", "X-Junk"]), st.text(max_size=20))),
)
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "X-User-ID",
            "X-Deadline-Ms",
            "Idempotency-Key",
            "Accept",
            "Authorization",
            "X-Forwarded-For",
            "X-Request-ID",
            "Range",
        ]
    ),
    _HEADER_TEXT,
    max_size=5,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
_JSON_BODY = st.one_of(
    _JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "image_hash": st.one_of(
                _JSON, st.text("0123456789abcdefABCDEF", min_size=64, max_size=64)
            ),
            "image_hashes": st.one_of(
                _JSON, st.lists(st.text("0123456789abcdef", min_size=64, max_size=64), max_size=120)
            ),
            "user_id": _JSON,
        },
    ),
)


def _fuzz_multipart(
    parts: list[tuple[str, str | None, bytes, list[tuple[str, str]]]],
    boundary: str,
    cut: int | None,
) -> bytes:
    out = io.BytesIO()
    for name, filename, data, extra in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in extra)
        out.write(head.encode("utf-8", "surrogateescape") + b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    raw = out.getvalue()
    return raw if cut is None else raw[:cut]


def _positive_int(value: str | None) -> bool:
    try:
        return value is not None and int(value) > 0
    except ValueError:
        return False


def _no_5xx(resp: httpx.Response, what: object) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300], what)
    if resp.status_code >= 400 and resp.headers.get("content-type") == "application/json":
        body = resp.json()
        assert body["success"] is False
        assert isinstance(body["error_code"], str)


async def test_fuzzed_requests_never_get_5xx_and_others_keep_being_served(
    tmp_path: Path,
) -> None:
    config = hostile_config(tmp_path)
    good_answers: list[int] = []
    done = trio.Event()

    async def good_client(base: str) -> None:
        """A well-behaved client, served throughout the attack."""
        i = 0
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            while not done.is_set():
                photo = encode(solid(32, 32, (i % 256, 10, 10)), "PNG")
                resp = await client.post(V1, files={"image": ("p.png", photo)})
                good_answers.append(resp.status_code)
                i += 1

    def fuzz(base: str) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:

            @settings(
                max_examples=150,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(
                path=st.sampled_from(
                    [V1, f"{V1}/batch", f"{V1}/check-cache", f"{V1}/batch-check-cache"]
                ),
                parts=st.lists(_PART, max_size=6),
                boundary=st.text(
                    "abcdefghijklmnopqrstuvwxyz0123456789'()+_,-./:=?", min_size=1, max_size=70
                ),
                declared=st.one_of(st.none(), _HEADER_TEXT),
                cut=st.one_of(st.none(), st.integers(0, 2000)),
                json_body=_JSON_BODY,
                raw_json=st.one_of(st.none(), st.binary(max_size=200)),
                headers=_HEADERS,
            )
            def one(
                path: str,
                parts: list[tuple[str, str | None, bytes, list[tuple[str, str]]]],
                boundary: str,
                declared: str | None,
                cut: int | None,
                json_body: Any,
                raw_json: bytes | None,
                headers: dict[str, str],
            ) -> None:
                if _positive_int(headers.get("X-Deadline-Ms")):
                    headers["X-Deadline-Ms"] = "60000"  # a tiny deadline is a fair 504
                if path.endswith("cache"):
                    content = raw_json if raw_json is not None else json.dumps(json_body).encode()
                    headers["Content-Type"] = "application/json"
                else:
                    content = _fuzz_multipart(parts, boundary, cut)
                    headers["Content-Type"] = (
                        declared
                        if declared is not None
                        else f"multipart/form-data; boundary={boundary}"
                    )
                try:
                    resp = client.post(path, content=content, headers=headers)
                except httpx.LocalProtocolError:
                    return  # httpx itself refused to send it
                _no_5xx(resp, (path, headers, content[:200]))

            one()

    with trio.fail_after(120):
        async with real_server(config, DecodingModel(config.images)) as base:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(good_client, base)
                try:
                    await trio.to_thread.run_sync(fuzz, base)
                finally:
                    done.set()
            async with httpx.AsyncClient(base_url=base) as client:
                assert (await client.get("/readyz")).status_code == 200
    assert len(good_answers) >= 5
    assert set(good_answers) == {200}


# Framing headers are the server's business (h11 refuses malformed ones).
_FRAMING = frozenset({"content-length", "transfer-encoding"})


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    headers=st.lists(
        st.tuples(
            st.text(
                st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
                min_size=1,
                max_size=20,
            ),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80),
        ),
        max_size=8,
    ),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(
        [
            "/",
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/v1/stats",
            V1,
            f"{V1}/check-cache",
            "/admin/x",
            "/%2e%2e/etc/passwd",
        ]
    ),
)
def test_fuzzed_headers_through_the_app_never_5xx(
    headers: list[tuple[str, str]], method: str, path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Headers Hypercorn would let through, straight into the app (no socket)."""
    assume(not any(k.lower() in _FRAMING for k, _ in headers))
    config = hostile_config(tmp_path_factory.mktemp("fuzz"))

    async def main() -> None:
        async with serving(config) as (_app, client):
            resp = await client.open(path, method=method, headers=headers, data=b"{}")
            assert resp.status_code < 500, (resp.status_code, await resp.get_data())

    trio.run(main)

"""Answer parsing, the upload image, and the two wire formats (exact request shapes)."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from xintu import Category
from xintu.llm import (
    BadAnswer,
    ImageNotUploadable,
    ProviderConfig,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from xintu.llm._image import prepare_upload
from xintu.llm._parse import DescriptionLanguage, clip_description, parse_answer, user_prompt
from xintu.llm._providers import ProviderClient, parse_retry_after, upstream_message
from xintu.llm.wire import wire_format

KEY = "sk-test-SECRET-5678"


def jpeg(size: tuple[int, int], color: str = "red", **save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG", **save)
    return out.getvalue()


# --- parse_answer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"category": "pets", "confidence": 0.8, "description": "a cat"}',
        '```json\n{"category": "pets", "confidence": 0.8, "description": "a cat"}\n```',
        '```\n{"category":"pets","confidence":0.8,"description":"a cat"}```',
        'Sure! Here is the answer:\n{"category": "pets", "confidence": 0.8, '
        '"description": "a cat"}\nLet me know.',
        '{"note": "x"} then {"category": "Pets", "confidence": "0.8", "description": " a  cat "}',
    ],
)
def test_parse_accepts_fences_and_prose(text: str) -> None:
    answer = parse_answer(text, language="en")
    assert (answer.category, answer.confidence, answer.description) == (
        Category.PETS,
        0.8,
        "a cat",
    )


def test_parse_normalises_category_spelling() -> None:
    assert parse_answer(
        '{"category": "Travel Scenery", "confidence": 1}', language="en"
    ).category == (Category.TRAVEL_SCENERY)
    assert (
        parse_answer('{"category": "single-person", "confidence": 0}', language="zh").description
        is None
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("I think it is a cat.", "the answer holds no JSON object with a category"),
        ("", "the answer holds no JSON object with a category"),
        (
            '{"category": "cats", "confidence": 0.5}',
            ("the answer's category 'cats' is not one of the eight keys"),
        ),
        ('{"category": 3, "confidence": 0.5}', "the answer's category is not a string"),
        ('{"category": "pets", "confidence": 1.5}', "the answer's confidence 1.5 is outside 0..1"),
        (
            '{"category": "pets", "confidence": -0.1}',
            ("the answer's confidence -0.1 is outside 0..1"),
        ),
        ('{"category": "pets", "confidence": "high"}', "the answer's confidence is not a number"),
        ('{"category": "pets", "confidence": true}', "the answer's confidence is not a number"),
        ('{"category": "pets", "confidence": NaN}', "the answer's confidence nan is outside 0..1"),
        ('{"category": "pets"}', "the answer has no confidence"),
        (
            "{'category': 'pets', 'confidence': 0.5}",
            ("the answer holds no JSON object with a category"),
        ),
    ],
)
def test_parse_rejects_off_schema(text: str, message: str) -> None:
    with pytest.raises(BadAnswer) as info:
        parse_answer(text, language="en")
    assert str(info.value) == message


@given(st.text(max_size=300))
def test_parse_never_raises_anything_but_bad_answer(text: str) -> None:
    try:
        answer = parse_answer(text, language="en")
    except BadAnswer:
        return
    assert answer.category in Category
    assert 0.0 <= answer.confidence <= 1.0


@pytest.mark.parametrize("language", ["zh", "en"])
def test_prompt_names_every_category(language: DescriptionLanguage) -> None:
    for c in Category:
        assert f"- {c.value}:" in user_prompt(language)


def test_prompt_asks_the_description_in_its_language() -> None:
    zh, en = user_prompt("zh"), user_prompt("en")
    # The original backend's instruction, with its full-width punctuation.
    assert '"description": "<简短描述图片内容（中文，30字以内）>"' in zh  # noqa: RUF001
    assert zh.endswith("\nWrite the description in Simplified Chinese, at most 30 characters.")
    assert en.endswith('"description": "<what the photo shows, at most 15 words>"}')
    assert "中文" not in en
    assert zh.split("Answer with only")[0] == en.split("Answer with only")[0]


@pytest.mark.parametrize(
    ("text", "language", "clipped"),
    [
        ("一只猫", "zh", "一只猫"),
        ("猫" * 30, "zh", "猫" * 30),
        ("猫" * 31, "zh", "猫" * 29 + "…"),
        # A full stop at the cut is dropped, not kept before the ellipsis.
        (
            "小猫在窗台上晒太阳。窗外是一片绿色的草地和几棵高大的树木。远处有山",
            "zh",
            "小猫在窗台上晒太阳。窗外是一片绿色的草地和几棵高大的树木…",
        ),
        # An English answer under "zh" is cut at a word boundary when one is near...
        (
            "A fluffy orange cat is sleeping on a sunny windowsill",
            "zh",
            "A fluffy orange cat is…",
        ),
        # ...and mid-word only when none is.
        (
            "Pneumonoultramicroscopicsilicovolcanoconiosis here",
            "zh",
            "Pneumonoultramicroscopicsilic…",
        ),
        ("a cat on a sofa", "en", "a cat on a sofa"),
        (" ".join(f"w{i}" for i in range(15)), "en", " ".join(f"w{i}" for i in range(15))),
        (
            " ".join(f"w{i}" for i in range(16)),
            "en",
            " ".join(f"w{i}" for i in range(15)) + "…",
        ),
        (
            "cats, dogs, birds, fish, frogs, snakes, horses, cows, sheep, goats, ducks, geese, "
            "hens, pigs, mice, and rats",
            "en",
            "cats, dogs, birds, fish, frogs, snakes, horses, cows, sheep, goats, ducks, geese, "
            "hens, pigs, mice…",
        ),
        ("x" * 250, "en", "x" * 199 + "…"),
    ],
)
def test_clip_description(text: str, language: DescriptionLanguage, clipped: str) -> None:
    assert clip_description(text, language) == clipped


@given(st.text(max_size=400), st.sampled_from(["zh", "en"]))
def test_clipped_descriptions_keep_to_the_limit(text: str, language: DescriptionLanguage) -> None:
    clipped = clip_description(" ".join(text.split()), language)
    if language == "zh":
        assert len(clipped) <= 30
    else:
        assert len(clipped) <= 200
        assert len(clipped.split(" ")) <= 15


def test_parse_clips_a_long_description() -> None:
    long = json.dumps({"category": "pets", "confidence": 0.9, "description": "猫" * 40})
    assert parse_answer(long, language="zh").description == "猫" * 29 + "…"
    assert parse_answer(long, language="en").description == "猫" * 40


def answer_text(kind: str, body: object) -> str:
    return wire_format(kind).answer_text(body)


def test_answer_text_formats() -> None:
    assert answer_text("openai", {"choices": [{"message": {"content": "hi"}}]}) == "hi"
    assert (
        answer_text("openai", {"choices": [{"message": {"content": [{"text": "a"}, {"x": 1}]}}]})
        == "a"
    )
    assert answer_text("anthropic", {"content": [{"type": "text", "text": "hi"}]}) == "hi"
    for kind, body in [
        ("openai", {"choices": []}),
        ("openai", {"error": "x"}),
        ("openai", [1]),
        ("anthropic", {"content": "x"}),
        ("anthropic", {"content": [{"type": "tool_use"}]}),
    ]:
        with pytest.raises(BadAnswer):
            answer_text(kind, body)


def test_retry_after_parsing() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3", now=now) == 3.0
    assert parse_retry_after(" 1.5 ", now=now) == 1.5
    assert parse_retry_after("-4", now=now) == 0.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:07 GMT", now=now) == 7.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("inf") is None


# --- the upload image --------------------------------------------------------------


def upload_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        assert img.mode == "RGB"
        return img.size


def test_downscale_respects_the_longest_side() -> None:
    up = prepare_upload(jpeg((3000, 1000)), max_side_px=1024, quality=85)
    assert (up.width, up.height) == (1024, 341) == upload_size(up.jpeg)
    assert base64.b64decode(up.b64) == up.jpeg
    small = prepare_upload(jpeg((300, 200)), max_side_px=1024, quality=85)
    assert upload_size(small.jpeg) == (300, 200)
    assert prepare_upload(jpeg((300, 200)), max_side_px=1024, quality=85) == small
    assert up.b64 not in repr(up)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (200, 100), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = io.BytesIO()
    img.save(out, "JPEG", exif=exif)
    up = prepare_upload(out.getvalue(), max_side_px=64, quality=85)
    assert upload_size(up.jpeg) == (32, 64)


def test_alpha_is_composited_on_white() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(out, "PNG")
    up = prepare_upload(out.getvalue(), max_side_px=1024, quality=95)
    with Image.open(io.BytesIO(up.jpeg)) as img:
        r, g, b = img.getpixel((20, 20))  # type: ignore[misc]
    assert min(r, g, b) > 245


def test_16_bit_grayscale_is_scaled() -> None:
    out = io.BytesIO()
    Image.new("I;16", (20, 20), 1000).save(out, "PNG")
    assert upload_size(prepare_upload(out.getvalue(), max_side_px=64, quality=85).jpeg) == (
        20,
        20,
    )


def test_garbage_is_not_uploadable() -> None:
    with pytest.raises(ImageNotUploadable) as info:
        prepare_upload(b"not an image", max_side_px=1024, quality=85)
    assert str(info.value) == (
        "the image could not be prepared for upload (UnidentifiedImageError)"
    )


# --- request shapes (httpx.MockTransport) ---------------------------------------------


def provider(kind: str, base_url: str, *, api_key: str = KEY, **params: Any) -> ProviderConfig:
    return ProviderConfig("p", kind, base_url, "model-x", 5.0, 123, api_key=api_key, **params)  # type: ignore[arg-type]


def openai_ok(text: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"content": text}}]})


async def attempt_with(
    cfg: ProviderConfig, handler: httpx.MockTransport, *, language: DescriptionLanguage = "zh"
) -> tuple[object, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    inner = handler.handle_async_request

    async def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        await request.aread()
        return await inner(request)

    transport = httpx.MockTransport(record)
    client = ProviderClient(cfg, language=language, callers=2, transport=transport)
    up = prepare_upload(jpeg((2000, 1500)), max_side_px=1024, quality=85)
    try:
        with trio.fail_after(5):
            result: object = await client.attempt(up)
    except Exception as exc:
        result = exc
    finally:
        await client.aclose()
    return result, seen


async def test_openai_request_shape() -> None:
    answer = '{"category": "foods", "confidence": 0.7, "description": "noodles"}'
    result, seen = await attempt_with(
        provider("openai", "https://llm.example/v1"),
        httpx.MockTransport(lambda r: openai_ok(answer)),
    )
    assert getattr(result, "category", None) is Category.FOODS
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "https://llm.example/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert "x-api-key" not in request.headers
    body = json.loads(request.content)
    assert body["model"] == "model-x"
    assert body["max_tokens"] == 123
    system, user = body["messages"]
    assert system["role"] == "system"
    text, image = user["content"]
    assert text == {"type": "text", "text": user_prompt("zh")}
    url = image["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert upload_size(base64.b64decode(url.split(",", 1)[1])) == (1024, 768)


async def test_anthropic_request_shape() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        text = 'Answer: {"category": "idcard", "confidence": 0.95, "description": "a passport"}'
        return httpx.Response(200, json={"content": [{"type": "text", "text": text}]})

    result, seen = await attempt_with(
        provider("anthropic", "https://api.example"), httpx.MockTransport(handler)
    )
    assert getattr(result, "category", None) is Category.IDCARD
    (request,) = seen
    assert str(request.url) == "https://api.example/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    body = json.loads(request.content)
    assert (body["model"], body["max_tokens"]) == ("model-x", 123)
    assert isinstance(body["system"], str)
    (message,) = body["messages"]
    image, text = message["content"]
    assert image["type"] == "image"
    assert image["source"]["type"] == "base64"
    assert image["source"]["media_type"] == "image/jpeg"
    assert upload_size(base64.b64decode(image["source"]["data"])) == (1024, 768)
    assert text == {"type": "text", "text": user_prompt("zh")}


@pytest.mark.parametrize("language", ["zh", "en"])
async def test_request_parameters_default_as_before(language: DescriptionLanguage) -> None:
    for kind, url in (("openai", "https://llm.example/v1"), ("anthropic", "https://api.example")):
        _, seen = await attempt_with(
            provider(kind, url), httpx.MockTransport(lambda r: openai_ok("{}")), language=language
        )
        body = json.loads(seen[0].content)
        assert (body["max_tokens"], body["temperature"]) == (123, 0)
        assert "max_completion_tokens" not in body
        texts = [
            p["text"]
            for m in body["messages"]
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "text"
        ]
        assert texts == [user_prompt(language)]


async def test_request_parameters_for_reasoning_models() -> None:
    cfg = provider(
        "openai",
        "https://api.openai.com/v1",
        token_limit_param="max_completion_tokens",
        temperature=None,
        extra_body={"reasoning_effort": "minimal", "metadata": {"app": "xintu"}},
    )
    _, seen = await attempt_with(cfg, httpx.MockTransport(lambda r: openai_ok("{}")))
    body = json.loads(seen[0].content)
    assert body["max_completion_tokens"] == 123
    assert "max_tokens" not in body
    assert "temperature" not in body
    assert (body["reasoning_effort"], body["metadata"]) == ("minimal", {"app": "xintu"})
    assert body["model"] == "model-x"


async def test_anthropic_always_sends_max_tokens() -> None:
    # The configuration refuses max_completion_tokens for anthropic; the body keeps to it.
    cfg = provider(
        "anthropic",
        "https://api.example",
        token_limit_param="max_completion_tokens",
        temperature=0.5,
    )
    _, seen = await attempt_with(cfg, httpx.MockTransport(lambda r: openai_ok("{}")))
    body = json.loads(seen[0].content)
    assert (body["max_tokens"], body["temperature"]) == (123, 0.5)
    assert "max_completion_tokens" not in body


async def test_no_key_no_auth_header() -> None:
    _, seen = await attempt_with(
        provider("openai", "http://127.0.0.1:1/v1", api_key=""),
        httpx.MockTransport(lambda r: openai_ok("{}")),
    )
    assert "authorization" not in seen[0].headers


def _raise(exc: Exception) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("transport", "error", "message", "retryable"),
    [
        (
            httpx.MockTransport(lambda r: httpx.Response(500, text=f"boom {KEY}")),
            UpstreamServerError,
            "p: server error (500)",
            True,
        ),
        (
            httpx.MockTransport(
                lambda r: httpx.Response(429, headers={"retry-after": "4"}, json={})
            ),
            UpstreamRateLimited,
            "p: rate limited (429)",
            True,
        ),
        (
            httpx.MockTransport(lambda r: httpx.Response(401, json={"error": KEY})),
            UpstreamRejected,
            "p: request rejected (401)",
            False,
        ),
        (
            _raise(httpx.ConnectError("refused")),
            UpstreamUnreachable,
            "p: transport error (ConnectError)",
            True,
        ),
        (_raise(httpx.ReadTimeout("slow")), UpstreamTimeout, "p: no answer in time", True),
        (
            httpx.MockTransport(lambda r: httpx.Response(200, text="<html>")),
            BadAnswer,
            "p: the response is not JSON",
            False,
        ),
        (
            httpx.MockTransport(lambda r: openai_ok("no idea")),
            BadAnswer,
            "p: the answer holds no JSON object with a category",
            False,
        ),
    ],
)
async def test_failures_are_translated(
    transport: httpx.MockTransport, error: type[Exception], message: str, retryable: bool
) -> None:
    result, _ = await attempt_with(provider("openai", "https://llm.example/v1"), transport)
    assert type(result) is error
    assert str(result) == message
    assert getattr(result, "retryable", False) is retryable
    assert KEY not in str(result)
    if isinstance(result, UpstreamRateLimited):
        assert result.retry_after_s == 4.0
        assert result.status == 429


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "error": {
                    "message": "Unsupported value: 'temperature' does not support 0 with this "
                    "model. Only the default (1) value is supported.",
                    "type": "invalid_request_error",
                    "param": "temperature",
                    "code": "unsupported_value",
                }
            },
            "Unsupported value: 'temperature' does not support 0 with this model. Only the "
            "default (1) value is supported. (param: temperature, code: unsupported_value)",
        ),
        (
            {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "bad\n\tmodel"},
            },
            "bad model",
        ),
        (
            {"object": "error", "message": "max_tokens is too large", "code": 400},
            "max_tokens is too large",
        ),
        ({"error": "model 'qwen' not found"}, "model 'qwen' not found"),
        (
            {"error": {"message": f"Incorrect API key provided: {KEY}."}},
            "Incorrect API key provided: ***.",
        ),
        (
            {"error": {"message": "leaked sk-proj-abcdefgh123 and Bearer abc.def-ghi"}},
            "leaked sk-*** and Bearer ***",
        ),
        ({"error": {"message": "x" * 500}}, "x" * 299 + "…"),
        ({"error": {"code": 400}}, None),
        ({"error": {"message": "  "}}, None),
        ([1, 2], None),
    ],
)
def test_upstream_message(body: object, message: str | None) -> None:
    assert upstream_message(json.dumps(body).encode(), api_key=KEY) == message


def test_upstream_message_of_text_and_of_nothing() -> None:
    assert upstream_message(b"<html>Bad\r\nRequest</html>") == "<html>Bad Request</html>"
    assert upstream_message(b"") is None
    assert upstream_message(b"x" * (1 << 20)) is None


async def test_a_rejection_carries_the_upstream_message_apart() -> None:
    refusal = {
        "error": {
            "message": f"Unsupported parameter: 'max_tokens' (key {KEY})",
            "param": "max_tokens",
        }
    }
    result, _ = await attempt_with(
        provider("openai", "https://llm.example/v1"),
        httpx.MockTransport(lambda r: httpx.Response(400, json=refusal)),
    )
    assert type(result) is UpstreamRejected
    assert str(result) == "p: request rejected (400)"
    assert repr(result) == "UpstreamRejected('p: request rejected (400)')"
    assert result.upstream_message == (
        "Unsupported parameter: 'max_tokens' (key ***) (param: max_tokens)"
    )

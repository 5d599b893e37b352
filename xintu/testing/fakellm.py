"""A fake multimodal LLM upstream on loopback, for tests and the benchmark harness.

It speaks both wire formats Xintu uses, on any path prefix:

* ``POST .../chat/completions``: OpenAI-compatible chat completions (image as a
  ``data:image/jpeg;base64,`` URL);
* ``POST .../messages``: Anthropic's Messages API (base64 image block,
  ``anthropic-version`` header).

So ``http://127.0.0.1:PORT/v1`` works as an OpenAI ``base_url`` and
``http://127.0.0.1:PORT`` as an Anthropic one. It answers deterministically from the
uploaded image bytes (:func:`fake_answer`) or with a fixed category, and its
behaviour is a :class:`Behaviour` that can change at run time:

* latency: lognormal with ``latency_median_ms`` and ``latency_sigma`` (0: exact);
* faults: ``fail_next`` (the next N calls fail: deterministic), ``error_rate``
  (each call fails with that probability), an outage window (every call fails);
  how a call fails is ``error_mode``: ``status`` (``error_status``, e.g. 500 or
  429, with ``Retry-After: retry_after`` if set), ``hang`` (no answer for
  ``hang_s``, so the client times out), ``malformed`` (200, no JSON in the text),
  ``off_schema`` (200, a category outside the eight);
* ``answer``: ``"hash"`` or one of the eight category keys; ``answer_style``:
  ``plain`` JSON, ``fenced`` in a code fence, ``prose`` with text around it; the
  description is in Chinese when the prompt asks for Chinese (it says 中文), else
  in English;
* ``api_key``: when set, a call without it is answered 401;
* ``reasoning_model``: answer like OpenAI's o-series and gpt-5 models, which
  refuse ``max_tokens`` (they take ``max_completion_tokens``) and any
  ``temperature`` but 1 with a 400 and OpenAI's error message.

Control and statistics: ``GET /_fake/stats`` (calls, by API and status, in
flight, distinct images; ``?images=1`` adds the calls per uploaded image's
SHA-256), ``POST /_fake/control`` with a JSON object of :class:`Behaviour`
fields (``outage_start_s`` there is relative to now), and ``POST /_fake/reset``
(zero the statistics).

In-process (tests)::

    async with run_fake_llm(latency_median_ms=5) as fake:
        fake.openai_base_url, fake.anthropic_base_url, fake.stats(), fake.behaviour

As a process (benchmarks), serving until SIGINT/SIGTERM and printing
``fakellm listening on http://127.0.0.1:PORT``::

    python -m xintu.testing.fakellm --port 8100 --latency-median-ms 400 --latency-sigma 0.5 \\
        --outage-start-s 20 --outage-duration-s 20

It is a bare ASGI app on Hypercorn (the fastest server on this stack) and binds
loopback addresses only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import json
import math
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from .._types import CATEGORIES

__all__ = ["Behaviour", "FakeLlm", "fake_answer", "main", "run_fake_llm"]

_ERROR_MODES = ("status", "hang", "malformed", "off_schema")
_ANSWER_STYLES = ("plain", "fenced", "prose")
_MAX_BODY_BYTES = 64 << 20
_DATA_URL_PREFIX = "data:image/jpeg;base64,"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def fake_answer(image: bytes) -> tuple[str, float]:
    """The ``hash`` rule: (category, confidence) from the uploaded image's SHA-256."""
    digest = hashlib.sha256(image).digest()
    return CATEGORIES[digest[0] % len(CATEGORIES)], round(0.5 + digest[1] / 510, 3)


@dataclass
class Behaviour:
    """What the fake does; mutable at run time (attributes, or ``/_fake/control``).

    ``outage_start_s`` is in ``trio.current_time()`` seconds relative to the
    server's start when given to the constructor or the command line; through
    ``/_fake/control`` it is relative to the moment of the request.
    """

    latency_median_ms: float = 0.0
    latency_sigma: float = 0.0
    error_rate: float = 0.0
    error_mode: str = "status"
    error_status: int = 500
    retry_after: str | None = None
    fail_next: int = 0
    outage_start_s: float | None = None
    outage_duration_s: float = 0.0
    hang_s: float = 3600.0
    answer: str = "hash"
    answer_style: str = "plain"
    api_key: str | None = field(default=None, repr=False)
    reasoning_model: bool = False

    def check(self) -> None:
        """Raise ValueError on a value the fake cannot act on."""
        if self.error_mode not in _ERROR_MODES:
            raise ValueError(f"error_mode must be one of {', '.join(_ERROR_MODES)}")
        if self.answer_style not in _ANSWER_STYLES:
            raise ValueError(f"answer_style must be one of {', '.join(_ANSWER_STYLES)}")
        if self.answer != "hash" and self.answer not in CATEGORIES:
            raise ValueError("answer must be 'hash' or one of the eight category keys")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within 0..1")
        if not 100 <= self.error_status <= 599:
            raise ValueError("error_status must be an HTTP status")
        if self.latency_median_ms < 0 or self.latency_sigma < 0 or self.hang_s < 0:
            raise ValueError("latencies must not be negative")


class _BadRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


# The categories' names in the fake's Chinese descriptions.
_ZH_NAMES: Mapping[str, str] = {
    "social_activities": "聚会",
    "pets": "宠物",
    "single_person": "人像",
    "foods": "美食",
    "travel_scenery": "风景",
    "screenshot": "截图",
    "idcard": "证件",
    "other": "物品",
}


class FakeLlm:
    """The ASGI app: one instance per server; ``behaviour`` may be changed at any time."""

    def __init__(self, behaviour: Behaviour | None = None, *, seed: int | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.behaviour.check()
        self.base_url = ""
        self._rng = random.Random(seed)
        self._started_at = 0.0
        self._outage: tuple[float, float] | None = None
        self._serial = 0
        self.reset()

    # --- knobs and statistics ------------------------------------------------------

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.base_url

    def reset(self) -> None:
        """Zero the statistics (the behaviour stays)."""
        self.calls = 0
        self.failed = 0
        self.bad_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_api: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.images: Counter[str] = Counter()

    def stats(self, *, images: bool = False) -> dict[str, Any]:
        """Calls (requests that reached an API route), by API and status; per image if asked.

        ``images`` adds the call count per uploaded image's SHA-256 (large after a
        long benchmark; ``GET /_fake/stats?images=1``).
        """
        out = {
            "calls": self.calls,
            "failed": self.failed,
            "bad_requests": self.bad_requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "by_api": dict(self.by_api),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "distinct_images": len(self.images),
            "max_calls_per_image": max(self.images.values(), default=0),
            "in_outage": self.in_outage(),
        }
        if images:
            out["images"] = dict(self.images)
        return out

    def set_outage(self, start_s: float | None, duration_s: float) -> None:
        """Fail every call from *start_s* seconds from now, for *duration_s* seconds."""
        b = self.behaviour
        b.outage_duration_s = duration_s
        b.outage_start_s = start_s
        self._outage = None
        if start_s is not None:
            start = trio.current_time() + start_s
            self._outage = (start, start + duration_s)

    def in_outage(self) -> bool:
        if self._outage is None:
            return False
        start, end = self._outage
        return start <= trio.current_time() < end

    def control(self, changes: Mapping[str, Any]) -> None:
        """Apply *changes* (Behaviour field names) atomically; ValueError if bad."""
        names = {f.name for f in dataclasses.fields(Behaviour)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        updated = dataclasses.replace(self.behaviour, **changes)
        updated.check()
        outage_changed = {"outage_start_s", "outage_duration_s"} & set(changes)
        self.behaviour = updated
        if outage_changed:
            self.set_outage(updated.outage_start_s, updated.outage_duration_s)

    # --- ASGI ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # pragma: no cover - websockets are not served
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/_fake/"):
            query: bytes = scope.get("query_string", b"")
            await self._fake_route(method, path, b"images=1" in query, receive, send)
            return
        if method != "POST":
            await _json(send, 405, {"error": {"message": "method not allowed"}})
            return
        if path.endswith("/chat/completions"):
            api = "openai"
        elif path.endswith("/messages"):
            api = "anthropic"
        else:
            await _json(send, 404, {"error": {"message": "not found"}})
            return
        body = await _read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.calls += 1
        self.by_api[api] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status = await self._api(api, headers, body, send)
        finally:
            self.in_flight -= 1
        self.by_status[status] += 1
        if status != 200:
            self.failed += 1

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._started_at = trio.current_time()
                b = self.behaviour
                if b.outage_start_s is not None and self._outage is None:
                    start = self._started_at + b.outage_start_s
                    self._outage = (start, start + b.outage_duration_s)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _fake_route(
        self, method: str, path: str, images: bool, receive: Receive, send: Send
    ) -> None:
        if path == "/_fake/stats" and method == "GET":
            await _json(send, 200, self.stats(images=images))
        elif path == "/_fake/reset" and method == "POST":
            self.reset()
            await _json(send, 200, self.stats())
        elif path == "/_fake/control" and method == "POST":
            try:
                changes = json.loads(await _read_body(receive))
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                self.control(changes)
            except (ValueError, TypeError) as exc:
                await _json(send, 400, {"error": str(exc)})
                return
            shown = dataclasses.asdict(self.behaviour)
            shown["api_key"] = "***" if shown["api_key"] else None
            await _json(send, 200, shown)
        else:
            await _json(send, 404, {"error": "not found"})

    def _fails_now(self) -> bool:
        b = self.behaviour
        if b.fail_next > 0:
            b.fail_next -= 1
            return True
        if self.in_outage():
            return True
        return b.error_rate > 0 and self._rng.random() < b.error_rate

    async def _api(self, api: str, headers: Mapping[str, str], body: bytes, send: Send) -> int:
        b = self.behaviour
        if b.api_key is not None and _key(api, headers) != b.api_key:
            return await _error(send, api, 401, "invalid api key")
        try:
            model, image, prompt = _parse_request(api, headers, body)
            if b.reasoning_model and api == "openai":
                _check_reasoning_params(body)
        except _BadRequest as exc:
            self.bad_requests += 1
            return await _error(send, api, 400, str(exc), param=exc.param, code=exc.code)
        self.images[hashlib.sha256(image).hexdigest()] += 1

        if b.latency_median_ms > 0:
            factor = math.exp(self._rng.gauss(0.0, b.latency_sigma)) if b.latency_sigma else 1.0
            await trio.sleep(b.latency_median_ms * factor / 1000.0)

        mode = b.error_mode if self._fails_now() else None
        if mode == "status":
            extra = [(b"retry-after", b.retry_after.encode())] if b.retry_after else []
            return await _error(send, api, b.error_status, "fake failure", extra)
        if mode == "hang":
            await trio.sleep(b.hang_s)
            return await _error(send, api, 504, "fake hang over")

        if b.answer == "hash":
            category, confidence = fake_answer(image)
        else:
            category, confidence = b.answer, 0.9
        if "中文" in prompt:
            description = f"一张模拟的{_ZH_NAMES[category]}照片"
        else:
            description = f"a fake {category.replace('_', ' ')} photo"
        answer = json.dumps(
            {"category": category, "confidence": confidence, "description": description},
            ensure_ascii=False,
        )
        if mode == "malformed":
            text = "I am not sure what this photo shows."
        elif mode == "off_schema":
            text = json.dumps({"category": "landscape", "confidence": 0.9})
        elif b.answer_style == "fenced":
            text = f"```json\n{answer}\n```"
        elif b.answer_style == "prose":
            text = f"Here is the classification you asked for:\n{answer}\nI hope this helps."
        else:
            text = answer
        self._serial += 1
        await _json(send, 200, _completion(api, self._serial, model, text))
        return 200


def _key(api: str, headers: Mapping[str, str]) -> str | None:
    if api == "anthropic":
        return headers.get("x-api-key")
    auth = headers.get("authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else None


def _parse_request(api: str, headers: Mapping[str, str], body: bytes) -> tuple[str, bytes, str]:
    """(model, image bytes, prompt text) from a well-formed request; _BadRequest otherwise.

    The prompt text is every text part of every message, and the system prompt.
    """
    try:
        req = json.loads(body)
    except ValueError:
        raise _BadRequest("the body is not JSON") from None
    if not isinstance(req, dict):
        raise _BadRequest("the body is not a JSON object")
    model = req.get("model")
    messages = req.get("messages")
    if not isinstance(model, str) or not model:
        raise _BadRequest("model is required")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages is required")
    limits = ("max_tokens",) if api == "anthropic" else ("max_tokens", "max_completion_tokens")
    if not any(isinstance(req.get(name), int) for name in limits):
        raise _BadRequest(f"{' or '.join(limits)} is required")
    texts: list[str] = [req["system"]] if isinstance(req.get("system"), str) else []
    encoded: str | None = None
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            if api == "openai" and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if isinstance(url, str) and url.startswith(_DATA_URL_PREFIX):
                    encoded = url[len(_DATA_URL_PREFIX) :]
            elif api == "anthropic" and part.get("type") == "image":
                source = part.get("source") or {}
                if source.get("type") == "base64" and source.get("media_type") == "image/jpeg":
                    encoded = source.get("data")
    if api == "anthropic" and not headers.get("anthropic-version"):
        raise _BadRequest("anthropic-version header is required")
    if not isinstance(encoded, str):
        raise _BadRequest("no JPEG image in the request")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _BadRequest("the image is not valid base64") from None
    if not image.startswith(b"\xff\xd8"):
        raise _BadRequest("the image is not a JPEG")
    return model, image, "\n".join(texts)


def _check_reasoning_params(body: bytes) -> None:
    """Refuse what OpenAI's reasoning models refuse, with their messages."""
    req = json.loads(body)  # parsed once already: a JSON object
    if "max_tokens" in req:
        raise _BadRequest(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            param="max_tokens",
            code="unsupported_parameter",
        )
    temperature = req.get("temperature", 1)
    if temperature != 1:
        raise _BadRequest(
            f"Unsupported value: 'temperature' does not support {temperature} with this "
            "model. Only the default (1) value is supported.",
            param="temperature",
            code="unsupported_value",
        )


def _completion(api: str, serial: int, model: str, text: str) -> dict[str, Any]:
    if api == "anthropic":
        return {
            "id": f"msg_fake_{serial}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 1000, "output_tokens": 30},
        }
    return {
        "id": f"chatcmpl-fake-{serial}",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 30, "total_tokens": 1030},
    }


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise trio.BrokenResourceError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            raise trio.BrokenResourceError("body too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _json(
    send: Send,
    status: int,
    payload: object,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _error(
    send: Send,
    api: str,
    status: int,
    message: str,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    param: str | None = None,
    code: str | None = None,
) -> int:
    client_error = 400 <= status < 500
    if api == "anthropic":
        kind = "invalid_request_error" if client_error else "api_error"
        payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = "invalid_request_error" if client_error else "server_error"
        payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    await _json(send, status, payload, extra_headers)
    return status


# --- serving -----------------------------------------------------------------------


def _asgi(fake: FakeLlm) -> ASGIFramework:
    # FakeLlm is a plain ASGI callable over mutable mappings; Hypercorn's types are
    # TypedDicts per event, which a hand-written app need not spell out.
    return cast(ASGIFramework, fake)


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the fake LLM binds loopback addresses only, not {host!r}")


def _hypercorn_config(host: str, port: int, *, quiet: bool) -> HypercornConfig:
    _check_loopback(host)
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    if quiet:
        config.errorlog = None
    config.graceful_timeout = 0.5
    config.keep_alive_timeout = 30.0
    return config


@asynccontextmanager
async def run_fake_llm(
    behaviour: Behaviour | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int | None = 0,
    **knobs: Any,
) -> AsyncIterator[FakeLlm]:
    """Serve a :class:`FakeLlm` on loopback for the body of the ``async with``.

    *knobs* are :class:`Behaviour` fields (when *behaviour* is not given).
    """
    fake = FakeLlm(behaviour or Behaviour(**knobs), seed=seed)
    config = _hypercorn_config(host, port, quiet=True)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, _asgi(fake), config))
        fake.base_url = binds[0]
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xintu.testing.fakellm",
        description="A fake OpenAI- and Anthropic-compatible multimodal LLM on loopback.",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8100, help="0 picks a free port")
    p.add_argument("--latency-median-ms", type=float, default=0.0)
    p.add_argument("--latency-sigma", type=float, default=0.0, help="lognormal sigma")
    p.add_argument("--error-rate", type=float, default=0.0, help="0..1")
    p.add_argument("--error-mode", choices=_ERROR_MODES, default="status")
    p.add_argument("--error-status", type=int, default=500)
    p.add_argument("--retry-after", default=None, help="Retry-After header on errors")
    p.add_argument("--outage-start-s", type=float, default=None, help="after server start")
    p.add_argument("--outage-duration-s", type=float, default=0.0)
    p.add_argument("--hang-s", type=float, default=3600.0)
    p.add_argument("--answer", default="hash", help="'hash' or a category key")
    p.add_argument("--answer-style", choices=_ANSWER_STYLES, default="plain")
    p.add_argument("--api-key", default=None, help="require this key")
    p.add_argument(
        "--reasoning-model",
        action="store_true",
        help="refuse max_tokens and temperature like OpenAI's o-series and gpt-5 models",
    )
    p.add_argument("--seed", type=int, default=None)
    return p


async def _serve_forever(fake: FakeLlm, config: HypercornConfig) -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        binds: list[str] = await nursery.start(partial(serve, _asgi(fake), config))
        fake.base_url = binds[0]
        print(f"fakellm listening on {binds[0]}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        behaviour = Behaviour(
            latency_median_ms=args.latency_median_ms,
            latency_sigma=args.latency_sigma,
            error_rate=args.error_rate,
            error_mode=args.error_mode,
            error_status=args.error_status,
            retry_after=args.retry_after,
            outage_start_s=args.outage_start_s,
            outage_duration_s=args.outage_duration_s,
            hang_s=args.hang_s,
            answer=args.answer,
            answer_style=args.answer_style,
            api_key=args.api_key,
            reasoning_model=args.reasoning_model,
        )
        fake = FakeLlm(behaviour, seed=args.seed)
        config = _hypercorn_config(args.host, args.port, quiet=False)
    except ValueError as exc:
        print(f"fakellm: {exc}", file=sys.stderr)
        return 2
    trio.run(_serve_forever, fake, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

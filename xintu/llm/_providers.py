"""One attempt at one provider, in its wire format.

The request's path, headers and body, and the reading of the answer's text, are
the provider's wire format's (:mod:`xintu.llm.wire`, one module per
``ProviderConfig.kind``); so are the request's parameters (the token limit
field, the temperature or none, and extra fields).

Each :class:`ProviderClient` owns its ``httpx.AsyncClient`` (connection pooling,
keep-alive) for its whole life; no SDKs. :meth:`ProviderClient.attempt` makes one
HTTP request and either returns a :class:`~xintu.llm._parse.ParsedAnswer` or
raises an :class:`~xintu.llm.UpstreamError` (httpx's errors translated with
``raise ... from``) or :class:`~xintu.llm.BadAnswer`. Retries, deadlines and the
breaker are the pool's business. Upstream bodies, headers and keys never reach an
error message. An error answer's own message (``{"error": {"message": ...}}``),
without the API key or anything that looks like one, and at most
:data:`UPSTREAM_MESSAGE_CHARS` long, rides on the error as ``upstream_message``
for the operator's log: a 400 for a parameter the model refuses says so there.

One client serves up to :data:`LANE_CONNECTIONS` callers; with more callers the
provider keeps one client per that many, each caller pinned to one (its *lane*).
The reason is httpcore 1.0's pool, which does work quadratic in its connection
count on every request (its keep-alive check counts all connections for each
one): measured against the fake upstream, 64 workers on one client ran about 160
calls/s, 8 workers about 600/s; with lanes, 64 workers ran about 780/s. No
client holds more than 8 connections, and as a caller makes one request at a
time, no request ever queues inside a client.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from datetime import UTC, datetime

import httpx

from ._config import ProviderConfig
from ._errors import (
    BadAnswer,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ._image import UploadImage
from ._parse import DescriptionLanguage, ParsedAnswer, parse_answer
from .wire import wire_format

__all__ = [
    "LANE_CONNECTIONS",
    "UPSTREAM_MESSAGE_CHARS",
    "ProviderClient",
    "parse_retry_after",
    "upstream_message",
]

#: Most callers (so connections) on one ``httpx.AsyncClient``; see the module docstring.
LANE_CONNECTIONS = 8
_MAX_BODY_BYTES = 1 << 20  # an answer is a few hundred bytes; refuse megabytes
#: Longest upstream error message kept for the log.
UPSTREAM_MESSAGE_CHARS = 300
_MAX_ERROR_BODY_BYTES = 64 << 10
# Things that look like credentials, whoever's: OpenAI-style keys, bearer tokens.
_SECRET_RE = re.compile(r"\b(sk-|Bearer\s+)[A-Za-z0-9._\-]{6,}", re.IGNORECASE)


def upstream_message(content: bytes, *, api_key: str = "") -> str | None:
    """The message of an error response body, fit for a log line; None if it has none.

    Takes ``error.message`` (OpenAI, Anthropic, DashScope, Ollama), ``error`` as a
    string, or ``message`` (vLLM), adding ``param`` and ``code`` where given; a
    body that is not JSON gives its text. The API key and anything that looks like
    a key or a bearer token are replaced by ``***``; control characters and runs of
    spaces are collapsed; at most :data:`UPSTREAM_MESSAGE_CHARS` characters.
    """
    if not content or len(content) > _MAX_ERROR_BODY_BYTES:
        return None
    text = content.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        message: object = text
    else:
        message = None
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict):
                message = error.get("message")
                extras = [
                    f"{k}: {v}"
                    for k in ("param", "code")
                    if isinstance(v := error.get(k), str) or type(v) is int
                ]
                if isinstance(message, str) and extras:
                    message = f"{message} ({', '.join(extras)})"
            elif isinstance(error, str):
                message = error
            elif isinstance(body.get("message"), str):
                message = body["message"]
    if not isinstance(message, str):
        return None
    if api_key:
        message = message.replace(api_key, "***")
    message = _SECRET_RE.sub(lambda m: m.group(1) + "***", message)
    message = " ".join("".join(c if c.isprintable() else " " for c in message).split())
    if not message:
        return None
    if len(message) > UPSTREAM_MESSAGE_CHARS:
        message = message[: UPSTREAM_MESSAGE_CHARS - 1] + "…"
    return message


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class ProviderClient:
    """One provider: its settings and its shared ``httpx.AsyncClient`` (one per lane).

    *language* is the description's (``[llm] description_language``). *callers* is
    the number of tasks that call :meth:`attempt` concurrently, each with its own
    ``lane`` in ``range(callers)``.
    """

    def __init__(
        self,
        cfg: ProviderConfig,
        *,
        language: DescriptionLanguage,
        callers: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.wire = wire_format(cfg.kind)
        self.language: DescriptionLanguage = language
        sizes = [
            min(LANE_CONNECTIONS, callers - start)
            for start in range(0, max(callers, 1), LANE_CONNECTIONS)
        ]
        self._clients = [
            httpx.AsyncClient(
                base_url=cfg.base_url,
                headers=self.wire.headers(cfg),
                timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 5.0)),
                limits=httpx.Limits(
                    max_connections=max(size, 1), max_keepalive_connections=max(size, 1)
                ),
                transport=transport,
                follow_redirects=False,
            )
            for size in sizes
        ]

    def __repr__(self) -> str:
        return f"<ProviderClient {self.cfg.name} {self.cfg.kind} {self.cfg.model}>"

    @property
    def name(self) -> str:
        return self.cfg.name

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def attempt(self, image: UploadImage, *, lane: int = 0) -> ParsedAnswer:
        """One request. The caller bounds it with its own cancel scope as well."""
        name = self.cfg.name
        client = self._clients[(lane // LANE_CONNECTIONS) % len(self._clients)]
        try:
            response = await client.post(
                self.wire.path(self.cfg),
                json=self.wire.body(self.cfg, image, language=self.language),
            )
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(name, "no answer in time") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnreachable(name, f"transport error ({type(exc).__name__})") from exc
        status = response.status_code
        if status != 200:
            error = _status_error(name, status, response.headers.get("retry-after"))
            error.upstream_message = upstream_message(response.content, api_key=self.cfg.api_key)
            raise error
        if len(response.content) > _MAX_BODY_BYTES:
            raise BadAnswer(f"{name}: the response is too large")
        try:
            body = json.loads(response.content)
        except ValueError as exc:
            raise BadAnswer(f"{name}: the response is not JSON") from exc
        try:
            return parse_answer(self.wire.answer_text(body), language=self.language)
        except BadAnswer as exc:
            raise BadAnswer(f"{name}: {exc.message}") from exc


def _status_error(name: str, status: int, retry_after: str | None) -> UpstreamError:
    delay = parse_retry_after(retry_after)
    if status == 429:
        return UpstreamRateLimited(name, "rate limited (429)", status=status, retry_after_s=delay)
    if status >= 500 or status == 408:
        return UpstreamServerError(
            name, f"server error ({status})", status=status, retry_after_s=delay
        )
    return UpstreamRejected(name, f"request rejected ({status})", status=status)

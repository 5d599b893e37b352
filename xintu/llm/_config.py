"""The LLM classifier's configuration: the ``[llm]`` table plus the environment.

:func:`llm_config_from` builds one frozen :class:`LlmConfig` from a TOML-like
``[llm]`` table (``raw``; missing keys take the defaults below) and the process
environment (``env``), the environment winning. The block to paste into
``xintu/defaults.toml``, equal to :data:`DEFAULTS` (a test keeps them in step)::

    [llm]
    # Ordered provider chain, e.g. ["openai", "anthropic"]; empty: local model only.
    # XINTU_LLM_PROVIDERS="openai,anthropic" overrides it. Each provider NAME is set
    # by XINTU_LLM_<NAME>_BASE_URL, _API_KEY, _MODEL, _KIND ("openai" or "anthropic"),
    # _TIMEOUT_S, _MAX_TOKENS, _TOKEN_LIMIT_PARAM, _TEMPERATURE and _EXTRA_BODY, or by
    # a [llm.provider.NAME] table with the same keys in lower case. The names openai,
    # anthropic and dashscope have default endpoints and models and also read
    # OPENAI_API_KEY, ANTHROPIC_API_KEY and DASHSCOPE_API_KEY.
    # Request parameters per provider: token_limit_param is "max_tokens" (the
    # default; anthropic takes only that) or "max_completion_tokens", which OpenAI's
    # o-series and gpt-5 models want (their reasoning counts against it: raise
    # max_tokens, or lower the effort with extra_body); temperature is a number
    # (default 0) or "default" to send none (those models refuse any other);
    # extra_body is a JSON object merged into every request, e.g.
    # {"reasoning_effort": "low"} or vLLM's, Ollama's or DashScope's own options;
    # it may not replace a field Xintu sets.
    providers = []
    # Concurrent upstream calls, and the LLM pool's inbox bound (full: local model).
    workers = 8
    inbox_size = 64
    # Seconds of the request's deadline kept for the local fallback; an LLM call
    # that would start with less than this left is not made.
    fallback_reserve_s = 1.5
    # Default per-attempt timeout and answer length of every provider.
    timeout_s = 20.0
    max_tokens = 300
    # The language the prompt asks the photo's description in: "zh" (Chinese, at
    # most 30 characters, as the original Xintu backend asked) or "en" (English, at
    # most 15 words). Longer descriptions are clipped to that length.
    description_language = "zh"
    # Upload: longest side in pixels, JPEG quality.
    max_image_side_px = 1024
    jpeg_quality = 85
    # Retries of retryable faults (connect errors, timeouts, 429, 5xx): attempts in
    # all, exponential backoff with full jitter from retry_initial_s to retry_max_s
    # (a longer Retry-After is honoured while the deadline allows).
    retry_max_attempts = 3
    retry_initial_s = 0.2
    retry_max_s = 2.0
    # Retry budget per provider: retries in any retry_budget_window_s at most
    # retry_budget_min + retry_budget_ratio x calls in that window.
    retry_budget_ratio = 0.2
    retry_budget_min = 3
    retry_budget_window_s = 10.0
    # Circuit breaker per provider: opens when at least breaker_min_calls outcomes in
    # the last breaker_window_s fail at breaker_failure_ratio or more, or when
    # breaker_consecutive_failures calls in a row fail (0: off); stays open
    # breaker_open_s; then lets breaker_half_open_probes concurrent probes through.
    breaker_window_s = 30.0
    breaker_min_calls = 10
    breaker_consecutive_failures = 5
    breaker_failure_ratio = 0.5
    breaker_open_s = 15.0
    breaker_half_open_probes = 3
    # Background LLM re-classifications of local results (bounded, droppable).
    recheck_queue = 32

Every pool key can be set as ``XINTU_LLM_<KEY>``. Any other ``XINTU_LLM_*``
variable must be a provider variable as above (those of providers not in the chain
are ignored, so keys of a disabled provider may stay set); anything else, an
unknown key in ``raw`` or a bad value raises :class:`~xintu.errors.ConfigError`
naming the key. API keys are never part of a ``repr`` and :meth:`LlmConfig.redacted`
shows them as ``"***"``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

from .._redact import redact_url
from ..errors import ConfigError
from ._parse import DESCRIPTION_LANGUAGES, DescriptionLanguage
from .wire import DEFAULT_KIND, KINDS, wire_format

__all__ = [
    "DEFAULTS",
    "LlmConfig",
    "ProviderConfig",
    "ProviderKind",
    "TokenLimitParam",
    "llm_config_from",
]

#: One of :data:`xintu.llm.wire.KINDS`: a module of :mod:`xintu.llm.wire` each.
ProviderKind: TypeAlias = str
#: The request field that carries ``max_tokens``: OpenAI's newer models (o-series,
#: gpt-5) refuse ``max_tokens`` and want ``max_completion_tokens``.
TokenLimitParam = Literal["max_tokens", "max_completion_tokens"]

#: Defaults of the ``[llm]`` table (the docstring's TOML block, parsed).
DEFAULTS: Mapping[str, Any] = {
    "providers": [],
    "workers": 8,
    "inbox_size": 64,
    "fallback_reserve_s": 1.5,
    "timeout_s": 20.0,
    "max_tokens": 300,
    "description_language": "zh",
    "max_image_side_px": 1024,
    "jpeg_quality": 85,
    "retry_max_attempts": 3,
    "retry_initial_s": 0.2,
    "retry_max_s": 2.0,
    "retry_budget_ratio": 0.2,
    "retry_budget_min": 3,
    "retry_budget_window_s": 10.0,
    "breaker_window_s": 30.0,
    "breaker_min_calls": 10,
    "breaker_consecutive_failures": 5,
    "breaker_failure_ratio": 0.5,
    "breaker_open_s": 15.0,
    "breaker_half_open_probes": 3,
    "recheck_queue": 32,
}

# key -> (type, lowest, highest); None: unbounded on that side.
_NUMBERS: Mapping[str, tuple[type[int] | type[float], float | None, float | None]] = {
    "workers": (int, 1, 1024),
    "inbox_size": (int, 1, None),
    "fallback_reserve_s": (float, 0, 3600),
    "timeout_s": (float, 0.01, 3600),
    "max_tokens": (int, 16, 100_000),
    "max_image_side_px": (int, 64, 8192),
    "jpeg_quality": (int, 1, 95),
    "retry_max_attempts": (int, 1, 20),
    "retry_initial_s": (float, 0, 600),
    "retry_max_s": (float, 0, 3600),
    "retry_budget_ratio": (float, 0, 10),
    "retry_budget_min": (int, 0, None),
    "retry_budget_window_s": (float, 0.1, 3600),
    "breaker_window_s": (float, 0.1, 3600),
    "breaker_min_calls": (int, 1, None),
    "breaker_consecutive_failures": (int, 0, None),
    "breaker_failure_ratio": (float, 0.01, 1),
    "breaker_open_s": (float, 0, 3600),
    "breaker_half_open_probes": (int, 1, 1024),
    "recheck_queue": (int, 0, None),
}
_PROVIDER_KEYS = (
    "base_url",
    "api_key",
    "model",
    "kind",
    "timeout_s",
    "max_tokens",
    "token_limit_param",
    "temperature",
    "extra_body",
)
_TOKEN_LIMIT_PARAMS: tuple[TokenLimitParam, ...] = ("max_tokens", "max_completion_tokens")
# Fields Xintu sets itself, each through its own key: extra_body may not replace them.
_RESERVED_BODY_KEYS = frozenset(
    {"model", "messages", "system", "stream", "temperature", *_TOKEN_LIMIT_PARAMS}
)
_MAX_EXTRA_BODY_CHARS = 4096
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_ENV_PREFIX = "XINTU_LLM_"
_S = TypeVar("_S", bound=str)


@dataclass(frozen=True, slots=True)
class _Known:
    kind: ProviderKind
    base_url: str
    model: str
    key_var: str


_KNOWN: Mapping[str, _Known] = {
    "openai": _Known("openai", "https://api.openai.com/v1", "gpt-4o-mini", "OPENAI_API_KEY"),
    "anthropic": _Known(
        "anthropic", "https://api.anthropic.com", "claude-haiku-4-5", "ANTHROPIC_API_KEY"
    ),
    "dashscope": _Known(
        "openai",
        "https://dashscope.aliyuncs.com/compatible-mode/v1",
        "qwen-vl-max",
        "DASHSCOPE_API_KEY",
    ),
}


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One upstream in the chain. ``api_key`` is never shown by ``repr``.

    ``base_url`` is the API root as the vendor's SDK takes it: for ``openai``
    requests go to ``{base_url}/chat/completions`` (so it ends in ``/v1`` for
    OpenAI), for ``anthropic`` to ``{base_url}/v1/messages``.

    The request carries ``max_tokens`` under the name ``token_limit_param``
    (always ``max_tokens`` for ``anthropic``), ``temperature`` unless it is None
    (the model's own default), and every field of ``extra_body``, which never
    holds a field Xintu sets itself.
    """

    name: str
    kind: ProviderKind
    base_url: str
    model: str
    timeout_s: float
    max_tokens: int
    api_key: str = field(default="", repr=False)
    token_limit_param: TokenLimitParam = "max_tokens"
    temperature: float | None = 0.0
    extra_body: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def redacted(self) -> dict[str, Any]:
        """The provider's settings for display, the API key as ``"***"``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "base_url": redact_url(self.base_url),
            "api_key": "***" if self.api_key else "",
            "model": self.model,
            "timeout_s": self.timeout_s,
            "max_tokens": self.max_tokens,
            "token_limit_param": self.token_limit_param,
            "temperature": self.temperature,
            "extra_body": json.loads(json.dumps(self.extra_body)),
        }


@dataclass(frozen=True, slots=True)
class LlmConfig:
    """Every setting of the LLM classifier. Build it with :func:`llm_config_from`."""

    providers: tuple[ProviderConfig, ...]
    workers: int
    inbox_size: int
    fallback_reserve_s: float
    timeout_s: float
    max_tokens: int
    description_language: DescriptionLanguage
    max_image_side_px: int
    jpeg_quality: int
    retry_max_attempts: int
    retry_initial_s: float
    retry_max_s: float
    retry_budget_ratio: float
    retry_budget_min: int
    retry_budget_window_s: float
    breaker_window_s: float
    breaker_min_calls: int
    breaker_consecutive_failures: int
    breaker_failure_ratio: float
    breaker_open_s: float
    breaker_half_open_probes: int
    recheck_queue: int

    @property
    def enabled(self) -> bool:
        """False when no provider is configured: the service runs local-only."""
        return bool(self.providers)

    def redacted(self) -> dict[str, Any]:
        """Every value for ``config show``; API keys as ``"***"``."""
        out: dict[str, Any] = {
            "providers": [p.redacted() for p in self.providers],
            "description_language": self.description_language,
        }
        for key in _NUMBERS:
            out[key] = getattr(self, key)
        return out


def _check_number(
    key: str,
    value: Any,
    kind: type[int] | type[float],
    lo: float | None,
    hi: float | None,
    *,
    from_env: bool,
) -> int | float:
    if from_env and isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise ConfigError(key, f"expected {kind.__name__}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"expected {kind.__name__}, got {value!r}")
    if kind is int and not isinstance(value, int):
        raise ConfigError(key, f"expected int, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"expected a finite number, got {value!r}")
    number: int | float = kind(value)
    if lo is not None and number < lo:
        raise ConfigError(key, f"must be >= {lo}, got {number!r}")
    if hi is not None and number > hi:
        raise ConfigError(key, f"must be <= {hi}, got {number!r}")
    return number


def _choice(key: str, value: Any, choices: tuple[_S, ...]) -> _S:
    """The one of *choices* that *value* names (case and spaces aside)."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    text = value.strip().lower()
    for choice in choices:
        if choice == text:
            return choice
    raise ConfigError(key, f"must be {' or '.join(choices)}; got {text!r}")


def _temperature(key: str, value: Any, hi: float, *, from_env: bool) -> float | None:
    """A number in 0..*hi*, or None (send none) for ``"default"`` or ``""``."""
    if isinstance(value, str):
        if value.strip().lower() in ("", "default"):
            return None
        if not from_env:
            raise ConfigError(key, f'expected a number or "default", got {value!r}')
    return float(_check_number(key, value, float, 0, hi, from_env=from_env))


def _extra_body(
    key: str, value: Any, body_keys: frozenset[str], *, from_env: bool
) -> dict[str, Any]:
    """A JSON object (a TOML table, or JSON text in the environment) of extra fields.

    It may set none of *body_keys* (the wire format's own) nor of the fields that
    Xintu sets through other keys.
    """
    if from_env and isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(key, "expected a JSON object, got text that is not JSON") from None
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a JSON object, got {type(value).__name__}")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise ConfigError(key, "holds a value JSON cannot carry") from None
    if len(text) > _MAX_EXTRA_BODY_CHARS:
        raise ConfigError(key, f"longer than {_MAX_EXTRA_BODY_CHARS} characters as JSON")
    reserved = sorted((_RESERVED_BODY_KEYS | body_keys).intersection(value))
    if reserved:
        raise ConfigError(
            key,
            f"may not set {', '.join(reserved)}: Xintu sets those itself "
            "(see token_limit_param and temperature)",
        )
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _chain(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        names = [p.strip().lower() for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        names = [v.strip().lower() for v in value]
    else:
        raise ConfigError(key, f"expected a list of provider names, got {value!r}")
    for n in names:
        if not _NAME_RE.fullmatch(n):
            raise ConfigError(key, f"bad provider name {n!r} (use a-z, 0-9 and _)")
    if len(set(names)) != len(names):
        raise ConfigError(key, f"a provider is named twice: {', '.join(names)}")
    return tuple(names)


def _provider(
    name: str,
    table: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    timeout_s: float,
    max_tokens: int,
) -> ProviderConfig:
    var = f"{_ENV_PREFIX}{name.upper()}_"
    for k in table:
        if k not in _PROVIDER_KEYS:
            raise ConfigError(f"llm.provider.{name}.{k}", "unknown configuration key")

    def get(key: str) -> tuple[str, Any, bool] | None:
        """(the key's name for errors, the value, from the environment) or None."""
        if (v := env.get(var + key.upper())) is not None:
            return var + key.upper(), v, True
        if key in table:
            return f"llm.provider.{name}.{key}", table[key], False
        return None

    def text(key: str) -> str | None:
        got = get(key)
        if got is None:
            return None
        where, value, _ = got
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, got {type(value).__name__}")
        return value.strip()

    known = _KNOWN.get(name)
    kind: ProviderKind = (text("kind") or (known.kind if known else DEFAULT_KIND)).lower()
    if kind not in KINDS:
        raise ConfigError(var + "KIND", f"must be {' or '.join(KINDS)}; got {kind!r}")
    wire = wire_format(kind)

    base_url = text("base_url") or ""
    explicit_url = bool(base_url)
    if not base_url:
        if known is None or known.kind != kind:
            raise ConfigError(var + "BASE_URL", f"required for provider {name!r}")
        base_url = known.base_url
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(var + "BASE_URL", "must start with http:// or https://")
    base_url = base_url.rstrip("/")

    model = text("model") or (known.model if known and known.kind == kind else "")
    if not model:
        raise ConfigError(var + "MODEL", f"required for provider {name!r}")

    api_key = text("api_key")
    if not api_key and known is not None:
        api_key = env.get(known.key_var, "").strip()
    if not api_key and not explicit_url:
        hint = f" (or set {known.key_var})" if known else ""
        raise ConfigError(var + "API_KEY", f"required for {base_url}{hint}")

    numbers: dict[str, int | float] = {"timeout_s": timeout_s, "max_tokens": max_tokens}
    for key in ("timeout_s", "max_tokens"):
        got = get(key)
        if got is not None:
            where, value, from_env = got
            kind_, lo, hi = _NUMBERS[key]
            numbers[key] = _check_number(where, value, kind_, lo, hi, from_env=from_env)

    token_limit_param: TokenLimitParam = wire.token_limit_params[0]
    if (got := get("token_limit_param")) is not None:
        where, value, _ = got
        token_limit_param = _choice(where, value, _TOKEN_LIMIT_PARAMS)
        if token_limit_param not in wire.token_limit_params:
            takes = " or ".join(wire.token_limit_params)
            raise ConfigError(where, f"the {kind} kind takes {takes} only")

    temperature: float | None = 0.0
    if (got := get("temperature")) is not None:
        where, value, from_env = got
        temperature = _temperature(where, value, wire.max_temperature, from_env=from_env)

    extra_body: dict[str, Any] = {}
    if (got := get("extra_body")) is not None:
        where, value, from_env = got
        extra_body = _extra_body(where, value, wire.body_keys, from_env=from_env)

    return ProviderConfig(
        name=name,
        kind=kind,
        base_url=base_url,
        model=model,
        timeout_s=float(numbers["timeout_s"]),
        max_tokens=int(numbers["max_tokens"]),
        api_key=api_key or "",
        token_limit_param=token_limit_param,
        temperature=temperature,
        extra_body=extra_body,
    )


def llm_config_from(raw: Mapping[str, Any], env: Mapping[str, str]) -> LlmConfig:
    """Build the LLM configuration from the ``[llm]`` table *raw* and *env*.

    *raw* may hold any subset of :data:`DEFAULTS` and ``provider`` (a table of
    per-provider tables); *env* is usually ``os.environ``. Raises
    :class:`~xintu.errors.ConfigError` naming the key on anything unknown or bad.
    """
    for k in raw:
        if k not in DEFAULTS and k != "provider":
            raise ConfigError(f"llm.{k}", "unknown configuration key")
    tables = raw.get("provider", {})
    if not isinstance(tables, Mapping) or not all(isinstance(t, Mapping) for t in tables.values()):
        raise ConfigError("llm.provider", "expected a table of provider tables")

    env_values: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(_ENV_PREFIX):
            continue
        key = name[len(_ENV_PREFIX) :].lower()
        if key in DEFAULTS:
            env_values[key] = value
        elif not any(key.endswith("_" + pk) and len(key) > len(pk) + 1 for pk in _PROVIDER_KEYS):
            raise ConfigError(name, "unknown configuration variable")

    def pick(key: str) -> tuple[str, Any, bool]:
        if key in env_values:
            return _ENV_PREFIX + key.upper(), env_values[key], True
        return f"llm.{key}", raw.get(key, DEFAULTS[key]), False

    values: dict[str, Any] = {}
    for key in _NUMBERS:
        where, value, from_env = pick(key)
        kind, lo, hi = _NUMBERS[key]
        values[key] = _check_number(where, value, kind, lo, hi, from_env=from_env)
    if values["retry_max_s"] < values["retry_initial_s"]:
        raise ConfigError("llm.retry_max_s", "must be >= retry_initial_s")
    where, value, _ = pick("description_language")
    language = _choice(where, value, DESCRIPTION_LANGUAGES)

    where, value, _ = pick("providers")
    names = _chain(where, value)
    # Tables of providers not in the chain are allowed (and ignored), like env vars.
    providers = tuple(
        _provider(
            n,
            tables.get(n, {}),
            env,
            timeout_s=values["timeout_s"],
            max_tokens=values["max_tokens"],
        )
        for n in names
    )
    return LlmConfig(providers=providers, description_language=language, **values)

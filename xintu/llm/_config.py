"""The LLM classifier's configuration: the ``[llm]`` section and its provider chain.

The keys of ``[llm]`` and their defaults are in ``xintu/defaults.toml``; the
fields of :class:`LlmConfig` declare their types and bounds, and
:func:`xintu._config.load_config` checks them like every other section's (a file's
``[llm]`` table, then ``XINTU_LLM_<KEY>``).

The provider chain has rules of its own, written here. ``providers`` names the
providers in order (a list, or a comma-separated string); each provider NAME takes
the keys of :class:`ProviderConfig` from ``XINTU_LLM_<NAME>_<KEY>``, else from the
``[llm.provider.NAME]`` table, each checked against its field's declaration as
``[llm]``'s keys are. The names ``openai``, ``anthropic`` and ``dashscope`` have
default endpoints and models and also read ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``
and ``DASHSCOPE_API_KEY``; ``kind`` is one of :data:`xintu.llm.wire.KINDS`, whose
wire format bounds ``temperature`` and ``token_limit_param`` and reserves the fields
``extra_body`` may not set. Any ``XINTU_LLM_*`` variable that is not a key of
``[llm]`` must be a provider variable (those of providers not in the chain are
ignored, so keys of a disabled provider may stay set). API keys are never part of a
``repr``, an error message, or :meth:`LlmConfig.redacted` (``"***"``).
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from .._config import _bounded, _build, _choice, _coerce, _parsed, _redacted, _secret
from .._redact import redact_url
from ..errors import ConfigError
from ._parse import DESCRIPTION_LANGUAGES, DescriptionLanguage
from .wire import DEFAULT_KIND, KINDS, wire_format

__all__ = [
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

_TOKEN_LIMIT_PARAMS: tuple[TokenLimitParam, ...] = typing.get_args(TokenLimitParam)
# Fields Xintu sets itself, each through its own key: extra_body may not replace them.
_RESERVED_BODY_KEYS = frozenset(
    {"model", "messages", "system", "stream", "temperature", *_TOKEN_LIMIT_PARAMS}
)
_MAX_EXTRA_BODY_CHARS = 4096
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_ENV_PREFIX = "XINTU_LLM_"


# [llm] timeout_s and max_tokens are every provider's defaults, with the same bounds.
def _timeout_s() -> Any:
    return _bounded(0.01, 3600)


def _max_tokens() -> Any:
    return _bounded(16, 100_000)


@dataclass(frozen=True, slots=True)
class _Known:
    kind: ProviderKind
    base_url: str
    model: str
    key_var: str


_KNOWN: Mapping[str, _Known] = MappingProxyType(
    {
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
)


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
    timeout_s: float = _timeout_s()
    max_tokens: int = _max_tokens()
    api_key: str = _secret(default="")
    token_limit_param: TokenLimitParam = "max_tokens"
    # Bounded by the kind's wire format; None (configured as "default"): none sent.
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


def _chain(key: str, value: Any, *, from_env: bool) -> tuple[str, ...]:
    """The provider names of ``providers``: a list, or a comma-separated string."""
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


@dataclass(frozen=True, slots=True)
class LlmConfig:
    """Every setting of the LLM classifier; the ``[llm]`` section of :class:`~xintu.Config`.

    Keys, defaults and what they mean: ``xintu/defaults.toml``.
    """

    # Checked as names by _chain, then built into ProviderConfigs by llm_config().
    providers: tuple[ProviderConfig, ...] = _parsed(_chain)
    workers: int = _bounded(1, 1024)
    inbox_size: int = _bounded(1)
    fallback_reserve_s: float = _bounded(0, 3600)
    hedge_after_s: float = _bounded(0, 3600)
    hedge_quantile: float = _bounded(0, 1)
    hedge_min_s: float = _bounded(0, 3600)
    timeout_s: float = _timeout_s()
    max_tokens: int = _max_tokens()
    # (RUF009: ruff does not see through the alias of a Literal of strings)
    description_language: DescriptionLanguage = _choice(*DESCRIPTION_LANGUAGES)  # noqa: RUF009
    max_image_side_px: int = _bounded(64, 8192)
    jpeg_quality: int = _bounded(1, 95)
    retry_max_attempts: int = _bounded(1, 20)
    retry_initial_s: float = _bounded(0, 600)
    retry_max_s: float = _bounded(0, 3600)
    retry_budget_ratio: float = _bounded(0, 10)
    retry_budget_min: int = _bounded(0)
    retry_budget_window_s: float = _bounded(0.1, 3600)
    breaker_window_s: float = _bounded(0.1, 3600)
    breaker_min_calls: int = _bounded(1)
    breaker_consecutive_failures: int = _bounded(0)
    breaker_failure_ratio: float = _bounded(0.01, 1)
    breaker_open_s: float = _bounded(0, 3600)
    breaker_half_open_probes: int = _bounded(1, 1024)
    breaker_slow_call_s: float = _bounded(0, 3600)
    recheck_queue: int = _bounded(0)

    @property
    def enabled(self) -> bool:
        """False when no provider is configured: the service runs local-only."""
        return bool(self.providers)

    def redacted(self) -> dict[str, Any]:
        """Every value for ``config show``; API keys as ``"***"``."""
        return _redacted(self)


def llm_config_from(raw: Mapping[str, Any], env: Mapping[str, str]) -> LlmConfig:
    """The ``[llm]`` section as :func:`~xintu.load_config` builds it from *raw* and *env*.

    *raw* is an ``[llm]`` table (any of its keys, and ``provider``: a table of
    provider tables) taking the place of a file's; *env* is usually ``os.environ``,
    of which only the ``XINTU_LLM_*`` variables and the conventional API keys count.
    Raises :class:`~xintu.errors.ConfigError` naming the key on anything unknown or bad.
    """
    llm_env = {
        k: v for k, v in env.items() if k.startswith(_ENV_PREFIX) or not k.startswith("XINTU_")
    }
    return _build(llm_env, {"llm": raw}, {}).llm


def llm_config(
    values: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]], env: Mapping[str, str]
) -> LlmConfig:
    """:class:`LlmConfig` from ``[llm]``'s checked *values*, the provider *tables* and *env*.

    For :func:`xintu._config.load_config`: ``values["providers"]`` holds the chain's
    names; each becomes a :class:`ProviderConfig`.
    """
    if values["retry_max_s"] < values["retry_initial_s"]:
        raise ConfigError("llm.retry_max_s", "must be >= retry_initial_s")
    if values["hedge_after_s"] and values["hedge_min_s"] > values["hedge_after_s"]:
        raise ConfigError("llm.hedge_min_s", "must be <= hedge_after_s (or hedge_after_s = 0)")
    # Tables of providers not in the chain are allowed (and ignored), like env vars.
    providers = tuple(
        _provider(
            name,
            tables.get(name, {}),
            env,
            timeout_s=values["timeout_s"],
            max_tokens=values["max_tokens"],
        )
        for name in values["providers"]
    )
    return LlmConfig(**{**values, "providers": providers})


_PROVIDER_FIELDS = MappingProxyType({f.name: f for f in fields(ProviderConfig) if f.name != "name"})
_PROVIDER_TYPES = MappingProxyType(typing.get_type_hints(ProviderConfig))


def is_provider_variable(name: str) -> bool:
    """Whether *name* is of the form ``XINTU_LLM_<NAME>_<KEY>``, KEY a provider's."""
    if not name.startswith(_ENV_PREFIX):
        return False
    key = name[len(_ENV_PREFIX) :].lower()
    return any(key.endswith("_" + k) and len(key) > len(k) + 1 for k in _PROVIDER_FIELDS)


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
        if k not in _PROVIDER_FIELDS:
            raise ConfigError(f"llm.provider.{name}.{k}", "unknown configuration key")

    def get(key: str) -> tuple[str, Any, bool] | None:
        """(the key's name for errors, the value, from the environment) or None."""
        if (v := env.get(var + key.upper())) is not None:
            return var + key.upper(), v, True
        if key in table:
            return f"llm.provider.{name}.{key}", table[key], False
        return None

    def typed(key: str) -> tuple[str, Any]:
        """(the key's name for errors, its value checked as declared), or ("", None)."""
        got = get(key)
        if got is None:
            return "", None
        where, value, from_env = got
        field_ = _PROVIDER_FIELDS[key]
        value = _coerce(where, value, _PROVIDER_TYPES[key], field_.metadata, from_env=from_env)
        return where, value.strip() if isinstance(value, str) else value

    known = _KNOWN.get(name)
    where, kind = typed("kind")
    kind = (kind or (known.kind if known else DEFAULT_KIND)).lower()
    if kind not in KINDS:
        raise ConfigError(where, f"must be {' or '.join(KINDS)}; got {kind!r}")
    wire = wire_format(kind)

    where, base_url = typed("base_url")
    explicit_url = bool(base_url)
    if not base_url:
        if known is None or known.kind != kind:
            raise ConfigError(var + "BASE_URL", f"required for provider {name!r}")
        base_url = known.base_url
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(where, "must start with http:// or https://")
    base_url = base_url.rstrip("/")

    _, model = typed("model")
    model = model or (known.model if known and known.kind == kind else "")
    if not model:
        raise ConfigError(var + "MODEL", f"required for provider {name!r}")

    _, api_key = typed("api_key")
    if not api_key and known is not None:
        api_key = env.get(known.key_var, "").strip()
    if not api_key and not explicit_url:
        hint = f" (or set {known.key_var})" if known else ""
        raise ConfigError(var + "API_KEY", f"required for {base_url}{hint}")

    _, own_timeout_s = typed("timeout_s")
    _, own_max_tokens = typed("max_tokens")

    where, token_limit_param = typed("token_limit_param")
    if token_limit_param is None:
        token_limit_param = wire.token_limit_params[0]
    elif token_limit_param not in wire.token_limit_params:
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
        timeout_s=timeout_s if own_timeout_s is None else own_timeout_s,
        max_tokens=max_tokens if own_max_tokens is None else own_max_tokens,
        api_key=api_key or "",
        token_limit_param=token_limit_param,
        temperature=temperature,
        extra_body=extra_body,
    )


def _temperature(key: str, value: Any, hi: float, *, from_env: bool) -> float | None:
    """A number in 0..*hi*, or None (send none) for ``"default"`` or ``""``."""
    if isinstance(value, str):
        if value.strip().lower() in ("", "default"):
            return None
        if not from_env:
            raise ConfigError(key, f'expected a number or "default", got {value!r}')
    number: float = _coerce(key, value, float, {"lo": 0, "hi": hi}, from_env=from_env)
    return number


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

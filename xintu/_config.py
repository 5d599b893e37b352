"""The one frozen configuration object, built once from TOML and the environment.

Values live in one place, ``xintu/defaults.toml`` (``config/xintu.toml`` links to
it); the dataclasses below (and :class:`~xintu.llm.LlmConfig` for ``[llm]``) only
declare each key's type and bounds, and one loader checks every section. Layers,
later ones winning:

1. ``defaults.toml`` (every key),
2. an optional TOML file (``--config PATH`` or ``XINTU_CONFIG``) holding a subset,
3. environment variables ``XINTU_<SECTION>_<KEY>``.

An unknown key, a value of the wrong type or out of bounds raises
:class:`~xintu.errors.ConfigError` naming the key. :attr:`Config.origins` says
which layer each key came from. Secrets are never rendered by
:meth:`Config.redacted`, nor echoed by an error.

``[llm]`` has, besides its keys, the provider chain: ``[llm.provider.NAME]`` tables
and ``XINTU_LLM_<NAME>_<KEY>`` variables, which :mod:`xintu.llm._config` turns into
:class:`~xintu.llm.ProviderConfig` objects with this module's checks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import platformdirs

from ._redact import redact_url
from .errors import ConfigError

if TYPE_CHECKING:
    # Imported where it is used: xintu.llm._config declares its keys with this
    # module's helpers, so it cannot be imported before they exist.
    from .llm._config import LlmConfig

__all__ = ["Config", "load_config", "redact_url"]

Origin = Literal["default", "file", "env"]

_ENV_PREFIX = "XINTU_"
# Environment variables with the prefix that are not configuration keys.
# XINTU_ADMIN_KEY: the key `xintu admin` sends (xintu/cli/_admin.py).
_ENV_NOT_KEYS = frozenset({"XINTU_CONFIG", "XINTU_ADMIN_KEY"})


# Each key's declaration is a dataclass field; its metadata says how to check it
# (see _coerce). Fields typed with a Literal are choices among its values.


def _bounded(lo: float | None = None, hi: float | None = None) -> Any:
    return field(metadata={"lo": lo, "hi": hi})


def _choice(*choices: str) -> Any:
    return field(metadata={"choices": choices})


def _secret(**field_args: Any) -> Any:
    # Never in a repr: a Config logged or shown in a traceback carries no secret.
    return field(metadata={"secret": True}, repr=False, **field_args)


def _parsed(parse: Callable[..., Any]) -> Any:
    """A key with a rule of its own: ``parse(key, value, from_env=...)`` checks it."""
    return field(metadata={"parse": parse})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    bind: str
    ready_without_store: bool  # no metadata: it goes before the fields with some
    workers: int = _bounded(0, 64)
    drain_delay_s: float = _bounded(0, 600)
    graceful_timeout_s: float = _bounded(0, 3600)
    max_body_bytes: int = _bounded(1024)
    max_json_bytes: int = _bounded(1024, 16 * 1024 * 1024)
    request_deadline_s: float = _bounded(0.05, 3600)
    latency_target_s: float = _bounded(0.01, 3600)
    keep_alive_s: float = _bounded(0, 3600)
    max_connections: int = _bounded(1, 1_000_000)
    listen_backlog: int = _bounded(1, 65_535)
    body_timeout_s: float = _bounded(0.1, 3600)
    read_timeout_s: float = _bounded(0.1, 86_400)


@dataclass(frozen=True, slots=True)
class DataConfig:
    dir: str


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = _secret()
    pool_size: int = _bounded(1, 256)
    query_timeout_s: float = _bounded(0.01, 600)
    lru_size: int = _bounded(0)
    writer_batch: int = _bounded(1, 100_000)
    writer_flush_ms: int = _bounded(0, 60_000)
    writer_inbox: int = _bounded(1)
    request_log_retention_days: int = _bounded(0, 36_500)
    read_error_budget: int = _bounded(0, 1_000_000)
    # Upgrades of local answers served from the cache (xintu.actors._upgrades).
    spool_mb: int = _bounded(0, 1_000_000)
    upgrades_per_minute: int = _bounded(0, 1_000_000)
    upgrade_queue: int = _bounded(1, 1_000_000)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    # Which local model (xintu.vision._factory.KINDS builds it).
    kind: str = _choice("efficientnet-lite0")
    # Where the local model runs: worker processes (xintu.actors._procs) or threads.
    executor: str = _choice("process", "thread")
    # Worker processes per service process; 0: the CPUs / max(1, server.workers).
    processes: int = _bounded(0, 256)
    # Niceness the worker processes add to their own (os.nice): the event loop first.
    process_nice: int = _bounded(0, 19)
    intra_op_threads: int = _bounded(1, 256)
    inference_threads: int = _bounded(1, 256)
    decode_threads: int = _bounded(1, 256)
    max_batch: int = _bounded(1, 256)
    max_wait_ms: int = _bounded(0, 10_000)
    inbox_size: int = _bounded(1)


@dataclass(frozen=True, slots=True)
class ImagesConfig:
    max_image_bytes: int = _bounded(1)
    max_pixels: int = _bounded(1)
    formats: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    inbox_size: int = _bounded(1)
    max_in_flight: int = _bounded(1)
    claim_ttl_s: float = _bounded(0.1, 86_400)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    api_key_sha256: tuple[str, ...] = _secret()
    admin_key_sha256: tuple[str, ...] = _secret()
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    rate_per_s: float = _bounded(0)
    burst: int = _bounded(1)
    max_clients: int = _bounded(1)


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    ttl_s: float = _bounded(1)
    lease_s: float = _bounded(1)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """What the v1 API promises its clients (DESIGN §2)."""

    cors_origins: tuple[str, ...]
    client_hash_mode: str = _choice("alias", "shared", "verify")


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = _choice("debug", "info", "warning", "error")
    format: str = _choice("auto", "json", "console")


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of one Xintu process. Build it with :func:`load_config`."""

    server: ServerConfig
    data: DataConfig
    store: StoreConfig
    model: ModelConfig
    images: ImagesConfig
    dispatcher: DispatcherConfig
    security: SecurityConfig
    ratelimit: RateLimitConfig
    idempotency: IdempotencyConfig
    api: ApiConfig
    log: LogConfig
    # Declared in xintu.llm._config, next to the provider chain's rules.
    llm: LlmConfig
    # "section.key" -> where the value came from; not compared.
    origins: Mapping[str, Origin] = field(default_factory=dict, compare=False, repr=False)

    @property
    def data_dir(self) -> Path:
        """The data directory, with the per-user default applied."""
        if self.data.dir:
            return Path(self.data.dir).expanduser().resolve()
        return Path(platformdirs.user_data_dir("xintu", appauthor=False))

    @property
    def store_url(self) -> str:
        """The store URL, with the embedded SQLite default applied."""
        return self.store.url or f"sqlite:///{self.data_dir / 'xintu.sqlite3'}"

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections replaced, or ``section={"key": value}`` patches."""
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            if isinstance(value, Mapping):
                value = dataclasses.replace(getattr(self, name), **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, dict[str, Any]]:
        """Every value by section, secrets replaced by ``"***"`` (passwords in URLs too)."""
        return {name: _redacted(getattr(self, name)) for name in _section_names()}


def _redacted(section: Any) -> dict[str, Any]:
    """One section's values for display (``config show``), secrets hidden."""
    return {
        f.name: _shown(getattr(section, f.name), f.metadata) for f in dataclasses.fields(section)
    }


def _shown(value: Any, meta: Mapping[str, Any]) -> Any:
    if meta.get("secret") and value:
        if isinstance(value, tuple):
            return ["***"] * len(value)
        return redact_url(value) if "://" in value else "***"
    if isinstance(value, tuple):
        return [_shown(v, {}) for v in value]
    if dataclasses.is_dataclass(value) and hasattr(value, "redacted"):
        return value.redacted()  # a provider: its own rendering
    return value


def _section_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config) if f.name != "origins")


def _section_types(llm_config: type[LlmConfig]) -> dict[str, type[Any]]:
    """Section name -> its dataclass, in the order of :class:`Config`."""
    hints = typing.get_type_hints(Config, localns={"LlmConfig": llm_config})
    return {name: hints[name] for name in _section_names()}


def _what(value: Any, meta: Mapping[str, Any]) -> str:
    """*value* for an error message: a secret only by its type."""
    return type(value).__name__ if meta.get("secret") else repr(value)


def _coerce(
    key: str, value: Any, annotation: Any, meta: Mapping[str, Any], *, from_env: bool
) -> Any:
    """Check (and, from the environment, parse) one value against its declared type.

    *meta* is the field's metadata: ``lo``/``hi`` bounds for numbers, ``choices``
    for strings (matched without regard to case or surrounding spaces), ``secret``
    (never echoed), ``parse`` (a rule of the key's own, which replaces all this).
    """
    parse = meta.get("parse")
    if parse is not None:
        return parse(key, value, from_env=from_env)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        meta = {**meta, "choices": typing.get_args(annotation)}
        annotation = str
    if origin is tuple:
        if from_env and isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of strings, got {_what(value, meta)}")
        return tuple(value)
    if annotation is bool:
        if from_env and isinstance(value, str):
            low = value.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int or annotation is float:
        if from_env and isinstance(value, str):
            try:
                value = annotation(value.strip())
            except ValueError:
                raise ConfigError(key, f"expected {annotation.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected {annotation.__name__}, got {value!r}")
        if annotation is int and not isinstance(value, int):
            raise ConfigError(key, f"expected int, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        value = annotation(value)
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and value < lo:
            raise ConfigError(key, f"must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(key, f"must be <= {hi}, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_what(value, meta)}")
        choices = meta.get("choices")
        if choices:
            folded = value.strip().lower()
            for choice in choices:
                if choice == folded:
                    return choice
            raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value
    raise TypeError(f"unsupported config type {annotation!r} for {key}")  # pragma: no cover


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(what, f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(what, f"{path} is not valid TOML: {exc}") from None


def _defaults() -> dict[str, Any]:
    text = resources.files("xintu").joinpath("defaults.toml").read_text("utf-8")
    return tomllib.loads(text)


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Mapping[str, Any],
) -> Config:
    """Build the configuration: defaults, then the file at *path*, then *env*.

    *env* defaults to ``os.environ``; ``XINTU_CONFIG`` in it names the file when
    *path* is not given. *overrides* (``server={"bind": ...}``) apply last, for
    the command line and tests, and are validated like everything else.
    """
    environ = os.environ if env is None else env
    file_path = path if path is not None else environ.get("XINTU_CONFIG") or None
    file_layer: Mapping[str, Any] = {}
    if file_path is not None:
        file_layer = _read_toml(Path(file_path), "config file")
    return _build(environ, file_layer, overrides)


def _build(
    environ: Mapping[str, str],
    file_layer: Mapping[str, Any],
    overrides: Mapping[str, Mapping[str, Any]],
) -> Config:
    """Check every key of every layer and build the :class:`Config`."""
    from .llm import _config as llm  # see the TYPE_CHECKING import above

    sections = _section_types(llm.LlmConfig)
    raw = _defaults()
    if set(raw) != set(sections):  # pragma: no cover - guarded by a test
        raise ConfigError("defaults.toml", f"sections {sorted(raw)} != {sorted(sections)}")

    layers: list[tuple[Origin, Mapping[str, Any], bool]] = [
        ("file", file_layer, False),
        ("env", _env_layer(environ, raw, llm.is_provider_variable), True),
    ]
    if overrides:
        layers.append(("env", overrides, False))

    merged: dict[str, dict[str, tuple[Any, Origin, bool]]] = {
        s: {k: (v, "default", False) for k, v in keys.items()} for s, keys in raw.items()
    }
    # The [llm.provider.NAME] tables, merged key by key over the layers.
    provider_tables: dict[str, Any] = {}
    for origin, layer, from_env in layers:
        for s, keys in layer.items():
            if s not in merged:
                raise ConfigError(s, "unknown configuration section")
            if not isinstance(keys, Mapping):
                raise ConfigError(s, "expected a table of keys")
            for k, v in keys.items():
                if s == "llm" and k == "provider":
                    if not isinstance(v, Mapping) or not all(
                        isinstance(t, Mapping) for t in v.values()
                    ):
                        raise ConfigError("llm.provider", "expected a table of provider tables")
                    provider_tables = _merge_tables(provider_tables, v)
                elif k not in merged[s]:
                    raise ConfigError(f"{s}.{k}", "unknown configuration key")
                else:
                    merged[s][k] = (v, origin, from_env)

    origins: dict[str, Origin] = {}
    built: dict[str, Any] = {}
    for s, cls in sections.items():
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if set(fields) != set(merged[s]):  # pragma: no cover - guarded by a test
            raise ConfigError(s, f"keys {sorted(merged[s])} != declared {sorted(fields)}")
        values = {}
        for k, (v, origin, from_env) in merged[s].items():
            key = f"{s}.{k}"
            values[k] = _coerce(key, v, hints[k], fields[k].metadata, from_env=from_env)
            origins[key] = origin
        if s == "llm":
            built[s] = llm.llm_config(values, provider_tables, environ)
        else:
            built[s] = cls(**values)
    _check_server(built["server"], built["store"])
    _check_api(built["api"])
    return Config(**built, origins=types.MappingProxyType(origins))


def _env_layer(
    environ: Mapping[str, str],
    raw: Mapping[str, Mapping[str, Any]],
    is_provider_variable: Callable[[str], bool],
) -> dict[str, dict[str, Any]]:
    """The ``XINTU_<SECTION>_<KEY>`` variables of *environ*, by section and key.

    ``XINTU_LLM_<NAME>_<KEY>`` variables of the provider chain are left to it.
    """
    layer: dict[str, dict[str, Any]] = {}
    env_keys = {f"{_ENV_PREFIX}{s.upper()}_{k.upper()}": (s, k) for s in raw for k in raw[s]}
    for name, value in environ.items():
        if not name.startswith(_ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        if name in env_keys:
            s, k = env_keys[name]
            layer.setdefault(s, {})[k] = value
        elif not is_provider_variable(name):
            raise ConfigError(name, "unknown configuration variable")
    return layer


def _check_server(server: ServerConfig, store: StoreConfig) -> None:
    """Rules between keys of ``[server]`` (and the store timeout they depend on)."""
    # Hypercorn keeps reading while a request is served: a read timeout shorter than
    # the longest answer would hang up on clients waiting for it. The longest answer
    # is the deadline plus the idempotency record's two store calls around it.
    longest = server.request_deadline_s + 2 * store.query_timeout_s
    if server.read_timeout_s <= longest:
        raise ConfigError(
            "server.read_timeout_s",
            f"must exceed server.request_deadline_s + 2 x store.query_timeout_s "
            f"({longest:g}), got {server.read_timeout_s:g}",
        )


# An origin as browsers send it: scheme://host[:port], no path (RFC 6454).
_ORIGIN_RE = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+", re.IGNORECASE)


def _check_api(api: ApiConfig) -> None:
    for origin in api.cors_origins:
        if origin != "*" and _ORIGIN_RE.fullmatch(origin) is None:
            raise ConfigError(
                "api.cors_origins",
                f'each entry must be "*" or an origin like "https://album.example.com"'
                f" (scheme://host[:port], no path); got {origin!r}",
            )


def _merge_tables(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """*over* on top of *base*, nested tables merged key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge_tables(out[k], v)
        else:
            out[k] = v
    return out

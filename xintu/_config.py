"""The one frozen configuration object, built once from TOML and the environment.

Values live in one place, ``xintu/defaults.toml`` (``config/xintu.toml`` links to
it); the dataclasses below only declare each key's type and bounds. Layers, later
ones winning:

1. ``defaults.toml`` (every key),
2. an optional TOML file (``--config PATH`` or ``XINTU_CONFIG``) holding a subset,
3. environment variables ``XINTU_<SECTION>_<KEY>``.

An unknown key, a value of the wrong type or out of bounds raises
:class:`~xintu.errors.ConfigError` naming the key. Secrets are never rendered by
:meth:`Config.redacted`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import platformdirs

from ._redact import redact_url
from .errors import ConfigError
from .llm._config import LlmConfig, llm_config_from

__all__ = ["Config", "load_config", "redact_url"]

Origin = Literal["default", "file", "env"]

_ENV_PREFIX = "XINTU_"
# Environment variables with the prefix that are not configuration keys.
_ENV_NOT_KEYS = frozenset({"XINTU_CONFIG"})
_LLM_ENV_PREFIX = "XINTU_LLM_"


def _bounded(lo: float | None = None, hi: float | None = None) -> Any:
    return field(metadata={"lo": lo, "hi": hi})


def _choice(*choices: str) -> Any:
    return field(metadata={"choices": choices})


def _secret() -> Any:
    # Never in a repr: a Config logged or shown in a traceback carries no secret.
    return field(metadata={"secret": True}, repr=False)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    bind: str
    workers: int = _bounded(0, 64)
    drain_delay_s: float = _bounded(0, 600)
    graceful_timeout_s: float = _bounded(0, 3600)
    max_body_bytes: int = _bounded(1024)
    max_json_bytes: int = _bounded(1024, 16 * 1024 * 1024)
    request_deadline_s: float = _bounded(0.05, 3600)
    keep_alive_s: float = _bounded(0, 3600)
    max_connections: int = _bounded(1, 1_000_000)
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


@dataclass(frozen=True, slots=True)
class ModelConfig:
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
    # The [llm] table and XINTU_LLM_* variables, validated by xintu.llm.
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
        out: dict[str, dict[str, Any]] = {}
        for sec in _sections():
            values: dict[str, Any] = {}
            obj = getattr(self, sec.name)
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if f.metadata.get("secret") and v:
                    if isinstance(v, tuple):
                        v = ["***"] * len(v)
                    else:
                        v = redact_url(v) if "://" in v else "***"
                values[f.name] = list(v) if isinstance(v, tuple) else v
            out[sec.name] = values
        out["llm"] = self.llm.redacted()
        return out


_NOT_GENERIC = frozenset({"origins", "llm"})


def _sections() -> tuple[dataclasses.Field[Any], ...]:
    """The sections the generic loader builds (``llm`` has a loader of its own)."""
    return tuple(f for f in dataclasses.fields(Config) if f.name not in _NOT_GENERIC)


def _section_type(f: dataclasses.Field[Any]) -> type[Any]:
    hints = typing.get_type_hints(Config)
    t = hints[f.name]
    assert isinstance(t, type)
    return t


def _coerce(
    key: str, value: Any, annotation: Any, meta: Mapping[str, Any], *, from_env: bool
) -> Any:
    """Check (and, from the environment, parse) one value against its declared type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if from_env and isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
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
        value = annotation(value)
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and value < lo:
            raise ConfigError(key, f"must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(key, f"must be <= {hi}, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        choices = meta.get("choices")
        if choices and value not in choices:
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
    raw = _defaults()
    llm_raw: dict[str, Any] = dict(raw.pop("llm", {}))
    origins: dict[str, Origin] = {}
    sections = {f.name: f for f in _sections()}
    if set(raw) != set(sections):  # pragma: no cover - guarded by a test
        raise ConfigError("defaults.toml", f"sections {sorted(raw)} != {sorted(sections)}")

    layers: list[tuple[Origin, Mapping[str, Any], bool]] = []
    file_path = path if path is not None else environ.get("XINTU_CONFIG") or None
    if file_path is not None:
        layers.append(("file", _read_toml(Path(file_path), "config file"), False))

    env_layer: dict[str, dict[str, Any]] = {}
    env_keys = {f"{_ENV_PREFIX}{s.upper()}_{k.upper()}": (s, k) for s in raw for k in raw[s]}
    for name, value in environ.items():
        if not name.startswith(_ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        if name.startswith(_LLM_ENV_PREFIX):
            continue  # read by llm_config_from
        if name not in env_keys:
            raise ConfigError(name, "unknown configuration variable")
        s, k = env_keys[name]
        env_layer.setdefault(s, {})[k] = value
    layers.append(("env", env_layer, True))
    if overrides:
        layers.append(("env", {s: dict(v) for s, v in overrides.items()}, False))

    merged: dict[str, dict[str, tuple[Any, Origin, bool]]] = {
        s: {k: (v, "default", False) for k, v in keys.items()} for s, keys in raw.items()
    }
    for origin, layer, from_env in layers:
        for s, keys in layer.items():
            if s == "llm" and not from_env:
                if not isinstance(keys, Mapping):
                    raise ConfigError("llm", "expected a table of keys")
                llm_raw = _merge_tables(llm_raw, keys)
                continue
            if s not in merged:
                raise ConfigError(s, "unknown configuration section")
            if not isinstance(keys, Mapping):
                raise ConfigError(s, "expected a table of keys")
            for k, v in keys.items():
                if k not in merged[s]:
                    raise ConfigError(f"{s}.{k}", "unknown configuration key")
                merged[s][k] = (v, origin, from_env)

    built: dict[str, Any] = {}
    for s, sec_field in sections.items():
        cls = _section_type(sec_field)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if set(fields) != set(merged[s]):  # pragma: no cover - guarded by a test
            raise ConfigError(s, f"keys {sorted(merged[s])} != declared {sorted(fields)}")
        values = {}
        for k, (v, origin, from_env) in merged[s].items():
            key = f"{s}.{k}"
            values[k] = _coerce(key, v, hints[k], fields[k].metadata, from_env=from_env)
            origins[key] = origin
        built[s] = cls(**values)
    _check_server(built["server"], built["store"])
    _check_api(built["api"])
    llm = llm_config_from(llm_raw, environ)
    return Config(**built, llm=llm, origins=types.MappingProxyType(origins))


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

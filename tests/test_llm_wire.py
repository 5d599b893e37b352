"""The wire-format registry: its kinds are exactly those the configuration accepts.

The request shapes of each format are pinned in ``test_llm_parse.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import pytest

import xintu.llm.wire
from xintu.errors import ConfigError
from xintu.llm import llm_config_from
from xintu.llm.wire import DEFAULT_KIND, FORMATS, KINDS, WireFormat, wire_format


def test_the_kinds_are_the_modules() -> None:
    modules = {
        m.name for m in pkgutil.iter_modules(xintu.llm.wire.__path__) if not m.name.startswith("_")
    }
    assert KINDS == ("openai", "anthropic")
    assert set(KINDS) == modules
    assert KINDS[0] == DEFAULT_KIND
    assert tuple(FORMATS) == KINDS
    for kind in KINDS:
        module = importlib.import_module(f"xintu.llm.wire.{kind}")
        assert module.FORMAT is FORMATS[kind] is wire_format(kind)
        assert isinstance(FORMATS[kind], WireFormat)
        assert FORMATS[kind].kind == kind
        assert FORMATS[kind].token_limit_params[0] == "max_tokens"


def provider_env(kind: str) -> dict[str, str]:
    return {
        "XINTU_LLM_PROVIDERS": "p",
        "XINTU_LLM_P_KIND": kind,
        "XINTU_LLM_P_BASE_URL": "http://127.0.0.1:9/v1",
        "XINTU_LLM_P_MODEL": "m",
    }


@pytest.mark.parametrize("kind", KINDS)
def test_config_accepts_every_registered_kind(kind: str) -> None:
    (p,) = llm_config_from({}, provider_env(kind)).providers
    assert p.kind == kind
    assert p.token_limit_param == FORMATS[kind].token_limit_params[0]


def test_config_accepts_no_other_kind() -> None:
    with pytest.raises(ConfigError) as info:
        llm_config_from({}, provider_env("gemini"))
    assert str(info.value) == f"XINTU_LLM_P_KIND: must be {' or '.join(KINDS)}; got 'gemini'"


def test_a_provider_without_a_kind_takes_the_default() -> None:
    env = provider_env("")
    del env["XINTU_LLM_P_KIND"]
    assert llm_config_from({}, env).providers[0].kind == DEFAULT_KIND


@pytest.mark.parametrize("kind", KINDS)
def test_extra_body_may_not_set_the_formats_own_fields(kind: str) -> None:
    for key in sorted(FORMATS[kind].body_keys):
        env = provider_env(kind) | {"XINTU_LLM_P_EXTRA_BODY": f'{{"{key}": 1}}'}
        with pytest.raises(ConfigError) as info:
            llm_config_from({}, env)
        assert str(info.value).startswith(f"XINTU_LLM_P_EXTRA_BODY: may not set {key}: ")


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_is_bounded_by_the_format(kind: str) -> None:
    top: Any = FORMATS[kind].max_temperature
    env = provider_env(kind)
    assert llm_config_from({}, env | {"XINTU_LLM_P_TEMPERATURE": str(top)}).providers[
        0
    ].temperature == float(top)
    with pytest.raises(ConfigError) as info:
        llm_config_from({}, env | {"XINTU_LLM_P_TEMPERATURE": str(top + 0.5)})
    assert str(info.value) == f"XINTU_LLM_P_TEMPERATURE: must be <= {top}, got {top + 0.5}"

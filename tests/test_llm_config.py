"""``xintu.llm``'s configuration: the [llm] table, the environment, secrets, exports."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

import xintu.llm
from xintu import load_config
from xintu.cli._show import config_show
from xintu.errors import ConfigError
from xintu.llm import LlmConfig, ProviderConfig, llm_config_from

KEY = "sk-test-SECRET-1234"
ROOT = Path(__file__).resolve().parent.parent


def test_defaults_file_declares_every_key() -> None:
    # The defaults are written once, in defaults.toml: [llm] declares each key there.
    raw = tomllib.loads((ROOT / "xintu" / "defaults.toml").read_text("utf-8"))["llm"]
    assert set(raw) == {f.name for f in dataclasses.fields(LlmConfig)}
    cfg = llm_config_from({}, {})
    assert {k: v for k, v in raw.items() if k != "providers"} == {
        k: getattr(cfg, k) for k in raw if k != "providers"
    }
    assert raw["providers"] == []


def test_defaults_are_local_only() -> None:
    cfg = llm_config_from({}, {})
    assert cfg.providers == ()
    assert not cfg.enabled
    assert (cfg.workers, cfg.inbox_size, cfg.fallback_reserve_s) == (8, 64, 1.5)
    assert (cfg.max_image_side_px, cfg.jpeg_quality) == (1024, 85)
    assert (cfg.retry_max_attempts, cfg.retry_initial_s, cfg.retry_max_s) == (3, 0.2, 2.0)
    assert cfg.retry_budget_ratio == 0.2
    assert (cfg.breaker_window_s, cfg.breaker_min_calls, cfg.breaker_failure_ratio) == (
        30.0,
        10,
        0.5,
    )
    assert (cfg.breaker_open_s, cfg.breaker_half_open_probes, cfg.recheck_queue) == (15.0, 3, 32)
    assert cfg.description_language == "zh"  # as the original backend asked


@pytest.mark.parametrize(
    ("raw", "env", "language"),
    [
        ({"description_language": "en"}, {}, "en"),
        ({"description_language": " EN "}, {}, "en"),
        ({"description_language": "en"}, {"XINTU_LLM_DESCRIPTION_LANGUAGE": "zh"}, "zh"),
        ({}, {"XINTU_LLM_DESCRIPTION_LANGUAGE": "en"}, "en"),
    ],
)
def test_description_language(raw: dict[str, object], env: dict[str, str], language: str) -> None:
    cfg = llm_config_from(raw, env)
    assert cfg.description_language == language
    assert cfg.redacted()["description_language"] == language


def test_request_parameters_default_as_before() -> None:
    cfg = llm_config_from(
        {"providers": ["openai", "anthropic"]}, {"OPENAI_API_KEY": "k"} | {"ANTHROPIC_API_KEY": "k"}
    )
    for p in cfg.providers:
        assert (p.token_limit_param, p.temperature, p.extra_body) == ("max_tokens", 0.0, {})


def test_request_parameters_from_toml_and_env() -> None:
    cfg = llm_config_from(
        {
            "providers": ["openai", "qwen", "claude"],
            "provider": {
                "openai": {"token_limit_param": "max_completion_tokens", "temperature": "default"},
                "qwen": {"temperature": 0.7, "extra_body": {"enable_thinking": False}},
                "claude": {"kind": "anthropic", "temperature": 1},
            },
        },
        {
            "OPENAI_API_KEY": KEY,
            "XINTU_LLM_OPENAI_EXTRA_BODY": '{"reasoning_effort": "low"}',
            "XINTU_LLM_QWEN_BASE_URL": "http://127.0.0.1:8000/v1",
            "XINTU_LLM_QWEN_MODEL": "qwen3-vl",
            "XINTU_LLM_QWEN_TEMPERATURE": "0.2",
            "XINTU_LLM_CLAUDE_BASE_URL": "https://proxy.example",
            "XINTU_LLM_CLAUDE_MODEL": "claude-x",
            "XINTU_LLM_CLAUDE_TOKEN_LIMIT_PARAM": "MAX_TOKENS",
        },
    )
    openai, qwen, claude = cfg.providers
    assert (openai.token_limit_param, openai.temperature) == ("max_completion_tokens", None)
    assert openai.extra_body == {"reasoning_effort": "low"}
    assert (qwen.token_limit_param, qwen.temperature) == ("max_tokens", 0.2)
    assert qwen.extra_body == {"enable_thinking": False}
    assert (claude.token_limit_param, claude.temperature, claude.extra_body) == (
        "max_tokens",
        1.0,
        {},
    )
    shown = cfg.redacted()["providers"]
    assert [(p["token_limit_param"], p["temperature"], p["extra_body"]) for p in shown] == [
        ("max_completion_tokens", None, {"reasoning_effort": "low"}),
        ("max_tokens", 0.2, {"enable_thinking": False}),
        ("max_tokens", 1.0, {}),
    ]
    json.dumps(shown)  # config show prints it


@pytest.mark.parametrize("value", ["", "default", " Default "])
def test_temperature_none_from_env(value: str) -> None:
    cfg = llm_config_from(
        {"providers": ["openai"]}, {"OPENAI_API_KEY": "k", "XINTU_LLM_OPENAI_TEMPERATURE": value}
    )
    assert cfg.providers[0].temperature is None


def test_chain_from_env_with_known_providers() -> None:
    cfg = llm_config_from(
        {"providers": ["openai"]},
        {
            "XINTU_LLM_PROVIDERS": "openai, anthropic,dashscope",
            "OPENAI_API_KEY": "k1",
            "ANTHROPIC_API_KEY": "k2",
            "DASHSCOPE_API_KEY": "k3",
        },
    )
    assert [(p.name, p.kind, p.base_url, p.model, p.api_key) for p in cfg.providers] == [
        ("openai", "openai", "https://api.openai.com/v1", "gpt-4o-mini", "k1"),
        ("anthropic", "anthropic", "https://api.anthropic.com", "claude-haiku-4-5", "k2"),
        (
            "dashscope",
            "openai",
            "https://dashscope.aliyuncs.com/compatible-mode/v1",
            "qwen-vl-max",
            "k3",
        ),
    ]
    assert all(p.timeout_s == 20.0 and p.max_tokens == 300 for p in cfg.providers)


def test_provider_variables_win() -> None:
    cfg = llm_config_from(
        {"provider": {"openai": {"model": "from-toml", "timeout_s": 7}}},
        {
            "XINTU_LLM_PROVIDERS": "openai,local",
            "OPENAI_API_KEY": "conventional",
            "XINTU_LLM_OPENAI_API_KEY": "explicit",
            "XINTU_LLM_OPENAI_BASE_URL": "http://127.0.0.1:9/v1/",
            "XINTU_LLM_LOCAL_BASE_URL": "http://127.0.0.1:11434/v1",
            "XINTU_LLM_LOCAL_MODEL": "qwen2.5vl",
            "XINTU_LLM_LOCAL_MAX_TOKENS": "100",
            "XINTU_LLM_WORKERS": "3",
            "XINTU_LLM_FALLBACK_RESERVE_S": "0.5",
        },
    )
    openai, local = cfg.providers
    assert openai == ProviderConfig(
        "openai", "openai", "http://127.0.0.1:9/v1", "from-toml", 7.0, 300, api_key="explicit"
    )
    assert local == ProviderConfig(
        "local", "openai", "http://127.0.0.1:11434/v1", "qwen2.5vl", 20.0, 100, api_key=""
    )
    assert (cfg.workers, cfg.fallback_reserve_s) == (3, 0.5)


def test_anthropic_kind_for_another_name() -> None:
    cfg = llm_config_from(
        {"providers": "claude"},
        {
            "XINTU_LLM_CLAUDE_KIND": "anthropic",
            "XINTU_LLM_CLAUDE_BASE_URL": "https://proxy.example/anthropic",
            "XINTU_LLM_CLAUDE_MODEL": "claude-x",
            "XINTU_LLM_CLAUDE_API_KEY": KEY,
        },
    )
    assert cfg.providers[0].kind == "anthropic"


def test_variables_of_providers_not_in_the_chain_are_ignored() -> None:
    cfg = llm_config_from({}, {"XINTU_LLM_OPENAI_API_KEY": KEY, "XINTU_LLM_OLD_MODEL": "m"})
    assert cfg.providers == ()


@pytest.mark.parametrize(
    ("raw", "env", "message"),
    [
        ({"wrokers": 1}, {}, "llm.wrokers: unknown configuration key"),
        ({}, {"XINTU_LLM_WORKRS": "1"}, "XINTU_LLM_WORKRS: unknown configuration variable"),
        ({"workers": 0}, {}, "llm.workers: must be >= 1, got 0"),
        ({"workers": 1.5}, {}, "llm.workers: expected int, got 1.5"),
        ({"workers": True}, {}, "llm.workers: expected int, got True"),
        ({}, {"XINTU_LLM_WORKERS": "many"}, "llm.workers: expected int, got 'many'"),
        ({}, {"XINTU_LLM_TIMEOUT_S": "inf"}, "llm.timeout_s: expected a finite number, got inf"),
        ({"breaker_failure_ratio": 1.5}, {}, "llm.breaker_failure_ratio: must be <= 1, got 1.5"),
        ({"retry_initial_s": 3.0}, {}, "llm.retry_max_s: must be >= retry_initial_s"),
        ({"providers": 3}, {}, "llm.providers: expected a list of provider names, got 3"),
        (
            {"providers": ["a", "a"]},
            {},
            "llm.providers: a provider is named twice: a, a",
        ),
        (
            {"providers": ["Bad-Name"]},
            {},
            "llm.providers: bad provider name 'bad-name' (use a-z, 0-9 and _)",
        ),
        (
            {"providers": ["openai"]},
            {},
            "XINTU_LLM_OPENAI_API_KEY: required for https://api.openai.com/v1 "
            "(or set OPENAI_API_KEY)",
        ),
        ({"providers": ["vllm"]}, {}, "XINTU_LLM_VLLM_BASE_URL: required for provider 'vllm'"),
        (
            {"providers": ["vllm"]},
            {"XINTU_LLM_VLLM_BASE_URL": "http://127.0.0.1:8000/v1"},
            "XINTU_LLM_VLLM_MODEL: required for provider 'vllm'",
        ),
        (
            {"providers": ["vllm"]},
            {"XINTU_LLM_VLLM_BASE_URL": "ftp://x", "XINTU_LLM_VLLM_MODEL": "m"},
            "XINTU_LLM_VLLM_BASE_URL: must start with http:// or https://",
        ),
        (
            {"providers": ["openai"]},
            {"OPENAI_API_KEY": "k", "XINTU_LLM_OPENAI_KIND": "gemini"},
            "XINTU_LLM_OPENAI_KIND: must be openai or anthropic; got 'gemini'",
        ),
        (
            {"providers": ["openai"], "provider": {"openai": {"api_kee": "k"}}},
            {},
            "llm.provider.openai.api_kee: unknown configuration key",
        ),
        (
            {"providers": ["openai"]},
            {"OPENAI_API_KEY": "k", "XINTU_LLM_OPENAI_TIMEOUT_S": "0"},
            "XINTU_LLM_OPENAI_TIMEOUT_S: must be >= 0.01, got 0.0",
        ),
        (
            {"providers": ["openai"], "provider": {"openai": {"max_tokens": 10**6}}},
            {"OPENAI_API_KEY": "k"},
            "llm.provider.openai.max_tokens: must be <= 100000, got 1000000",
        ),
        (
            {"providers": ["vllm"], "provider": {"vllm": {"base_url": 8000}}},
            {},
            "llm.provider.vllm.base_url: expected a string, got 8000",
        ),
        (
            # A key of the wrong type is not echoed: it may be a real key.
            {"providers": ["openai"], "provider": {"openai": {"api_key": 12345678}}},
            {},
            "llm.provider.openai.api_key: expected a string, got int",
        ),
        (
            {"providers": ["openai"], "provider": {"openai": {"kind": "gemini"}}},
            {"OPENAI_API_KEY": "k"},
            "llm.provider.openai.kind: must be openai or anthropic; got 'gemini'",
        ),
        ({"provider": "x"}, {}, "llm.provider: expected a table of provider tables"),
        (
            {"description_language": "fr"},
            {},
            "llm.description_language: must be one of zh, en; got 'fr'",
        ),
        ({"description_language": 1}, {}, "llm.description_language: expected a string, got 1"),
        (
            {},
            {"XINTU_LLM_DESCRIPTION_LANGUAGE": "zh-TW"},
            "llm.description_language: must be one of zh, en; got 'zh-TW'",
        ),
        (
            {"providers": ["openai"]},
            {"OPENAI_API_KEY": "k", "XINTU_LLM_OPENAI_TOKEN_LIMIT_PARAM": "max_output_tokens"},
            "XINTU_LLM_OPENAI_TOKEN_LIMIT_PARAM: must be one of max_tokens, "
            "max_completion_tokens; got 'max_output_tokens'",
        ),
        (
            {
                "providers": ["anthropic"],
                "provider": {"anthropic": {"token_limit_param": "max_completion_tokens"}},
            },
            {"ANTHROPIC_API_KEY": "k"},
            "llm.provider.anthropic.token_limit_param: the anthropic kind takes max_tokens only",
        ),
        (
            {"providers": ["openai"]},
            {"OPENAI_API_KEY": "k", "XINTU_LLM_OPENAI_TEMPERATURE": "hot"},
            "XINTU_LLM_OPENAI_TEMPERATURE: expected float, got 'hot'",
        ),
        (
            {"providers": ["openai"], "provider": {"openai": {"temperature": "warm"}}},
            {"OPENAI_API_KEY": "k"},
            "llm.provider.openai.temperature: expected a number or \"default\", got 'warm'",
        ),
        (
            {"providers": ["openai"], "provider": {"openai": {"temperature": 2.5}}},
            {"OPENAI_API_KEY": "k"},
            "llm.provider.openai.temperature: must be <= 2.0, got 2.5",
        ),
        (
            {"providers": ["openai"], "provider": {"openai": {"temperature": True}}},
            {"OPENAI_API_KEY": "k"},
            "llm.provider.openai.temperature: expected float, got True",
        ),
        (
            {"providers": ["anthropic"]},
            {"ANTHROPIC_API_KEY": "k", "XINTU_LLM_ANTHROPIC_TEMPERATURE": "1.5"},
            "XINTU_LLM_ANTHROPIC_TEMPERATURE: must be <= 1.0, got 1.5",
        ),
        (
            {"providers": ["openai"]},
            {"OPENAI_API_KEY": "k", "XINTU_LLM_OPENAI_EXTRA_BODY": "{"},
            "XINTU_LLM_OPENAI_EXTRA_BODY: expected a JSON object, got text that is not JSON",
        ),
        (
            {"providers": ["openai"]},
            {"OPENAI_API_KEY": "k", "XINTU_LLM_OPENAI_EXTRA_BODY": "[1]"},
            "XINTU_LLM_OPENAI_EXTRA_BODY: expected a JSON object, got list",
        ),
        (
            {"providers": ["openai"], "provider": {"openai": {"extra_body": "{}"}}},
            {"OPENAI_API_KEY": "k"},
            "llm.provider.openai.extra_body: expected a JSON object, got str",
        ),
        (
            {
                "providers": ["openai"],
                "provider": {"openai": {"extra_body": {"temperature": 1, "model": "x"}}},
            },
            {"OPENAI_API_KEY": "k"},
            "llm.provider.openai.extra_body: may not set model, temperature: Xintu sets those "
            "itself (see token_limit_param and temperature)",
        ),
        (
            {"providers": ["openai"]},
            {"OPENAI_API_KEY": "k", "XINTU_LLM_OPENAI_EXTRA_BODY": '{"x": NaN}'},
            "XINTU_LLM_OPENAI_EXTRA_BODY: holds a value JSON cannot carry",
        ),
    ],
)
def test_bad_configuration_names_the_key(
    raw: dict[str, object], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        llm_config_from(raw, env)
    assert str(info.value) == message


def test_api_key_is_never_shown() -> None:
    cfg = llm_config_from(
        {"providers": ["openai", "anthropic"]},
        {"OPENAI_API_KEY": KEY, "XINTU_LLM_ANTHROPIC_API_KEY": KEY},
    )
    assert KEY not in repr(cfg)
    assert KEY not in str(cfg.providers[0])
    shown = cfg.redacted()
    assert KEY not in repr(shown)
    assert shown["providers"][0]["api_key"] == "***"
    assert shown["workers"] == 8
    assert set(shown) == {f.name for f in dataclasses.fields(LlmConfig)}


def test_exports() -> None:
    exported = {
        name
        for name, value in vars(xintu.llm).items()
        if not name.startswith("_") and not isinstance(value, type(xintu))
    }
    assert set(xintu.llm.__all__) == exported
    assert all(re.fullmatch(r"[A-Za-z_]+", n) for n in xintu.llm.__all__)


def test_llm_keys_have_origins(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(
        '[llm]\nproviders = ["vllm"]\nworkers = 2\n'
        '[llm.provider.vllm]\nbase_url = "http://127.0.0.1:8000/v1"\nmodel = "from-file"\n'
    )
    config = load_config(
        path,
        env={
            "XINTU_LLM_WORKERS": "3",
            "XINTU_LLM_DESCRIPTION_LANGUAGE": "en",
            "XINTU_LLM_VLLM_MODEL": "from-env",
        },
    )
    assert (config.llm.workers, config.llm.description_language) == (3, "en")
    (vllm,) = config.llm.providers
    assert (vllm.base_url, vllm.model) == ("http://127.0.0.1:8000/v1", "from-env")
    llm_origins = {k: v for k, v in config.origins.items() if k.startswith("llm.")}
    assert set(llm_origins) == {f"llm.{f.name}" for f in dataclasses.fields(LlmConfig)}
    assert llm_origins["llm.workers"] == "env"
    assert llm_origins["llm.description_language"] == "env"
    assert llm_origins["llm.providers"] == "file"
    assert llm_origins["llm.timeout_s"] == "default"


def test_provider_tables_merge_over_the_layers(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[llm.provider.vllm]\nbase_url = "http://127.0.0.1:8000/v1"\nmodel = "m"\n')
    config = load_config(
        path,
        env={"XINTU_LLM_PROVIDERS": "vllm"},
        llm={"provider": {"vllm": {"timeout_s": 3}}},
    )
    assert config.llm.providers == (
        ProviderConfig("vllm", "openai", "http://127.0.0.1:8000/v1", "m", 3.0, 300),
    )
    assert config.origins["llm.providers"] == "env"


def test_config_show_names_the_origin_of_llm_keys(capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(
        env={"XINTU_LLM_PROVIDERS": "openai", "OPENAI_API_KEY": KEY, "XINTU_LLM_WORKERS": "3"}
    )
    assert config_show(config) == 0
    out = capsys.readouterr().out
    assert KEY not in out
    llm = out.split("[llm]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert llm[0].startswith('providers = [{"name": "openai", "kind": "openai", ')
    assert '"api_key": "***"' in llm[0]
    assert llm[0].endswith("  # env")
    assert llm[1:3] == ["workers = 3  # env", "inbox_size = 64  # default"]
    assert len(llm) == len(dataclasses.fields(LlmConfig))

"""Configuration: defaults, file and environment layers, and refusals that name the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from xintu import load_config
from xintu._config import Config, redact_url
from xintu.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_file_declares_every_key() -> None:
    raw = tomllib.loads((ROOT / "config" / "xintu.toml").read_text())
    config = load_config(env={})
    sections = [s.name for s in dataclasses.fields(Config) if s.name != "origins"]
    assert sorted(raw) == sorted(sections)
    for section in sections:  # [llm] included: one loader checks every section
        declared = {f.name for f in dataclasses.fields(getattr(config, section))}
        assert set(raw[section]) == declared, section
        for key in declared:
            assert config.origins[f"{section}.{key}"] == "default"
    assert len(config.origins) == sum(len(keys) for keys in raw.values())


def test_environment_overrides_with_types() -> None:
    config = load_config(
        env={
            "XINTU_SERVER_BIND": "0.0.0.0:9000",
            "XINTU_SERVER_WORKERS": "2",
            "XINTU_SERVER_REQUEST_DEADLINE_S": "2.5",
            "XINTU_IMAGES_FORMATS": "JPEG, PNG",
            "XINTU_DATA_DIR": "/tmp/xintu-test",
            "XINTU_STORE_URL": "mysql://u:pw@127.0.0.1:3306/test",
        }
    )
    assert config.server.bind == "0.0.0.0:9000"
    assert config.server.workers == 2
    assert config.server.request_deadline_s == 2.5
    assert config.images.formats == ("JPEG", "PNG")
    assert config.data_dir == Path("/tmp/xintu-test")
    assert config.store_url == "mysql://u:pw@127.0.0.1:3306/test"
    assert config.origins["server.workers"] == "env"
    assert config.origins["server.keep_alive_s"] == "default"


def test_file_layer_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[server]\nbind = "127.0.0.1:1"\nworkers = 3\n')
    config = load_config(path, env={"XINTU_SERVER_WORKERS": "4"})
    assert config.server.bind == "127.0.0.1:1"
    assert config.server.workers == 4
    assert config.origins["server.bind"] == "file"
    assert config.origins["server.workers"] == "env"


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[model]\nmax_batch = 4\n")
    assert load_config(env={"XINTU_CONFIG": str(path)}).model.max_batch == 4


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"XINTU_SERVER_NOPE": "1"}, "XINTU_SERVER_NOPE: unknown configuration variable"),
        ({"XINTU_SERVER_WORKERS": "two"}, "server.workers: expected int, got 'two'"),
        ({"XINTU_SERVER_WORKERS": "-1"}, "server.workers: must be >= 0, got -1"),
        ({"XINTU_MODEL_MAX_BATCH": "1000"}, "model.max_batch: must be <= 256, got 1000"),
        (
            {"XINTU_LOG_LEVEL": "loud"},
            "log.level: must be one of debug, info, warning, error; got 'loud'",
        ),
        (
            {"XINTU_RATELIMIT_RATE_PER_S": "inf"},
            "ratelimit.rate_per_s: expected a finite number, got inf",
        ),
        ({"XINTU_LLM_NOPE": "1"}, "XINTU_LLM_NOPE: unknown configuration variable"),
    ],
)
def test_bad_environment_names_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 1\n", "server.port: unknown configuration key"),
        ("[nope]\nx = 1\n", "nope: unknown configuration section"),
        ('[server]\nworkers = "2"\n', "server.workers: expected int, got '2'"),
        (
            "[server]\nrequest_deadline_s = true\n",
            "server.request_deadline_s: expected float, got True",
        ),
        ("[images]\nformats = [1]\n", "images.formats: expected a list of strings, got [1]"),
        (
            "[server]\ndrain_delay_s = nan\n",
            "server.drain_delay_s: expected a finite number, got nan",
        ),
        # A secret of the wrong type is named by its type only.
        (
            '[security]\napi_key_sha256 = "0123abcd"\n',
            "security.api_key_sha256: expected a list of strings, got str",
        ),
        ('[store]\nurl = ["mysql://u:pw@db/x"]\n', "store.url: expected a string, got list"),
        ("[llm]\nwrokers = 1\n", "llm.wrokers: unknown configuration key"),
        ('[llm]\nprovider = "x"\n', "llm.provider: expected a table of provider tables"),
        ("llm = 1\n", "llm: expected a table of keys"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == message


def test_choices_ignore_case_and_spaces() -> None:
    config = load_config(env={"XINTU_LOG_LEVEL": " Debug ", "XINTU_API_CLIENT_HASH_MODE": "VERIFY"})
    assert (config.log.level, config.api.client_hash_mode) == ("debug", "verify")


def test_missing_and_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file: file not found"):
        load_config(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match=r"config file: .* is not valid TOML"):
        load_config(bad, env={})


def test_secrets_are_redacted() -> None:
    config = load_config(env={"XINTU_STORE_URL": "mysql://root:s3cret@db:3306/x"})
    shown = config.redacted()
    assert shown["store"]["url"] == "mysql://root:***@db:3306/x"
    assert "s3cret" not in repr(shown)
    assert redact_url("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"
    assert redact_url("mysql://root@db/x") == "mysql://root@db/x"


def test_config_is_frozen() -> None:
    config = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.workers = 3  # type: ignore[misc]

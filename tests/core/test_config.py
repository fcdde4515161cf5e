"""Settings: the committed config.toml, environment overrides, one-line errors, no token in files."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import DEFAULT_CONFIG_PATH, ConfigError, load_settings


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_committed_config_loads_with_its_documented_defaults(monkeypatch):
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    settings = load_settings(DEFAULT_CONFIG_PATH)
    assert settings.model.name == "openflamingo/OpenFlamingo-9B-vitl-mpt7b"
    assert settings.model.precision == "auto"
    assert settings.storage.database_path.name == "flamingo.db"
    assert settings.logging.log_prompts is False


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAMINGO_MODEL__PRECISION", "int8")
    monkeypatch.setenv("FLAMINGO_LIMITS__MAX_EXAMPLES_PER_TASK", "3")
    monkeypatch.setenv("DISCORD_TOKEN", "secret-token")
    settings = load_settings(_config(tmp_path, '[model]\nprecision = "bf16"\n'))
    assert settings.model.precision == "int8"
    assert settings.limits.max_examples_per_task == 3
    assert settings.discord_token.get_secret_value() == "secret-token"
    assert "secret-token" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[model]\nprecision = "fp8"\n',
            r"^bad setting model\.precision: Input should be 'auto', 'fp32', .* \(got 'fp8'\)$",
        ),
        ("[service]\nmax_queue = 0\n", r"^bad setting service\.max_queue: Input should be greater than 0 \(got 0\)$"),
        ("[generation]\ntemperature = { low = 2, high = 1 }\n", r"^bad setting generation\.temperature: .*range low"),
        ("[model\n", r"^cannot read .*config\.toml: "),
        ('DISCORD_TOKEN = "abc"\n', r"^config\.toml must not hold the bot token; set DISCORD_TOKEN"),
        ('[model]\nprecison = "int8"\n', r"^bad setting model\.precison: there is no such setting \(in config\.toml, "),
        ("[generation]\ntemperature = { low = 0.1, high = 1, hi = 2 }\n", r"^bad setting generation\.temperature\.hi:"),
        ("[metric]\nenabled = true\n", r"^config\.toml has no setting called 'metric'$"),
        (
            "[generation]\nmax_new_tokens_default = 300\n",
            r"^bad setting generation: .*max_new_tokens_default 300 must lie within max_new_tokens \(1\.0 to 256\.0\)$",
        ),
        (
            '[discord]\napi_base_url = "localhost/api/v10"\n',
            r"^bad setting discord\.api_base_url: .*must be a http:// or https:// address with a host \(got 'localhost",
        ),
        (
            '[discord]\ngateway_url = "https://gateway.discord.gg"\n',
            r"^bad setting discord\.gateway_url: .*must be a ws:// or wss:// address with a host",
        ),
    ],
    ids=[
        "bad-choice",
        "out-of-range",
        "inverted-range",
        "toml-syntax",
        "token-in-file",
        "typo",
        "nested-typo",
        "unknown-section",
        "default-outside-its-range",
        "api-address-without-scheme",
        "gateway-address-not-websocket",
    ],
)
def test_bad_configuration_is_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as refused:
        load_settings(_config(tmp_path, text))
    assert "\n" not in str(refused.value)


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="no configuration file at"):
        load_settings(tmp_path / "absent.toml")


def test_a_typo_in_the_environment_is_reported_as_the_environments(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAMINGO_MODEL__PRECISON", "int8")
    with pytest.raises(ConfigError, match=r"^bad setting model\.precison: there is no such setting .*FLAMINGO_"):
        load_settings(_config(tmp_path, ""))
    monkeypatch.delenv("FLAMINGO_MODEL__PRECISON")
    monkeypatch.setenv("FLAMINGO_PRIVACY__BLOCKED_WORDS", "foo,bar")  # a list must be JSON
    unreadable = r"^cannot read the environment's settings \(FLAMINGO_\*, \.env\): .* as JSON"
    with pytest.raises(ConfigError, match=unreadable):
        load_settings(_config(tmp_path, ""))


def test_errors_name_the_settings_file_in_use(tmp_path):
    other = tmp_path / "staging.toml"
    other.write_text("[metric]\nenabled = true\n")
    with pytest.raises(ConfigError, match=r"^staging\.toml has no setting called 'metric'$"):
        load_settings(other)
    other.write_text('[model]\nprecison = "int8"\n')
    with pytest.raises(ConfigError, match=r"no such setting \(in staging\.toml, or as a FLAMINGO_ variable\)$"):
        load_settings(other)

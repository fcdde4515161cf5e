"""Settings: the committed config.toml, environment overrides, one-line errors, no token in files,
and no key or FLAMINGO_ variable that names no setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import DEFAULT_CONFIG_PATH, PROJECT_ROOT, ConfigError, Settings, load_settings


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
        (
            'DISCORD_TOKEN = "abc"\n',
            r"^config\.toml must not hold the bot token \(DISCORD_TOKEN\); set DISCORD_TOKEN in the environment or "
            r"\.env, never in config\.toml$",
        ),
        (
            '[discord]\ntoken = "abc"\n',
            r"^config\.toml must not hold the bot token \(discord\.token\); set DISCORD_TOKEN in the environment",
        ),
        (
            '[model]\nprecison = "int8"\n',
            r"^unknown setting model\.precison in config\.toml; did you mean model\.precision\?$",
        ),
        (
            "[generation]\ntemperature = { low = 0.1, high = 1, hi = 2 }\n",
            r"^unknown setting generation\.temperature\.hi in config\.toml; "
            r"did you mean generation\.temperature\.high\?$",
        ),
        ("[metric]\nenabled = true\n", r"^unknown setting metric in config\.toml; did you mean metrics\?$"),
        (
            "[service]\nuser_cooldown_seconds = 5\n",
            r"^unknown setting service\.user_cooldown_seconds in config\.toml; "
            r"did you mean quotas\.user_cooldown_seconds\?$",
        ),
        ("[discord]\nport = 9000\n", r"^unknown setting discord\.port in config\.toml; did you mean metrics\.port\?$"),
        ("[generation.ranges]\ntop_k = { high = 9 }\n", r"^unknown setting generation\.ranges in config\.toml$"),
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
        "token-in-a-table",
        "typo",
        "nested-typo",
        "unknown-section",
        "key-in-the-wrong-table",
        "key-of-another-table",
        "internal-field-no-guess",
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


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        (
            "FLAMINGO_QUOTA__USER_COOLDOWN_SECONDS",
            "unknown setting FLAMINGO_QUOTA__USER_COOLDOWN_SECONDS; "
            "did you mean FLAMINGO_QUOTAS__USER_COOLDOWN_SECONDS?",
        ),
        (
            "FLAMINGO_SERVICE__USER_COOLDOWN_SECONDS",
            "unknown setting FLAMINGO_SERVICE__USER_COOLDOWN_SECONDS; "
            "did you mean FLAMINGO_QUOTAS__USER_COOLDOWN_SECONDS?",
        ),
        (
            "FLAMINGO_MODEL__PRECISON",
            "unknown setting FLAMINGO_MODEL__PRECISON; did you mean FLAMINGO_MODEL__PRECISION?",
        ),
        ("FLAMINGO_DATADIR", "unknown setting FLAMINGO_DATADIR; did you mean FLAMINGO_DATA_DIR?"),
        (
            "FLAMINGO_GENERATION__TOP_K__HI",
            "unknown setting FLAMINGO_GENERATION__TOP_K__HI; did you mean FLAMINGO_GENERATION__TOP_K__HIGH?",
        ),
        ("FLAMINGO_DISCORD_TOKEN", "unknown setting FLAMINGO_DISCORD_TOKEN; did you mean DISCORD_TOKEN?"),
        ("flamingo_metric__port", "unknown setting FLAMINGO_METRIC__PORT; did you mean FLAMINGO_METRICS__PORT?"),
        ("FLAMINGO_NOTHING_LIKE_IT", "unknown setting FLAMINGO_NOTHING_LIKE_IT"),
    ],
    ids=["section-typo", "wrong-section", "key-typo", "top-level", "range-bound", "token", "lowercase", "no-guess"],
)
def test_a_variable_that_names_no_setting_is_refused_naming_the_closest(tmp_path, monkeypatch, variable, message):
    monkeypatch.setenv(variable, "5-secret")
    with pytest.raises(ConfigError) as refused:
        load_settings(_config(tmp_path, ""))
    assert str(refused.value) == message
    assert "secret" not in str(refused.value)  # values are never shown: this one might be the token


def test_a_variable_in_dot_env_that_names_no_setting_is_refused_as_the_files(tmp_path, monkeypatch):
    dot_env = tmp_path / ".env"
    monkeypatch.setitem(Settings.model_config, "env_file", dot_env)
    dot_env.write_text("DISCORD_TOKEN=abc\nflamingo_quotas__user_cooldown_seconds=3\n")
    assert load_settings(_config(tmp_path, "")).quotas.user_cooldown_seconds == 3
    dot_env.write_text("FLAMINGO_QUOTAS__USER_COOLDOWN_SECOND=3\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(_config(tmp_path, ""))
    assert str(refused.value) == (
        "unknown setting FLAMINGO_QUOTAS__USER_COOLDOWN_SECOND in .env; "
        "did you mean FLAMINGO_QUOTAS__USER_COOLDOWN_SECONDS?"
    )


def test_every_flamingo_variable_the_project_sets_or_documents_is_a_setting(tmp_path, monkeypatch):
    """The end-to-end tests, the benchmarks, the documentation and the deployment files set these: none
    may be refused as unknown (each is set alone, to a value its setting may refuse: not the point here)."""
    files = [PROJECT_ROOT / name for name in ("README.md", "config.toml", "Dockerfile", "compose.yaml")]
    for folder in ("tests/helpers", "tests/e2e", "bench", "scripts", "deploy", "core", "cogs"):
        files += (PROJECT_ROOT / folder).rglob("*")
    names = {
        name
        for path in files
        if path.is_file() and path.suffix in {"", ".py", ".md", ".toml", ".yaml", ".sh", ".service"}
        for name in re.findall(r"\bFLAMINGO_[A-Z][A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8"))
    }
    assert {"FLAMINGO_STORAGE__DATABASE", "FLAMINGO_QUOTAS__USER_COOLDOWN_SECONDS", "FLAMINGO_RAY__ADDRESS"} <= names
    for name in sorted(names):
        monkeypatch.setenv(name, "1")
        try:
            load_settings(_config(tmp_path, ""))
        except ConfigError as error:
            assert not str(error).startswith("unknown setting"), error
        monkeypatch.delenv(name)


def test_a_misspelt_key_in_a_variables_json_is_named_with_the_closest(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAMINGO_MODEL", '{"precison": "int8"}')
    with pytest.raises(ConfigError) as refused:
        load_settings(_config(tmp_path, ""))
    assert str(refused.value) == (
        "unknown setting model.precison in a FLAMINGO_ variable's JSON; did you mean model.precision?"
    )
    monkeypatch.delenv("FLAMINGO_MODEL")
    monkeypatch.setenv("FLAMINGO_PRIVACY__BLOCKED_WORDS", "foo,bar")  # a list must be JSON
    unreadable = r"^cannot read the environment's settings \(FLAMINGO_\*, \.env\): .* as JSON"
    with pytest.raises(ConfigError, match=unreadable):
        load_settings(_config(tmp_path, ""))


def test_errors_name_the_settings_file_in_use(tmp_path):
    other = tmp_path / "staging.toml"
    other.write_text("[metric]\nenabled = true\n")
    with pytest.raises(ConfigError, match=r"^unknown setting metric in staging\.toml; did you mean metrics\?$"):
        load_settings(other)
    other.write_text('[discord]\nbot_token = "abc"\n')
    with pytest.raises(ConfigError, match=r"^staging\.toml must not hold the bot token .*, never in staging\.toml$"):
        load_settings(other)

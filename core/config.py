"""Typed settings: ``config.toml`` for choices, the environment (or ``.env``) for overrides.

Environment variables use the prefix ``FLAMINGO_`` and ``__`` between levels, e.g.
``FLAMINGO_MODEL__PRECISION=int8``. A key or variable that names no setting is refused with the
closest one that does: a typo silently ignored would leave the default in force unnoticed.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from core.generation import OPTIONS, Range
from core.model.registry import transferred_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config.toml"
# The one place the version is written is the project's metadata.
VERSION: str = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8", "nf4"]


class Section(BaseModel):
    """A table of settings: a key it does not know is a typo to report, not a default to use."""

    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    name: str = Field(
        "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
        description="A registry name or a local model directory holding flamingo.json.",
    )
    precision: Precision = "auto"
    device: str = Field("auto", description="'auto' picks cuda when present, else cpu.")
    llama_path: str = Field(
        "huggyllama/llama-7b",
        description="LLaMA-7B in Hugging Face format, for the v1 openflamingo/OpenFlamingo-9B.",
    )
    language_model: str | None = Field(
        None,
        description="Another causal LM (hub id or directory) of the checkpoint's architecture and shape, under "
        "its trained layers; for the v1 9B, loaded instead of llama_path's. Not applied to choices.",
    )
    quantize_cross_attention: bool = Field(
        True, description="With int8 or nf4, quantize the cross-attention layers too, not only the LM."
    )
    choices: list[str] | None = Field(
        None, description="Models servers may choose besides this one (Ray backend); None: the registry."
    )
    skip_resource_checks: bool = Field(
        False, description="Load even when free memory or the hub cache's disk looks too small for the model."
    )

    @property
    def shown_name(self) -> str:
        """The model as status lines name it: saying so when its layers sit on another language model."""
        return self.name if self.language_model is None else transferred_name(self.name, self.language_model)

    def chosen(self, name: str) -> ModelSettings:
        """The settings a model a server chose loads with: as released (``language_model`` is the default's)."""
        return self.model_copy(update={"name": name, "language_model": None})


class ImageSettings(Section):
    max_bytes: int = Field(25 * 1024 * 1024, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)
    max_side_kept: int = Field(1024, ge=224, description="Larger images are scaled down to this short side.")
    max_per_request: int = Field(4, ge=1, le=4, description="Images one /comprehend may read (Discord offers 4).")
    download_seconds: float = Field(
        60, gt=0, description="An upload still downloading from Discord after this is refused: send it again."
    )
    decode_seconds: float = Field(
        10, gt=0, description="An upload read in a worker process for longer than this is refused, the process killed."
    )


class PromptSettings(Section):
    max_chars: int = Field(2000, gt=0)


_DEFAULT_RANGES = {option.name: option.range for option in OPTIONS if option.range is not None}


class GenerationSettings(Section):
    """The default length, and the range users may choose from for each option of ``core.generation.OPTIONS``
    (inclusive); config writes each range under its option's name."""

    max_new_tokens_default: int = Field(30, gt=0)
    ranges: dict[str, Range] = Field(default_factory=lambda: dict(_DEFAULT_RANGES))

    @model_validator(mode="before")
    @classmethod
    def _ranges_by_name(cls, data: Any) -> Any:
        """``top_k = { high = 100 }`` sets that option's range; a bound not given keeps its default."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        ranges: dict[str, Any] = dict(_DEFAULT_RANGES) | data.pop("ranges", {})
        for name in [key for key in data if key in _DEFAULT_RANGES]:
            given = data.pop(name)
            default = _DEFAULT_RANGES[name]
            ranges[name] = default.model_dump() | given if isinstance(given, dict) else given
        data["ranges"] = ranges
        return data

    @model_validator(mode="after")
    def _default_in_range(self) -> GenerationSettings:
        low, high = self.ranges["max_new_tokens"].low, self.ranges["max_new_tokens"].high
        if not low <= self.max_new_tokens_default <= high:
            raise ValueError(
                f"max_new_tokens_default {self.max_new_tokens_default} must lie within max_new_tokens ({low} to {high})"
            )
        return self


class ServiceSettings(Section):
    backend: Literal["local", "ray"] = Field("local", description="ray: the model runs on Ray Serve replicas.")
    max_queue: int = Field(32, gt=0, description="Requests waiting beyond this are refused as busy.")
    max_batch: int = Field(16, gt=0, description="Waiting requests decoded together in one batch.")
    prefix_cache_mb: int = Field(2048, ge=0, description="Tasks' precomputed examples, least recently used dropped.")
    image_cache_mb: int = Field(256, ge=0, description="Image features by content hash.")
    task_image_cache_mb: int = Field(
        256, ge=0, description="Server tasks' example images, decoded once per revision; least recently used dropped."
    )
    cuda_graph_max_batch: int = Field(
        4, ge=0, description="Batches up to this size replay each decode step from a CUDA graph (on a GPU); 0: off."
    )
    cuda_graph_mb: int = Field(512, ge=0, description="Key/value buffers of those graphs, least used dropped.")
    queue_update_seconds: float = Field(15.0, ge=1, description="Least time between edits of a place in line.")


class RaySettings(Section):
    """Where the model runs when it is served by Ray Serve replicas instead of in the bot's process."""

    address: str = Field("127.0.0.1:6379", description="The Ray cluster's GCS address, host:port.")
    namespace: str = "flamingo-bot"
    app_name: str = "flamingo"
    replicas: int = Field(1, ge=1, description="Replicas, or the least of them when max_replicas is set.")
    max_replicas: int | None = Field(None, ge=1, description="Set: Serve autoscales between replicas and this.")
    num_cpus: float = Field(1.0, ge=0, description="Per replica; fractions let tests fit several on one core.")
    num_gpus: float = Field(0.0, ge=0, description="Per replica: 1 on a GPU cluster.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one replica takes at once (its batch).")
    project_path: str | None = Field(None, description="This checkout on the workers; default: the same path.")
    routing: Literal["task_affinity", "default"] = Field(
        "task_affinity", description="task_affinity: a task's requests go where its examples are cached."
    )
    max_imbalance: int = Field(4, ge=0, description="Queue length beyond the shortest before affinity yields.")
    probe_seconds: float = Field(5.0, gt=0, description="How often the bot checks that the cluster answers.")
    extra_model_memory_gib: float = Field(
        0.0, ge=0, description="Per replica, for models servers chose besides the default; 0: the default only."
    )

    @model_validator(mode="after")
    def _bounds(self) -> RaySettings:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below replicas {self.replicas}")
        return self


class QuotaSettings(Section):
    user_cooldown_seconds: float = Field(10.0, ge=0)
    guild_in_flight: int = Field(8, gt=0, description="Requests of one guild being answered or waiting.")
    guild_per_period: int = Field(120, gt=0)
    period_seconds: float = Field(3600.0, gt=0)
    task_uploads_in_flight: int = Field(1, gt=0, description="A guild's add-example and import commands at once.")
    task_uploads_per_period: int = Field(30, gt=0, description="A guild's add-example and import commands per period.")
    task_upload_cooldown_seconds: float | None = Field(
        None, ge=0, description="Between two task uploads of one user; None: user_cooldown_seconds."
    )

    @property
    def task_uploads(self) -> QuotaSettings:
        """The quotas of task uploads, which read images too but have their own, as members' requests'."""
        cooldown = self.task_upload_cooldown_seconds
        return QuotaSettings(
            user_cooldown_seconds=self.user_cooldown_seconds if cooldown is None else cooldown,
            guild_in_flight=self.task_uploads_in_flight,
            guild_per_period=self.task_uploads_per_period,
            period_seconds=self.period_seconds,
        )


class DiscordSettings(Section):
    owner_ids: list[int] = Field(default_factory=list, description="Empty: the application's owner or team.")
    admin_guild_id: int | None = Field(None, description="The only guild that sees the owner's admin commands.")
    sync_commands_on_start: bool = True
    api_base_url: str = "https://discord.com/api/v10"
    privacy_url: str | None = Field(None, description="Shown by /help when set.")
    terms_url: str | None = Field(None, description="Shown by /help when set.")
    gateway_url: str = Field("wss://gateway.discord.gg/", description="For every shard, also after a new session.")
    shard_count: int | None = Field(None, ge=1, description="None: as many shards as Discord recommends.")
    heartbeat_timeout_seconds: float = Field(
        60.0,
        gt=5,  # discord.py waits 5 s before identifying anew without reading; less would never let it connect
        description="A connection that receives nothing for this long is made anew: longer than the gateway's "
        "heartbeat interval (Discord's: 41.25 s).",
    )

    @field_validator("api_base_url")
    @classmethod
    def _http(cls, url: str) -> str:
        return _url(url, ("http", "https"))

    @field_validator("gateway_url")
    @classmethod
    def _websocket(cls, url: str) -> str:
        return _url(url, ("ws", "wss"))


def _url(url: str, schemes: tuple[str, ...]) -> str:
    """A malformed address is a setting to fix, not a connection error after the model has loaded."""
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be a {' or '.join(f'{scheme}://' for scheme in schemes)} address with a host")
    return url


class LimitSettings(Section):
    max_tasks_per_guild: int = Field(50, gt=0)
    max_examples_per_task: int = Field(8, gt=0)
    max_example_chars: int = Field(400, gt=0)
    max_description_chars: int = Field(200, gt=0)
    max_template_chars: int = Field(400, gt=0)
    max_import_bytes: int = Field(25 * 1024 * 1024, gt=0, description="A task file /manage-tasks import reads.")
    max_task_images_mb: float = Field(64, gt=0, description="All of one server's task images together.")
    max_all_task_images_mb: float = Field(
        4096, gt=0, description="All servers' task images together: the database's share the operator allows them."
    )

    @property
    def max_task_image_bytes(self) -> int:
        return round(self.max_task_images_mb * 2**20)

    @property
    def max_all_task_image_bytes(self) -> int:
        return round(self.max_all_task_images_mb * 2**20)


class StorageSettings(Section):
    database: Path = Field(Path("data/flamingo.db"), description="Relative paths are relative to the project.")
    request_images_mb: float = Field(
        4096, gt=0, description="Answered requests' images, all together; beyond it the oldest are deleted early."
    )
    request_images_per_server_mb: float = Field(
        256, gt=0, description="One server's (in direct messages, one user's); beyond it that server's oldest go."
    )

    @model_validator(mode="after")
    def _share_within_total(self) -> StorageSettings:
        if self.request_images_per_server_mb > self.request_images_mb:
            raise ValueError(
                f"request_images_per_server_mb {self.request_images_per_server_mb:g} is above "
                f"request_images_mb {self.request_images_mb:g}"
            )
        return self

    @property
    def database_path(self) -> Path:
        return self.database if self.database.is_absolute() else PROJECT_ROOT / self.database


class PrivacySettings(Section):
    request_retention_hours: float = Field(
        168.0, gt=0, description="Answered requests (kept for their buttons) are deleted after this."
    )
    departed_guild_retention_days: float = Field(
        30.0, ge=0, description="A server's tasks and settings are deleted this long after the bot leaves it."
    )
    blocked_words: list[str] = Field(
        default_factory=list, description="Answers containing these, outside NSFW channels, are withheld."
    )
    purge_interval_minutes: float = Field(60.0, gt=0)


class AnswerSettings(Section):
    stream_edit_seconds: float = Field(
        1.0, ge=0, description="Least time between edits of an answer being written; 0: posted only when done."
    )
    stream_after_seconds: float = Field(
        2.0, ge=0, description="An answer is shown while written only once it takes this long: short ones are one post."
    )


class MetricsSettings(Section):
    enabled: bool = Field(False, description="Serve /metrics (Prometheus) and /health over HTTP.")
    host: str = Field("127.0.0.1", description="Loopback unless the scraper is on another machine.")
    port: int = Field(9464, ge=1, le=65535)


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_prompts: bool = Field(False, description="Prompts are private to the people who wrote them.")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and what is allowed."""


class _TomlWithoutSecrets(TomlConfigSettingsSource):
    """The settings file, refused if it holds the token (it is committed; the token must never be) or a key
    that is no setting (the settings themselves ignore unknown keys, which the environment is full of)."""

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        name = Path(str(self.toml_file_path)).name
        keys = list(_keys_in(values))
        token = next((key for key in keys if key[-1].lower() in _TOKEN_KEYS), None)
        if token is not None:
            raise ConfigError(
                f"{name} must not hold the bot token ({'.'.join(token)}); "
                f"set DISCORD_TOKEN in the environment or .env, never in {name}"
            )
        unknown = next((key for key in keys if key not in _SETTING_KEYS), None)
        if unknown is not None:
            raise ConfigError(_unknown_setting(unknown, ".".join, f" in {name}"))
        return values


def _keys_in(values: Mapping[str, Any], above: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key of a TOML document, each after the table holding it (so the outermost unknown comes first)."""
    for name, value in values.items():
        yield (*above, name)
        if isinstance(value, dict):
            yield from _keys_in(value, (*above, name))


_ENV_PREFIX = "FLAMINGO_"
_ENV_NESTING = "__"
# What the bot token gets called where it does not belong: the refusal says where it does.
_TOKEN_KEYS = frozenset({"token", "bot_token", "discord_token"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=_ENV_PREFIX,
        env_nested_delimiter=_ENV_NESTING,
        env_file=PROJECT_ROOT / ".env",
        extra="ignore",
    )

    model: ModelSettings = ModelSettings()
    images: ImageSettings = ImageSettings()
    prompts: PromptSettings = PromptSettings()
    generation: GenerationSettings = GenerationSettings()
    service: ServiceSettings = ServiceSettings()
    answers: AnswerSettings = AnswerSettings()
    discord: DiscordSettings = DiscordSettings()
    limits: LimitSettings = LimitSettings()
    quotas: QuotaSettings = QuotaSettings()
    storage: StorageSettings = StorageSettings()
    privacy: PrivacySettings = PrivacySettings()
    ray: RaySettings = RaySettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    data_dir: Path = Field(PROJECT_ROOT / "data", description="The built-in tasks (tasks/*.json) and their images.")
    discord_token: SecretStr | None = Field(None, validation_alias=AliasChoices("DISCORD_TOKEN", "discord_token"))

    @field_validator("data_dir")
    @classmethod
    def _within_project(cls, path: Path) -> Path:
        """Relative to the project, like the database, whatever folder the bot is started from."""
        return path if path.is_absolute() else PROJECT_ROOT / path

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        for source, where in ((env_settings, ""), (dotenv_settings, " in .env")):
            if isinstance(source, EnvSettingsSource):
                _refuse_unknown_variables(source.env_vars, where)
        toml = _TomlWithoutSecrets(settings_cls, toml_file=settings_cls.model_config.get("toml_file"))
        return (init_settings, env_settings, dotenv_settings, toml)


def _setting_keys(model: type[BaseModel], above: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key config.toml and FLAMINGO_ variables may name, after the tables above it."""
    # The token has a name of its own (DISCORD_TOKEN), never a FLAMINGO_ one nor a key in config.toml.
    fields = {name: field.annotation for name, field in model.model_fields.items() if field.validation_alias is None}
    if model is GenerationSettings:  # each range is written under its option's name, not inside ``ranges``
        del fields["ranges"]
        fields |= dict.fromkeys(_DEFAULT_RANGES, Range)
    for name, kind in fields.items():
        yield (*above, name)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _setting_keys(kind, (*above, name))


_SETTING_KEYS = frozenset(_setting_keys(Settings))


def _refuse_unknown_variables(variables: Mapping[str, str | None], where: str) -> None:
    """Raise ``ConfigError`` for the first ``FLAMINGO_`` variable (names come lowercased) that names no setting."""
    prefix = _ENV_PREFIX.lower()
    for name in sorted(variables):
        if not name.startswith(prefix):
            continue
        key = tuple(name.removeprefix(prefix).split(_ENV_NESTING))
        if key in _SETTING_KEYS:
            continue
        if key[-1] in _TOKEN_KEYS:
            raise ConfigError(f"unknown setting {_variable(key)}{where}; did you mean DISCORD_TOKEN?")
        raise ConfigError(_unknown_setting(key, _variable, where))


def _variable(key: tuple[str, ...]) -> str:
    return _ENV_PREFIX + _ENV_NESTING.join(key).upper()


def _unknown_setting(key: tuple[str, ...], spell: Callable[[tuple[str, ...]], str], where: str) -> str:
    """One line naming the key and the real setting it most likely meant: the same key in another
    table (it was put in the wrong one), else the most alike key of its table (of any, when the table
    is no setting either); of several, the one in the table most alike."""
    meant = [real for real in _SETTING_KEYS if real[-1] == key[-1]]
    if not meant:
        table = key[:-1]
        known_table = not table or table in _SETTING_KEYS
        scope = [real for real in _SETTING_KEYS if real[:-1] == table] if known_table else list(_SETTING_KEYS)
        alike = difflib.get_close_matches(key[-1], {real[-1] for real in scope}, n=1)
        meant = [real for real in scope if real[-1] in alike]
    by_name = {".".join(real): real for real in meant}
    closest = difflib.get_close_matches(".".join(key), by_name, n=1, cutoff=0)
    suggestion = f"; did you mean {spell(by_name[closest[0]])}?" if closest else ""
    return f"unknown setting {spell(key)}{where}{suggestion}"


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = list(first["loc"])
    if loc[:2] == ["generation", "ranges"]:  # config writes each range under its option's name
        del loc[1]
    if first["type"] == "extra_forbidden":  # keys in files and variables' names are checked before: JSON's
        return _unknown_setting(tuple(map(str, loc)), ".".join, " in a FLAMINGO_ variable's JSON")
    key = ".".join(str(part) for part in loc) or "settings"
    given = first.get("input")
    # A check across a table (a range, a default within its range) gets the whole table as input.
    return f"bad setting {key}: {first['msg']}" + ("" if isinstance(given, dict) else f" (got {given!r})")


def load_settings(config_path: Path | None = None) -> Settings:
    """Read settings from a TOML file (the project's ``config.toml`` by default).

    Raises ``ConfigError`` with one line naming the bad key and what it allows.
    """
    path = config_path or DEFAULT_CONFIG_PATH
    if not path.is_file():
        raise ConfigError(f"no configuration file at {path}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FromFile()
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    except SettingsError as error:  # a FLAMINGO_ variable that is not valid JSON, say
        raise ConfigError(
            f"cannot read the environment's settings (FLAMINGO_*, .env): {error}; lists and tables are "
            "written as JSON there, e.g. FLAMINGO_DISCORD__OWNER_IDS='[123]'"
        ) from None
    except ValueError as error:  # TOML syntax
        raise ConfigError(f"cannot read {path}: {error}") from None

"""The bot: owns the one model service, the task store, the task library and the evaluations under way.

They live here, not in a cog module, so that reloading a cog swaps its code without reloading the
model's weights or reopening the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TypeAlias

import discord
import yarl
from aiohttp import web
from discord import app_commands
from discord.ext import commands
from discord.gateway import DiscordWebSocket

from cogs.utils.errors import reply_with_error
from core.asking import Asking
from core.config import ConfigError, Settings
from core.errors import StorageUnavailable
from core.evaluation.jobs import TaskEvaluations
from core.moderation import AnswerFilter, ReportLog, WordListFilter
from core.quotas import RequestQuotas
from core.serving import ModelService, QueuedRequest, start_model_service
from core.serving.metrics import Health, Metrics, gather_caches, serve_metrics
from core.serving.model_choice import ModelCatalog
from core.serving.systemd import notify
from core.storage import Storage
from core.storage.request_store import RequestBudget
from core.tasks.builtin import load_builtin_tasks
from core.tasks.library import TaskLibrary

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.inference", "cogs.tasks", "cogs.settings", "cogs.privacy", "cogs.admin", "cogs.help", "cogs.queue")
# How long an interaction that arrives during a reload may wait for it before being told to retry.
_RELOAD_WAIT_SECONDS = 2.0
_SHUTDOWN_GRACE_SECONDS = 10.0


class FlamingoTree(app_commands.CommandTree["FlamingoBot"]):
    async def interaction_check(self, interaction: Interaction) -> bool:
        """Hold interactions while cogs reload, so none finds its command missing; and let each
        finish before a shutdown closes the connection and the database under it."""
        bot = interaction.client
        bot.track_current_task()
        await bot.after_reload()
        return True

    async def on_error(self, interaction: Interaction, error: app_commands.AppCommandError) -> None:
        await reply_with_error(interaction, error)


async def _open_storage(path: Path) -> Storage:
    try:
        return await Storage.open(path)
    except StorageUnavailable as error:  # it could not even migrate: the operator reads SQLite's words
        raise ConfigError(f"cannot open the database at {path}: {error.cause}") from None
    except (sqlite3.Error, OSError, RuntimeError) as error:
        raise ConfigError(f"cannot open the database at {path}: {error}") from None


class FlamingoBot(commands.AutoShardedBot):
    service: ModelService
    store: Storage
    library: TaskLibrary
    quotas: RequestQuotas
    models: ModelCatalog
    asking: Asking
    evaluations: TaskEvaluations

    def __init__(self, settings: Settings, service: ModelService | None = None) -> None:
        # Both are needed: REST routes come from Route.BASE, and every shard connects (and falls back
        # after an invalidated session) to DEFAULT_GATEWAY once the shard count is known (setup_hook).
        discord.http.Route.BASE = settings.discord.api_base_url
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord.gateway_url)
        owner_ids = set(settings.discord.owner_ids) or None
        super().__init__(
            command_prefix=commands.when_mentioned,
            help_command=None,
            intents=discord.Intents(guilds=True),
            allowed_mentions=discord.AllowedMentions.none(),
            owner_ids=owner_ids,
            tree_cls=FlamingoTree,
            shard_count=settings.discord.shard_count,
            heartbeat_timeout=settings.discord.heartbeat_timeout_seconds,
        )
        self.settings = settings
        self._given_service = service
        self.started_at = time.monotonic()
        self.commands_ready = asyncio.Event()
        self.commands_ready.set()
        self.in_flight: set[asyncio.Task[Any]] = set()
        # Requests waiting for the model, by interaction id, with who asked: for their cancel buttons.
        self.waiting: dict[int, tuple[QueuedRequest, int]] = {}
        self.answer_filter: AnswerFilter = WordListFilter(settings.privacy.blocked_words)
        self.reports = ReportLog()
        self._closing: asyncio.Task[None] | None = None
        self.started_up = False  # until then a shutdown has nothing to finish (see main.py's signals)
        self._purging: asyncio.Task[None] | None = None
        self.metrics = Metrics()
        self._metrics_server: web.AppRunner | None = None

    async def after_reload(self) -> None:
        """Wait (briefly) for a cog reload in progress to end, so an interaction finds its handler."""
        try:
            await asyncio.wait_for(self.commands_ready.wait(), _RELOAD_WAIT_SECONDS)
        except TimeoutError:
            log.warning("an interaction waited %.0f s for a reload", _RELOAD_WAIT_SECONDS)

    async def setup_hook(self) -> None:
        if self.shard_count is None:
            # Discord's recommendation, asked here so that discord.py then connects every shard to the
            # configured gateway rather than to the address /gateway/bot gives.
            self.shard_count = (await self.http.get_bot_gateway())[0]
        # The database and the metrics port first: a bad path or a busy port is told in seconds,
        # not after minutes of loading the model.
        self.store = await _open_storage(self.settings.storage.database_path)
        self.store.max_all_image_bytes = self.settings.limits.max_all_task_image_bytes
        await self._check_admin_guild()
        metrics = self.settings.metrics
        if metrics.enabled:
            try:
                self._metrics_server = await serve_metrics(
                    metrics.host, metrics.port, self._render_metrics, self._healthy
                )
            except OSError as error:
                why = os.strerror(error.errno) if error.errno else str(error)
                raise ConfigError(f"cannot serve metrics on {metrics.host}:{metrics.port}: {why}") from None
        given = self._given_service
        notify("STATUS=Loading the model")
        self.service = given if given is not None else await asyncio.to_thread(start_model_service, self.settings)
        self.models = await asyncio.to_thread(ModelCatalog.from_settings, self.settings)
        builtins = await asyncio.to_thread(load_builtin_tasks, self.settings.data_dir, self.settings.images)
        self.library = TaskLibrary(self.store, builtins, self.service.rules, self.settings)
        self.quotas = RequestQuotas(self.settings.quotas)
        self.asking = Asking(
            self.settings,
            self.store,
            self.library,
            self.quotas,
            self.models,
            self.service,
            self.metrics,
            self.answer_filter,
        )
        self.evaluations = TaskEvaluations(self.asking)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        if self.settings.discord.sync_commands_on_start:
            await self.sync_commands()
        self.started_up = True
        notify("STATUS=Connecting to Discord")

    async def _check_admin_guild(self) -> None:
        """Syncing /admin to a guild the bot is not in would fail only after the model had loaded."""
        guild_id = self.settings.discord.admin_guild_id
        if guild_id is None:
            return
        try:
            await self.http.get_guild(guild_id)
        except (discord.Forbidden, discord.NotFound):
            raise ConfigError(
                f"discord.admin_guild_id = {guild_id}: the bot is not in that server; "
                "add it there or change the setting"
            ) from None

    async def _render_metrics(self) -> bytes:
        writes = self.store.writes
        if not self.started_up:  # the model is still loading
            return self.metrics.exposition(0, {}, None, dict(self.latencies), False, writes)
        caches, replicas = await gather_caches(self.service.cache_status)
        shards = dict(self.latencies)
        return self.metrics.exposition(self.service.waiting, caches, replicas, shards, self.service.reachable, writes)

    def _healthy(self) -> Health:
        """Serving while connected and the model answers. A database that refuses writes only degrades
        it: answers are still posted (unstored), so a load balancer must not restart the bot for it."""
        ready = self.started_up and self.is_ready() and not self.is_closed()
        serving = ready and not self.closing and self.service.reachable
        return Health(serving, ("storage",) if self.store.writes.degraded else ())

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        """A server's join or leave the database refused to record is logged by the store once while
        writes fail, not with a traceback per event."""
        if isinstance(sys.exc_info()[1], StorageUnavailable):
            return
        await super().on_error(event_method, *args, **kwargs)

    async def _purge_regularly(self) -> None:
        """Retention: expired requests and the data of servers left long enough ago are deleted."""
        privacy = self.settings.privacy
        while True:
            try:
                purged = await self.store.purge(privacy, RequestBudget.of(self.settings.storage))
                if purged.requests or purged.guilds or purged.over_budget:
                    log.info(
                        "deleted %d expired requests, %d beyond the storage budget and %d departed servers",
                        purged.requests,
                        purged.over_budget,
                        purged.guilds,
                    )
            except StorageUnavailable:
                pass  # logged by the store when writes stop being taken; tried again all the same
            except Exception:
                log.exception("purging expired data failed; will try again")
            await asyncio.sleep(privacy.purge_interval_minutes * 60)

    async def on_ready(self) -> None:
        """Every shard is connected: what changed while the bot was away is taken into account."""
        # A refusal is logged by the store; presence is reconciled at the next connection, and the purge starts.
        with contextlib.suppress(StorageUnavailable):
            await self.store.reconcile_presence({guild.id for guild in self.guilds})
        log.info("ready: in %d servers, over %d shard(s)", len(self.guilds), self.shard_count or 1)
        if not self.closing:
            notify("READY=1", f"STATUS=Answering in {len(self.guilds)} servers")
        if self._purging is None and not self.closing:
            # Only now: a server that re-added the bot while it was away is known to be back, and
            # keeps what it had however long ago it left.
            self._purging = asyncio.create_task(self._purge_regularly(), name="flamingo-purge")

    async def on_guild_join(self, guild: discord.Guild) -> None:
        await self.store.mark_present(guild.id)

    async def on_guild_available(self, guild: discord.Guild) -> None:
        await self.store.mark_present(guild.id)

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        await self._forget_deleted(channel.guild.id, channel.id)

    async def _forget_deleted(self, guild_id: int, gone: int) -> None:
        """A channel the server deleted leaves its settings (written only if they named it)."""
        rules = await self.store.guild_settings(guild_id)
        if rules.forgetting(gone) != rules:
            await self.store.change_guild_settings(guild_id, lambda current: current.forgetting(gone))
            log.info("server %s deleted %s, which its settings named; they no longer do", guild_id, gone)

    async def on_guild_remove(self, guild: discord.Guild) -> None:
        """Kept for the grace period in config, so a server that removed the bot by mistake loses nothing."""
        await self.store.mark_departed(guild.id)

    async def sync_commands(self, guild_id: int | None = None) -> int:
        """Global commands everywhere, admin commands in the admin guild; or all of one guild's."""
        if guild_id is not None:
            return len(await self.tree.sync(guild=discord.Object(guild_id)))
        synced = len(await self.tree.sync())
        admin_guild = self.settings.discord.admin_guild_id
        if admin_guild is not None:
            synced += len(await self.tree.sync(guild=discord.Object(admin_guild)))
        return synced

    async def reload_cogs(self, names: list[str]) -> dict[str, str]:
        """Each cog that failed to reload, with why; discord.py keeps its previous version running,
        and the others are reloaded all the same."""
        failed = {}
        self.commands_ready.clear()
        try:
            for name in names:
                try:
                    await self.reload_extension(name)
                except commands.ExtensionError as error:
                    log.exception("reloading %s failed; its previous version stays", name)
                    cause = error.__cause__ or error
                    failed[name] = f"{type(cause).__name__}: {cause}"
        finally:
            self.commands_ready.set()
        return failed

    @property
    def closing(self) -> bool:
        return self._closing is not None

    def request_shutdown(self) -> None:
        """Close from a signal handler or a command; the task is kept so it cannot be collected."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close(), name="flamingo-shutdown")

    def track_current_task(self) -> None:
        """Remember the command or click running now: it must be allowed to answer before the bot disconnects."""
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

    async def close(self) -> None:
        """Finish the requests being answered (stopping them after the service's grace), refuse the
        queued ones, let every command and click under way reply, then disconnect and close the database."""
        notify("STOPPING=1", "STATUS=Stopping: finishing the answers under way")
        done = []  # the closing line says only what was running: a refused token opens nothing
        if getattr(self, "service", None) is not None:
            await asyncio.to_thread(self.service.close)
            done.append("answers delivered")
        pending = [task for task in self.in_flight if task is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=_SHUTDOWN_GRACE_SECONDS)
        await super().close()
        if self._purging is not None:
            self._purging.cancel()  # and waited for: it may be inside a transaction
            await asyncio.gather(self._purging, return_exceptions=True)
        if self._metrics_server is not None:
            await self._metrics_server.cleanup()
        if getattr(self, "store", None) is not None:
            await self.store.close()
            done.append("the database closed")
        log.info("Closed: %s", ", ".join(done) if done else "nothing had been started")

    async def finish_closing(self) -> None:
        """Wait for a shutdown in progress, which outlives ``start`` (it returns once disconnected)."""
        if self._closing is not None:
            await self._closing


# Every interaction the bot handles is one of this bot's: ``interaction.client`` is typed.
Interaction: TypeAlias = discord.Interaction[FlamingoBot]

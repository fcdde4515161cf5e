"""``/admin``: the owner's tools, registered only in the configured admin guild."""

from __future__ import annotations

import logging
import time

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.bot import EXTENSIONS, FlamingoBot, Interaction
from cogs.utils.checks import OwnerGroup
from cogs.utils.options import limit_options
from cogs.utils.replies import clip
from core.config import VERSION
from core.model.engine import EngineStatus
from core.storage.database import WriteState
from core.wording import duration, plural

log = logging.getLogger(__name__)


def _cache_line(stats: dict[str, int], what: str) -> str:
    return (
        f"{stats['entries']} {what}, {stats['bytes'] / 2**20:.1f} MiB, {stats['hits']} hits / {stats['misses']} misses"
    )


def _model_fields(bot: FlamingoBot) -> dict[str, str]:
    status = bot.service.status()
    engine = status.engine
    if engine is None:  # the ray backend: the model lives on the cluster's replicas
        return {
            "Model": status.model,
            "Backend": f"ray: {status.cluster}"
            + ("" if status.reachable else " (unreachable: rejoining when it answers)"),
            "Server models": f"{len(bot.models.offered()) - 1} offered besides the default, "
            f"up to {bot.models.models_per_replica} loaded per replica",
            "Queue": f"{status.waiting} in flight",
        }
    where = "on the GPU" if engine.device.startswith("cuda") else "resident"
    return {
        "Model": engine.model,
        "Precision": engine.precision,
        "Device": engine.device,
        "Memory": f"{engine.memory_bytes / 2**30:.2f} GiB {where}",
        "Queue": f"{status.waiting} waiting",
        "Prefix cache": _cache_line(engine.caches["prefix"], "tasks"),
        "Image cache": _cache_line(engine.caches["image"], "images"),
        "Decode graphs": _graphs_line(engine),
    }


def _graphs_line(engine: EngineStatus) -> str:
    """The CUDA-graphed decode steps: off (CPU, int8, remote-code models or turned off), failed, or in use."""
    if engine.graphs_failed:
        return "off: a capture failed (see the log)"
    stats = engine.caches.get("graphs")
    if stats is None:
        return "off"
    used = engine.graphed_batches
    return f"{stats['entries']} kept, {stats['bytes'] / 2**20:.1f} MiB, batches stepped from them: {used}"


def _storage_line(writes: WriteState) -> str:
    if writes.refusal is None:
        return "ok" + (f" ({plural(writes.refused, 'write')} refused since start)" if writes.refused else "")
    return (
        f"degraded: the database refuses writes ({writes.refusal}); answers are posted unstored and "
        "changes refused until a write succeeds"
    )


def status_embed(bot: FlamingoBot) -> discord.Embed:
    writes = bot.store.writes
    colour = discord.Colour.orange() if writes.degraded else discord.Colour.green()
    embed = discord.Embed(title="flamingo-bot status", colour=colour)
    fields = {
        **_model_fields(bot),
        "Storage": clip(_storage_line(writes), 1024),
        "Uptime": duration(time.monotonic() - bot.started_at),
        "Servers": str(len(bot.guilds)),
        "Shards": " · ".join(f"{shard}: {latency * 1000:.0f} ms" for shard, latency in bot.latencies)
        or "not connected",
        "Version": VERSION,
    }
    for name, value in fields.items():
        embed.add_field(name=name, value=value)
    return embed


class Admin(commands.Cog):
    admin = OwnerGroup(name="admin", description="Owner tools")

    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot
        sync = self.admin.get_command("sync")
        assert isinstance(sync, app_commands.Command)
        limit_options(sync, guild_id=(17, 20))  # the digits of a Discord id

    @admin.command(description="Reload one cog, or all of them, without reloading the model")
    @app_commands.describe(cog="e.g. cogs.inference; empty reloads all")
    @app_commands.choices(cog=[app_commands.Choice(name=name, value=name) for name in EXTENSIONS])
    async def reload(self, interaction: Interaction, cog: str | None = None) -> None:
        names = [cog] if cog else list(EXTENSIONS)
        await interaction.response.defer(ephemeral=True, thinking=True)
        failed = await self.bot.reload_cogs(names)
        reloaded = [name for name in names if name not in failed]
        lines = [f"Reloaded {', '.join(reloaded)}."] if reloaded else []
        lines += [f"{name} failed, and its previous version still runs: {why}" for name, why in failed.items()]
        await interaction.followup.send(clip("\n".join(lines), 2000), ephemeral=True)

    @admin.command(description="Sync commands with Discord: all of them, or only one guild's own (such as /admin)")
    @app_commands.describe(guild_id="A server's id, to sync only the commands made for that server")
    async def sync(self, interaction: Interaction, guild_id: str | None = None) -> None:
        if guild_id is not None and not guild_id.strip().isdigit():
            await interaction.response.send_message(f"“{guild_id}” is not a server's id.", ephemeral=True)
            return
        target = int(guild_id) if guild_id is not None else None
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            count = await self.bot.sync_commands(target)
        except discord.Forbidden:
            await interaction.followup.send(f"The bot is not in server {target}.", ephemeral=True)
            return
        where = f"for server {target}" if target else "everywhere"
        await interaction.followup.send(f"Synced {plural(count, 'command')} {where}.", ephemeral=True)

    @admin.command(description="Model, memory, queue and uptime")
    async def status(self, interaction: Interaction) -> None:
        await interaction.response.send_message(embed=status_embed(self.bot), ephemeral=True)

    @admin.command(description="Finish the answers under way (a minute at most), refuse queued ones, disconnect")
    async def shutdown(self, interaction: Interaction) -> None:
        waiting = self.bot.service.waiting
        queued = f"{plural(waiting, 'waiting request')} {'is' if waiting == 1 else 'are'} told to try later"
        await interaction.response.send_message(
            "Shutting down: answers under way are finished first (a minute at most)"
            + (f", and {queued}." if waiting else "; nothing is waiting."),
            ephemeral=True,
        )
        log.info("shutdown requested by %s", interaction.user.id)
        self.bot.request_shutdown()


async def setup(bot: FlamingoBot) -> None:
    guild_id = bot.settings.discord.admin_guild_id
    if guild_id is None:
        log.warning("discord.admin_guild_id is not set: the /admin commands are not registered")
        return
    await bot.add_cog(Admin(bot), guild=discord.Object(guild_id))

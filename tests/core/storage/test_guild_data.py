"""Server settings, stored requests and retention, on the bot's one database."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from core.config import PrivacySettings, QuotaSettings
from core.errors import BadParameter
from core.generation import GenerationParams
from core.guild_settings import GuildSettings, check_quota_change
from core.moderation import WordListFilter
from core.storage import Forgotten, Storage
from core.storage.request_store import DELETE_BATCH, RequestBudget

GUILD, OTHER = 1, 2
ROOMY = RequestBudget(total=2**40, per_place=2**40)


@pytest.fixture
async def storage(tmp_path):
    storage = await Storage.open(tmp_path / "bot.db")
    yield storage
    await storage.close()


async def test_settings_default_until_changed_and_are_kept_per_guild(storage):
    assert await storage.guild_settings(GUILD) == GuildSettings()
    await storage.set_default_task(GUILD, "cats")
    changed = await storage.change_guild_settings(
        GUILD,
        lambda s: replace(
            s, answer_channels=frozenset({5, 3}), required_role=9, ephemeral_answers=True, model="models/small"
        ),
    )
    assert changed == GuildSettings("cats", frozenset({3, 5}), 9, True, model="models/small")
    assert await storage.guild_settings(GUILD) == changed
    assert await storage.guild_settings(OTHER) == GuildSettings()


async def test_concurrent_changes_each_see_the_other(storage):
    await asyncio.gather(
        *(
            storage.change_guild_settings(GUILD, lambda s, c=c: replace(s, answer_channels=s.answer_channels | {c}))
            for c in range(10)
        )
    )
    assert (await storage.guild_settings(GUILD)).answer_channels == frozenset(range(10))


async def test_too_many_answer_channels_are_refused_and_nothing_changes(storage):
    with pytest.raises(BadParameter, match="At most 25 answer channels"):
        await storage.change_guild_settings(GUILD, lambda s: replace(s, answer_channels=frozenset(range(26))))
    assert await storage.guild_settings(GUILD) == GuildSettings()


def test_a_server_can_only_tighten_the_operators_quotas():
    defaults = QuotaSettings(user_cooldown_seconds=10, guild_in_flight=8, guild_per_period=120)
    own = GuildSettings(user_cooldown_seconds=60, guild_in_flight=2, guild_per_period=20).quotas(defaults)
    assert (own.user_cooldown_seconds, own.guild_in_flight, own.guild_per_period) == (60, 2, 20)
    assert GuildSettings().quotas(defaults) == defaults
    check_quota_change(defaults, 10, 1, 120)
    for values, message in [
        ((5, None, None), "cooldown_seconds must be between 10 and 3600"),
        ((None, 9, None), "in_flight must be between 1 and 8"),
        ((None, None, 0), "per_period must be between 1 and 120"),
    ]:
        with pytest.raises(BadParameter, match=message):
            check_quota_change(defaults, *values)


def test_answer_channels_allow_their_threads():
    rules = GuildSettings(answer_channels=frozenset({10}))
    assert rules.allows_channel(10) and rules.allows_channel(77, 10)
    assert not rules.allows_channel(77, None)
    assert GuildSettings().allows_channel(77)


async def test_requests_round_trip_only_within_their_guild(storage):
    params = GenerationParams(max_new_tokens=5, do_sample=True, temperature=0.7)
    request_id = await storage.save_request(
        GUILD, 3, 42, "caption", "<image>Output:", params, [b"one", b"two"], budget=ROOMY
    )
    stored = await storage.get_request(request_id, GUILD, 42)
    assert stored is not None
    assert (stored.user_id, stored.task, stored.prompt, stored.params, stored.images) == (
        42,
        "caption",
        "<image>Output:",
        params,
        (b"one", b"two"),
    )
    assert stored.model is None  # the default model answered
    assert await storage.get_request(request_id, OTHER, 42) is None
    direct = await storage.save_request(
        None, 4, 42, "vqa", "<image>Q:", GenerationParams(), [b"x"], "models/small", budget=ROOMY
    )
    assert (await storage.get_request(direct, None, 42)).guild_id == 0  # type: ignore[union-attr]
    assert (await storage.get_request(direct, None, 42)).model == "models/small"  # type: ignore[union-attr]
    assert await storage.get_request(direct, None, 43) is None  # direct messages are each person's own
    await storage.delete_request(direct, None, 43)
    assert await storage.get_request(direct, None, 42) is not None
    await storage.delete_request(request_id, OTHER, 42)  # only where it was made
    assert await storage.get_request(request_id, GUILD, 42) is not None
    await storage.delete_request(request_id, GUILD, 42)
    assert await storage.get_request(request_id, GUILD, 42) is None


async def test_purge_deletes_old_requests_and_servers_left_long_ago(storage):
    privacy = PrivacySettings(request_retention_hours=24, departed_guild_retention_days=30)
    for guild in (GUILD, OTHER):
        await storage.create_task(
            guild, "cats", "", "<image>Cat:", 42, max_tasks=5, max_image_bytes=2**30, examples=[(b"jpeg", "t", 42)]
        )
        await storage.set_default_task(guild, "cats")
        await storage.save_request(guild, 3, 42, "cats", "<image>Cat:", GenerationParams(), [b"x"], budget=ROOMY)
    await storage.mark_departed(GUILD)
    await storage.mark_departed(OTHER)
    await storage.mark_present(OTHER)  # came back: nothing of it may go

    soon = await storage.purge(privacy, ROOMY, datetime.now(UTC) + timedelta(hours=1))
    assert (soon.requests, soon.guilds) == (0, 0)
    later = await storage.purge(privacy, ROOMY, datetime.now(UTC) + timedelta(days=2))
    assert (later.requests, later.guilds) == (2, 0)
    assert await storage.get_task(GUILD, "cats") is not None
    gone = await storage.purge(privacy, ROOMY, datetime.now(UTC) + timedelta(days=31))
    assert gone.guilds == 1
    assert await storage.get_task(GUILD, "cats") is None
    assert await storage.guild_settings(GUILD) == GuildSettings()
    assert await storage.get_task(OTHER, "cats") is not None
    assert (await storage.guild_settings(OTHER)).default_task == "cats"


async def test_servers_joined_or_left_while_the_bot_was_away_are_reconciled_on_connecting(storage):
    """Discord sends no join or leave for changes made while the bot was disconnected."""
    privacy = PrivacySettings(departed_guild_retention_days=30)
    for guild in (GUILD, OTHER):
        await storage.create_task(guild, "cats", "", "<image>Cat:", 7, max_tasks=5, max_image_bytes=2**30)
    await storage.save_request(None, 3, 42, "caption", "<image>Output:", GenerationParams(), [b"x"], budget=ROOMY)
    await storage.mark_departed(GUILD)  # left, then invited back while the bot was away
    await storage.reconcile_presence({GUILD})  # and OTHER removed it meanwhile
    assert (await storage.purge(privacy, ROOMY, datetime.now(UTC) + timedelta(days=31))).guilds == 1
    assert await storage.get_task(GUILD, "cats") is not None
    assert await storage.get_task(OTHER, "cats") is None


async def test_forgetting_a_user_removes_their_requests_and_examples_and_renumbers(storage):
    await storage.create_task(
        GUILD, "cats", "", "<image>Cat:", 7, max_tasks=5, max_image_bytes=2**30, examples=[(b"a", "by seven", 7)]
    )
    for image, text, author in [(b"b", "by me", 42), (b"c", "by seven again", 7), (b"d", "by me again", 42)]:
        await storage.add_example(GUILD, "cats", image, text, max_examples=8, max_image_bytes=2**30, added_by=author)
    await storage.save_request(GUILD, 3, 42, "cats", "<image>Cat:", GenerationParams(), [b"x"], budget=ROOMY)
    mine = await storage.save_request(GUILD, 3, 7, "cats", "<image>Cat:", GenerationParams(), [b"y"], budget=ROOMY)
    before = await storage.get_task(GUILD, "cats")

    assert await storage.forget_user(42) == Forgotten(requests=1, examples=2)
    assert await storage.delete_user_examples(42) == 2
    after = await storage.get_task(GUILD, "cats")
    assert after is not None and before is not None
    assert [(e.position, e.text) for e in after.examples] == [(1, "by seven"), (2, "by seven again")]
    assert after.revision > before.revision
    assert await storage.get_request(mine, GUILD, 7) is not None
    assert await storage.forget_user(42) == Forgotten(requests=0, examples=0)


async def test_many_requests_are_deleted_a_batch_per_transaction(storage, monkeypatch):
    """One transaction for all of them held every server's reads and writes for seconds."""
    for _ in range(2 * DELETE_BATCH + 3):
        await storage.save_request(GUILD, 3, 42, "cats", "<image>Cat:", GenerationParams(), [b"x" * 1000], budget=ROOMY)
    transactions = []
    transaction = storage._transaction
    monkeypatch.setattr(storage, "_transaction", lambda: transactions.append(1) or transaction())
    assert await storage.delete_user_requests(42) == 2 * DELETE_BATCH + 3
    assert len(transactions) == 3
    assert await storage.delete_user_requests(42) == 0


@pytest.mark.parametrize("moves", [[], [(4, 1)], [(1, 4)], [(3, 1), (4, 2)]], ids=str)
async def test_forgetting_a_user_keeps_the_order_of_examples_that_were_moved(storage, moves):
    """Positions need not follow the rows' order once examples have moved."""
    await storage.create_task(GUILD, "cats", "", "<image>Cat:", 7, max_tasks=5, max_image_bytes=2**30)
    for n, author in enumerate([7, 42, 7, 7, 42, 7], 1):
        await storage.add_example(
            GUILD, "cats", b"%d" % n, f"example {n}", max_examples=8, max_image_bytes=2**30, added_by=author
        )
    for position, new_position in moves:
        await storage.move_example(GUILD, "cats", position, new_position)
    before = [e.text for e in (await storage.get_task(GUILD, "cats")).examples]
    assert await storage.delete_user_examples(42) == 2
    after = (await storage.get_task(GUILD, "cats")).examples
    assert [e.text for e in after] == [text for text in before if text not in ("example 2", "example 5")]
    assert [e.position for e in after] == [1, 2, 3, 4]


def test_the_word_filter_matches_whole_words_in_any_case():
    words = WordListFilter(["darn", " Heck ", "", "^_^"])
    assert words.blocks("Well DARN it")
    assert words.blocks("oh heck.")
    assert words.blocks("smile ^_^ please")
    assert not words.blocks("darnation and checking")
    assert not words.blocks("a^_^b")
    assert not WordListFilter([]).blocks("anything at all")

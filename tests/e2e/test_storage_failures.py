"""The real bot process while its database refuses writes, then takes them again.

Another process holds SQLite's write lock past the bot's busy timeout (2 s): a refusal the bot's
own connection meets as it would a full disk or a read-only file (those cannot be made to happen
to an open connection from outside it: ``max_page_count`` is the connection's own, and the tests
may run as root, whom no file mode stops).
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.e2e import E2E, buttons, click

pytestmark = E2E

ALL_BUTTONS = ["Re-roll", "Prompt", "Delete", "Report"]
NOTE = "Not stored: the bot cannot save right now, so this answer has no Re-roll or Prompt button."
CANNOT_SAVE = "The bot cannot save changes right now, so nothing was changed; try again later."


async def storage_metrics(bot) -> tuple[float, float]:
    """Refused writes so far, and whether storage is degraded."""
    status, text = await bot.scrape()
    assert status == 200
    values = {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}
    return values["flamingo_storage_refused_writes_total"], values["flamingo_storage_degraded"]


async def test_answers_are_posted_unstored_while_the_database_refuses_writes_and_stored_once_it_takes_them(
    scene, shared_bot, stand_in
):
    owner = stand_in.admin_guild.members[stand_in.owner.id]
    async with asyncio.timeout(30):  # what the bot writes once connected is written before the lock is taken
        while "ready: in" not in shared_bot.log():
            await asyncio.sleep(0.1)
    stored = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2))[0]
    assert list(buttons(stored)) == ALL_BUTTONS
    refused_before, _ = await storage_metrics(shared_bot)
    log_start = len(shared_bot.log())

    with closing(sqlite3.connect(Path(shared_bot.env["FLAMINGO_STORAGE__DATABASE"]), isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            answer = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2))[0]
            assert not answer.ephemeral and answer.embeds[0]["description"]
            assert answer.embeds[0]["footer"]["text"].endswith(f" s\n{NOTE}")
            assert answer.files["image.jpg"].startswith(b"\xff\xd8")
            assert list(buttons(answer)) == ["Delete", "Report"]
            refused = await scene.ask("manage-tasks create", scene.moderator, name="pets", template="<image>Pet:")
            assert [(m.content, m.ephemeral) for m in refused] == [(CANNOT_SAVE, True)]
            assert await shared_bot.scrape("/health") == (200, "degraded: storage")
            assert await storage_metrics(shared_bot) == (refused_before + 2, 1)
            status = (await scene.ask("admin status", owner, stand_in.admin_guild))[0]
            fields = {field["name"]: field["value"] for field in status.embeds[0]["fields"]}
            assert fields["Storage"].startswith(
                "degraded: the database refuses writes (SQLITE_BUSY: database is locked)"
            )
            deleting = await click(scene, answer, "Delete")  # needs no write
            await deleting.wait_for(lambda: answer.deleted, timeout=30)
        finally:
            other.execute("ROLLBACK")

    answer = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2))[0]
    assert list(buttons(answer)) == ALL_BUTTONS
    assert NOTE not in answer.embeds[0]["footer"]["text"]
    assert await shared_bot.scrape("/health") == (200, "ok")
    assert await storage_metrics(shared_bot) == (refused_before + 2, 0)
    created = await scene.ask("manage-tasks create", scene.moderator, name="pets", template="<image>Pet:")
    assert created[0].ephemeral and "pets" in created[0].content
    log = shared_bot.log()[log_start:]
    assert log.count("the database refuses writes") == 1 and log.count("the database takes writes again") == 1
    assert "Traceback" not in log

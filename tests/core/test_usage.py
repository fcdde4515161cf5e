"""Usage counts: every way a member's request ends is counted once, in the report's four outcomes
(never in direct messages, never at an answer's cost), and the report's chart is a PNG."""

from __future__ import annotations

import io
import sqlite3
from contextlib import closing
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import pytest
from PIL import Image

from core.asking import Asker, Asking, Question
from core.errors import (
    BadImage,
    BadParameter,
    BadPrompt,
    ClusterUnavailable,
    GenerationFailed,
    NotAllowedHere,
    RequestCancelled,
    RequestExpired,
    ServiceBusy,
    StorageUnavailable,
    UnknownTask,
)
from core.generation import GenerationParams
from core.model.engine import Answer
from core.quotas import TooManyRequests
from core.storage import Storage
from core.usage import NO_TASK, OUTCOMES, UsageCount, UsageReport, outcome_of, usage_chart
from tests.helpers.settings import IMAGES

GUILD = 1
ANSWER = Answer(text="a cat", token_ids=(1, 2, 3), prompt="", prompt_tokens=3, finished=True, seconds=0.1)
PHOTO = (IMAGES / "chelsea.jpg").read_bytes()


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (RequestCancelled("withdrawn"), "cancelled"),
        (GenerationFailed("the model raised"), "failed"),
        (RuntimeError("a bug"), "failed"),
        (NotAllowedHere("not in this channel"), "refused"),
        (TooManyRequests("too fast"), "refused"),
        (UnknownTask("no such task"), "refused"),
        (BadImage("not an image"), "refused"),
        (ServiceBusy("the line is full"), "refused"),
        (ClusterUnavailable("the cluster is away"), "refused"),
        (RequestExpired("waited too long"), "refused"),
    ],
)
def test_each_ending_maps_to_one_of_the_four_outcomes(error: Exception, outcome: str) -> None:
    assert outcome_of(error) == outcome


class _Front:
    """Answers, or ends the wait with ``ending``."""

    deadline = None

    def __init__(self, ending: Exception | None = None) -> None:
        self.ending = ending

    async def accepted(self, private: bool) -> None:
        pass

    async def in_line(self, ticket: object) -> Answer:
        if self.ending is not None:
            raise self.ending
        return ANSWER


def asked(image: bytes = PHOTO, task: str | None = None) -> Question:
    async def read() -> list[bytes]:
        return [image]

    return Question(read, None, task, GenerationParams())


async def ending(asking: Asking, member: Asker, question: Question, front: _Front, raised: type[Exception]) -> None:
    with pytest.raises(raised):  # told to the asker by the front end; here only the count matters
        await asking.ask(member, question, front)


async def test_every_ending_of_a_servers_request_is_counted_once_with_its_task(asking: Asking, store: Storage) -> None:
    member = Asker(user_id=7, guild_id=GUILD, channel_id=2)
    answered = await asking.ask(member, asked(), _Front())
    assert answered is not None
    await ending(asking, member, asked(b"not an image"), _Front(), BadImage)  # refused for its input, its task read
    await ending(asking, member, asked(task="nope"), _Front(), UnknownTask)  # refused before a task was read
    await ending(asking, member, asked(), _Front(ServiceBusy("full")), ServiceBusy)
    await ending(asking, member, asked(task="vqa"), _Front(GenerationFailed("raised")), GenerationFailed)
    await ending(asking, member, asked(task="vqa"), _Front(RuntimeError("a bug")), RuntimeError)
    assert await asking.ask(member, asked(task="vqa"), _Front(RequestCancelled("withdrawn"))) is None
    await store.change_guild_settings(GUILD, lambda rules: replace(rules, required_role=99))
    await ending(
        asking, member, asked(), _Front(), NotAllowedHere
    )  # the server's role: refused before anything is read

    tasks = (await store.usage(GUILD, 7)).per_task()
    assert {task: (dict(tally.outcomes), tally.tokens) for task, tally in tasks.items()} == {
        "caption": ({"answered": 1, "refused": 2}, 3),
        "vqa": ({"failed": 2, "cancelled": 1}, 0),
        NO_TASK: ({"refused": 2}, 0),
    }


async def test_a_refusal_given_before_anything_is_read_is_counted_under_no_task(asking: Asking, store: Storage) -> None:
    """The front end's first check (parameters, files, prompt) refuses before a task is resolved;
    a message with no image to describe is one such refusal."""
    member = Asker(user_id=7, guild_id=GUILD, channel_id=2)
    with pytest.raises(BadPrompt):
        await asking.check(member, None, [(1000, "a.jpg"), (1000, "b.jpg")], GenerationParams())
    with pytest.raises(BadImage, match="no attached image"):
        await asking.check(member, None, [], GenerationParams())
    with pytest.raises(BadParameter):
        await asking.check(member, None, [(1000, "a.jpg")], GenerationParams(max_new_tokens=10_000))
    await asking.check(member, None, [(1000, "a.jpg")], GenerationParams())  # let through: counted when it ends
    tasks = (await store.usage(GUILD, 7)).per_task()
    assert {task: dict(tally.outcomes) for task, tally in tasks.items()} == {NO_TASK: {"refused": 3}}


async def test_direct_messages_are_not_counted(asking: Asking, store: Storage, tmp_path: Path) -> None:
    assert await asking.ask(Asker(user_id=7, guild_id=None, channel_id=None), asked(), _Front()) is not None
    with closing(sqlite3.connect(tmp_path / "bot.db")) as db:
        assert db.execute("SELECT count(*) FROM usage_counts").fetchone() == (0,)


async def test_a_database_refusing_writes_costs_the_answer_nothing(asking: Asking, store: Storage, monkeypatch) -> None:
    member = Asker(user_id=7, guild_id=GUILD, channel_id=2)
    await store._db.execute("PRAGMA query_only = ON")
    answered = await asking.ask(member, asked(), _Front())
    assert answered is not None and answered.request_id is None and answered.text == "a cat"
    assert store.writes.refused == 1  # the request's save; the count is not even tried while degraded
    await store._db.execute("PRAGMA query_only = OFF")

    async def refused(*args: object) -> None:
        raise StorageUnavailable("SQLITE_FULL: database or disk is full")

    monkeypatch.setattr(store, "count_request", refused)  # refused only now: the request was saved
    answered = await asking.ask(member, asked(), _Front())
    assert answered is not None and answered.request_id is not None


def _png(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()  # the whole file decodes
        return image.size


def test_the_chart_is_a_png_with_and_without_requests() -> None:
    today = date(2026, 5, 20)
    empty = usage_chart(UsageReport.ending(today, 7, []))
    assert _png(empty) == (800, 600) and len(empty) > 10_000
    counts = [
        UsageCount(today - timedelta(days=day), hour, task, outcome, 1 + (day * hour) % 5, 20)
        for day in range(30)
        for hour in range(0, 24, 2)
        for task in ("caption", "vqa")
        for outcome in OUTCOMES
    ]
    full = usage_chart(UsageReport.ending(today, 30, counts))
    assert _png(full) == (800, 600) and len(full) > len(empty)

"""The request use case over a real store, with the model and the front end stood in: what it keeps
while a request waits, and an answer the database refuses to store."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

import core.asking
from core.asking import Asker, Asking, Question
from core.generation import GenerationParams
from core.model.engine import Answer
from core.serving.metrics import Metrics
from core.storage import Storage
from tests.helpers.settings import IMAGES

ASKER = Asker(user_id=7, guild_id=1, channel_id=2)
ANSWER = Answer(text="a cat", token_ids=(1, 2), prompt="", prompt_tokens=3, finished=True, seconds=0.1)


class _Front:
    deadline = None

    def __init__(self, waiting: Callable[[], None] = lambda: None) -> None:
        self.waiting = waiting

    async def accepted(self, private: bool) -> None:
        pass

    async def in_line(self, ticket: object) -> Answer:
        # A thread lets go of its work a moment after handing back the result: with one thread, once
        # this call is done, what is seen held is held by the request itself, not by the decoding.
        await asyncio.to_thread(lambda: None)
        self.waiting()
        return ANSWER


def question(read_images) -> Question:
    return Question(read_images, None, None, GenerationParams())


class _Upload(bytearray):
    """An upload's bytes that a weak reference can follow (``bytes`` takes none)."""


async def test_the_uploaded_files_are_let_go_before_the_request_waits_in_line(asking: Asking) -> None:
    """A request waits up to 12 minutes: holding its four 25 MiB uploads meanwhile would cost 100 MiB each."""
    uploads: list[weakref.ref[_Upload]] = []

    async def read() -> list[bytes]:
        files = [_Upload((IMAGES / "chelsea.jpg").read_bytes()) for _ in range(2)]
        uploads.extend(weakref.ref(upload) for upload in files)
        return files  # type: ignore[return-value]  # read as bytes are

    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))  # see _Front.in_line
    held: list[list[bool]] = []
    prompt = "<image><image>Output:"
    waiting = _Front(lambda: held.append([upload() is not None for upload in uploads]))
    answered = await asking.ask(ASKER, Question(read, prompt, None, GenerationParams()), waiting)
    assert answered is not None and len(answered.images) == 2
    assert held == [[False, False]]


def samples(metrics: Metrics, store: Storage) -> dict[str, float]:
    text = metrics.exposition(0, {}, None, {}, True, store.writes).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("flamingo_storage") or sample.name == "flamingo_requests_total"
    }


async def test_an_answer_the_database_refuses_to_store_is_still_answered_and_counted(
    asking: Asking, store: Storage
) -> None:
    image = (IMAGES / "chelsea.jpg").read_bytes()

    async def read() -> list[bytes]:
        return [image]

    await store._db.execute("PRAGMA query_only = ON")  # SQLite refuses every write on the store's connection
    unstored = await asking.ask(ASKER, question(read), _Front())
    assert unstored is not None and unstored.request_id is None
    assert (unstored.text, unstored.task) == ("a cat", "caption") and unstored.images[0][:2] == b"\xff\xd8"
    assert samples(asking.metrics, store) == {
        "flamingo_requests_total": 1,  # answered and posted
        "flamingo_storage_refused_writes_total": 1,
        "flamingo_storage_degraded": 1,
    }

    await store._db.execute("PRAGMA query_only = OFF")
    stored = await asking.ask(ASKER, question(read), _Front())
    assert stored is not None and stored.request_id is not None
    assert (await asking.stored(stored.request_id, ASKER)).task == "caption"
    assert samples(asking.metrics, store) == {
        "flamingo_requests_total": 2,
        "flamingo_storage_refused_writes_total": 1,
        "flamingo_storage_degraded": 0,
    }


async def test_the_images_are_encoded_for_storage_while_the_model_works(asking: Asking, monkeypatch) -> None:
    """Saving the answered request then waits for no encoder: the answer is posted sooner."""
    encoded = asyncio.Event()
    loop = asyncio.get_running_loop()
    encode = core.asking.encode_for_storage

    def encoding(picture):
        loop.call_soon_threadsafe(encoded.set)
        return encode(picture)

    monkeypatch.setattr(core.asking, "encode_for_storage", encoding)

    class Working(_Front):
        async def in_line(self, ticket: object) -> Answer:
            await asyncio.wait_for(encoded.wait(), timeout=10)  # the model is still at work
            return ANSWER

    async def read() -> list[bytes]:
        return [(IMAGES / "chelsea.jpg").read_bytes()]

    answered = await asking.ask(ASKER, question(read), Working())
    assert answered is not None and answered.request_id is not None and answered.images[0][:2] == b"\xff\xd8"

"""/comprehend as a user meets it: deferral, the answer embed, and every refusal in private."""

from __future__ import annotations

from core.generation import GenerationParams
from tests.conftest import IMAGES


def photo(world, name: str = "chelsea"):
    return world.discord.upload(f"{name}.jpg", (IMAGES / f"{name}.jpg").read_bytes(), "image/jpeg")


async def test_comprehend_answers_with_the_image_and_the_models_answer(world, llama_engine, builtin_tasks, photos):
    messages = await world.reply("comprehend", image=photo(world), max_new_tokens=6)
    assert len(messages) == 1
    reply = messages[0]
    assert not reply.ephemeral
    embed = reply.embeds[0]
    task = builtin_tasks["caption"]
    expected = llama_engine.run(
        llama_engine.prepare([photos["chelsea"]], task.prompt_template, task, GenerationParams(max_new_tokens=6))
    )
    assert embed["description"] == (expected.text or "*(the model gave an empty answer)*")
    assert embed["author"]["name"] == "Reader asked"
    assert embed["footer"]["text"].startswith("task: caption · ")
    assert embed["image"]["url"] == "attachment://image.jpg"
    assert list(reply.files) == ["image.jpg"]

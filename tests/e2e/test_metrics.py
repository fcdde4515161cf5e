"""/metrics and /health of the running bot, as Prometheus and a load balancer would read them."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.e2e import E2E

pytestmark = E2E


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_answers_and_show_queue_caches_and_shards(scene, shared_bot):
    status, before_text = await shared_bot.scrape()
    assert status == 200
    before = samples(before_text)
    await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2)
    await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2)
    after = samples((await shared_bot.scrape())[1])

    answered = ("flamingo_requests_total", (("outcome", "answered"),))
    assert after[answered] - before.get(answered, 0) == 2
    count = ("flamingo_request_seconds_count", ())
    assert after[count] - before.get(count, 0) == 2
    assert after[("flamingo_queue_depth", ())] == 0  # both answered, nothing left waiting
    assert after[("flamingo_replicas", ())] == 1
    assert after[("flamingo_model_reachable", ())] == 1
    hits = ("flamingo_cache_hits", (("cache", "prefix"),))
    misses = ("flamingo_cache_misses", (("cache", "prefix"),))
    assert after[hits] + after[misses] > before.get(hits, 0) + before.get(misses, 0)
    assert 0 <= after[("flamingo_shard_latency_seconds", (("shard", "0"),))] < 60


async def test_health_turns_ok_once_the_bot_is_connected(shared_bot):
    # discord.py reports ready a moment after the last guild arrives; a load balancer polls the same way.
    async with asyncio.timeout(30):
        while (await shared_bot.scrape("/health")) != (200, "ok"):
            await asyncio.sleep(0.1)

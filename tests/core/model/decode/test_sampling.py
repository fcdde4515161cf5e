"""Sampling, with and without beams, draws what upstream draws for the same seed."""

from __future__ import annotations

import pytest
import torch

from core.model.decode.logits import logits_processors
from tests.helpers.reference import one_shot_answers
from tests.make_tiny_model import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_draws_the_same_tokens_as_the_reference_for_the_same_seed(engines, references, photos, family):
    options = {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "max_new_tokens": 12}
    ours, expected = one_shot_answers(engines[family], references[family], photos, "coffee", "chelsea", 1234, **options)
    assert ours == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [1234, 99])
def test_sampled_beams_draw_the_same_tokens_as_the_reference_for_the_same_seed(
    engines, references, photos, family, seed
):
    """Beam sampling runs on the cached prefix too; its draws follow upstream's for a seed."""
    engine, reference = engines[family], references[family]
    options = {"num_beams": 3, "max_new_tokens": 12}
    sampling = {"do_sample": True, "temperature": 1.5, "top_k": 20, "top_p": 0.9}
    ours, expected = one_shot_answers(engine, reference, photos, "coffee", "chelsea", seed, **options, **sampling)
    assert ours == expected
    greedy_beams, _ = one_shot_answers(engine, reference, photos, "coffee", "chelsea", seed, **options)
    assert greedy_beams != ours  # the draws did choose


@pytest.mark.parametrize(("beams", "kept"), [(1, 1), (3, 2)])
def test_sampled_beams_keep_a_token_beside_the_stop_token(beams, kept):
    """As transformers does for beams: top-p never leaves a beam only its stop token to choose."""
    kwargs = {"do_sample": True, "top_p": 0.05, "num_beams": beams}
    processors = logits_processors(kwargs, 1, {0}, torch.device("cpu"))
    scores = processors(torch.tensor([[5]]), torch.tensor([[10.0, 1.0, 0.0, 0.0]]))
    assert int(torch.isfinite(scores).sum()) == kept

"""Every bad prompt or parameter is refused before it reaches the model, with its own message."""

from __future__ import annotations

import copy

import pytest
from tokenizers import AddedToken

from core.errors import BadParameter, BadPrompt
from core.generation import GenerationParams
from core.model.engine import FlamingoEngine, PromptRules
from core.prompts import Example, Task


@pytest.fixture(scope="module")
def two_shot(photos) -> Task:
    examples = (
        Example(photos["astronaut"], "<image>Output:An astronaut."),
        Example(photos["coffee"], "<image>Output:A cup."),
    )
    return Task("two", "", "<image>Output:", examples)


PROMPT_CASES = [
    ("Output:", 1, r"has 0 <image> markers but 1 image was given"),
    ("<image><image>Output:", 1, r"has 2 <image> markers but 1 image was given"),
    ("<image>Output:", 2, r"has 1 <image> marker but 2 images were given"),
    ("<image>Output:<|endofchunk|><image>", 2, r"reserved token `<\|endofchunk\|>`"),
    ("<image>Output: </s>", 1, r"reserved token `</s>`"),
    ("<s><image>Output:", 1, r"reserved token `<s>`"),
    ("<image>Output: <PAD>", 1, r"reserved token `<PAD>`"),
    ("<image>Output: <unk>", 1, r"reserved token `<unk>`"),
    ("   ", 1, r"prompt is empty"),
    ("<image>" + "x" * 2001, 1, r"prompt is 2008 characters long; the limit is 2000"),
    ("<image>Output:\x00", 1, r"control characters \(U\+0000\)"),
    ("<image>Out\x1bput:", 1, r"control characters \(U\+001B\)"),
    ("<image>A \ud83d cat", 1, r"a broken character \(half of an emoji or symbol\)"),  # the tokenizer raised
]


@pytest.mark.parametrize(("prompt", "image_count", "message"), PROMPT_CASES, ids=[c[2][:40] for c in PROMPT_CASES])
def test_bad_prompts_are_refused_with_their_reason(llama_engine: FlamingoEngine, photos, prompt, image_count, message):
    task = Task("none", "", "<image>Output:")
    with pytest.raises(BadPrompt, match=message):
        llama_engine.prepare([photos["chelsea"]] * image_count, prompt, task, GenerationParams())


def test_newlines_and_tabs_are_allowed(llama_engine: FlamingoEngine, photos):
    task = Task("none", "", "<image>Output:")
    prepared = llama_engine.prepare(
        [photos["chelsea"]], "<image>\tQuestion:\nwhat?\r\nAnswer:", task, GenerationParams()
    )
    assert prepared.prompt.endswith("Answer:")


def test_plain_added_tokens_are_not_reserved(engines: dict[str, FlamingoEngine]):
    """GPT-NeoX's tokenizer (MPT, RedPajama) adds runs of spaces as plain tokens: typing two spaces
    is ordinary text, while the special tokens stay refused."""
    engine = engines["gptneox"]
    tokenizer = copy.deepcopy(engine.loaded.tokenizer)
    tokenizer.add_tokens([AddedToken(" " * width, special=False, normalized=True) for width in range(2, 25)])
    rules = PromptRules(tokenizer, engine.loaded.context_length, engine.settings)
    assert rules.check_text("<image>Question: what is it?  Answer:", images=1).endswith("  Answer:")
    with pytest.raises(BadPrompt, match=r"reserved token `<\|endoftext\|>`"):
        rules.check_text("<image>Output:<|endoftext|>", images=1)


def test_prompt_that_does_not_fit_the_context_is_refused(llama_engine: FlamingoEngine, photos, two_shot):
    context = llama_engine.loaded.context_length
    long_prompt = "<image>" + " cat" * (context - 40)
    with pytest.raises(BadPrompt, match=rf"task's 2 examples is \d+ tokens and 30 new tokens .* at most {context}"):
        llama_engine.prepare([photos["chelsea"]], long_prompt[:2000], two_shot, GenerationParams())


def test_new_tokens_count_against_the_context(llama_engine: FlamingoEngine, photos, two_shot):
    generation = llama_engine.settings.generation
    longest = generation.ranges["max_new_tokens"].model_copy(update={"high": 10_000})
    wide = generation.model_copy(update={"ranges": generation.ranges | {"max_new_tokens": longest}})
    engine = FlamingoEngine(llama_engine.loaded, llama_engine.settings.model_copy(update={"generation": wide}))
    prepared = engine.prepare([photos["chelsea"]], "<image>Output:", two_shot, GenerationParams(max_new_tokens=1))
    room = engine.loaded.context_length - prepared.input_ids.shape[1]
    fits = engine.prepare([photos["chelsea"]], "<image>Output:", two_shot, GenerationParams(max_new_tokens=room))
    assert fits.generate_kwargs["max_new_tokens"] == room
    with pytest.raises(BadPrompt, match=f"{room + 1} new tokens were asked for"):
        engine.prepare([photos["chelsea"]], "<image>Output:", two_shot, GenerationParams(max_new_tokens=room + 1))


PARAMETER_CASES = [
    (GenerationParams(max_new_tokens=0), r"max_new_tokens must be between 1 and 256 \(got 0\)"),
    (GenerationParams(max_new_tokens=-5), r"max_new_tokens must be between 1 and 256 \(got -5\)"),
    (GenerationParams(max_new_tokens=100_000), r"max_new_tokens must be between 1 and 256 \(got 100000\)"),
    (GenerationParams(max_new_tokens=2.5), r"max_new_tokens must be a whole number \(got 2.5\)"),
    (GenerationParams(do_sample=True, temperature=0), r"temperature must be between 0.05 and 2.0 \(got 0\)"),
    (GenerationParams(do_sample=True, temperature=-1.0), r"temperature must be between 0.05 and 2.0 \(got -1.0\)"),
    (GenerationParams(do_sample=True, temperature=float("nan")), r"temperature must be a finite number \(got nan\)"),
    (GenerationParams(do_sample=True, top_p=1.5), r"top_p must be between 0.05 and 1.0 \(got 1.5\)"),
    (GenerationParams(do_sample=True, top_k=0), r"top_k must be between 1 and 500 \(got 0\)"),
    (GenerationParams(num_beams=0), r"num_beams must be between 1 and 5 \(got 0\)"),
    (GenerationParams(num_beams=64), r"num_beams must be between 1 and 5 \(got 64\)"),
    (GenerationParams(repetition_penalty=0.0), r"repetition_penalty must be between 1.0 and 2.0 \(got 0.0\)"),
    (GenerationParams(no_repeat_ngram_size=-1), r"no_repeat_ngram_size must be between 0 and 10 \(got -1\)"),
    (GenerationParams(temperature=0.7), r"temperature only applies when sampling; turn on do_sample"),
    (GenerationParams(top_p=0.9, top_k=40), r"top_p, top_k only apply when sampling"),
    (GenerationParams(length_penalty=1.0), r"length_penalty only applies to beam search"),
    (
        GenerationParams(min_new_tokens=40, max_new_tokens=10),
        r"min_new_tokens \(40\) cannot be more than max_new_tokens \(10\)",
    ),
    (GenerationParams(min_new_tokens=-1), r"min_new_tokens must be between 0 and 256 \(got -1\)"),
    (GenerationParams(max_new_tokens="ten"), r"max_new_tokens must be a number \(got 'ten'\)"),
    (GenerationParams(num_beams=True), r"num_beams must be a number \(got True\)"),
    (GenerationParams(max_new_tokens=float("inf")), r"max_new_tokens must be a finite number \(got inf\)"),
]


@pytest.mark.parametrize(("params", "message"), PARAMETER_CASES, ids=[c[1][:40] for c in PARAMETER_CASES])
def test_bad_parameters_are_refused_with_the_allowed_range(llama_engine: FlamingoEngine, photos, params, message):
    task = Task("none", "", "<image>Output:")
    with pytest.raises(BadParameter, match=message):
        llama_engine.prepare([photos["chelsea"]], "<image>Output:", task, params)


def test_valid_parameters_reach_generate(llama_engine: FlamingoEngine, photos):
    task = Task("none", "", "<image>Output:")
    params = GenerationParams(
        max_new_tokens=5,
        do_sample=True,
        temperature=0.5,
        top_p=0.9,
        top_k=20,
        num_beams=2,
        repetition_penalty=1.2,
        length_penalty=0.5,
        no_repeat_ngram_size=3,
    )
    prepared = llama_engine.prepare([photos["chelsea"]], "<image>Output:", task, params)
    assert prepared.generate_kwargs == {
        "max_new_tokens": 5,
        "do_sample": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "num_beams": 2,
        "repetition_penalty": 1.2,
        "length_penalty": 0.5,
        "no_repeat_ngram_size": 3,
    }
    answer = llama_engine.run(prepared)
    assert len(answer.token_ids) <= 5

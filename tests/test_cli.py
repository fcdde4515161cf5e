"""``python main.py describe`` as a user runs it: a subprocess on the tiny models."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.generation import GenerationParams
from tests.helpers.cli import OFFLINE, run_main
from tests.helpers.settings import IMAGES


def describe(*args: str | Path, hf_home: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_main("describe", *args, env=OFFLINE | ({"HF_HOME": str(hf_home)} if hf_home else {}))


def _save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def awkward_images(tmp_path_factory) -> list[Path]:
    """Valid uploads that naive code mishandles."""
    root = tmp_path_factory.mktemp("awkward")
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 0))
    frames = [Image.new("P", (40, 40), colour) for colour in (1, 2, 3)]
    exif = Image.Exif()
    exif[0x0112] = 6
    deep = Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16))
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    (root / "animated.gif").write_bytes(gif.getvalue())
    return [
        _save(root / "tiny.png", Image.new("RGB", (1, 1), (0, 128, 255))),
        _save(root / "transparent.png", rgba),
        root / "animated.gif",
        _save(root / "deep.png", deep),
        _save(root / "cmyk.jpg", Image.new("CMYK", (50, 50), (0, 255, 255, 0))),
        _save(root / "rotated.jpg", Image.new("RGB", (60, 20), "green"), exif=exif),
        _save(root / "strip.png", Image.new("RGB", (4000, 3), "blue")),
    ]


def test_describe_prints_only_the_answer_and_matches_the_service(model_dirs, llama_engine, builtin_tasks, photos):
    result = describe(IMAGES / "chelsea.jpg", "--model", model_dirs["llama"], "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    task = builtin_tasks["caption"]
    expected = llama_engine.run(
        llama_engine.prepare([photos["chelsea"]], task.prompt_template, task, GenerationParams(max_new_tokens=8))
    )
    assert result.stdout == expected.text + "\n"
    assert "Loading language model" in result.stderr
    assert "Loaded " in result.stderr and "language model" in result.stderr
    assert "Traceback" not in result.stderr


def test_describe_accepts_awkward_but_valid_images(model_dirs, awkward_images):
    prompt = "<image>" * len(awkward_images) + "Output:"
    result = describe(
        *awkward_images,
        "--prompt",
        prompt,
        "--model",
        model_dirs["mpt"],
        "--max-new-tokens",
        "4",
        "--task",
        "vqa",
        "--num-beams",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jpg"], r"Cannot read missing\.jpg: No such file or directory\."),
        (["config.toml"], r"config\.toml: This file is not an image I can read"),
        (
            [IMAGES / "chelsea.jpg", "--task", "poetry"],
            r"There is no task called 'poetry'; built-in tasks: caption, vqa\.",
        ),
        ([IMAGES / "chelsea.jpg", "--prompt", "Output:"], r"has 0 <image> markers but 1 image was given"),
        ([IMAGES / "chelsea.jpg", "--temperature", "0.5"], r"temperature only applies when sampling"),
        ([IMAGES / "chelsea.jpg", "--num-beams", "50"], r"num_beams must be between 1 and 5 \(got 50\)"),
        ([IMAGES / "chelsea.jpg", "--model", "OpenFlamingo-10B"], r"unknown model 'OpenFlamingo-10B'"),
        (["TRUNCATED"], r"damaged or incomplete"),
    ],
    ids=[
        "missing-file",
        "not-an-image",
        "unknown-task",
        "no-marker",
        "sampling-off",
        "beams",
        "unknown-model",
        "truncated",
    ],
)
def test_describe_refusals_are_one_clear_line(model_dirs, tmp_path, args, message):
    if args == ["TRUNCATED"]:
        data = (IMAGES / "rocket.jpg").read_bytes()
        args = [tmp_path / "cut.jpg"]
        args[0].write_bytes(data[: len(data) // 2])
    if "--model" not in args:
        args = [*args, "--model", model_dirs["llama"]]
    result = describe(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert re.search(message, last_line), last_line


def test_registry_model_offline_and_not_cached_is_one_clear_line(tmp_path):
    """HF_HUB_OFFLINE is honoured: nothing is fetched, and the refusal names the missing part."""
    result = describe(IMAGES / "chelsea.jpg", "--model", "openflamingo/OpenFlamingo-4B-vitl-rpj3b", hf_home=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot load the vision encoder of openflamingo/OpenFlamingo-4B-vitl-rpj3b: ")
    assert "weights for tag 'openai'" in last_line


def test_describe_can_skip_the_resource_checks_for_an_operator_who_knows_better():
    import main

    def chosen(*flags: str) -> bool:
        args = main._parser().parse_args(["describe", "photo.jpg", *flags])
        return main._describe_settings(args).model.skip_resource_checks

    assert chosen("--skip-resource-checks") is True
    assert chosen() is False  # as config.toml ships

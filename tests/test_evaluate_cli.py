"""``python main.py evaluate`` as an operator runs it: a subprocess on the tiny models."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.config import PROJECT_ROOT
from core.tasks.archive import ArchivedExample, TaskArchive, write_archive
from tests.helpers.cli import run_main
from tests.helpers.settings import IMAGES

pytestmark = pytest.mark.evaluate

CAPTION = "<image>Output:"


def evaluate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_main("evaluate", *args)


def _last_json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _folder(root: Path, texts: dict[str, str], template: str | None = None) -> Path:
    root.mkdir()
    for name in texts:
        if (IMAGES / name).exists():
            shutil.copy(IMAGES / name, root / name)
    spec: dict[str, object] = {"examples": texts} | ({} if template is None else {"template": template})
    (root / "texts.json").write_text(json.dumps(spec))
    return root


def test_two_models_on_a_builtin_task_give_one_comparison(model_dirs):
    result = evaluate("--task", "vqa", "--model", model_dirs["llama"], "--model", model_dirs["mpt"], "--json")
    report = _last_json(result)
    assert report["task"] == "vqa"
    assert [model["model"] for model in report["models"]] == [str(model_dirs["llama"]), str(model_dirs["mpt"])]
    for model in report["models"]:
        assert model["language_model"] is None
        assert [example["expected"] for example in model["examples"]] == ["camera", "spoon", "cat", "no"]
        assert all(example["answered"] for example in model["examples"])
        assert 0.0 <= model["f1"] < 1.0 and model["exact_match"] == 0.0 and model["seconds"] > 0
    assert report["unsplit"] == []
    assert "Traceback" not in result.stderr


def test_an_exported_task_file_is_evaluated(model_dirs, tmp_path):
    examples = tuple(
        ArchivedExample((IMAGES / f"{name}.jpg").read_bytes(), f"{CAPTION}A {name}.") for name in ("chelsea", "rocket")
    )
    path = tmp_path / "pets.flamingo-task.zip"
    path.write_bytes(write_archive(TaskArchive("pets", "Pets.", CAPTION, examples), datetime.now(UTC)))
    report = _last_json(evaluate("--task", path, "--model", model_dirs["llama"], "--json"))
    assert report["task"] == "pets"
    assert [example["expected"] for example in report["models"][0]["examples"]] == ["A chelsea.", "A rocket."]


def test_a_folder_is_evaluated_into_a_table_that_names_the_example_it_cannot_split(model_dirs, tmp_path):
    texts = {"chelsea.jpg": "<image>Seen:a cat", "coffee.jpg": "<image>Seen:a cup", "rocket.jpg": "<image>a rocket"}
    folder = _folder(tmp_path / "mine", texts, template="<image>Seen:")
    result = evaluate("--task", folder, "--model", model_dirs["llama"])
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert table.startswith("Task “mine”: 2 examples scored, each with the others as context.")
    assert re.search(rf"^{re.escape(str(model_dirs['llama']))} +- +0\.00 +\d\.\d\d +\d+\.\d\d$", table, re.MULTILINE)
    assert "Example 1, expected: a cat" in table and "Example 2, expected: a cup" in table
    assert "Example 3 not scored: no ending of the template “<image>Seen:” follows its <image>." in table


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: "poetry", r"There is no task called 'poetry' and no file or folder of that name; built-in tasks"),
        (lambda root: PROJECT_ROOT / "config.toml", r"config\.toml: This file is not a ZIP file"),
        (lambda root: root, r"has no texts\.json"),
        (lambda root: _folder(root / "one", {"chelsea.jpg": CAPTION + "A cat."}), r"has 1 example; leaving one out"),
        (
            lambda root: _folder(root / "two", {"chelsea.jpg": "Output:A cat.", "rocket.jpg": CAPTION + "A rocket."}),
            r"text of chelsea\.jpg in .* has 0 <image> markers but 1 image was given",
        ),
        (lambda root: _folder(root / "bad", {"missing.jpg": CAPTION + "x"}), r"Cannot read .*missing\.jpg"),
    ],
    ids=["unknown-task", "not-a-task-file", "folder-without-texts", "one-example", "no-marker", "missing-image"],
)
def test_bad_inputs_are_one_clear_line_before_any_model_loads(model_dirs, tmp_path, make, message):
    result = evaluate("--task", make(tmp_path), "--model", model_dirs["llama"])
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr and "Loading" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ")
    assert re.search(message, last_line), last_line


def test_the_language_model_is_passed_to_each_model_and_reported(model_dirs, other_language_models):
    twin = other_language_models["twin"]
    plain = _last_json(evaluate("--task", "vqa", "--model", model_dirs["llama"], "--json"))["models"][0]
    swapped = _last_json(evaluate("--task", "vqa", "--model", model_dirs["llama"], "--language-model", twin, "--json"))[
        "models"
    ][0]
    assert (plain["language_model"], swapped["language_model"]) == (None, str(twin))
    assert [e["answered"] for e in swapped["examples"]] != [e["answered"] for e in plain["examples"]]

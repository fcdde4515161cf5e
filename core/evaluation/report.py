"""One task's evaluations by several models, side by side: a text table, or the same as JSON; or one
evaluation's examples as CSV, the file ``/manage-tasks evaluate`` attaches."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.evaluation.leave_one_out import Evaluation
from core.wording import plural


@dataclass(frozen=True)
class ModelRun:
    model: str
    language_model: str | None
    evaluation: Evaluation


def as_json(runs: Sequence[ModelRun]) -> dict[str, Any]:
    """Every model's scores and time, and each example's expected and given answers; ``unsplit``
    lists the examples left out of the scores, and why."""
    first = runs[0].evaluation
    return {
        "task": first.task,
        "models": [
            {
                "model": run.model,
                "language_model": run.language_model,
                "exact_match": run.evaluation.exact_match,
                "f1": run.evaluation.f1,
                "seconds": run.evaluation.seconds,
                "examples": [
                    {
                        "position": score.position,
                        "expected": score.expected,
                        "answered": score.answered,
                        "exact_match": score.exact_match,
                        "f1": score.f1,
                    }
                    for score in run.evaluation.examples
                ],
            }
            for run in runs
        ],
        "unsplit": [{"position": left.position, "text": left.text, "reason": left.reason} for left in first.unsplit],
    }


def as_csv(evaluation: Evaluation) -> bytes:
    """One row per example, in the task's order: the scored ones, and those left out with why."""
    rows: list[tuple[int, str, str, str, str, str]] = [
        (s.position, s.expected, s.answered, f"{s.exact_match:.0f}", f"{s.f1:.2f}", "") for s in evaluation.examples
    ]
    rows += [(u.position, "", "", "", "", f"not scored: {u.reason}") for u in evaluation.unsplit]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["position", "expected", "answered", "exact_match", "f1", "note"])
    writer.writerows(sorted(rows))
    return out.getvalue().encode()


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _one_line(text: str) -> str:
    """A model's answer may hold line breaks; a table row may not."""
    return " ".join(text.split())


def as_table(runs: Sequence[ModelRun]) -> str:
    """A row per model (its scores, and seconds per example, loading excluded), then each example's
    expected answer with every model's."""
    first = runs[0].evaluation
    scored = len(first.examples)
    lines = [f"Task “{first.task}”: {plural(scored, 'example')} scored, each with the others as context.", ""]
    rows = [["model", "language model", "exact match", "F1", "s/example"]]
    for run in runs:
        result = run.evaluation
        per_example = result.seconds / len(result.examples)
        rows.append(
            [
                run.model,
                run.language_model or "-",
                f"{result.exact_match:.2f}",
                f"{result.f1:.2f}",
                f"{per_example:.2f}",
            ]
        )
    lines += _columns(rows)
    for index, example in enumerate(first.examples):
        lines += ["", f"Example {example.position}, expected: {_one_line(example.expected)}"]
        answers = []
        for run in runs:
            score = run.evaluation.examples[index]
            answered = _one_line(score.answered) or "(no answer)"
            answers.append([run.model, f"EM {score.exact_match:.0f}", f"F1 {score.f1:.2f}", answered])
        lines += ["  " + line for line in _columns(answers)]
    for left in first.unsplit:
        lines += ["", f"Example {left.position} not scored: {left.reason}."]
    return "\n".join(lines)

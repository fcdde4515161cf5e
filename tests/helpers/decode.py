"""Prefilled rows for the decode steppers' tests, which compare the steppers on the same rows."""

from __future__ import annotations

import torch

from core.generation import GenerationParams
from core.model.decode.state import Running
from core.prompts import Example, Task


def prefilled_rows(engine, photos) -> list[Running]:
    """Four prefilled requests: 0, 1 and 2 examples, so their caches differ in length, and a second
    request of the 2-example task, which shares its prefix."""
    examples = [Example(photos[name], f"<image>Output:A photo of {name}.") for name in ("astronaut", "coffee")]
    rows = []
    for shots, query in [(0, "rocket"), (1, "chelsea"), (2, "camera"), (2, "coffee")]:
        task = Task(f"static-{shots}", "", "<image>Output:", tuple(examples[:shots]), key=f"static/{shots}")
        request = engine.prepare([photos[query]], "<image>Output:", task, GenerationParams(max_new_tokens=20))
        row = engine.decoder.prefill(engine._jobs([request], [lambda: False])[0], engine.loaded.model.media_token_id)
        row.sequence = torch.cat([row.sequence, row.logits.argmax(dim=-1, keepdim=True)], dim=1)
        row.generated.append(int(row.sequence[0, -1]))
        rows.append(row)
    return rows

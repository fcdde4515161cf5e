"""Fixtures shared by the core tests."""

from __future__ import annotations

import pytest

from tests.helpers.reference import Reference
from tests.make_tiny_model import FAMILIES, REMOTE_CODE_FAMILY


@pytest.fixture(scope="session")
def references(model_dirs) -> dict[str, Reference]:
    """Upstream's own model for each family, loaded once."""
    return {family: Reference(model_dirs[family]) for family in (*FAMILIES, REMOTE_CODE_FAMILY)}

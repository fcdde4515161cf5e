"""Fixtures shared by the core tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.asking import Asking
from core.config import QuotaSettings, Settings
from core.moderation import WordListFilter
from core.quotas import RequestQuotas
from core.serving.metrics import Metrics
from core.serving.model_choice import ModelCatalog
from core.storage import Storage
from core.tasks.library import TaskLibrary
from tests.helpers.reference import Reference
from tests.make_tiny_model import FAMILIES, REMOTE_CODE_FAMILY


@pytest.fixture(scope="session")
def references(model_dirs) -> dict[str, Reference]:
    """Upstream's own model for each family, loaded once."""
    return {family: Reference(model_dirs[family]) for family in (*FAMILIES, REMOTE_CODE_FAMILY)}


class _Service:
    """Takes the request; the test's front end gives its answer (or ends its wait)."""

    def submit(self, *request: object) -> object:
        return request


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Storage]:
    store = await Storage.open(tmp_path / "bot.db")
    yield store
    await store.close()


@pytest.fixture
def asking(store: Storage, builtin_tasks) -> Asking:
    """The request use case over a real store, the model stood in; built-in tasks need no model."""
    settings = Settings(quotas=QuotaSettings(user_cooldown_seconds=0))
    models = ModelCatalog(default="tiny", choices=("tiny",), weight_bytes={}, budget_bytes=0, on_replicas=False)
    library = TaskLibrary(store, builtin_tasks, rules=None, settings=settings)
    quotas = RequestQuotas(settings.quotas)
    return Asking(settings, store, library, quotas, models, _Service(), Metrics(), WordListFilter([]))

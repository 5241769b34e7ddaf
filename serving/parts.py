"""The one seam between the serving code and the project's own modules: ``Parts``.

``handler.py`` imports the project's pieces (the task registry, where the weights come from,
where files go) and hands them in as one ``Parts``; nothing in ``serving/`` imports ``tasks``,
``model_loader``, ``storage`` or ``handler`` itself (``tests/test_import_rules.py`` checks it).
Imports nothing at runtime but the standard library: ``handler.py`` imports it first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.config import ModelSettings, StorageSettings
    from serving.placement import ModelFiles
    from storage import Storage
    from tasks.base import Task


@dataclass(frozen=True)
class Parts:
    """What a worker is made of, besides the serving code."""

    tasks: Mapping[str, type[Task]]                              # tasks.TASKS
    find_model: Callable[[ModelSettings], ModelFiles]            # model_loader.find_model
    storage_from_settings: Callable[[StorageSettings], Storage | None]   # the worker's storage

"""The files a fork edits stay small: they are the ones it must merge with every upstream release.

Each entry is a file at the top of the repository and the most lines it may have; what grows
past it belongs in ``serving/`` (the machinery), behind the seam ``handler.py`` hands in.
"""

from __future__ import annotations

import pytest

from serving.config import PROJECT_ROOT

MAX_LINES = {
    "storage.py": 250,          # the Storage protocol, LocalStorage and the factory
    "model_loader.py": 250,     # where the weights come from
    "handler.py": 60,           # the project's pieces, handed to serving/start.py
    "tasks/upscale.py": 100,    # the built-in task a fork copies: the seam at its real size
}
RECIPE_MAX_LINES = 25           # the README's task: Cog's and LitServe's examples are 5 to 20


@pytest.mark.parametrize("path", sorted(MAX_LINES))
def test_a_file_a_fork_edits_stays_small(path: str) -> None:
    lines = len((PROJECT_ROOT / path).read_text().splitlines())
    limit = MAX_LINES[path]
    assert lines <= limit, f"{path} has {lines} lines, over {limit}: move internals to serving/"


def test_the_readmes_task_recipe_stays_small() -> None:
    from tests.test_fork import readme_recipe

    lines = len(readme_recipe()["tasks/classify.py"].strip().splitlines())
    assert lines <= RECIPE_MAX_LINES, f"the README's task is {lines} lines, over {RECIPE_MAX_LINES}"

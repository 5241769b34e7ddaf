"""The files a forker edits stay small: each is merged with every upstream release.

The machinery they call lives in ``serving/``; a file that outgrows its limit has taken on
internals that belong there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MAX_LINES = {              # path -> most lines it may have
    "storage.py": 250,
}


@pytest.mark.parametrize(("path", "limit"), sorted(MAX_LINES.items()))
def test_a_forker_file_stays_within_its_line_limit(path: str, limit: int) -> None:
    lines = len((ROOT / path).read_text().splitlines())
    assert lines <= limit, f"{path} has {lines} lines, over {limit}: move internals to serving/"

"""A copy of the project as a clone (or a GPU machine given this checkout) has it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.dockerfile import ROOT


def copy_project(to: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """The project's files into ``to``: tracked, plus new files git does not ignore (so never
    ``models/``, ``.venv`` or results), less the paths starting with one of ``leave_out``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file() and not (leave_out and name.startswith(leave_out)):
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)
    return to

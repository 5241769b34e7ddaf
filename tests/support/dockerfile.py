"""The project's Dockerfile, read with Docker's own parser (the `dockerfile` package).

No Docker engine is needed: tests check what a build would depend on, and run the image's
command on this machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def arg_defaults() -> dict[str, str]:
    """Every ARG with its default value ('' for an ARG declared without one)."""
    defaults: dict[str, str] = {}
    for cmd in instructions():
        if cmd.cmd == "ARG":
            for item in cmd.value:
                name, _, default = item.partition("=")
                defaults[name] = default
    return defaults


def expand_args(text: str) -> str:
    """``text`` with ``${NAME}`` / ``$NAME`` replaced by the ARG defaults, as a build would."""
    defaults = arg_defaults()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), text)


def image_command() -> list[str]:
    """The command a container of the image runs: ENTRYPOINT + CMD, both in JSON form."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for c in instructions():
        if c.cmd in ("ENTRYPOINT", "CMD"):
            assert c.json, f"{c.cmd} must use the JSON form, so signals reach the program"
            if c.cmd == "ENTRYPOINT":
                entrypoint = list(c.value)
            else:
                cmd = list(c.value)
    return entrypoint + cmd

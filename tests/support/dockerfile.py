"""The project's Dockerfile, read with Docker's own parser (the `dockerfile` package).

No Docker engine is needed: tests check what a build would depend on, and run the image's
command on this machine. ``make image-check`` (scripts/image_check.py) builds and runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import dockerfile

ROOT = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def arg_defaults() -> dict[str, str]:
    """Every ARG with its default value ('' for an ARG declared without one). A stage's bare
    ``ARG NAME`` re-declares a global one and keeps its default, as Docker does."""
    defaults: dict[str, str] = {}
    for cmd in instructions():
        if cmd.cmd == "ARG":
            for item in cmd.value:
                name, given, default = item.partition("=")
                if given or name not in defaults:
                    defaults[name] = default
    return defaults


@dataclass(frozen=True)
class Stage:
    """One build stage: its ``AS`` name (or None), what it starts FROM, its instructions."""

    name: str | None
    base: str
    commands: list[dockerfile.Command]


def stages() -> list[Stage]:
    """The build stages in order."""
    found: list[Stage] = []
    for cmd in instructions():
        if cmd.cmd == "FROM":
            words = list(cmd.value)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(name, words[0], []))
        elif found:
            found[-1].commands.append(cmd)
    return found


def shipped_stages() -> list[Stage]:
    """The last stage and the stages it starts FROM, in turn: what the image is made of."""
    by_name = {s.name: s for s in stages() if s.name}
    chain = [stages()[-1]]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return chain


def stage_args(commands: list[dockerfile.Command]) -> set[str]:
    """The ARG names a stage declares (only those are visible inside it)."""
    return {item.partition("=")[0] for c in commands if c.cmd == "ARG" for item in c.value}


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

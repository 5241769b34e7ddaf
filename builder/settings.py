"""Settings declared once, and the few the builder reads: which model to bake, where, how.

A setting is one field of a frozen dataclass, declared with ``setting(...)``: the environment
variable, the default (as a user would write it), the meaning, the legal range (``ge``/``le``;
a ``Literal`` type lists the choices), whether it is a secret, and an optional ``check`` for
what a type and a range cannot say (a URL, a directory that must exist). Everything else
follows from that one line: ``from_env(env=None)`` reads the group in one call (``env``
defaults to ``os.environ``; tests pass a dict), an invalid value raises the class's ``error``
in one line naming the variable and its legal values (never a secret's value), and
``declared()`` lists every field for the settings table of docs/configuration.md::

    @settings
    class Limits(EnvSettings):
        batch: int = setting("WORKER_MAX_BATCH_SIZE", 16, "Sequences per forward pass",
                             ge=1, le=256)

A blank variable means its default. A rule across fields goes in the class's
``__post_init__``. Plain dataclasses, not pydantic models: this module is imported by the
container's launcher, whose every millisecond is a cold start's, and pydantic's import costs
about 90 ms of CPU there (a task's own ``TaskSettings`` is a pydantic model: by then pydantic is
loaded anyway).

``serving/config.py`` declares the worker's settings this way and extends ``ModelSource``;
this package never imports ``serving`` (the Dockerfile's weights stage copies only
``builder/``). This module imports nothing of the project but ``builder.defaults``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from builder.defaults import DEFAULT_MODEL_ID

PROJECT_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")
S = TypeVar("S", bound="EnvSettings")
# A check: the parsed value and the environment read -> the value to keep; raises the
# settings error (with its own one line) when the value cannot be used.
Check = Callable[[Any, Mapping[str, str]], Any]

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(Exception):
    """A setting has a value that cannot be used. ``str(err)`` is one line, never a secret."""


def setting(env: str, default: Any, meaning: str, *, ge: float | None = None,
            le: float | None = None, legal: str | None = None, secret: bool = False,
            check: Check | None = None) -> Any:
    """One setting: read from ``env``, ``default`` when unset or blank, ``ge``..``le`` when a
    number; ``legal`` describes the legal values where the type and range cannot (a URL, a
    directory), and ``check`` enforces them. A ``secret`` is left out of ``repr`` and of every
    error message."""
    return dataclasses.field(default=default, repr=not secret, metadata={
        "env": env, "meaning": meaning, "ge": ge, "le": le, "legal": legal, "secret": secret,
        "check": check})


@typing.dataclass_transform(kw_only_default=True, frozen_default=True,
                            field_specifiers=(dataclasses.field, setting))
def settings(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen, keyword-only dataclass of settings (type checkers see it so)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@dataclasses.dataclass(frozen=True)
class Declared:
    """A declared setting, as the docs table and the error messages describe it."""

    name: str                    # the environment variable
    field: str
    group: str
    default: str | None          # as a user would write it; None: unset
    meaning: str
    legal: str                   # e.g. "1..256", "fast, sdk", "true, false"; "" when free text
    secret: bool
    kind: str                    # "an integer" | "a number" | "a boolean" | "one of" | "text"
    ge: float | None
    le: float | None
    choices: tuple[str, ...]
    type: Any = None             # the field's type, None left out
    check: Check | None = None


_DECLARED: dict[type, list[Declared]] = {}


class EnvSettings:
    """Base of a group of settings; subclasses are decorated with ``@settings``."""

    group: ClassVar[str] = ""
    error: ClassVar[type[Exception]] = SettingsError

    @classmethod
    def declared(cls) -> list[Declared]:
        """This group's settings in declaration order."""
        if cls not in _DECLARED:
            hints = typing.get_type_hints(cls)
            _DECLARED[cls] = [describe(cls.group, f.name, hints[f.name], f.default, f.metadata)
                              for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                              if "env" in f.metadata]
        return _DECLARED[cls]

    @classmethod
    def from_env(cls: type[S], env: Mapping[str, str] | None = None) -> S:
        """The group's settings read from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        values = {}
        for d in cls.declared():
            raw = (env.get(d.name) or "").strip()
            value = parse(d, raw, cls.error) if raw else _typed(d, d.default)
            values[d.field] = value if d.check is None else d.check(value, env)
        return cls(**values)


def parse(d: Declared, raw: str, error: type[Exception] = SettingsError) -> Any:
    """``raw`` read as ``d`` declares; raises ``error`` with the one line for a bad value."""
    if d.choices:
        if raw.lower() not in d.choices:
            raise error(problem(d, raw, "literal_error"))
        return raw.lower()
    if d.type is bool:
        if raw.lower() not in TRUE + FALSE:
            raise error(problem(d, raw, "bool_parsing"))
        return raw.lower() in TRUE
    if d.type in (int, float):
        try:
            number = d.type(raw)
        except ValueError:
            raise error(problem(d, raw, "int_parsing")) from None
        if (number != number or (d.ge is not None and number < d.ge)      # NaN is never legal
                or (d.le is not None and number > d.le)):
            raise error(problem(d, raw, "greater_than_equal"))
        return number
    return _typed(d, raw)


def _typed(d: Declared, text: str | None) -> Any:
    if text is None:
        return None
    if d.type is bool:
        return text == "true"
    return d.type(text) if d.type in (int, float, Path) else text


def problem(d: Declared, raw: str | None, kind: str, msg: str = "") -> str:
    """The one line a bad value of ``d`` is reported with; ``kind`` names what is wrong in
    pydantic's words (``greater_than_equal``, ``int_parsing``, ``literal_error``, ...)."""
    shown = "" if d.secret or raw is None else f"={raw}"
    quoted = "" if d.secret or raw is None else f"={raw!r}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"{d.name}{shown} is out of range: {legal_phrase(d)}"
    if kind in ("int_parsing", "int_from_float", "int_type", "float_parsing", "float_type"):
        return f"{d.name}{quoted} is not {d.kind}; use {legal_phrase(d)}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{d.name}{quoted} is not a boolean; use true or false"
    if kind == "literal_error":
        return f"{d.name}{quoted} is not allowed; use one of {', '.join(d.choices)}"
    return f"{d.name}{quoted}: {msg.removeprefix('Value error, ')}"


def legal_phrase(d: Declared) -> str:
    """``d``'s legal values in words: "an integer from 1 to 256"."""
    if d.ge is not None and d.le is not None:
        return f"{d.kind} from {d.ge} to {d.le}"
    if d.ge is not None:
        return f"{d.kind} of at least {d.ge}"
    if d.le is not None:
        return f"{d.kind} of at most {d.le}"
    return d.legal or d.kind


def describe(group: str, field: str, annotation: Any, default: Any,
             meta: Mapping[str, Any]) -> Declared:
    """The declaration of ``field``, typed ``annotation``, from its metadata (``setting``'s
    keywords). A task's pydantic ``TaskSettings`` fields are described the same way."""
    annotation = _without_none(annotation)
    choices: tuple[str, ...] = ()
    if typing.get_origin(annotation) is Literal:
        choices = tuple(str(c) for c in typing.get_args(annotation))
        kind, legal = "one of", ", ".join(choices)
    elif annotation is bool:
        kind, legal = "a boolean", "true, false"
    elif annotation in (int, float):
        kind, legal = ("an integer" if annotation is int else "a number"), ""
    else:
        kind, legal = "text", ""
    ge, le = meta.get("ge"), meta.get("le")
    if ge is not None or le is not None:
        legal = f"{'' if ge is None else ge}..{'' if le is None else le}"
    if default is None or default is dataclasses.MISSING:
        text = None
    elif isinstance(default, bool):
        text = "true" if default else "false"
    else:
        text = str(default)
    return Declared(name=meta["env"], field=field, group=group, default=text,
                    meaning=meta.get("meaning") or "", legal=meta.get("legal") or legal,
                    secret=bool(meta.get("secret")), kind=kind, ge=ge, le=le, choices=choices,
                    type=annotation, check=meta.get("check"))


def _without_none(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


# --------------------------------------------------------------------------------------------
# What the builder reads: which model, from where, into which directory. The worker's
# ModelSettings (serving/config.py) extends this class, so each is declared here only.
# --------------------------------------------------------------------------------------------
def _under_the_project(path: Path, env: Mapping[str, str]) -> Path:
    return path if path.is_absolute() else PROJECT_ROOT / path


@settings
class ModelSource(EnvSettings):
    """The model to bake (and to serve), and how the Hub is reached."""

    group: ClassVar[str] = "model"

    model_name: str = setting(
        "MODEL_NAME", DEFAULT_MODEL_ID,
        "Hugging Face id of the model: looked up in the HF caches, baked by builder/")
    model_revision: str | None = setting(
        "MODEL_REVISION", None,
        "Hub revision (branch, tag or commit) of MODEL_NAME; default: main")
    baked_dir: Path = setting(
        "MODEL_BAKED_DIR", "models/default",
        "Directory the builder writes the model to (relative to the project)",
        legal="a directory", check=_under_the_project)
    hf_token: str | None = setting(
        "HF_TOKEN", None,
        "Hub token for gated models (build or download only; never printed)", secret=True)
    hub_endpoint: str | None = setting(
        "HF_ENDPOINT", None,
        "Hub address for downloads (a mirror or proxy); default: https://huggingface.co",
        legal="a URL")

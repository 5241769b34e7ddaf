"""Settings declared once, and the few the builder reads: which model to bake, where, how.

A setting is one field of a frozen pydantic dataclass, declared with ``setting(...)``: the
environment variable, the default (as a user would write it), the meaning, the legal range
(``ge``/``le``; a ``Literal`` type lists the choices) and whether it is a secret. Everything
else is derived from that one line: ``from_env(env=None)`` reads the group in one call (``env``
defaults to ``os.environ``; tests pass a dict), an invalid value raises the class's ``error``
in one line naming the variable and its legal values (never a secret's value), and
``declared()`` lists every field for the settings table of docs/configuration.md::

    @settings
    class Limits(EnvSettings):
        batch: int = setting("WORKER_MAX_BATCH_SIZE", 16, "Sequences per forward pass",
                             ge=1, le=256)

A blank variable means its default. Rules that span fields, or need more than a range, are
pydantic validators on the class (``info.context["env"]`` is the environment read).

``serving/config.py`` declares the worker's settings this way and reuses ``ModelSource``; this
package never imports ``serving`` (the Dockerfile's weights stage copies only ``builder/``).
This module imports pydantic and nothing of the project but ``builder.defaults``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import pydantic
from pydantic import ConfigDict, Field, ValidationError

from builder.defaults import DEFAULT_MODEL_ID

PROJECT_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")
S = TypeVar("S", bound="EnvSettings")


class SettingsError(Exception):
    """A setting has a value that cannot be used. ``str(err)`` is one line, never a secret."""


def setting(env: str, default: Any, meaning: str, *, ge: float | None = None,
            le: float | None = None, legal: str | None = None, secret: bool = False) -> Any:
    """One setting: read from ``env``, ``default`` when unset or blank, ``ge``..``le`` when a
    number; ``legal`` describes the legal values where the type and range cannot (a URL, a
    directory). A ``secret`` is left out of ``repr`` and of every error message."""
    return Field(default, ge=ge, le=le, description=meaning, repr=not secret,
                 json_schema_extra={"env": env, "secret": secret, "legal": legal})


def settings(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen, keyword-only pydantic dataclass whose defaults are validated too
    (so a default goes through the same validators as a value read from the environment)."""
    return pydantic.dataclasses.dataclass(
        frozen=True, kw_only=True, config=ConfigDict(validate_default=True, defer_build=True))(cls)


@dataclasses.dataclass(frozen=True)
class Declared:
    """A declared setting, as the docs table and the error messages describe it."""

    name: str
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


class EnvSettings:
    """Base of a group of settings; subclasses are decorated with ``@settings``."""

    group: ClassVar[str] = ""
    error: ClassVar[type[Exception]] = SettingsError

    @classmethod
    def declared(cls) -> list[Declared]:
        """This group's settings in declaration order (fields not read from the environment,
        if any, are left out)."""
        found = []
        for name, info in cls.__pydantic_fields__.items():  # type: ignore[attr-defined]
            extra = info.json_schema_extra
            if isinstance(extra, dict) and "env" in extra:
                found.append(describe(cls.group, name, info, extra))
        return found

    @classmethod
    def from_env(cls: type[S], env: Mapping[str, str] | None = None) -> S:
        """The group's settings read from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        declared = {d.field: d for d in cls.declared()}
        given: dict[str, str] = {}
        for d in declared.values():
            raw = (env.get(d.name) or "").strip()
            if raw:
                given[d.field] = raw.lower() if d.choices else raw
        try:
            return cls.__pydantic_validator__.validate_python(  # type: ignore[attr-defined]
                given, context={"env": env})
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            d = declared.get(field)
            if d is None:
                raise cls.error(f"{cls.group} settings: {err['msg']}") from None
            raise cls.error(problem(d, given.get(field), err["type"], err["msg"])) from None


def problem(d: Declared, raw: str | None, kind: str, msg: str) -> str:
    """The one line an invalid value of ``d`` is reported with."""
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


def describe(group: str, name: str, info: Any, extra: dict[str, Any]) -> Declared:
    """The declaration of field ``name`` (a pydantic ``FieldInfo``, ``info``) read from the
    variable ``extra["env"]``; pydantic models with fields of their own (a task's
    ``TaskSettings``) are described the same way."""
    annotation = _without_none(info.annotation)
    choices: tuple[str, ...] = ()
    if typing.get_origin(annotation) is Literal:
        choices = tuple(str(c) for c in typing.get_args(annotation))
        kind, legal = "one of", ", ".join(choices)
    elif annotation is bool:
        kind, legal = "a boolean", "true, false"
    elif annotation in (int, float):
        kind = "an integer" if annotation is int else "a number"
        legal = ""
    else:
        kind, legal = "text", ""
    ge = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
    le = next((m.le for m in info.metadata if hasattr(m, "le")), None)
    if ge is not None or le is not None:
        legal = f"{'' if ge is None else ge}..{'' if le is None else le}"
    default = info.default
    if default is None:
        text = None
    elif isinstance(default, bool):
        text = "true" if default else "false"
    else:
        text = str(default)
    return Declared(name=extra["env"], field=name, group=group, default=text,
                    meaning=info.description or "", legal=extra.get("legal") or legal,
                    secret=bool(extra.get("secret")), kind=kind, ge=ge, le=le, choices=choices)


def _without_none(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


# --------------------------------------------------------------------------------------------
# What the builder reads: which model, from where, into which directory. The worker's
# ModelSettings (serving/config.py) extends this class, so each is declared here only.
# --------------------------------------------------------------------------------------------
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
        legal="a directory")
    hf_token: str | None = setting(
        "HF_TOKEN", None,
        "Hub token for gated models (build or download only; never printed)", secret=True)
    hub_endpoint: str | None = setting(
        "HF_ENDPOINT", None,
        "Hub address for downloads (a mirror or proxy); default: https://huggingface.co",
        legal="a URL")

    @pydantic.field_validator("baked_dir")
    @classmethod
    def _under_the_project(cls, value: Path) -> Path:
        return value if value.is_absolute() else PROJECT_ROOT / value

"""Model families served from the model's own config: one table of transformers pipelines.

Owns what differs between the families ``tasks/pipeline.py`` serves: which pipeline runs, which
parameters a job may pass to it (typed, with limits; anything else is refused by name), and how
one input's result is shaped for each of the two input forms:

- the Hugging Face Inference API's ``{"inputs": X, "parameters": {...}}``: the answer is what
  ``transformers.pipeline(<kind>, model=<the same directory>)(X, **parameters)`` returns, as
  JSON (a list ``X`` is a list of inputs, answered in order);
- the worker's own fields, ``{"text": "...", <parameters as fields>}``: the answer is
  ``{"result": <that input's result>, "model": <served name>}``.

Inputs of concurrent jobs with equal parameters share one pipeline call (its own batching), on
the device thread. Never imports runpod or boto3; never lets a pipeline fetch a URL or open a
path: its inputs are plain strings here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from serving.validation import StrictInput

MAX_TEXT_CHARS = 20_000            # one input text; longer inputs are refused, naming the field
MAX_LABELS = 64                    # zero-shot candidate labels: each one is a forward pass
MAX_INPUTS = 64                    # inputs of one Hugging Face-shaped job


class TextClassificationParameters(StrictInput):
    top_k: int | None = Field(default=None, ge=1, le=1000)
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = None


class ZeroShotParameters(StrictInput):
    candidate_labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)
    multi_label: bool = False
    hypothesis_template: str = Field(default="This example is {}.", max_length=500)

    @field_validator("candidate_labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:
        if any(not label.strip() or len(label) > 200 for label in labels):
            raise ValueError("each label must be 1..200 characters, not blank")
        return labels

    @field_validator("hypothesis_template")
    @classmethod
    def _template(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise ValueError("must hold '{}' exactly once, where the label goes")
        return template


class TokenClassificationParameters(StrictInput):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"
    ignore_labels: list[str] | None = Field(default=None, max_length=MAX_LABELS)


class FillMaskParameters(StrictInput):
    top_k: int = Field(default=5, ge=1, le=100)
    targets: list[str] | None = Field(default=None, min_length=1, max_length=MAX_LABELS)


def _wrap_text_classification(single: bool, results: list[Any], params: dict[str, Any]) -> Any:
    # As the pipeline answers: one string without top_k is a one-element list.
    if single:
        return [results[0]] if "top_k" not in params else results[0]
    return results


def _wrap_plain(single: bool, results: list[Any], params: dict[str, Any]) -> Any:
    return results[0] if single else results


@dataclass(frozen=True)
class Family:
    """One row of the table: a pipeline kind and what differs about it."""

    kind: str
    parameters: type[StrictInput]
    wrap: Callable[[bool, list[Any], dict[str, Any]], Any]   # per-input results -> X's answer
    mask_token: bool = False                                  # the text must hold the mask token


FAMILIES: dict[str, Family] = {f.kind: f for f in (
    Family("text-classification", TextClassificationParameters, _wrap_text_classification),
    Family("zero-shot-classification", ZeroShotParameters, _wrap_plain),
    Family("token-classification", TokenClassificationParameters, _wrap_plain),
    Family("fill-mask", FillMaskParameters, _wrap_plain, mask_token=True),
)}


def params_key(params: dict[str, Any]) -> str:
    """Inputs whose parameters give the same key share one pipeline call."""
    return json.dumps(params, sort_keys=True)


def to_json(value: Any) -> Any:
    """A pipeline's result as plain JSON: numpy and torch scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if hasattr(value, "tolist"):                # numpy / torch scalars and arrays
        return to_json(value.tolist())
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    raise TypeError(f"a pipeline answered a {type(value).__name__}, which is not JSON")

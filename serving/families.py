"""Model families served from the model's own config: one table of transformers pipelines.

Owns what differs between the families ``tasks/pipeline.py`` serves: which pipeline runs, which
parameters a job may pass to it (typed, with limits; anything else is refused by name), and how
one input's result is shaped for each of the two input forms:

- the Hugging Face Inference API's ``{"inputs": X, "parameters": {...}}``: the answer is what
  ``transformers.pipeline(<kind>, model=<the same directory>)(X, **parameters)`` returns, as
  JSON (a list ``X`` is a list of inputs, answered in order); an image-text-to-text ``X`` is
  ``{"image", "prompt"}``, answered as ``pipeline(...)(images=image, text=prompt, **parameters)``
  (or ``{"image", "messages"}``, as ``(text=<the chat, the image in its image part>, ...)``);
- the worker's own fields, ``{"text": "...", <parameters as fields>}``: the answer is
  ``{"result": <that input's result>, "model": <served name>}``.

Inputs of concurrent jobs with equal parameters share one pipeline call (its own batching), on
the device thread, unless a family runs one input per call (``batch=False``). Never imports
runpod or boto3; never lets a pipeline fetch a URL or open a path: its inputs are plain strings
here, and images the worker decoded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from serving import text_runners
from serving.delivery import Artefact
from serving.validation import StrictInput

MAX_TEXT_CHARS = 20_000            # one input text; longer inputs are refused, naming the field
MAX_LABELS = 64                    # zero-shot candidate labels: each one is a forward pass
MAX_INPUTS = 64                    # inputs of one Hugging Face-shaped job


class TextClassificationParameters(StrictInput):
    top_k: int | None = Field(default=None, ge=1, le=1000)
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = None


def _check_labels(labels: list[str]) -> list[str]:
    if any(not label.strip() or len(label) > 200 for label in labels):
        raise ValueError("each label must be 1..200 characters, not blank")
    return labels


def _check_template(template: str) -> str:
    if template.count("{}") != 1:
        raise ValueError("must hold '{}' exactly once, where the label goes")
    return template


class ZeroShotParameters(StrictInput):
    candidate_labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)
    multi_label: bool = False
    hypothesis_template: str = Field(default="This example is {}.", max_length=500)

    _labels = field_validator("candidate_labels")(_check_labels)
    _template = field_validator("hypothesis_template")(_check_template)


class TokenClassificationParameters(StrictInput):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"
    ignore_labels: list[str] | None = Field(default=None, max_length=MAX_LABELS)


class FillMaskParameters(StrictInput):
    top_k: int = Field(default=5, ge=1, le=100)
    targets: list[str] | None = Field(default=None, min_length=1, max_length=MAX_LABELS)


class ImageClassificationParameters(StrictInput):
    top_k: int | None = Field(default=None, ge=1, le=1000)
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = None


class ZeroShotImageParameters(StrictInput):
    candidate_labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)
    hypothesis_template: str = Field(default="This is a photo of {}.", max_length=500)

    _labels = field_validator("candidate_labels")(_check_labels)
    _template = field_validator("hypothesis_template")(_check_template)


class ObjectDetectionParameters(StrictInput):
    threshold: float = Field(default=0.5, ge=0, le=1)


class ImageSegmentationParameters(StrictInput):
    threshold: float = Field(default=0.9, ge=0, le=1)
    mask_threshold: float = Field(default=0.5, ge=0, le=1)
    overlap_mask_area_threshold: float = Field(default=0.5, ge=0, le=1)
    subtask: Literal["semantic", "instance", "panoptic"] | None = None


class NoParameters(StrictInput):
    pass


class SpeechRecognitionParameters(StrictInput):
    return_timestamps: bool | Literal["word", "char"] | None = None
    chunk_length_s: float | None = Field(default=None, gt=0, le=30)
    stride_length_s: float | None = Field(default=None, ge=0, le=10)
    language: str | None = Field(default=None, min_length=2, max_length=32)   # Whisper's
    task: Literal["transcribe", "translate"] | None = None                    # Whisper's


class AudioClassificationParameters(StrictInput):
    top_k: int | None = Field(default=None, ge=1, le=1000)


class TextToAudioParameters(StrictInput):
    output_format: Literal["wav", "flac", "mp3"] = "wav"      # ours: the file's format


class Text2TextParameters(StrictInput):
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024)
    num_beams: int | None = Field(default=None, ge=1, le=8)
    do_sample: bool | None = None
    temperature: float | None = Field(default=None, gt=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)


class ImageToTextParameters(Text2TextParameters):
    prompt: str | None = Field(default=None, min_length=1, max_length=2000)  # text to go on from


class ImageTextToTextParameters(Text2TextParameters):
    # max_new_tokens: at most WORKER_MAX_NEW_TOKENS (checked at parse), else its default
    max_new_tokens: int | None = Field(default=None, ge=1)
    return_full_text: bool | None = None


class ChatPart(StrictInput):
    type: Literal["text", "image"]
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)   # a text part's


def _content_kind(value: Any) -> str:
    return "text" if isinstance(value, str) else "parts"


class ChatTurn(StrictInput):
    role: Literal["system", "user", "assistant"]
    # A text, or parts; an error names the one the caller sent (content.parts.0.text).
    content: Annotated[
        Annotated[str, Tag("text"), Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[ChatPart], Tag("parts"), Field(max_length=MAX_LABELS)],
        Discriminator(_content_kind)]


class ImageAndPrompt(StrictInput):
    """One input of a vision-language model: an image, and either the prompt the model reads,
    holding the processor's image token (LLaVA's ``<image>``) where the image goes, or
    ``messages`` in the chat shape the pipeline takes, one ``{"type": "image"}`` part where the
    image goes (the model's chat template writes the prompt). Which one is checked at parse,
    naming the field."""

    image: str = Field(min_length=1)
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    messages: list[ChatTurn] | None = Field(default=None, min_length=1)


class QuestionAnsweringParameters(StrictInput):
    top_k: int = Field(default=1, ge=1, le=20)
    max_answer_len: int = Field(default=15, ge=1, le=512)
    doc_stride: int = Field(default=128, ge=0, le=1024)
    handle_impossible_answer: bool = False


class QuestionAndContext(StrictInput):
    question: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    context: str = Field(min_length=1, max_length=MAX_TEXT_CHARS * 10)


def _wrap_text_classification(single: bool, results: list[Any], params: dict[str, Any]) -> Any:
    # As the pipeline answers: one string without top_k is a one-element list.
    if single:
        return [results[0]] if "top_k" not in params else results[0]
    return results


def _wrap_plain(single: bool, results: list[Any], params: dict[str, Any]) -> Any:
    return results[0] if single else results


# A runner computes the kinds transformers 5 has no pipeline for, on the device thread:
# runner(pipe, inputs, params, kind) -> one JSON result per input, where ``pipe`` holds the
# model and its preprocessors as a pipeline does (``model``, ``tokenizer``, ``image_processor``).
Runner = Callable[[Any, list[Any], dict[str, Any], str], list[Any]]


@dataclass(frozen=True)
class Family:
    """One row of the table: a kind and what differs about it."""

    kind: str
    parameters: type[StrictInput]
    wrap: Callable[[bool, list[Any], dict[str, Any]], Any]   # per-input results -> X's answer
    mask_token: bool = False                                  # the text must hold the mask token
    inputs: type[StrictInput] | None = None    # one input's fields; None: one text, "text"
    runner: Runner | None = None               # None: transformers' pipeline for the kind
    pair_truncation: bool = False              # the model sees (text, x): the runner fits it
    media: Literal["text", "image", "audio"] = "text"   # what one input is
    batch: bool = True                         # inputs of several jobs share a pipeline call
    files: bool = False                        # its results hold images or audio to store
    pads_text: bool = True                     # a call's texts are padded to one length
    # On a CPU, whether batching pays for this model (a batch of a big convolution is no faster
    # there than its inputs one by one, and waits for its slowest member).
    batch_on_cpu: Callable[[Any], bool] = lambda model: True   # noqa: E731 - a default
    # The job's parameters -> the pipeline's keyword arguments (ours removed, some regrouped).
    call: Callable[[dict[str, Any]], dict[str, Any]] = dict
    # The parameters this model cannot take: (model, params) -> (parameter, why) or None.
    refuse: Callable[[Any, dict[str, Any]], tuple[str, str] | None] | None = None


def _families() -> dict[str, Family]:
    text2text: dict[str, Any] = {"parameters": Text2TextParameters, "wrap": _wrap_list,
                                 "runner": text_runners.text2text}
    return {f.kind: f for f in (
        Family("text-classification", TextClassificationParameters, _wrap_text_classification),
        Family("zero-shot-classification", ZeroShotParameters, _wrap_plain,
               pair_truncation=True),
        Family("token-classification", TokenClassificationParameters, _wrap_plain),
        Family("fill-mask", FillMaskParameters, _wrap_plain, mask_token=True),
        Family("text2text-generation", **text2text),
        Family("summarization", **text2text),
        Family("translation", **text2text),
        Family("question-answering", QuestionAnsweringParameters, _wrap_plain,
               inputs=QuestionAndContext, runner=text_runners.question_answering,
               pair_truncation=True),
        Family("image-classification", ImageClassificationParameters, _wrap_plain,
               media="image"),
        Family("zero-shot-image-classification", ZeroShotImageParameters, _wrap_plain,
               media="image"),
        Family("object-detection", ObjectDetectionParameters, _wrap_plain, media="image"),
        Family("image-segmentation", ImageSegmentationParameters, _wrap_plain, media="image",
               files=True),
        Family("depth-estimation", NoParameters, _wrap_plain, media="image", files=True),
        # One prompt per call (params_key): its rows need no padding.
        Family("image-to-text", ImageToTextParameters, _wrap_list, media="image",
               runner=text_runners.image_to_text, refuse=text_runners.refuse_image_to_text,
               pads_text=False),
        # Chat vision-language models (LLaVA, Idefics3, Qwen2-VL): transformers' own pipeline;
        # only inputs whose rows need no padding share a call (tasks/pipeline.py, _key).
        Family("image-text-to-text", ImageTextToTextParameters, _wrap_list, media="image",
               inputs=ImageAndPrompt, call=_generate_call),
        # Speech is a long input, and compute-bound on a CPU: 8 clips as one batch ran 0.75x
        # to 1.0x as fast as one by one for a CTC model (wav2vec2) and 0.8x for a Whisper
        # (bench/families_bench.py), so on a CPU speech runs one clip per call.
        Family("automatic-speech-recognition", SpeechRecognitionParameters, _wrap_plain,
               media="audio", call=_speech_call, batch_on_cpu=lambda model: False,
               refuse=_refuse_speech),
        Family("audio-classification", AudioClassificationParameters, _wrap_plain,
               media="audio"),
        # Speech lengths differ per text: one text per call, so no padding reaches the audio.
        Family("text-to-audio", TextToAudioParameters, _wrap_plain, batch=False,
               call=_without_format, files=True),
    )}


def _refuse_speech(model: Any, params: dict[str, Any]) -> tuple[str, str] | None:
    """Whisper's ``language`` and ``task`` only for a model whose generation config knows them
    (a CTC model has neither; an English-only Whisper has no languages), and a language it
    knows: a code (``fr``), a name (``french``) or its token (``<|fr|>``), as generate reads it."""
    config = getattr(model, "generation_config", None)
    languages = getattr(config, "lang_to_id", None) or {}
    tasks = getattr(config, "task_to_id", None) or {}
    for name, known in (("language", languages), ("task", tasks)):
        if params.get(name) is not None and not (known and getattr(
                config, "is_multilingual", True)):
            return name, f"this model ({type(model).__name__}) takes no {name}; leave it out"
    language = params.get("language")
    if language is not None and _language_token(language) not in languages:
        codes = ", ".join(sorted(t.strip("<|>") for t in languages))
        return "language", f"{language!r} is not a language this model knows; use one of {codes}"
    if params.get("task") is not None and params["task"] not in tasks:
        return "task", f"this model does not {params['task']}; use one of {', '.join(tasks)}"
    return None


def _language_token(language: str) -> str:
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    language = language.lower()
    if language.startswith("<|"):
        return language
    return f"<|{TO_LANGUAGE_CODE.get(language, language)}|>"


def _speech_call(params: dict[str, Any]) -> dict[str, Any]:
    """Whisper's language and task go to generate, as the pipeline takes them."""
    call = {k: v for k, v in params.items() if k not in ("language", "task")}
    generate = {k: params[k] for k in ("language", "task") if k in params}
    if generate:
        call["generate_kwargs"] = generate
    return call


def _generate_call(params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline takes max_new_tokens and return_full_text itself, the rest as generate's."""
    call = {k: v for k, v in params.items() if k in ("max_new_tokens", "return_full_text")}
    generate = {k: v for k, v in params.items() if k not in call}
    if generate:
        call["generate_kwargs"] = generate
    return call


def _without_format(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "output_format"}


def _wrap_list(single: bool, results: list[Any], params: dict[str, Any]) -> Any:
    # As the 4.x text2text and image-to-text pipelines answered (and 5's image-text-to-text
    # answers): a list of one {"<kind>_text": ...} per input.
    return [results[0]] if single else [[r] for r in results]


FAMILIES: dict[str, Family] = _families()


def params_key(params: dict[str, Any]) -> str:
    """Inputs whose parameters give the same key share one pipeline call."""
    return json.dumps(params, sort_keys=True)


def to_json(value: Any, store: Callable[[Any, str], Any] | None = None, name: str = "out"
            ) -> Any:
    """A pipeline's result as plain JSON: numpy and torch scalars become Python numbers; an
    image (a mask, a depth map) becomes ``store(image, name)``'s file, and a depth estimate's
    ``predicted_depth`` tensor its ``min`` and ``max`` (the map itself is the ``depth`` PNG)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "predicted_depth" and hasattr(v, "min"):
                out["min"], out["max"] = float(v.min()), float(v.max())
            else:
                out[str(k)] = to_json(v, store, f"{name}-{k}")
        return out
    if isinstance(value, list | tuple):
        return [to_json(v, store, f"{name}-{i}") for i, v in enumerate(value)]
    if hasattr(value, "save") and hasattr(value, "mode"):        # a PIL image
        if store is None:
            raise TypeError("an image in a result needs a place to store it")
        return store(value, name)
    if hasattr(value, "tolist"):                # numpy / torch scalars and arrays
        return to_json(value.tolist())
    if isinstance(value, float | int | str | bool | Artefact) or value is None:
        return value                           # an Artefact: a file delivery makes inline or a link
    raise TypeError(f"a pipeline answered a {type(value).__name__}, which is not JSON")

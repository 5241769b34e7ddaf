"""What kind of model a directory holds, read from its config: the pipeline tasks it can serve.

Owns the mapping from a model's config to the Hugging Face pipeline task names that fit it
(``automatic-speech-recognition``, ``text-generation``, ``feature-extraction``, ...). It reads
the config's ``architectures`` (else its ``model_type``) against transformers' own auto-class
tables, the ones behind ``AutoModelFor...``, so it is exact: a class name is looked up, never
guessed from a suffix. ``model_loader.pick_task`` matches these kinds against each task's
``pipeline_tasks``. Never imports torch, runpod or boto3 (transformers' tables are plain
dictionaries of names).

A class can sit in several tables (``GitForCausalLM`` is a causal LM and a captioner;
``CLIPModel`` is a bare encoder and a zero-shot image classifier). The kinds are ordered, the
most specific first, and the first is the default: the kind the Hugging Face Hub tags such
models with. The defaults that are choices, not lookups:

    a sequence classifier whose labels include "entailment"   zero-shot-classification
    CLIP- and SigLIP-style dual encoders                        zero-shot-image-classification
    a masked-LM head (that is not also a seq2seq model)         fill-mask
    a bare encoder, no head (or a sentence-transformers folder) feature-extraction
    a captioner (BLIP, BLIP-2, GIT, Pix2Struct, VisionEncoderDecoder) image-to-text
    any other image-text-to-text class (LLaVA, Idefics3, Qwen2-VL)  image-text-to-text
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from transformers.models.auto import modeling_auto

# transformers' table (MODEL_FOR_<X>_MAPPING_NAMES, model_type -> class name) -> the pipeline
# task its models serve, most specific first: a class found in several tables takes the kinds
# in this order, and the first is its default.
_TABLES: tuple[tuple[str, str], ...] = (
    ("SPEECH_SEQ_2_SEQ", "automatic-speech-recognition"),
    ("CTC", "automatic-speech-recognition"),
    ("TEXT_TO_WAVEFORM", "text-to-audio"),
    ("TEXT_TO_SPECTROGRAM", "text-to-audio"),
    ("AUDIO_CLASSIFICATION", "audio-classification"),
    ("IMAGE_TEXT_TO_TEXT", "image-to-text"),          # the captioners among them: see below
    ("IMAGE_TEXT_TO_TEXT", "image-text-to-text"),
    ("ZERO_SHOT_IMAGE_CLASSIFICATION", "zero-shot-image-classification"),
    ("OBJECT_DETECTION", "object-detection"),
    ("UNIVERSAL_SEGMENTATION", "image-segmentation"),
    ("INSTANCE_SEGMENTATION", "image-segmentation"),
    ("SEMANTIC_SEGMENTATION", "image-segmentation"),
    ("IMAGE_SEGMENTATION", "image-segmentation"),
    ("DEPTH_ESTIMATION", "depth-estimation"),
    ("IMAGE_CLASSIFICATION", "image-classification"),
    ("IMAGE_TO_IMAGE", "image-to-image"),
    ("SEQ_TO_SEQ_CAUSAL_LM", "text2text-generation"),
    ("QUESTION_ANSWERING", "question-answering"),
    ("TOKEN_CLASSIFICATION", "token-classification"),
    ("SEQUENCE_CLASSIFICATION", "text-classification"),
    ("MASKED_LM", "fill-mask"),
    ("CAUSAL_LM", "text-generation"),
    ("TEXT_ENCODING", "feature-extraction"),
    ("", "feature-extraction"),          # MODEL_MAPPING_NAMES: the bare model, when nothing else
)

# Every kind a task may name in ``pipeline_tasks`` or WORKER_TASK may take.
KINDS: tuple[str, ...] = tuple(dict.fromkeys(
    [kind for _, kind in _TABLES] + ["zero-shot-classification", "summarization", "translation"]))


def _table(name: str) -> Mapping[str, Any]:
    attr = f"MODEL_FOR_{name}_MAPPING_NAMES" if name else "MODEL_MAPPING_NAMES"
    return getattr(modeling_auto, attr, {})


def _classes(table: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in table.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def _types(name: str) -> frozenset[str]:
    return frozenset(_table(name))


_TEXT_ENCODERS = frozenset(_classes(_table("TEXT_ENCODING")))

# The image-text-to-text table holds captioners and chat vision-language models alike. The
# captioners (the model types transformers 4's image-to-text pipeline was written for) caption
# an image with no prompt; a chat model needs a prompt with its image token and is
# image-text-to-text only.
_CAPTIONER_TYPES = frozenset({"blip", "blip-2", "git", "pix2struct", "vision-encoder-decoder"})


def _class_kind(name: str, kind: str) -> tuple[frozenset[str], frozenset[str], str]:
    table = _table(name)
    if kind == "image-to-text":
        table = {t: c for t, c in table.items() if t in _CAPTIONER_TYPES}
    return frozenset(_classes(table)), frozenset(table), kind


_CLASS_KINDS: tuple[tuple[frozenset[str], frozenset[str], str], ...] = tuple(
    _class_kind(name, kind) for name, kind in _TABLES)


def model_kinds(config: Any, files: Iterable[str] = ()) -> tuple[str, ...]:
    """The pipeline tasks a model with ``config`` can serve, its default first; () for none.

    ``files`` names what the model's directory holds at its top level: a sentence-transformers
    folder (``modules.json``) is an embedding model whatever its architecture."""
    architectures = tuple(getattr(config, "architectures", None) or ())
    kinds: list[str] = []
    if architectures:
        for classes, _, kind in _CLASS_KINDS:
            if any(a in classes for a in architectures) and kind not in kinds:
                kinds.append(kind)
        if len(kinds) > 1 and kinds[-1] == "feature-extraction" and not any(
                a in _TEXT_ENCODERS for a in architectures):
            # Nearly every model has a bare class; only a model with nothing more specific
            # (or a text encoder) is read as an embedding model, so a VITS speech model or a
            # CLIP never reaches a text-embedding task.
            kinds.pop()
    else:
        # No architectures: the config names no head. As before, a model type that has a
        # causal-LM class is read as one (configs saved without architectures are mostly
        # decoders); any model type with a bare class is an encoder too.
        model_type = getattr(config, "model_type", None)
        for classes_types, kind in ((_types("CAUSAL_LM"), "text-generation"),
                                    (_types(""), "feature-extraction")):
            if model_type in classes_types:
                kinds.append(kind)
    if "modules.json" in set(files):
        kinds.insert(0, "feature-extraction")
    if "text-classification" in kinds and _has_entailment(config):
        kinds.insert(kinds.index("text-classification"), "zero-shot-classification")
    if "text2text-generation" in kinds and "fill-mask" in kinds:
        kinds.remove("fill-mask")             # BART: a seq2seq model first, its MLM head aside
    return tuple(dict.fromkeys(kinds))


def _has_entailment(config: Any) -> bool:
    labels = getattr(config, "label2id", None) or {}
    return any(str(label).lower().startswith("entail") for label in labels)


def describe(config: Any) -> str:
    """The model's architecture for a message: its class names, else its model type."""
    architectures = tuple(getattr(config, "architectures", None) or ())
    return ", ".join(architectures) or f"model type {getattr(config, 'model_type', 'unknown')}"

"""What the tests of the model kinds served with no code share: one job's answer, JSON compared
within float tolerance, the check that each kind's banner example answers, and a tiny model of
every family with a job for it."""

from __future__ import annotations

import asyncio
import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest

from serving.worker import Worker
from tests.support.worker import collect


def answer(loop, worker: Worker, job_input: dict[str, Any]) -> Any:
    """The one thing the worker yields for a job with ``job_input``."""
    [out] = loop.run(collect(worker, job_input))
    return out


def at_once(loop, worker: Worker, jobs: list[dict[str, Any]]) -> list[Any]:
    """The one thing the worker yields for each of ``jobs``, sent all at once (so that they
    may share batches), in order."""
    async def run() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(collect(worker, job, f"j{n}")
                                      for n, job in enumerate(jobs)))

    return [out for [out] in loop.run(run())]


def close(a: Any, b: Any) -> bool:
    """Equal JSON, numbers within float tolerance (batched rows are padded)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6)
    return a == b


def check_banner_examples(loop, workers: dict[str, Worker], model_dirs: dict[str, Path]) -> None:
    """The local endpoint's banner prints ``Task.example_for``: for each kind it must answer."""
    from model_loader import ModelSource, read_model_files

    for name, worker in workers.items():
        files = read_model_files(ModelSource(model_dirs[name], "MODEL_PATH"))
        example = type(worker.task).example_for(files)
        out = answer(loop, worker, example)
        assert "error" not in out, (name, example, out)


def one_model_of_each() -> dict[str, tuple[Any, dict[str, Any]]]:
    """kind -> (a function that makes a tiny model of the kind in a directory, a job input in
    the Hugging Face shape), for every family (Whisper beside the CTC model)."""
    from bench import families_bench as bench
    from tests import test_audio_families as audio
    from tests import test_image_families as image
    from tests import test_pipeline_task as text
    from tests import test_vision_language as vision
    from tests.support.images import image_uri
    from tests.support.images import picture as random_picture

    picture = image_uri(random_picture(0))
    speech = audio.data_uri(audio.wav_bytes(audio.tone(1.0)))

    def image_model(make: Any) -> Any:
        def build(path: Path) -> None:
            model, processor = make(path) if make is image._clip else make()
            model.save_pretrained(path)
            processor.save_pretrained(path)
        return build

    def text_model(name: str) -> Any:
        head, config = text.MODELS[name]

        def build(path: Path) -> None:
            # A word-piece vocabulary written here: the machine needs no tokenizer package.
            bench.word_tokenizer(path)
            text.tiny_model(path, path, head, **config)
        return build

    def audio_model(make: Any) -> Any:
        def build(path: Path) -> None:
            if importlib.util.find_spec("av") is None:
                pytest.skip("av is not installed (audio decoding); carry its wheel to run it")
            make(path)
        return build

    return {
        "text-classification": (text_model("sentiment"), {"inputs": "I loved it"}),
        "zero-shot-classification": (text_model("nli"), {
            "inputs": "The match ended late",
            "parameters": {"candidate_labels": ["sport", "politics"]}}),
        "question-answering": (bench.MAKERS["question-answering"], {"inputs": {
            "question": "Where is the tower?", "context": "The tower is in Paris."}}),
        "summarization": (bench.MAKERS["summarization"],
                          {"inputs": "The film was a quiet delight from the first scene."}),
        "token-classification": (text_model("ner"), {"inputs": "John lives in Paris"}),
        "fill-mask": (text_model("mlm"), {"inputs": "Paris is the [MASK] of France."}),
        "image-classification": (image_model(image._vit), {"inputs": picture}),
        "zero-shot-image-classification": (image_model(image._clip), {
            "inputs": picture, "parameters": {"candidate_labels": ["a cat", "a dog"]}}),
        "object-detection": (image_model(image._yolos),
                             {"inputs": picture, "parameters": {"threshold": 0.0}}),
        "image-segmentation": (image_model(image._segformer), {"inputs": picture}),
        "depth-estimation": (image_model(image._dpt), {"inputs": picture}),
        "image-to-text": (image._vit_gpt2, {"inputs": picture}),
        "image-text-to-text": (vision._llava, {"inputs": {"image": picture,
                                                           "prompt": vision.PROMPT},
                                               "parameters": {"max_new_tokens": 4}}),
        "automatic-speech-recognition": (audio_model(audio._ctc), {"inputs": speech}),
        "whisper": (audio_model(audio._whisper),
                    {"inputs": speech, "parameters": {"language": "fr", "task": "translate"}}),
        "audio-classification": (audio_model(audio._ast), {"inputs": speech}),
        "text-to-audio": (audio_model(audio._vits), {"inputs": "hello world"}),
    }

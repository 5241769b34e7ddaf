"""The families on CUDA: one model of each answers on the GPU what it answers on the CPU in
float32, through the worker's job wiring. Deselected by default (marker ``gpu``); ``make
gpu-check`` runs it. The models are the tiny random ones the CPU tests make; it skips where
pydantic or boto3 (the worker's job wiring) are missing, and the audio kinds where av is.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("pydantic")
pytest.importorskip("boto3")


def _jobs() -> dict[str, tuple[Any, dict[str, Any]]]:
    """kind -> (a function that makes its model in a directory, a job input)."""
    from PIL import Image

    from tests import test_audio_families as audio
    from tests import test_image_families as image
    from tests import test_pipeline_task as text

    out = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0)).numpy()
                    ).save(out, format="PNG")
    picture = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
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
            import transformers

            from bench.families_bench import _vocab
            path.mkdir(parents=True)
            words = dict.fromkeys(_vocab(path.parent).read_text().split())
            # transformers 5's BertTokenizer takes the vocabulary itself (not a vocab_file).
            transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}
                                       ).save_pretrained(path)
            text.tiny_model(path, path, head, **config)
        return build

    def audio_model(make: Any) -> Any:
        def build(path: Path) -> None:
            if importlib.util.find_spec("av") is None:
                pytest.skip("av is not installed (audio decoding); carry its wheel to run it")
            make(path)
        return build

    from bench import families_bench as bench
    from tests import test_vision_language as vision

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


def _answer(path: Path, device: str, job_input: dict[str, Any]) -> Any:
    from tests.support.worker import build_worker

    worker = build_worker({"MODEL_PATH": str(path), "MODEL_DEVICE": device,
                           "MODEL_DTYPE": "float32"})

    async def run() -> list[Any]:
        return [out async for out in worker.handle({"id": "gpu", "input": job_input})]

    [out] = asyncio.run(run())
    return out


def _numbers_close(a: Any, b: Any) -> bool:
    """Equal JSON but for floats (1e-3) and files (compared by size: PNG bytes of maps may
    differ in a pixel's rounding)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if {"data", "sha256"} <= a.keys():
            return a["content_type"] == b["content_type"]
        return a.keys() == b.keys() and all(_numbers_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_numbers_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-3, abs_tol=1e-4)
    return a == b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", list(_jobs()) if torch.cuda.is_available() else ["none"])
def test_a_family_answers_on_the_gpu_what_it_answers_on_the_cpu(kind, tmp_path):
    make, job_input = _jobs()[kind]
    torch.manual_seed(0)
    make(tmp_path / kind)
    on_gpu = _answer(tmp_path / kind, "cuda", job_input)
    on_cpu = _answer(tmp_path / kind, "cpu", job_input)
    assert "error" not in on_gpu, on_gpu
    assert _numbers_close(on_gpu, on_cpu), (on_gpu, on_cpu)

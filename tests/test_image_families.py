"""The image families (classification, detection, segmentation, depth) served with no code:
each answers what transformers' pipeline answers for the same model and image, images come by
data URI or URL (under the download rules), masks and depth maps are files, and bad images
name their field.

The models are tiny random ones made from configs (no Hub).
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from PIL import Image

from serving.families import to_json
from serving.worker import Worker
from tests.support.families import answer, check_banner_examples, close
from tests.support.worker import build_worker

LABELS = {0: "cat", 1: "dog", 2: "owl"}


def _vit() -> tuple[Any, Any]:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    return (transformers.ViTForImageClassification(config),
            transformers.ViTImageProcessor(size={"height": 32, "width": 32}))


def _yolos() -> tuple[Any, Any]:
    config = transformers.YolosConfig(
        image_size=[32, 32], patch_size=8, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, num_detection_tokens=5,
        id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    return (transformers.YolosForObjectDetection(config),
            transformers.YolosImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}))


def _segformer() -> tuple[Any, Any]:
    config = transformers.SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3],
        strides=[2], num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8,
        id2label={0: "sky", 1: "road"}, label2id={"sky": 0, "road": 1})
    return (transformers.SegformerForSemanticSegmentation(config),
            transformers.SegformerImageProcessor(size={"height": 32, "width": 32}))


def _dpt() -> tuple[Any, Any]:
    config = transformers.DPTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=16, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        backbone_out_indices=[0, 1, 2, 3], head_hidden_size=8)
    return (transformers.DPTForDepthEstimation(config),
            transformers.DPTImageProcessor(size={"height": 32, "width": 32}))


def _clip(path: Path) -> tuple[Any, Any]:
    """A dual encoder, with a character-level CLIP tokenizer written here (no merges)."""
    chars = "abcdefghijklmnopqrstuvwxyz.,"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")
                               ).save_pretrained(path)
    end = vocab["<|endoftext|>"]
    text = {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": end, "pad_token_id": end}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                crop_size={"height": 32, "width": 32})
    return transformers.CLIPModel(config), processor


MODELS = {"zero-shot-image-classification": _clip, "image-classification": _vit,
          "object-detection": _yolos, "image-segmentation": _segformer, "depth-estimation": _dpt}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image-families")
    dirs = {}
    for kind, make in MODELS.items():
        torch.manual_seed(0)
        model, processor = make(root / kind) if make is _clip else make()
        model.save_pretrained(root / kind)
        processor.save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


@pytest.fixture(scope="module")
def workers(model_dirs: dict[str, Path]) -> dict[str, Worker]:
    return {kind: build_worker({"MODEL_PATH": str(path), "WORKER_BATCH_WAIT_MS": "30",
                                "DOWNLOAD_ALLOW_PRIVATE": "true"})
            for kind, path in model_dirs.items()}


@pytest.fixture(scope="module")
def pipelines(model_dirs: dict[str, Path]) -> dict[str, Any]:
    return {kind: transformers.pipeline(kind, model=str(path), device="cpu")
            for kind, path in model_dirs.items()}


def picture(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def data_uri(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()




def file_image(artefact: dict[str, Any]) -> Image.Image:
    assert artefact["content_type"] == "image/png"
    return Image.open(io.BytesIO(base64.b64decode(artefact["data"])))


class TestTheHubShapeAnswersWhatThePipelineAnswers:
    @pytest.mark.parametrize(("kind", "parameters"), [
        ("image-classification", {}),
        ("image-classification", {"top_k": 2}),
        ("object-detection", {"threshold": 0.0}),
        ("zero-shot-image-classification", {"candidate_labels": ["cat", "dog", "owl"]}),
    ])
    def test_same_json(self, loop, workers, pipelines, kind, parameters):
        images = [picture(1), picture(2, (36, 44))]
        expected = pipelines[kind](images, **parameters)
        got = answer(loop, workers[kind], {"inputs": [data_uri(i) for i in images],
                                           "parameters": parameters})
        assert close(got, to_json(expected)), (got, expected)

    def test_segmentation_masks_are_png_files_equal_to_the_pipelines(self, loop, workers,
                                                                     pipelines):
        image = picture(3)
        expected = pipelines["image-segmentation"](image)
        got = answer(loop, workers["image-segmentation"], {"inputs": data_uri(image)})
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert file_image(g["mask"]).tobytes() == e["mask"].tobytes()

    def test_depth_is_a_png_file_with_its_range(self, loop, workers, pipelines):
        image = picture(4)
        expected = pipelines["depth-estimation"](image)
        got = answer(loop, workers["depth-estimation"], {"inputs": data_uri(image)})
        assert file_image(got["depth"]).tobytes() == expected["depth"].tobytes()
        assert math.isclose(got["min"], float(expected["predicted_depth"].min()), rel_tol=1e-5)
        assert math.isclose(got["max"], float(expected["predicted_depth"].max()), rel_tol=1e-5)


class TestOwnFields:
    def test_an_image_by_url_is_downloaded_under_the_rules(self, loop, workers, pipelines,
                                                           http_server):
        out = io.BytesIO()
        picture(5).save(out, format="PNG")
        http_server.files["cat.png"] = out.getvalue()
        got = answer(loop, workers["image-classification"],
                     {"image": http_server.url("/jsonl/cat.png"), "top_k": 3})
        assert close(got["result"], to_json(pipelines["image-classification"](
            picture(5), top_k=3)))


class TestBadImages:
    @pytest.mark.parametrize(("job_input", "field", "says"), [
        ({"image": "file:///etc/passwd"}, "input.image", "https:// or s3:// URL"),
        ({"image": "data:image/png;base64,not-base64!"}, "input.image", "not valid base64"),
        ({"image": "data:image/png;base64," + base64.b64encode(b"plain text").decode()},
         "input.image", "is not a PNG, JPEG or WebP image"),
        ({"inputs": ["data:image/png;base64,"]}, "input.inputs.0", ""),
        ({"image": data_uri(picture(0)), "threshold": 2}, "input.threshold", ""),
    ])
    def test_is_refused_naming_the_field(self, loop, workers, job_input, field, says):
        worker = workers["object-detection"]
        got = answer(loop, worker, job_input)
        assert got["error_code"] == "invalid_input", got
        assert field in got["error"] and says in got["error"], got["error"]
        assert "result" in answer(loop, worker, {"image": data_uri(picture(0))})

    def test_an_image_over_the_pixel_limit_is_refused_before_decoding(self, loop, model_dirs):
        worker = build_worker({"MODEL_PATH": str(model_dirs["image-classification"]),
                               "WORKER_MAX_IMAGE_PIXELS": "1000"})
        got = answer(loop, worker, {"image": data_uri(picture(0, (40, 30)))})
        assert got["error_code"] == "invalid_input"
        assert "over the limit of 1,000" in got["error"] and "input.image" in got["error"]



def test_each_kinds_banner_example_is_a_valid_job(loop, workers, model_dirs):
    """The local endpoint's banner prints ``Task.example_for``: it must answer, not fail."""
    check_banner_examples(loop, workers, model_dirs)

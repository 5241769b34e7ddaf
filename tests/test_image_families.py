"""The image families (classification, detection, segmentation, depth, captioning) served with
no code:
each answers what transformers' pipeline answers for the same model and image, images come by
data URI or URL (under the download rules), masks and depth maps are files, and bad images
name their field.

The models are tiny random ones made from configs (no Hub).
"""

from __future__ import annotations

import asyncio
import base64
import io
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
from tests.support.images import image_uri, picture
from tests.support.tokenizers import clip_tokenizer
from tests.support.worker import build_worker, collect

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
    """A dual encoder, with a character-level CLIP tokenizer (no merges)."""
    vocab = clip_tokenizer(path)
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
        got = answer(loop, workers[kind], {"inputs": [image_uri(i) for i in images],
                                           "parameters": parameters})
        assert close(got, to_json(expected)), (got, expected)

    def test_segmentation_masks_are_png_files_equal_to_the_pipelines(self, loop, workers,
                                                                     pipelines):
        image = picture(3)
        expected = pipelines["image-segmentation"](image)
        got = answer(loop, workers["image-segmentation"], {"inputs": image_uri(image)})
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert file_image(g["mask"]).tobytes() == e["mask"].tobytes()

    def test_depth_is_a_png_file_with_its_range(self, loop, workers, pipelines):
        image = picture(4)
        expected = pipelines["depth-estimation"](image)
        got = answer(loop, workers["depth-estimation"], {"inputs": image_uri(image)})
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
        ({"image": image_uri(picture(0)), "threshold": 2}, "input.threshold", ""),
        # DETR's and YOLOS's processors would make a side of 0 pixels: an internal error.
        ({"inputs": [image_uri(picture(0)), image_uri(picture(1, (2700, 1)))]},
         "input.inputs.1", "2700x1 pixels; its sides may differ by at most 100 times"),
    ])
    def test_is_refused_naming_the_field(self, loop, workers, job_input, field, says):
        worker = workers["object-detection"]
        got = answer(loop, worker, job_input)
        assert got["error_code"] == "invalid_input", got
        assert field in got["error"] and says in got["error"], got["error"]
        assert "result" in answer(loop, worker, {"image": image_uri(picture(0))})

    def test_an_image_over_the_pixel_limit_is_refused_before_decoding(self, loop, model_dirs):
        worker = build_worker({"MODEL_PATH": str(model_dirs["image-classification"]),
                               "WORKER_MAX_IMAGE_PIXELS": "1000"})
        got = answer(loop, worker, {"image": image_uri(picture(0, (40, 30)))})
        assert got["error_code"] == "invalid_input"
        assert "over the limit of 1,000" in got["error"] and "input.image" in got["error"]



def test_each_kinds_banner_example_is_a_valid_job(loop, workers, model_dirs):
    """The local endpoint's banner prints ``Task.example_for``: it must answer, not fail."""
    check_banner_examples(loop, workers, model_dirs)


# Captioners: image (+ a prompt) -> text. transformers 5 has no image-to-text pipeline, so the
# reference is what the 4.x pipeline computed: the image processor, generate, the tokenizer.
WORDS = ["a", "cat", "dog", "on", "the", "sofa", "red", "blue", "photo", "of"]


def _word_tokenizer(path: Path) -> Any:
    path.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(97, 123)]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
             *(f"##{c}" for c in letters), *WORDS]
    # transformers 5's BertTokenizer takes the vocabulary itself (a vocab_file is ignored).
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(
        dict.fromkeys(words))})
    tokenizer.save_pretrained(path)
    return tokenizer


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _words_only(model: Any) -> None:
    """A random model's generation config that writes 11 tokens: special tokens suppressed
    (the caption would often be empty), so an answer says something."""
    model.generation_config.update(max_length=12, suppress_tokens=list(range(5)))


TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2}


def _vit_gpt2(path: Path) -> None:
    """A VisionEncoderDecoder: a tiny ViT encoder and a tiny GPT-2 decoder."""
    tokenizer = _word_tokenizer(path)
    ids = _special_ids(tokenizer)
    decoder = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                                      n_positions=64, add_cross_attention=True, is_decoder=True,
                                      **ids)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(**TINY_VISION), decoder)
    config.decoder_start_token_id = ids["bos_token_id"]
    config.pad_token_id, config.eos_token_id = ids["pad_token_id"], ids["eos_token_id"]
    model = transformers.VisionEncoderDecoderModel(config)
    model.generation_config.update(decoder_start_token_id=ids["bos_token_id"],
                                   pad_token_id=ids["pad_token_id"],
                                   eos_token_id=ids["eos_token_id"])
    _words_only(model)
    model.save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)


def _blip(path: Path) -> None:
    tokenizer = _word_tokenizer(path)
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
            "sep_token_id": tokenizer.sep_token_id, **_special_ids(tokenizer)}
    model = transformers.BlipForConditionalGeneration(transformers.BlipConfig(
        text_config=text, vision_config=TINY_VISION, projection_dim=8))
    _words_only(model)
    model.save_pretrained(path)
    transformers.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)


def _git(path: Path) -> None:
    tokenizer = _word_tokenizer(path)
    model = transformers.GitForCausalLM(transformers.GitConfig(
        vision_config=TINY_VISION, vocab_size=len(tokenizer), hidden_size=16,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=64, **_special_ids(tokenizer)))
    _words_only(model)
    model.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(path)


CAPTIONERS = {"vit-gpt2": _vit_gpt2, "blip": _blip, "git": _git}


@pytest.fixture(scope="module")
def captioner_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    for name, make in CAPTIONERS.items():
        torch.manual_seed(0)
        make(root / name)
    return {name: root / name for name in CAPTIONERS}


@pytest.fixture(scope="module")
def captioners(captioner_dirs: dict[str, Path]) -> dict[str, Worker]:
    return {name: build_worker({"MODEL_PATH": str(path), "WORKER_BATCH_WAIT_MS": "30"})
            for name, path in captioner_dirs.items()}


def caption(path: Path, image: Image.Image, prompt: str | None = None, **generate: Any) -> str:
    """The 4.x image-to-text pipeline's answer, computed directly on the saved model."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    inputs = processor(images=image, return_tensors="pt")
    if prompt is not None and model.config.model_type == "git":
        ids = [tokenizer.cls_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        inputs["input_ids"] = torch.tensor([ids])
    elif prompt is not None:
        inputs.update(tokenizer(prompt, return_tensors="pt", return_token_type_ids=False))
    with torch.inference_mode():
        # As the 4.x pipeline: the model's generation config, the call's arguments over it.
        out = model.generate(inputs.pop(model.main_input_name, None), **inputs,
                             generation_config=model.generation_config, **generate)
    return tokenizer.decode(out[0], skip_special_tokens=True)


class TestImageToText:
    @pytest.mark.parametrize("name", list(CAPTIONERS))
    def test_the_hub_shape_answers_the_4x_pipelines_captions(self, loop, captioners,
                                                             captioner_dirs, name):
        images = [picture(6), picture(7, (36, 44))]
        got = answer(loop, captioners[name], {"inputs": [image_uri(i) for i in images]})
        assert got == [[{"generated_text": caption(captioner_dirs[name], i)}] for i in images]
        assert all(g[0]["generated_text"] for g in got)     # not vacuously equal

    @pytest.mark.parametrize("name", ["blip", "git"])
    def test_own_fields_with_a_prompt_and_generation_parameters(self, loop, captioners,
                                                                captioner_dirs, name):
        got = answer(loop, captioners[name], {"image": image_uri(picture(8)),
                                              "prompt": "a photo of", "max_new_tokens": 4})
        want = caption(captioner_dirs[name], picture(8), "a photo of", max_new_tokens=4)
        assert got == {"result": {"generated_text": want}, "model": name}

    def test_the_kind_is_read_from_the_config(self, captioners):
        assert {w.task.family.kind for w in captioners.values()} == {"image-to-text"}

    def test_concurrent_jobs_share_generate_calls(self, loop, captioners, captioner_dirs):
        worker = captioners["vit-gpt2"]
        before = worker.task.batcher.batches_run

        async def jobs() -> list[Any]:
            return await asyncio.gather(*(collect(worker, {"image": image_uri(picture(i))},
                                                  f"j{i}") for i in range(4)))

        outs = loop.run(jobs())
        assert worker.task.batcher.batches_run - before < 4
        for i, [out] in enumerate(outs):
            assert out["result"] == {"generated_text": caption(captioner_dirs["vit-gpt2"],
                                                               picture(i))}

    @pytest.mark.parametrize(("job_input", "field", "says"), [
        ({"image": "data:image/png;base64," + base64.b64encode(b"not a picture").decode()},
         "input.image", "is not a PNG, JPEG or WebP image"),
        ({"inputs": [image_uri(picture(0)), 42]}, "input.inputs.1", ""),
        ({"image": image_uri(picture(0)), "prompt": "a cat"}, "input.prompt", "takes no prompt"),
        ({"inputs": image_uri(picture(0)), "parameters": {"prompt": "a"}},
         "input.parameters.prompt", "takes no prompt"),
        ({"image": image_uri(picture(0)), "max_new_tokens": 0}, "input.max_new_tokens", ""),
    ])
    def test_bad_input_is_refused_naming_the_field(self, loop, captioners, job_input, field,
                                                   says):
        worker = captioners["vit-gpt2"]
        got = answer(loop, worker, job_input)
        assert got["error_code"] == "invalid_input", got
        assert field in got["error"] and says in got["error"], got["error"]
        assert "result" in answer(loop, worker, {"image": image_uri(picture(0))})

    def test_each_captioners_banner_example_is_a_valid_job(self, loop, captioners,
                                                           captioner_dirs):
        check_banner_examples(loop, captioners, captioner_dirs)

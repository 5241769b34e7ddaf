"""Chat vision-language models (LLaVA, Idefics3, Qwen2-VL style) served with no code as
``image-text-to-text``: the answer is what transformers' own pipeline answers for the same
decoded image and prompt, images come through the worker's media handling, and bad input names
its field.

The model is a tiny random LLaVA made from configs (a CLIP vision tower, a Llama decoder), with
a processor assembled here: a CLIP image processor and a word-level tokenizer that knows the
image token and carries a chat template (no Hub).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import torch
import transformers
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers

from serving.families import to_json
from serving.worker import Worker
from tests.support.families import answer, at_once, check_banner_examples
from tests.support.images import image_uri, picture
from tests.support.worker import build_worker

WORDS = ["a", "cat", "dog", "on", "the", "sofa", "what", "is", "in", "this", "picture", "?",
         "USER", "ASSISTANT", ":"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
PROMPT = "USER: <image> what is in this picture ? ASSISTANT:"


def _llava(path: Path) -> None:
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<image>", *WORDS])}
    words = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                   pre_tokenizers.Punctuation()])
    words.decoder = decoders.WordPiece(prefix="##")          # words joined by spaces
    # transformers 5 builds a tokenizer from a tokenizers object (a vocab_file is ignored).
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32})
    # 16 patches and CLIP's class token, which the "default" strategy drops: 16 image tokens.
    transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=8,
        num_additional_image_tokens=1, vision_feature_select_strategy="default",
        chat_template=TEMPLATE).save_pretrained(path)
    text = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16,
                                           intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default", vision_feature_layer=-1))
    # Special tokens suppressed: a random model's answer would often end at once.
    model.generation_config.update(suppress_tokens=list(range(5)))
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llava")
    _llava(path)
    return path


@pytest.fixture(scope="module")
def worker(llava_dir: Path) -> Worker:
    return build_worker({"MODEL_PATH": str(llava_dir), "WORKER_TASK": "auto",
                         "WORKER_MAX_NEW_TOKENS": "64", "WORKER_DEFAULT_MAX_NEW_TOKENS": "6",
                         "WORKER_MAX_PROMPT_TOKENS": "40", "DOWNLOAD_ALLOW_PRIVATE": "true"})


@pytest.fixture(scope="module")
def pipe(llava_dir: Path) -> Any:
    return transformers.pipeline("image-text-to-text", model=str(llava_dir), device="cpu")




class TestTheAnswerIsThePipelines:
    def test_the_kind_is_read_from_the_configs_architectures(self, worker):
        assert worker.task.family.kind == "image-text-to-text"

    def test_own_fields_answer_the_pipelines_record(self, loop, worker, pipe):
        got = answer(loop, worker, {"image": image_uri(picture(1)), "prompt": PROMPT,
                                    "max_new_tokens": 5})
        [want] = pipe(images=picture(1), text=PROMPT, max_new_tokens=5)
        assert got == {"result": to_json(want), "model": worker.task.loaded.served_name}
        assert want["generated_text"] != PROMPT           # it said something

    def test_the_hub_shape_answers_as_the_pipeline_per_input(self, loop, worker, pipe):
        images = [picture(2), picture(3, (36, 44))]
        parameters = {"max_new_tokens": 4, "return_full_text": False, "repetition_penalty": 1.5}
        got = answer(loop, worker, {"inputs": [{"image": image_uri(i), "prompt": PROMPT}
                                               for i in images], "parameters": parameters})
        want = [pipe(images=i, text=PROMPT, max_new_tokens=4, return_full_text=False,
                     generate_kwargs={"repetition_penalty": 1.5}) for i in images]
        assert got == to_json(want)
        one = answer(loop, worker, {"inputs": {"image": image_uri(images[0]), "prompt": PROMPT},
                                    "parameters": parameters})
        assert one == to_json(want[0])

    def test_without_max_new_tokens_the_workers_default_applies(self, loop, worker, pipe):
        got = answer(loop, worker, {"image": image_uri(picture(4)), "prompt": PROMPT})
        [want] = pipe(images=picture(4), text=PROMPT, max_new_tokens=6)
        assert got["result"] == to_json(want)

    def test_an_image_by_url_is_downloaded_under_the_rules(self, loop, worker, pipe,
                                                           http_server):
        out = io.BytesIO()
        picture(5).save(out, format="PNG")
        http_server.files["photo.png"] = out.getvalue()
        got = answer(loop, worker, {"image": http_server.url("/jsonl/photo.png"),
                                    "prompt": PROMPT, "max_new_tokens": 3})
        [want] = pipe(images=picture(5), text=PROMPT, max_new_tokens=3)
        assert got["result"] == to_json(want)


def _at_once_counting_rows(loop, worker: Worker, jobs: list[dict[str, Any]]
                           ) -> tuple[list[Any], list[int]]:
    """Each job's answer, the jobs sent at once, and the rows of each forward pass meanwhile."""
    rows: list[int] = []
    hook = worker.task.loaded.model.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        return at_once(loop, worker, jobs), rows
    finally:
        hook.remove()


class TestConcurrentJobs:
    @pytest.mark.parametrize("full", [True, False])
    def test_other_prompts_and_image_sizes_share_a_generate(self, loop, worker, pipe, full):
        """Rows padded on the left: each job answers what it answers alone."""
        prompts = [PROMPT, "<image> a cat", PROMPT,
                   "USER: <image> what is in this big picture ? ASSISTANT:"]
        images = [picture(0), picture(9), picture(10, (36, 44)), picture(11, (50, 20))]
        jobs = [{"image": image_uri(i), "prompt": p, "max_new_tokens": 4,
                 "return_full_text": full} for i, p in zip(images, prompts, strict=True)]
        outs, rows = _at_once_counting_rows(loop, worker, jobs)
        assert max(rows) == len(jobs), rows       # one generate for all four
        for job, image, out in zip(jobs, images, outs, strict=True):
            [want] = pipe(images=image, text=job["prompt"], max_new_tokens=4,
                          return_full_text=full)
            assert out["result"] == to_json(want)

    def test_chats_share_a_generate_and_answer_as_alone(self, loop, worker, pipe):
        questions = ["what is in this picture ?", "a cat", "what is in this big picture ?"]
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                 for q in questions]
        images = [picture(20), picture(21, (36, 44)), picture(22, (50, 20))]
        jobs = [{"image": image_uri(i), "messages": c, "max_new_tokens": 4,
                 "return_full_text": False} for i, c in zip(images, chats, strict=True)]
        outs, rows = _at_once_counting_rows(loop, worker, jobs)
        assert max(rows) == len(jobs), rows
        for chat, image, out in zip(chats, images, outs, strict=True):
            [want] = pipe(text=TestMessages().with_image(image, chat), max_new_tokens=4,
                          return_full_text=False)
            want["input_text"][0]["content"][0] = {"type": "image"}
            assert out["result"] == to_json(want)

    def test_images_whose_tokens_follow_their_size_share_a_call_only_by_size(self, worker):
        from tasks.pipeline import _size_matters

        assert not _size_matters(worker.task.processor, "<image>")   # LLaVA: one crop size

        def tiles(images: list[Image.Image], text: list[str], return_tensors: str) -> Any:
            width, height = images[0].size           # as LLaVA-NeXT: tiles along each side
            return {"pixel_values": torch.zeros(1, width // 16, height // 16, 3, 8, 8)}

        assert _size_matters(tiles, "<image>")


CHAT = [{"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": "what is in this picture ?"}]}]


class TestMessages:
    """``messages`` in the pipeline's chat shape: the model's chat template writes the prompt."""

    def with_image(self, image: Image.Image, chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**turn, "content": [{**p, "image": image} if p["type"] == "image" else p
                                     for p in turn["content"]]} for turn in chat]

    @pytest.mark.parametrize("full", [True, False])
    def test_answer_the_pipelines_chat_record_with_the_image_part_as_sent(self, loop, worker,
                                                                          pipe, full):
        got = answer(loop, worker, {"image": image_uri(picture(6)), "messages": CHAT,
                                    "max_new_tokens": 4, "return_full_text": full})
        [want] = pipe(text=self.with_image(picture(6), CHAT), max_new_tokens=4,
                      return_full_text=full)
        assert want["input_text"][0]["content"][0]["image"] is not None
        for turn in [want["input_text"], *([want["generated_text"]] if full else [])]:
            turn[0]["content"][0] = {"type": "image"}
        assert got["result"] == to_json(want)
        reply = want["generated_text"][-1]["content"] if full else want["generated_text"]
        assert reply.strip()

    def test_the_hub_shape_takes_messages_too(self, loop, worker, pipe):
        got = answer(loop, worker, {"inputs": {"image": image_uri(picture(7)), "messages": CHAT},
                                    "parameters": {"max_new_tokens": 3,
                                                   "return_full_text": False}})
        [want] = pipe(text=self.with_image(picture(7), CHAT), max_new_tokens=3,
                      return_full_text=False)
        want["input_text"][0]["content"][0] = {"type": "image"}
        assert got == [to_json(want)]


class TestBadInput:
    @pytest.mark.parametrize(("job_input", "field", "says"), [
        ({"image": "data:image/png;base64," + base64.b64encode(b"not a picture").decode(),
          "prompt": PROMPT}, "input.image", "is not a PNG, JPEG or WebP image"),
        ({"image": "file:///etc/passwd", "prompt": PROMPT}, "input.image", "https:// or s3://"),
        ({"image": image_uri(picture(0))}, "input.prompt", ""),
        ({"inputs": [{"image": image_uri(picture(0))}]}, "input.inputs.0.prompt", ""),
        ({"inputs": [{"image": "data:image/png;base64,", "prompt": PROMPT}]},
         "input.inputs.0.image", ""),
        ({"image": image_uri(picture(0)), "prompt": "what is this ?"}, "input.prompt",
         "image token <image> once"),
        ({"image": image_uri(picture(0)), "prompt": "<image> <image>"}, "input.prompt",
         "image token <image> once"),
        ({"image": image_uri(picture(0)), "prompt": PROMPT, "max_new_tokens": 65},
         "input.max_new_tokens", "WORKER_MAX_NEW_TOKENS"),
        ({"inputs": {"image": image_uri(picture(0)), "prompt": PROMPT},
          "parameters": {"max_new_tokens": 65}}, "input.parameters.max_new_tokens", "at most 64"),
        ({"image": image_uri(picture(0)), "prompt": PROMPT, "seed": 1}, "input.seed", ""),
        ({"inputs": {"image": image_uri(picture(0)), "prompt": PROMPT},
          "parameters": {"stream": True}}, "input.parameters.stream", ""),
        ({"image": image_uri(picture(0)), "prompt": "<image> " + "cat " * 40}, "input.prompt",
         "over WORKER_MAX_PROMPT_TOKENS"),
        ({"image": image_uri(picture(0)), "prompt": PROMPT, "messages": CHAT},
         "input.messages", "not both"),
        ({"image": image_uri(picture(0)), "messages": [{"role": "user", "content": "hi"}]},
         "input.messages", "one {\"type\": \"image\"} part"),
        ({"image": image_uri(picture(0)), "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text"}]}]}, "input.messages.0.content.1.text", ""),
        ({"image": image_uri(picture(0)), "messages": [{"role": "user", "content": 7}]},
         "input.messages.0.content", ""),
        ({"image": image_uri(picture(0)), "messages": [{"role": "robot", "content": "hi"}]},
         "input.messages.0.role", ""),
        # The pipeline would fetch an image part's url itself: only the job's image goes there.
        ({"image": image_uri(picture(0)), "messages": [{"role": "user", "content": [
            {"type": "image", "url": "http://127.0.0.1/cat.png"}]}]},
         "input.messages.0.content.parts.0.url", "unknown field"),
        ({"inputs": {"image": image_uri(picture(0)), "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "cat " * 50}]}]}},
         "input.inputs.messages", "over WORKER_MAX_PROMPT_TOKENS"),
        ({"image": image_uri(picture(0)), "prompt": "<image>" + "x" * 1281}, "input.prompt",
         "1,288 characters"),
    ])
    def test_is_refused_naming_the_field(self, loop, worker, job_input, field, says):
        got = answer(loop, worker, job_input)
        assert got["error_code"] == "invalid_input", got
        assert field in got["error"] and says in got["error"], got["error"]
        assert "result" in answer(loop, worker, {"image": image_uri(picture(0)),
                                                 "prompt": PROMPT, "max_new_tokens": 1})


def test_the_banner_example_is_a_valid_job(loop, worker, llava_dir):
    check_banner_examples(loop, {"llava": worker}, {"llava": llava_dir})

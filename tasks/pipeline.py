"""Models of many kinds served with no code, each through its own kind's pipeline.

Serves every model whose config reads as one of the kinds in ``serving/families.py`` (the
table that says what differs between them): text and zero-shot classification, token
classification (NER), fill-mask, seq2seq text (text2text, summarization, translation),
extractive question answering, image and zero-shot image classification, object detection,
image segmentation, depth estimation, image to text (captioning) and chat vision-language models
(image-text-to-text: an image and a prompt), speech recognition, audio classification and text
to speech. Answers are transformers' pipeline's own, which users
compare against (``serving/text_runners.py`` computes the kinds transformers 5 has no pipeline
for). Two input forms, both validated, unknown fields and parameters refused by name::

    {"inputs": X | [X, ...], "parameters": {...}}     the Hugging Face API's shape; answers the
                                                       pipeline's own JSON
    {"text" | "image" | "image"+"prompt"|"messages" | "question"+"context": ..., <parameters>}
                                                       ours; answers {"result": ..., "model"}

X is a text, an image (an https:// or s3:// URL fetched under the download rules, or a data:
URI; decoded within WORKER_MAX_IMAGE_PIXELS), ``{"image", "prompt" | "messages"}`` or
``{"question", "context"}``. Masks and depth
maps are PNG files (``job.store``: inline or links). The parameters of each kind:
docs/job-contract.md. Inputs of concurrent jobs with equal parameters share one pipeline call
on the device thread (``batcher.py``), except where that would change an answer (``_key``;
text to speech runs one text per call).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
import threading
import wave
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import transformers
from PIL import Image
from pydantic import Field, create_model

from serving.audio import OUTPUT_TYPES, decode_audio, encode_audio
from serving.batcher import Batcher
from serving.config import PROMPT_CHARS_PER_TOKEN, ModelSettings, WorkerSettings
from serving.errors import InputError, JobTimeout
from serving.families import (
    FAMILIES,
    MAX_INPUTS,
    MAX_TEXT_CHARS,
    Family,
    ImageAndPrompt,
    params_key,
    to_json,
)
from serving.inputs import AudioBytes, MediaRef, media_ref, resolve_ref
from serving.media import in_decode_pool
from serving.placement import LoadedModel, ModelFiles, place_model
from serving.text_runners import token_limit
from serving.validation import StrictInput, in_tokenizer_thread, parse_input
from tasks.base import JobContext, Task

log = logging.getLogger("worker.pipeline")

_MODEL_CLASSES = {
    "text-classification": transformers.AutoModelForSequenceClassification,
    "zero-shot-classification": transformers.AutoModelForSequenceClassification,
    "token-classification": transformers.AutoModelForTokenClassification,
    "fill-mask": transformers.AutoModelForMaskedLM,
    "text2text-generation": transformers.AutoModelForSeq2SeqLM,
    "summarization": transformers.AutoModelForSeq2SeqLM,
    "translation": transformers.AutoModelForSeq2SeqLM,
    "question-answering": transformers.AutoModelForQuestionAnswering,
    "image-classification": transformers.AutoModelForImageClassification,
    "zero-shot-image-classification": transformers.AutoModelForZeroShotImageClassification,
    "object-detection": transformers.AutoModelForObjectDetection,
    "image-segmentation": transformers.AutoModelForSemanticSegmentation,
    "depth-estimation": transformers.AutoModelForDepthEstimation,
    "image-to-text": transformers.AutoModelForImageTextToText,
    "image-text-to-text": transformers.AutoModelForImageTextToText,
    "automatic-speech-recognition": transformers.AutoModelForSpeechSeq2Seq,
    "audio-classification": transformers.AutoModelForAudioClassification,
    "text-to-audio": transformers.AutoModelForTextToWaveform,
}
MAX_ASPECT = 100                   # an image's long side over its short side, at most
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


class HubShapeInput(StrictInput):
    """The Hugging Face Inference API's envelope; ``parameters`` is checked per kind."""

    inputs: Any
    parameters: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class PipelineRequest:
    texts: list[Any]                    # one text, or one input's fields, per input
    params: dict[str, Any]              # exactly what the pipeline is called with
    single: bool                        # one input, not a list (the API shape answers it bare)
    hub_shape: bool
    fields: list[str]                   # each text's field, for errors
    stream: bool = False


@dataclass(eq=False)
class PipelineItem:
    """One text while it waits for and goes through a pipeline call."""

    text: Any                           # a string, or an input's fields (question answering)
    params: dict[str, Any]
    key: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    on_done: Callable[[], None] | None = None

    def reset_for_retry(self) -> bool:
        self.result = None
        return True


@dataclass(frozen=True)
class Preprocessors:
    """What ``PipelineTask.load`` leaves in ``LoadedModel.processor``: the kind it serves the
    model as, and the image processor or feature extractor that kind reads its media with."""

    kind: str
    image_processor: Any = None
    feature_extractor: Any = None
    processor: Any = None               # a multimodal processor (image-text-to-text)


class PipelineEngine:
    """Runs a batch of items on the device thread: one pipeline call per parameter set."""

    def __init__(self, pipe: Any, family: Family, batch: bool = True) -> None:
        self.pipe = pipe
        self.family = family
        self.batch = batch and family.batch      # False: one input per call

    def run(self, items: list[PipelineItem]) -> None:
        groups: dict[str, list[PipelineItem]] = {}
        for item in items:
            if not item.cancelled.is_set():
                groups.setdefault(item.key, []).append(item)
        if not self.batch:                    # one input per call
            groups = {str(n): [item] for n, item in enumerate(
                item for group in groups.values() for item in group)}
        for group in groups.values():
            # A pipeline may take its input dict apart: each call gets its own copy.
            texts = [dict(i.text) if isinstance(i.text, dict) else i.text for i in group]
            if self.family.runner is not None:
                outs = self.family.runner(self.pipe, texts, group[0].params, self.family.kind)
            elif self.family.inputs is ImageAndPrompt:    # the pipeline's own arguments
                call = self.family.call(group[0].params)
                # Rows padded on the left (__init__): each ends where the model reads on.
                if texts[0]["messages"]:                   # chats: the pipeline's own batches
                    outs = [out[0] for out in self.pipe(
                        text=[t["messages"] for t in texts], batch_size=len(texts), **call)]
                else:
                    outs = self.pipe(images=[t["image"] for t in texts],
                                     text=[t["prompt"] for t in texts], **call)
            else:
                outs = self.pipe(texts, batch_size=len(texts),
                                 **self.family.call(group[0].params))
            if len(texts) == 1 and self.family.kind == "fill-mask":
                outs = [outs]                  # fill-mask answers a one-text list unwrapped
            for item, out in zip(group, outs, strict=True):
                # Plain results are made JSON here, in proportion to the work just done: a hop
                # to another thread costs more than the conversion. Files (masks, depth maps,
                # audio) are encoded off the device thread, in answer.
                if self.family.inputs is ImageAndPrompt:    # a chat echoes its images
                    out = _image_parts_as_sent(out)
                item.result = out if self.family.files else to_json(out)


class PipelineTask(Task):
    """Jobs for the text families, through transformers' pipeline for the model's kind."""

    name = "pipeline"
    pipeline_tasks = tuple(FAMILIES)

    @classmethod
    def example_for(cls, model: ModelFiles, setting: str = "auto") -> dict[str, Any]:
        kind = _kind(model, setting)
        if kind == "fill-mask":                  # BERT's [MASK], RoBERTa's <mask>, ...
            mask = transformers.AutoTokenizer.from_pretrained(model.path).mask_token
            return {"text": f"Paris is the {mask} of France."}
        if FAMILIES[kind].inputs is ImageAndPrompt:     # LLaVA's <image>, ...
            processor = transformers.AutoProcessor.from_pretrained(model.path)
            return _vlm_example(getattr(processor, "image_token", None))
        return EXAMPLES[kind]

    @classmethod
    def load(cls, model: ModelFiles, settings: ModelSettings) -> LoadedModel:
        kind = _kind(model, settings.task)
        # The exact class the config names (detection found it in transformers' tables).
        named = [getattr(transformers, a, None) for a in model.architectures]
        model_class = next((c for c in named if c is not None), _MODEL_CLASSES[kind])
        loaded = place_model(model, settings, model_class)
        if any(model.has(name) for name in _TOKENIZER_FILES):
            loaded.tokenizer = transformers.AutoTokenizer.from_pretrained(
                model.path, trust_remote_code=False)
        image_processor = feature_extractor = processor = None
        if FAMILIES[kind].inputs is ImageAndPrompt:
            processor = transformers.AutoProcessor.from_pretrained(model.path)
        elif FAMILIES[kind].media == "image":
            image_processor = transformers.AutoImageProcessor.from_pretrained(model.path)
        if FAMILIES[kind].media == "audio":
            feature_extractor = transformers.AutoFeatureExtractor.from_pretrained(model.path)
        loaded.processor = Preprocessors(kind, image_processor, feature_extractor, processor)
        return loaded

    def __init__(self, loaded: LoadedModel, settings: WorkerSettings,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(loaded, settings, env)
        pre: Preprocessors = loaded.processor
        kind, feature_extractor = pre.kind, pre.feature_extractor
        self.family = FAMILIES[kind]
        if self.family.runner is None:
            # transformers' overloads take a literal task name; here it is read from the config.
            # A multimodal processor's image processor is named too: batching pixels needs one.
            image_processor = pre.image_processor or getattr(pre.processor, "image_processor",
                                                             None)
            self.pipe = transformers.pipeline(kind, model=loaded.model,  # type: ignore[call-overload]
                                              tokenizer=loaded.tokenizer,
                                              image_processor=image_processor,
                                              feature_extractor=feature_extractor,
                                              processor=pre.processor, device=loaded.device)
        else:                                 # the runner's model and preprocessors, as a pipe's
            self.pipe = SimpleNamespace(model=loaded.model, tokenizer=loaded.tokenizer,
                                        image_processor=pre.image_processor)
        self.sampling_rate = int(getattr(feature_extractor, "sampling_rate", 16000) or 16000)
        # Audio of different lengths is padded in a batch: where the model neither sees a mask
        # nor pads every input to one fixed size itself (Whisper's 30 s, AST's frames), padding
        # would change an answer with its batch-mates, so only equal lengths share a call.
        self.pads_safely = feature_extractor is None or bool(
            getattr(feature_extractor, "return_attention_mask", False)
            or getattr(feature_extractor, "n_samples", None)
            or getattr(feature_extractor, "max_length", None))
        self.max_tokens = token_limit(loaded.model, loaded.tokenizer)
        fields: dict[str, Any] = {"text": (str, Field(min_length=1, max_length=MAX_TEXT_CHARS))}
        if self.family.media in ("image", "audio"):
            fields = {self.family.media: (str, Field(min_length=1))}
        if self.family.inputs is not None:
            fields = {name: (info.annotation, info) for name, info in
                      self.family.inputs.model_fields.items()}
        self.named = create_model(
            f"{self.family.parameters.__name__.removesuffix('Parameters')}Input",
            __base__=self.family.parameters, **fields)
        # The seam's declarations, for this worker's kind: its input model and an example.
        # Declared per instance (the seam's are class attributes): the kind is the model's.
        self.input = self.named  # type: ignore[misc]
        self.processor = pre.processor
        # The prompt's image token (LLaVA's <image>): where the processor puts the image.
        self.image_token: str | None = getattr(pre.processor, "image_token", None)
        # Prompts of several jobs share a generate padded on the left, where a decoder's rows
        # end together; where an image's token count or pixels follow its size (LLaVA-NeXT's
        # tiles, Qwen2-VL's patches), only images of one size share a call.
        # The same holds for an image processor that keeps an image's aspect (DETR's, YOLOS's):
        # pixels of other shapes do not stack into one batch.
        self.sized_images = False
        if self.family.inputs is ImageAndPrompt:
            # The processor pads prompts; the pipeline's own batches (chats) its tokenizer.
            for tokenizer in (getattr(pre.processor, "tokenizer", None), loaded.tokenizer):
                if tokenizer is not None:
                    tokenizer.padding_side = "left"
            self.sized_images = _size_matters(pre.processor, self.image_token)
        elif pre.image_processor is not None:
            self.sized_images = _size_matters(pre.image_processor, None)
        example = (_vlm_example(self.image_token) if self.family.inputs is ImageAndPrompt
                   else EXAMPLES.get(kind) or
                   {"text": f"Paris is the {loaded.tokenizer.mask_token} of France."})
        self.example = example  # type: ignore[misc]
        batch = loaded.device.type != "cpu" or self.family.batch_on_cpu(loaded.model)
        # Texts of other lengths in one call are padded: a tokenizer with no pad token (GPT-2's)
        # would fail every batch, each job then retried alone.
        tokenizer = loaded.tokenizer
        if (batch and self.family.batch and self.family.pads_text and tokenizer is not None
                and tokenizer.pad_token_id is None):
            batch = False
            log.warning("%s: its tokenizer has no pad token, so each input runs in a call of "
                        "its own (no batching); give the tokenizer one to batch", kind)
        self.batcher = Batcher(PipelineEngine(self.pipe, self.family, batch),
                               settings.max_batch_size, settings.batch_wait_ms)

    def warm_up(self) -> None:
        text: Any
        if self.family.inputs is ImageAndPrompt:
            text = {"image": Image.new("RGB", (64, 48), (120, 60, 30)),
                    "prompt": _vlm_example(self.image_token)["prompt"], "messages": None}
        elif self.family.media == "image":
            text = Image.new("RGB", (64, 48), (120, 60, 30))
        elif self.family.media == "audio":
            text = {"raw": np.zeros(self.sampling_rate, dtype=np.float32),
                    "sampling_rate": self.sampling_rate}
        elif self.family.inputs is not None:
            text = {"question": "who?", "context": "warm up"}
        else:
            text = f"warm {self.loaded.tokenizer.mask_token or ''} up"
        params = self._warm_up_params()
        PipelineEngine(self.pipe, self.family).run([PipelineItem(text, params, "")])

    def _warm_up_params(self) -> dict[str, Any]:
        if self.family.kind in ("zero-shot-classification", "zero-shot-image-classification"):
            return {"candidate_labels": ["a", "b"]}
        if self.family.kind in ("text2text-generation", "summarization", "translation",
                                "image-to-text", "image-text-to-text"):
            # Two tokens, whatever least length the model's generation config asks of an
            # answer (a summariser's min_length of 56): else generate warns at every start.
            return {"max_new_tokens": 2, "min_new_tokens": 0}
        return self._call_params({})

    def parse(self, job_input: dict[str, Any], where: str = "input") -> PipelineRequest:
        if "inputs" in job_input:
            envelope = parse_input(HubShapeInput, job_input, {}, prefix=where)
            params = parse_input(self.family.parameters, envelope.parameters, {},
                                 prefix=f"{where}.parameters")
            raw = envelope.inputs
            single = not isinstance(raw, list)
            values = [raw] if single else list(raw)
            fields = [f"{where}.inputs"] if single else [
                f"{where}.inputs.{i}" for i in range(len(values))]
            if not values or len(values) > MAX_INPUTS:
                raise InputError(f"must hold 1..{MAX_INPUTS} inputs", field=f"{where}.inputs")
            texts = [self._one_input(v, name) for v, name in zip(values, fields, strict=True)]
            request = PipelineRequest(texts, self._call_params(params.model_dump(
                exclude_unset=True)), single, True, fields)
        else:
            named = parse_input(self.named, job_input, {}, prefix=where)
            own = (set(self.family.inputs.model_fields) if self.family.inputs
                   else {self._field})
            rest = named.model_dump(exclude=own)
            one = (getattr(named, self._field) if self.family.inputs is None
                   else named.model_dump(include=own))
            name = f"{where}.{self._field}" if self.family.inputs is None else where
            if self.family.media != "text":
                one = self._one_input(one, name)
            request = PipelineRequest([one], self._call_params(
                {k: v for k, v in rest.items() if v is not None}), True, False, [name])
        refused = self.family.refuse and self.family.refuse(self.loaded.model, request.params)
        if refused:
            parameter, why = refused
            prefix = f"{where}.parameters" if request.hub_shape else where
            raise InputError(why, field=f"{prefix}.{parameter}")
        if self.family.inputs is ImageAndPrompt:
            self._check_prompts(request, where)
        if self.family.mask_token:
            mask = self.loaded.tokenizer.mask_token
            for text, name in zip(request.texts, request.fields, strict=True):
                if mask not in text:
                    raise InputError(f"holds no mask token; put {mask} where the word goes",
                                     field=name)
        return request

    def _check_prompts(self, request: PipelineRequest, where: str) -> None:
        """Each input has a prompt naming its one image once (the processor refuses any other
        count) or messages with one image part, and max_new_tokens is within
        WORKER_MAX_NEW_TOKENS, else WORKER_DEFAULT_MAX_NEW_TOKENS."""
        token = self.image_token
        for one, name in zip(request.texts, request.fields, strict=True):
            if one["messages"] is not None:
                self._check_messages(one, name)
            elif one["prompt"] is None:
                raise InputError("is required: the text the model reads, or messages (a chat)",
                                 field=f"{name}.prompt")
            elif token and one["prompt"].count(token) != 1:
                raise InputError(f"must hold the image token {token} once, where the image "
                                 "goes", field=f"{name}.prompt")
        limit = self.settings.max_new_tokens
        asked = request.params.get("max_new_tokens")
        if asked is None:
            request.params["max_new_tokens"] = self.settings.default_max_new_tokens
        elif asked > limit:
            prefix = f"{where}.parameters" if request.hub_shape else where
            raise InputError(f"must be at most {limit} (WORKER_MAX_NEW_TOKENS)",
                             field=f"{prefix}.max_new_tokens")

    def _check_messages(self, one: dict[str, Any], name: str) -> None:
        field = f"{name}.messages"
        if one["prompt"] is not None:
            raise InputError("send prompt or messages, not both", field=field)
        if getattr(self.processor, "chat_template", None) is None:
            raise InputError("this model's processor has no chat template; send prompt, "
                             "written as the model reads it", field=field)
        if len(one["messages"]) > self.settings.max_messages:
            raise InputError(f"holds more than {self.settings.max_messages} messages "
                             "(WORKER_MAX_MESSAGES)", field=field)
        images = 0
        for i, turn in enumerate(one["messages"]):
            parts = [] if isinstance(turn["content"], str) else turn["content"]
            for j, part in enumerate(parts):
                at = f"{field}.{i}.content.{j}"
                if (part["type"] == "text") != (part["text"] is not None):
                    raise InputError("a text part has text; an image part has none",
                                     field=f"{at}.text")
                images += part["type"] == "image"
        if images != 1:
            raise InputError('must hold one {"type": "image"} part, where the image goes '
                             f"(it holds {images})", field=field)

    def _one_input(self, value: Any, name: str) -> Any:
        """One input of the API shape: a text, or the family's fields."""
        if self.family.inputs is not None:
            if not isinstance(value, dict):
                raise InputError("must be an object with "
                                 f"{', '.join(self.family.inputs.model_fields)}", field=name)
            one = parse_input(self.family.inputs, value, {}, prefix=name).model_dump()
            if self.family.media == "image":
                one["image"] = media_ref("image", one["image"], f"{name}.image")
            return one
        if self.family.media != "text":
            return media_ref(self.family.media, value, name)
        if not isinstance(value, str) or not value or len(value) > MAX_TEXT_CHARS:
            raise InputError(f"must be a text of 1..{MAX_TEXT_CHARS:,} characters", field=name)
        return value

    @property
    def _field(self) -> str:
        return "text" if self.family.media == "text" else self.family.media

    def _call_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """What the pipeline or runner is called with: a runner gets every default too."""
        if self.family.runner is None:
            return given
        defaults = self.family.parameters.model_construct().model_dump()
        return {k: v for k, v in {**defaults, **given}.items() if v is not None}

    async def answer(self, request: PipelineRequest, job: JobContext | None = None) -> Any:
        job = job or self._own_job("job")
        inputs = request.texts
        if self.family.inputs is ImageAndPrompt:
            inputs = [_with_image(one, await self._image(one["image"], f"{name}.image", job))
                      for one, name in zip(request.texts, request.fields, strict=True)]
            await self._check_prompt_tokens(inputs, request.fields)
        elif self.family.media == "image":
            inputs = [await self._image(ref, name, job)
                      for ref, name in zip(request.texts, request.fields, strict=True)]
        elif self.family.media == "audio":
            inputs = [await self._audio(ref, name, job)
                      for ref, name in zip(request.texts, request.fields, strict=True)]
        elif not self.family.pair_truncation:     # else the pairs are fitted to the model
            # The pipeline tokenizes every text again on the device thread: only a text that
            # could be over the limit is counted first (a token covers at least one byte, and
            # a tokenizer adds at most a marker per word and a few special tokens: 2 per byte
            # and 8 bound it), so a short text costs one tokenization, not two.
            long = [(text, name) for text, name in zip(request.texts, request.fields,
                                                       strict=True)
                    if 2 * len(text.encode()) + 8 > self.max_tokens]
            counts = (await in_tokenizer_thread(self._token_counts, [t for t, _ in long])
                      if long else [])
            for count, (_, name) in zip(counts, long, strict=True):
                if count > self.max_tokens:
                    raise InputError(f"is {count:,} tokens, over the model's {self.max_tokens:,};"
                                     " send a shorter text", field=name)
        key = params_key(request.params)
        items = [PipelineItem(one, request.params, self._key(key, one)) for one in inputs]
        try:
            await asyncio.wait_for(asyncio.gather(*(self.batcher.submit(i) for i in items)),
                                   max(0.0, job.remaining_s()))
        except TimeoutError:
            raise JobTimeout(f"the job ran past {job.timeout_s:g}s (WORKER_JOB_TIMEOUT_S); "
                             "send fewer inputs") from None

        def store(image: Image.Image, name: str) -> Any:
            out = io.BytesIO()
            image.save(out, format="PNG")
            return job.store(out.getvalue(), "image/png", f"{name}.png")

        raw = [i.result for i in items]
        if self.family.kind == "text-to-audio":
            fmt = request.params.get("output_format", "wav")
            raw = await in_decode_pool(self._audio_files, raw, fmt, job, deadline=job.deadline,
                                       cancelled=job.cancelled)
        # Encoding files (masks, depth maps) is image work: the decode pool, as decoding.
        results = (await in_decode_pool(to_json, raw, store, "result", deadline=job.deadline,
                                        cancelled=job.cancelled)
                   if self.family.files else raw)
        if request.hub_shape:
            return self.family.wrap(request.single, results, request.params)
        return {"result": results[0], "model": self.loaded.served_name}

    async def _image(self, ref: MediaRef, name: str, job: JobContext) -> Image.Image:
        """The image ``ref`` points at, fetched and decoded as every ``Image`` field is
        (``serving/inputs.py``: its structure and size checked before any pixel). Its sides
        may differ by at most MAX_ASPECT times: image processors that fit the short side to one
        length and cap the long one (DETR's, YOLOS's) make a side of 0 pixels past that."""
        image: Image.Image = await resolve_ref(ref, job, name, self.settings.max_image_pixels)
        width, height = image.size
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise InputError(f"is {width}x{height} pixels; its sides may differ by at most "
                             f"{MAX_ASPECT} times: crop or pad it", field=name)
        return image

    def _key(self, key: str, one: Any) -> str:
        if self.family.inputs is ImageAndPrompt:
            # Prompts share a call, and chats another, padded on the left (__init__).
            key = f"{key}|{'chat' if one['messages'] is not None else 'prompt'}"
            return f"{key}|{one['image'].size}" if self.sized_images else key
        if isinstance(one, Image.Image):
            return f"{key}|{one.size}" if self.sized_images else key
        if self.pads_safely or not isinstance(one, dict):
            return key
        return f"{key}|{len(one['raw'])}"        # only equal lengths batch together

    async def _audio(self, ref: MediaRef, name: str, job: JobContext) -> dict[str, Any]:
        """The audio ``ref`` points at, fetched as every ``Audio`` field is, as mono samples
        at the model's rate, within WORKER_MAX_AUDIO_SECONDS."""
        sent: AudioBytes = await resolve_ref(ref, job, name, self.settings.max_image_pixels)
        decode = functools.partial(decode_audio, sent.data, sampling_rate=self.sampling_rate,
                                   max_seconds=self.settings.max_audio_seconds, field=name)
        samples = await in_decode_pool(decode, deadline=job.deadline, cancelled=job.cancelled)
        return {"raw": samples, "sampling_rate": self.sampling_rate}

    @staticmethod
    def _audio_files(results: list[Any], fmt: str, job: JobContext) -> list[Any]:
        """Each generated waveform as an audio file (job.store), with its sampling rate."""
        files = []
        for n, result in enumerate(results):
            rate = int(result["sampling_rate"])
            data = encode_audio(np.asarray(result["audio"]), rate, fmt)
            files.append({"audio": job.store(data, OUTPUT_TYPES[fmt], f"audio-{n}.{fmt}"),
                          "sampling_rate": rate})
        return files

    async def _check_prompt_tokens(self, inputs: list[dict[str, Any]], fields: list[str]
                                   ) -> None:
        """A prompt is at most WORKER_MAX_PROMPT_TOKENS tokens (the image's not counted); one
        of more than PROMPT_CHARS_PER_TOKEN characters a token is refused before tokenizing."""
        limit = self.settings.max_prompt_tokens
        texts = [(one["prompt"], f"{name}.prompt") if one["messages"] is None else
                 (_chat_text(one["messages"]), f"{name}.messages")
                 for one, name in zip(inputs, fields, strict=True)]
        for text, name in texts:
            if len(text) > limit * PROMPT_CHARS_PER_TOKEN:
                raise InputError(f"is {len(text):,} characters, over what "
                                 f"WORKER_MAX_PROMPT_TOKENS ({limit:,}) allows; send a shorter "
                                 "prompt", field=name)
        long = [(text, name) for text, name in texts
                if 2 * len(text.encode()) + 8 > limit]      # as answer's bound
        counts = (await in_tokenizer_thread(self._token_counts, [t for t, _ in long])
                  if long else [])
        for count, (_, name) in zip(counts, long, strict=True):
            if count > limit:
                raise InputError(f"is {count:,} tokens, over WORKER_MAX_PROMPT_TOKENS "
                                 f"({limit:,}); send a shorter prompt", field=name)

    def _token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.loaded.tokenizer(texts)["input_ids"]]





def _size_matters(processor: Any, image_token: str | None) -> bool:
    """Whether ``processor`` makes an image's tokens or pixels of a shape that follows the
    image's size: two images of other shapes are processed and compared. A
    multimodal processor is given a prompt with its ``image_token``; an image processor, None."""
    shapes = []
    for size in ((64, 48), (48, 64)):          # a landscape and a portrait image
        text = {} if image_token is None else {"text": [f"{image_token} x"]}
        try:
            out = processor(images=[Image.new("RGB", size)], return_tensors="pt", **text)
        except Exception:  # noqa: BLE001 - the jobs will say what is wrong; batch by size
            return True
        shapes.append({k: tuple(v.shape) for k, v in out.items() if hasattr(v, "shape")})
    return shapes[0] != shapes[1]


def _chat_text(messages: list[dict[str, Any]]) -> str:
    """A chat's texts, for its token count (its template's few tokens aside)."""
    return "\n".join(turn["content"] if isinstance(turn["content"], str) else
                     "\n".join(p["text"] for p in turn["content"] if p["type"] == "text")
                     for turn in messages)


def _with_image(one: dict[str, Any], image: Image.Image) -> dict[str, Any]:
    """The pipeline's input: the decoded image beside the prompt, or in the chat's image part."""
    if one["messages"] is None:
        return {**one, "image": image}
    messages = [{"role": turn["role"], "content": turn["content"] if isinstance(
        turn["content"], str) else [{"type": "image", "image": image} if p["type"] == "image"
                                    else {"type": "text", "text": p["text"]}
                                    for p in turn["content"]]} for turn in one["messages"]]
    return {**one, "image": image, "messages": messages}


def _image_parts_as_sent(value: Any) -> Any:
    """A chat answer echoes its messages: each image part back as sent, {"type": "image"}."""
    if isinstance(value, dict):
        if value.get("type") == "image":
            return {"type": "image"}
        return {k: _image_parts_as_sent(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_image_parts_as_sent(v) for v in value]
    return value


def _vlm_example(image_token: str | None) -> dict[str, Any]:
    return {"image": _PIXEL, "prompt": f"{image_token or ''}\nWhat is in this picture?"}


def _kind(model: ModelFiles, setting: str) -> str:
    """The kind this worker serves the model as: WORKER_TASK's, else the model's first."""
    return setting if setting in FAMILIES else next(k for k in model.kinds if k in FAMILIES)


_PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8"
          "UaHBgA0wMeAAg1MCAB4nAXgllso1AAAAAElFTkSuQmCC")


def _silence() -> str:
    """A 20 ms silent WAV as a data URI: a runnable example that fits on a line or two."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 160)
    return "data:audio/wav;base64," + base64.b64encode(out.getvalue()).decode()


EXAMPLES: dict[str, dict[str, Any]] = {
    "text-classification": {"text": "I loved it"},
    "zero-shot-classification": {"text": "The match ended late",
                                 "candidate_labels": ["sport", "politics"]},
    "token-classification": {"text": "Ada Lovelace lived in London"},
    "text2text-generation": {"text": "translate English to German: Hello"},
    "summarization": {"text": "A long article to summarise."},
    "translation": {"text": "Hello, world"},
    "question-answering": {"question": "Where is the tower?",
                           "context": "The tower is in Paris."},
    "image-classification": {"image": _PIXEL},
    "zero-shot-image-classification": {"image": _PIXEL, "candidate_labels": ["cat", "dog"]},
    "object-detection": {"image": _PIXEL},
    "image-segmentation": {"image": _PIXEL},
    "depth-estimation": {"image": _PIXEL},
    "image-to-text": {"image": _PIXEL},
    "automatic-speech-recognition": {"audio": _silence()},
    "audio-classification": {"audio": _silence()},
    "text-to-audio": {"text": "Hello there"},
}

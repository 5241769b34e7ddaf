"""The embedding task: texts in, one vector per text out, batched across concurrent jobs.

Owns the job contract for embedding models (encoders such as all-MiniLM-L6-v2): the input fields
and their limits, the pooling the model was trained with, and the answer's shape. Texts from
concurrent jobs share forward passes through ``batcher.py`` on its single device thread; this
module's ``EmbedEngine`` is what runs on that thread.

Input (``job["input"]``)::

    texts | text     exactly one: a list of 1..WORKER_MAX_TEXTS strings, or one string
    normalize        true (default): unit-length vectors, so a dot product is the cosine
    dimensions       1..the model's dimension: keep the first N components (re-normalized when
                     normalize is on); more than the model has is refused
    truncate         false (default): a text over the token limit is refused, naming the text and
                     the limit; true: such texts are cut to the limit, as sentence-transformers does

The token limit of one text is the smaller of the model's own (``max_seq_length`` of
``sentence_bert_config.json``, else ``max_position_embeddings``) and WORKER_MAX_PROMPT_TOKENS.
A text's characters are bounded before it is tokenized (PROMPT_CHARS_PER_TOKEN per token of
that limit): refused, or with ``truncate`` cut to the bound first. Tokenizing runs in the
tokenizer thread (``validation.in_tokenizer_thread``), never on the event loop.

Answer: ``{"embeddings": [[float, ...], ...], "dim", "usage": {"prompt_tokens"}, "model"}``,
one vector per text in input order; ``prompt_tokens`` counts every token, special ones included.

Pooling follows ``1_Pooling/config.json`` when the model has one (mean, CLS or max over the
tokens the attention mask keeps), else mean pooling, the sentence-transformers default.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
import transformers
from pydantic import Field, ValidationInfo, field_validator, model_validator
from transformers import AutoTokenizer

from serving.batcher import Batcher
from serving.config import PROMPT_CHARS_PER_TOKEN, ModelSettings, WorkerSettings
from serving.errors import InputError, JobTimeout, ModelNotFound
from serving.placement import LoadedModel, ModelFiles, place_model
from serving.validation import StrictInput, in_tokenizer_thread, parse_input
from tasks.base import JobContext, Task

POOLING_MODES = ("mean", "cls", "max")
TOKENIZE_SLICE_CHARS = 256 * 1024   # characters tokenized in one call to the tokenizer thread


class EmbedInput(StrictInput):
    """The fields of an embedding job. The count limit comes from the context's settings."""

    texts: list[str] | None = None
    text: str | None = None
    normalize: bool = True
    dimensions: int | None = Field(None, ge=1)
    truncate: bool = False

    @field_validator("texts")
    @classmethod
    def _texts_within_limit(cls, value: list[str] | None,
                            info: ValidationInfo) -> list[str] | None:
        limit = info.context["limits"].max_texts
        if value is not None and not value:
            raise ValueError("is empty; send at least one text")
        if value is not None and len(value) > limit:
            raise ValueError(f"has {len(value)} texts, over the limit of {limit} "
                             "(WORKER_MAX_TEXTS)")
        return value

    @model_validator(mode="after")
    def _one_of_texts_or_text(self) -> EmbedInput:
        if (self.texts is None) == (self.text is None):
            raise ValueError("send exactly one of 'texts' (a list of strings) or 'text'")
        return self


class EmbedUsage(TypedDict):
    prompt_tokens: int


class EmbedAnswer(TypedDict):
    embeddings: list[list[float]]
    dim: int
    usage: EmbedUsage
    model: str


@dataclass(frozen=True)
class EmbedRequest:
    """A checked job, not yet tokenized: ``EmbedTask.tokens`` tokenizes it off the loop."""

    texts: list[str]               # already cut to the character bound when truncating
    normalize: bool
    dimensions: int | None
    truncate: bool
    field: str                     # "input.texts" (errors add [i]) or "input.text"
    stream: bool = False           # embeddings are answered whole


@dataclass(eq=False)
class EmbedItem:
    """One text while it waits for and goes through a forward pass."""

    ids: list[int]
    cancelled: threading.Event = field(default_factory=threading.Event)
    vector: torch.Tensor | None = None       # pooled, float32, on the CPU; not normalized
    on_done: Callable[[], None] | None = None   # set by the batcher

    def reset_for_retry(self) -> bool:
        self.vector = None
        return True


def read_pooling(model_dir: Path) -> str:
    """The pooling mode of a sentence-transformers model directory; mean when it has none.

    A ``modules.json`` that names a Pooling module whose config is missing (a copy that kept
    only top-level files) is refused: guessing mean for a CLS-pooled model gives wrong vectors.
    """
    path = model_dir / "1_Pooling" / "config.json"
    modules = model_dir / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if str(module.get("type", "")).endswith("Pooling"):
                path = model_dir / module.get("path", "1_Pooling") / "config.json"
                if not path.is_file():
                    raise ModelNotFound(
                        f"{model_dir} names a pooling module in modules.json but has no "
                        f"{path.relative_to(model_dir)}; copy the whole sentence-transformers "
                        "directory, subfolders included, or point MODEL_PATH at it")
    if not path.is_file():
        return "mean"
    config = json.loads(path.read_text())
    modes = [m for m in POOLING_MODES if config.get(f"pooling_mode_{m}_tokens")
             or config.get(f"pooling_mode_{m}_token")]
    if len(modes) != 1:
        raise ModelNotFound(f"{path} asks for pooling this worker does not implement; "
                            f"supported: exactly one of {', '.join(POOLING_MODES)}")
    return modes[0]


def model_token_limit(loaded: LoadedModel) -> int:
    """Longest input the model was trained for, in tokens."""
    st_config = loaded.source.path / "sentence_bert_config.json"
    if st_config.is_file():
        limit = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(limit, int) and limit > 0:
            return limit
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        return limit
    return loaded.tokenizer.model_max_length


class EmbedEngine:
    """Pools a batch of texts in one forward pass (right-padded, attention-masked)."""

    def __init__(self, loaded: LoadedModel, pooling: str) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.pad_id = loaded.tokenizer.pad_token_id or 0
        self.pooling = pooling

    def run(self, items: list[EmbedItem]) -> None:
        active = [i for i in items if not i.cancelled.is_set()]
        if not active:
            return
        width = max(len(i.ids) for i in active)
        ids = torch.full((len(active), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for row, item in enumerate(active):
            ids[row, :len(item.ids)] = torch.tensor(item.ids, dtype=torch.long)
            mask[row, :len(item.ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            # .to(): with the layers spread over several GPUs the output is on the last one.
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden = hidden.float().to(self.device)
            keep = mask.unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(keep == 0, float("-inf")).amax(dim=1)
            else:
                pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)
            pooled = pooled.cpu()
        for row, item in enumerate(active):
            item.vector = pooled[row]


class EmbedTask(Task):
    """Embedding jobs on an encoder model, batched across concurrent jobs."""

    name = "embed"
    # bare text encoders and sentence-transformers folders
    pipeline_tasks = ("feature-extraction",)
    input = EmbedInput
    example = {"texts": ["Hello", "world"]}
    openai_routes = ("/v1/embeddings",)

    @classmethod
    def load(cls, model: ModelFiles, settings: ModelSettings) -> LoadedModel:
        read_pooling(model.path)             # a broken pooling config stops the worker here
        loaded = place_model(model, settings, transformers.AutoModel)
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"      # encoders: absolute positions start at 0
        loaded.tokenizer = tokenizer
        return loaded

    def warm_up(self) -> None:
        """One forward pass: the first job pays no kernel or allocator start-up."""
        inputs = self.tokenizer("Hello", return_tensors="pt").to(self.loaded.device)
        with torch.inference_mode():
            self.loaded.model(**inputs)

    def __init__(self, loaded: LoadedModel, settings: WorkerSettings,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(loaded, settings, env)
        self.tokenizer = loaded.tokenizer
        self.pooling = read_pooling(loaded.source.path)
        self.dim = int(loaded.model.config.hidden_size)
        self.max_tokens = min(model_token_limit(loaded), settings.max_prompt_tokens)
        self.max_chars = self.max_tokens * PROMPT_CHARS_PER_TOKEN
        self.batcher = Batcher(EmbedEngine(loaded, self.pooling), settings.embed_batch_size,
                               settings.batch_wait_ms)

    def parse(self, job_input: dict[str, Any], where: str = "input") -> EmbedRequest:
        """Validate and bound the texts' lengths; raises InputError naming the field (and the
        text's index). Cheap enough for the event loop: tokenizing waits for ``tokens``."""
        data = parse_input(EmbedInput, job_input, {"limits": self.settings}, prefix=where)
        return self.request(data.texts if data.texts is not None else [data.text or ""],
                            normalize=data.normalize, dimensions=data.dimensions,
                            truncate=data.truncate,
                            field=f"{where}.texts" if data.texts is not None else f"{where}.text",
                            dimensions_field=f"{where}.dimensions")

    def request(self, texts: list[str], *, normalize: bool, dimensions: int | None,
                truncate: bool, field: str, dimensions_field: str) -> EmbedRequest:
        """The request for ``texts``; errors name ``field`` (``field[i]`` for one text).

        A text longer than PROMPT_CHARS_PER_TOKEN characters per token of the limit is refused
        before it is tokenized, or with ``truncate`` cut to that many characters first. The cut
        changes the tokens kept only if the kept part averages more than that many characters
        per token (long runs of spaces, which tokenizers drop): not real text.
        """
        if dimensions is not None and dimensions > self.dim:
            raise InputError(f"{dimensions} is more than the model's {self.dim} dimensions",
                             field=dimensions_field)
        limit = self.max_chars
        if truncate:
            texts = [t[:limit] for t in texts]
        else:
            for index, text in enumerate(texts):
                if len(text) > limit:
                    raise InputError(
                        f"is {len(text):,} characters, over the limit of {limit:,} "
                        f"({PROMPT_CHARS_PER_TOKEN} per token of the {self.max_tokens}-token "
                        "limit); shorten it or send \"truncate\": true",
                        field=self._text_field(field, index))
        return EmbedRequest(texts, normalize, dimensions, truncate, field)

    @staticmethod
    def _text_field(field: str, index: int) -> str:
        return f"{field}[{index}]" if field.endswith("s") else field

    async def tokens(self, request: EmbedRequest) -> list[list[int]]:
        """Each text's token ids, tokenized in the tokenizer thread a slice at a time (so one
        large job never holds the thread for long), checked against the token limit."""
        ids: list[list[int]] = []
        start = 0
        while start < len(request.texts):
            end, chars = start, 0
            while end < len(request.texts) and (end == start or chars < TOKENIZE_SLICE_CHARS):
                chars += len(request.texts[end])
                end += 1
            ids += await in_tokenizer_thread(self._tokenize, request.texts[start:end],
                                             request.truncate)
            start = end
        for index, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise InputError(f"is {len(row)} tokens, over the limit of {self.max_tokens} "
                                 "(the model's max_seq_length, or WORKER_MAX_PROMPT_TOKENS); "
                                 "shorten it or send \"truncate\": true",
                                 field=self._text_field(request.field, index))
        return ids

    def _tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Token ids of ``texts`` (runs in the tokenizer thread)."""
        ids = self.tokenizer(texts, truncation=truncate,
                             max_length=self.max_tokens if truncate else None)["input_ids"]
        return [list(row) for row in ids]

    async def vectors(self, request: EmbedRequest, token_ids: list[list[int]]) -> torch.Tensor:
        """One row per text, pooled, cut to ``dimensions`` and normalized as asked."""
        items = [EmbedItem(ids) for ids in token_ids]
        try:
            # Cancelling the submissions skips texts not yet on the device; a forward pass
            # already running ends on its own (it cannot be cut short).
            await asyncio.wait_for(asyncio.gather(*(self.batcher.submit(i) for i in items)),
                                   self.settings.job_timeout_s)
        except TimeoutError:
            raise JobTimeout(f"the job ran past {self.settings.job_timeout_s:g}s "
                             "(WORKER_JOB_TIMEOUT_S); send fewer texts per job") from None
        matrix = torch.stack([i.vector for i in items if i.vector is not None])
        if request.dimensions is not None:
            matrix = matrix[:, :request.dimensions]
        if request.normalize:
            matrix = torch.nn.functional.normalize(matrix, p=2, dim=1)
        return matrix

    async def answer(self, request: EmbedRequest,  # type: ignore[override]
                     job: JobContext | None = None) -> EmbedAnswer:
        token_ids = await self.tokens(request)
        matrix = await self.vectors(request, token_ids)
        return {
            "embeddings": matrix.tolist(),
            "dim": int(matrix.shape[1]),
            "usage": {"prompt_tokens": sum(len(r) for r in token_ids)},
            "model": self.loaded.served_name,
        }

    async def stream(self, request: EmbedRequest,  # type: ignore[override]
                     job: JobContext | None = None) -> AsyncIterator[dict[str, Any]]:
        """Embeddings are not streamed: the whole answer, once."""
        yield dict(await self.answer(request, job))

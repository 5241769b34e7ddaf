"""The embedding task: texts in, one vector per text out, batched across concurrent jobs.

Owns the job contract for embedding models (encoders such as all-MiniLM-L6-v2): the input fields
and their limits, the pooling the model was trained with, and the answer's shape. It is a task
on the seam (``tasks/base.py``): ``predict`` hands each text to the worker's batches
(``Task.batched``), so texts from concurrent jobs share forward passes, at most
WORKER_EMBED_BATCH_SIZE at a time; ``predict_batch`` is one forward pass on the device thread.
The worker owns the rest: cancel, the time limit, the out-of-memory split, device faults.

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

import json
from pathlib import Path
from typing import TypedDict

import torch
import transformers
from pydantic import Field, ValidationInfo, field_validator, model_validator
from transformers import AutoTokenizer

from serving.config import PROMPT_CHARS_PER_TOKEN, ModelSettings
from serving.errors import InputError, ModelNotFound
from serving.placement import LoadedModel, ModelFiles, place_model
from serving.validation import StrictInput, in_tokenizer_thread, limits_of
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
        limit = limits_of(info).max_texts
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


class EmbedTask(Task):
    """Embedding jobs on an encoder model, each text batched across concurrent jobs."""

    name = "embed"
    # bare text encoders and sentence-transformers folders
    pipeline_tasks = ("feature-extraction",)
    input = EmbedInput
    example = {"texts": ["Hello", "world"]}
    openai_routes = ("/v1/embeddings",)
    max_batch_size = 4096                   # texts; as many as WORKER_EMBED_BATCH_SIZE allows

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

    def batch_size(self) -> int:
        """Texts per forward pass: WORKER_EMBED_BATCH_SIZE (WORKER_MAX_BATCH_SIZE counts
        sequences and images, each far more work than a text)."""
        return min(self.max_batch_size, self.settings.embed_batch_size)

    def setup(self) -> None:
        self.tokenizer = self.loaded.tokenizer
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.pooling = read_pooling(self.loaded.source.path)
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = min(model_token_limit(self.loaded), self.settings.max_prompt_tokens)
        self.max_chars = self.max_tokens * PROMPT_CHARS_PER_TOKEN

    def warm_up(self) -> None:
        """One forward pass: the first job pays no kernel or allocator start-up."""
        with torch.inference_mode():
            self.predict_batch([list(self.tokenizer("Hello")["input_ids"])])

    def check(self, input: EmbedInput, where: str) -> None:
        """Before tokenizing: ``dimensions`` within the model's, and each text within
        PROMPT_CHARS_PER_TOKEN characters per token of the limit, unless it is to be truncated
        (``predict`` then cuts it to that many characters first). The cut changes the tokens
        kept only if the kept part averages more than that many characters per token (long
        runs of spaces, which tokenizers drop): not real text."""
        if input.dimensions is not None and input.dimensions > self.dim:
            raise InputError(f"{input.dimensions} is more than the model's {self.dim} "
                             "dimensions", field=f"{where}.dimensions")
        if input.truncate:
            return
        limit = self.max_chars
        for index, text in enumerate(_texts(input)):
            if len(text) > limit:
                raise InputError(
                    f"is {len(text):,} characters, over the limit of {limit:,} "
                    f"({PROMPT_CHARS_PER_TOKEN} per token of the {self.max_tokens}-token "
                    "limit); shorten it or send \"truncate\": true",
                    field=_text_field(input, where, index))

    async def predict(self, input: EmbedInput, job: JobContext) -> EmbedAnswer:
        """Tokenize (off the loop), embed each text as one item of the worker's batches, shared
        with other jobs' texts, then cut to ``dimensions`` and normalize as asked."""
        texts = _texts(input)
        if input.truncate:
            texts = [t[:self.max_chars] for t in texts]
        token_ids = await self.tokens(texts, input)
        # A forward pass already running ends on its own (it cannot be cut short); texts not
        # yet on the device are skipped once the job fails, ends or is cancelled.
        matrix = torch.stack(await self.batched(token_ids, job))
        if input.dimensions is not None:
            matrix = matrix[:, :input.dimensions]
        if input.normalize:
            matrix = torch.nn.functional.normalize(matrix, p=2, dim=1)
        return {
            "embeddings": matrix.tolist(),
            "dim": int(matrix.shape[1]),
            "usage": {"prompt_tokens": sum(len(r) for r in token_ids)},
            "model": self.loaded.served_name,
        }

    async def tokens(self, texts: list[str], input: EmbedInput) -> list[list[int]]:
        """Each text's token ids, tokenized in the tokenizer thread a slice at a time (so one
        large job never holds the thread for long), checked against the token limit."""
        ids: list[list[int]] = []
        start = 0
        while start < len(texts):
            end, chars = start, 0
            while end < len(texts) and (end == start or chars < TOKENIZE_SLICE_CHARS):
                chars += len(texts[end])
                end += 1
            ids += await in_tokenizer_thread(self._tokenize, texts[start:end], input.truncate)
            start = end
        for index, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise InputError(f"is {len(row)} tokens, over the limit of {self.max_tokens} "
                                 "(the model's max_seq_length, or WORKER_MAX_PROMPT_TOKENS); "
                                 "shorten it or send \"truncate\": true",
                                 field=_text_field(input, "input", index))
        return ids

    def _tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Token ids of ``texts`` (runs in the tokenizer thread)."""
        ids = self.tokenizer(texts, truncation=truncate,
                             max_length=self.max_tokens if truncate else None)["input_ids"]
        return [list(row) for row in ids]

    def predict_batch(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Each text's vector, pooled, float32 on the CPU, not normalized: one forward pass,
        right-padded and attention-masked (device thread)."""
        width = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, text_ids in enumerate(inputs):
            ids[row, :len(text_ids)] = torch.tensor(text_ids, dtype=torch.long)
            mask[row, :len(text_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
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
        return list(pooled.cpu().unbind(0))


def _texts(input: EmbedInput) -> list[str]:
    return input.texts if input.texts is not None else [input.text or ""]


def _text_field(input: EmbedInput, where: str, index: int) -> str:
    """The field of text ``index``: ``input.texts[3]``, or ``input.text`` for one text."""
    return f"{where}.texts[{index}]" if input.texts is not None else f"{where}.text"

"""The decode loop: many sequences, one forward pass per token, each with its own parameters.

Owns turning prompts into tokens step by step on the device. A batch is left-padded with an
attention mask; every sequence keeps its own sampling parameters, seed, stop strings, token limit,
stream callback and cancel flag. A sequence that finishes leaves the batch at once (its rows are
dropped from the KV cache), so the rest run on a smaller batch. Never imports runpod or boto3;
knows nothing about jobs. ``batcher.py`` feeds it from many jobs at once.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from model_loader import LoadedModel

FinishReason = str  # "stop" | "length" | "cancelled" | "timeout"


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. temperature 0 is greedy (deterministic)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                    # 0: no top-k cut
    repetition_penalty: float = 1.0   # 1.0: off; HF semantics (divide positive logits)
    seed: int | None = None           # None: a fresh random seed
    stop: tuple[str, ...] = ()


@dataclass(eq=False)
class Sequence:
    """One request's state while it decodes. Callbacks run on the engine's thread."""

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None     # streamed text deltas
    deadline: float | None = None                    # time.monotonic() after which it stops
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""                                   # final text (stop strings cut)
    emitted: int = 0                                 # characters already streamed
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def reset_for_retry(self) -> bool:
        """Start over after out of memory; impossible once text was streamed to the client."""
        if self.emitted > 0:
            return False
        self.generated.clear()
        self.text, self.finish_reason = "", None
        return True


class Engine:
    """Runs batches of sequences on a loaded model. One batch at a time (see batcher.py)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        eos = loaded.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = self.tokenizer.pad_token_id
        # transformers renamed past_key_values to cache (5.x); logits_to_keep=1 skips the
        # vocabulary projection of every prompt position but the last.
        accepted = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in accepted else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

    # ------------------------------------------------------------------------------------------
    def run(self, sequences: list[Sequence]) -> None:
        """Decode every sequence to its end. Results are written into the sequences."""
        active = [s for s in sequences if not self._check_before_start(s)]
        if not active:
            return
        for s in active:
            if s.params.temperature > 0:
                seed = s.params.seed if s.params.seed is not None else int.from_bytes(
                    os.urandom(8), "little") >> 1
                s.generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.inference_mode():
            self._decode(active)

    def _check_before_start(self, s: Sequence) -> bool:
        if s.cancelled.is_set():
            s.finish_reason = "cancelled"
        elif s.deadline is not None and time.monotonic() > s.deadline:
            s.finish_reason = "timeout"
        return s.done

    def _decode(self, active: list[Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in active)
        ids = torch.full((len(active), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for row, s in enumerate(active):
            n = len(s.prompt_ids)
            ids[row, width - n:] = torch.tensor(s.prompt_ids, dtype=torch.long)
            mask[row, width - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        history = ids  # prompt + generated ids, for the repetition penalty

        while active:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **{self._cache_kw: cache}, **self._extra)
            logits = out.logits[:, -1, :].float()
            next_ids = self._pick(logits, active, history)
            tokens = next_ids.tolist()

            keep: list[int] = []
            for row, (s, token) in enumerate(zip(active, tokens, strict=True)):
                self._advance(s, token)
                if not s.done:
                    keep.append(row)
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                next_ids, mask, positions, history = (
                    next_ids[index], mask[index], positions[index], history[index])
                active = [active[row] for row in keep]
            ids = next_ids.unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            history = torch.cat([history, ids], dim=-1)

    # ------------------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, active: list[Sequence],
              history: torch.Tensor) -> torch.Tensor:
        """Next token per row: greedy rows in one argmax, sampled rows each with their seed."""
        penalties = [s.params.repetition_penalty for s in active]
        if any(p != 1.0 for p in penalties):
            for row, p in enumerate(penalties):
                if p != 1.0:
                    seen = history[row]
                    scores = logits[row].gather(0, seen)
                    scores = torch.where(scores < 0, scores * p, scores / p)
                    logits[row].scatter_(0, seen, scores)
        next_ids = logits.argmax(dim=-1)
        for row, s in enumerate(active):
            if s.params.temperature > 0:
                next_ids[row] = _sample(logits[row], s.params, s.generator)
        return next_ids

    def _advance(self, s: Sequence, token: int) -> None:
        """Add a token to a sequence; decide whether it finished; stream the new text."""
        if s.cancelled.is_set():
            s.finish_reason = "cancelled"
            return
        s.generated.append(token)
        if token in self.eos_ids:
            s.finish_reason = "stop"
        text = self.tokenizer.decode(
            s.generated[:-1] if s.finish_reason == "stop" else s.generated,
            skip_special_tokens=True)
        cut = _find_stop(text, s.params.stop)
        if cut is not None:
            text = text[:cut]
            s.finish_reason = "stop"
        elif not s.done and len(s.generated) >= s.params.max_new_tokens:
            s.finish_reason = "length"
        elif not s.done and s.deadline is not None and time.monotonic() > s.deadline:
            s.finish_reason = "timeout"
        s.text = text
        if s.on_text is not None:
            # While running, hold back a partial character or a possible stop-string prefix.
            ready = len(text) if s.done else _safe_prefix(text, s.params.stop)
            if ready > s.emitted:
                s.on_text(text[s.emitted:ready])
                s.emitted = ready


def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    scores = logits / p.temperature
    if p.top_k > 0 and p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_scores.softmax(-1) > p.top_p   # keep the first past top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string begins, or None."""
    hits = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be streamed without emitting part of a stop string or char."""
    end = len(text)
    if text.endswith("\ufffd"):      # an incomplete multi-byte character, decoded as U+FFFD
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end

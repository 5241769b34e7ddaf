"""The decode loop: many sequences, one forward pass per token, each with its own parameters.

Owns turning prompts into tokens step by step on the device. A batch is left-padded with an
attention mask; every sequence keeps its own sampling parameters, seed, stop strings, token limit,
stream callback and cancel flag. A sequence that finishes leaves the batch at once (its rows are
dropped from the KV cache) and its job is answered while the rest decode on. New sequences join
a running batch between steps (their KV cache left-padded to the batch's), so a job never waits
for a whole batch to finish. ``batcher.py`` feeds it from many jobs at once. Never imports
runpod or boto3; knows nothing about jobs.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from serving.placement import LoadedModel

FinishReason = str  # "stop" | "length" | "cancelled" | "timeout"
MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy (dividing by less overflows)
# Text is decoded a few tokens at a time (_Text). Output that keeps ending in part of a character
# is settled once this many tokens are pending, up to SETTLE_TOKENS from its end: more bytes
# than the rest of any character (at most 3), so the text before them can no longer change.
FLUSH_TOKENS = 8
SETTLE_TOKENS = 4


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


@dataclass
class _Text:
    """A sequence's text, decoded incrementally: a step costs as much late as early.

    ``stable`` is the final text of the tokens before ``read``. Each step decodes the tokens
    from ``prefix`` (a few before ``read``) on and drops ``prefix_text``, the text of
    ``prefix:read``, from its front: decoding with the tokens before keeps what depends on a
    neighbour (a leading space) as a whole decode has it. The rest is ``pending`` until it ends
    in a whole character; then it is stable. Output that keeps ending in part of a character (an
    emoji split over tokens, a run of invalid bytes) would keep it pending and the decoded span
    growing, so past FLUSH_TOKENS its text up to SETTLE_TOKENS tokens from the end is made
    stable, once the later tokens show it cannot change. A decoder whose earlier text does
    change with later tokens (one that cleans up spaces before punctuation) is caught by the
    ``startswith`` check and decoded again from the start.
    """

    stable: str = ""
    pending: str = ""
    prefix: int = 0
    read: int = 0
    prefix_text: str = ""
    searched: int = 0                # characters of ``stable`` searched for stop strings

    @property
    def text(self) -> str:
        return self.stable + self.pending

    def advance(self, decode: Callable[[list[int]], str], ids: list[int], end: int) -> None:
        """Take in ``ids[:end]`` (``end`` never decreases)."""
        window = decode(ids[self.prefix:end])
        if not window.startswith(self.prefix_text):
            self.stable, self.prefix, self.read, self.prefix_text, self.searched = "", 0, 0, "", 0
            window = decode(ids[:end])
        if not window.endswith("\ufffd"):
            self._settle(decode, ids, window, end)
            return
        self.pending = window[len(self.prefix_text):]
        if end - self.read > FLUSH_TOKENS:
            cut = end - SETTLE_TOKENS
            head = decode(ids[self.prefix:cut])
            # The text up to ``cut`` is final once the tokens after it closed its last character:
            # then the whole window has more text than ``head``. Tokens without text (skipped
            # special tokens) cannot close it; after 4 x FLUSH_TOKENS it is settled anyway (a
            # mistake is then caught by the check above).
            if head.startswith(self.prefix_text) and window.startswith(head) and (
                    len(window) > len(head) or end - self.read > 4 * FLUSH_TOKENS):
                self._settle(decode, ids, head, cut)
                self.pending = window[len(head):]

    def _settle(self, decode: Callable[[list[int]], str], ids: list[int], window: str,
                end: int) -> None:
        """Make the text of ``ids[:end]`` (``window`` from ``prefix``) stable."""
        self.stable += window[len(self.prefix_text):]
        self.pending = ""
        self.prefix, self.read = self.read, end
        self.prefix_text = decode(ids[self.prefix:self.read])


@dataclass(eq=False)
class Sequence:
    """One request's state while it decodes. Callbacks run on the engine's thread."""

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None     # streamed text deltas
    on_done: Callable[[], None] | None = None        # called once, when it has finished
    deadline: float | None = None                    # time.monotonic() after which it stops
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""                                   # final text (stop strings cut)
    emitted: int = 0                                 # characters already streamed
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    decoded: _Text = field(default_factory=_Text, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def reset_for_retry(self) -> bool:
        """Get ready to run again after its batch failed: always possible, nothing is lost.

        The next prefill feeds the prompt and every token generated so far (see
        ``Engine._prefill``), so the sequence resumes where it stopped: a stream goes on from
        the text its client already has, and a seeded sequence keeps its random generator.
        """
        return True


@dataclass
class _Running:
    """The sequences decoding together and their device state, one row each."""

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor          # (rows, cached tokens) 1 where a row has a real token
    positions: torch.Tensor     # (rows, 1) position of each row's last token
    next_ids: torch.Tensor      # (rows,) the token each row feeds next


class Engine:
    """Decodes sequences on a loaded model, admitting new ones between steps (see batcher.py)."""

    continuous = True                   # batcher.py: run() takes in arrivals between steps

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        config = loaded.generation_config
        eos = config.eos_token_id if config is not None else None
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
        self.steps = 0                  # forward passes, for benchmarks
        self.joins = 0                  # sequences admitted into a running batch

    # ------------------------------------------------------------------------------------------
    def run(self, sequences: list[Sequence],
            admit: Callable[[int], list[Sequence]] | None = None,
            max_rows: int | None = None) -> None:
        """Decode ``sequences`` to their ends; results are written into the sequences.

        Between steps ``admit(free_rows)`` may hand over newly arrived sequences, which are
        prefilled and joined to the running batch (continuous batching); ``run`` returns when
        no sequence is left and ``admit`` has none. ``on_done`` of each sequence is called as it
        finishes, so its job can answer while the others decode on.
        """
        limit = max_rows or max(len(sequences), 1)
        running: _Running | None = None
        fresh: _Running | None = None
        waiting = list(sequences)
        with torch.inference_mode():
            while True:
                free = limit - (len(running.seqs) if running else 0) - len(waiting)
                if admit is not None and free > 0 and (running is None or self._joinable(running)):
                    waiting += admit(free)
                ready = [s for s in waiting if not self._finished_before_start(s)]
                waiting = []
                if ready:
                    fresh = self._prefill(ready)
                    if running is None or not running.seqs:
                        running = fresh
                    elif fresh.seqs:
                        running = self._merge(running, fresh)
                        self.joins += len(fresh.seqs)
                if running is None or not running.seqs:
                    if admit is None:
                        return
                    waiting = admit(limit)
                    if not waiting:
                        return
                    running = None
                    continue
                successor = self._successor(running.seqs)
                if successor is not None:
                    # A faster engine is ready (serving/graphs.py): it carries these sequences
                    # on from the tokens they have, as after a failed batch; this engine's
                    # caches go first.
                    seqs = running.seqs
                    running = fresh = None
                    with torch.inference_mode(False):
                        successor.run(seqs, admit, max_rows)
                    return
                self._step(running)

    def _successor(self, running: list[Sequence]) -> Engine | None:
        """Asked between two steps: an engine to hand ``running`` over to, or None."""
        return None

    def _finished_before_start(self, s: Sequence) -> bool:
        if s.done:
            pass                # finished before its batch failed: answer it, do not resume
        elif s.cancelled.is_set():
            s.finish_reason = "cancelled"
        elif s.deadline is not None and time.monotonic() > s.deadline:
            s.finish_reason = "timeout"
        if s.done:
            self._finish(s)
        return s.done

    def _finish(self, s: Sequence) -> None:
        if s.on_done is not None:
            s.on_done()

    # ------------------------------------------------------------------------------------------
    def _prefill(self, seqs: list[Sequence]) -> _Running:
        """Run the prompts (left-padded) and pick each one's next token.

        A sequence retried after its batch failed feeds its generated tokens too, and resumes.
        """
        for s in seqs:
            if s.params.temperature > 0 and s.generator is None:
                seed = s.params.seed if s.params.seed is not None else int.from_bytes(
                    os.urandom(8), "little") >> 1
                s.generator = torch.Generator(device=self.device).manual_seed(seed)
        rows = [s.prompt_ids + s.generated for s in seqs]
        width = max(len(tokens) for tokens in rows)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            n = len(tokens)
            ids[row, width - n:] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        running = _Running(seqs, cache, mask, positions[:, -1:], ids.new_zeros(len(seqs)))
        self._advance_all(running, logits)
        return running

    def _step(self, r: _Running) -> None:
        """Feed every row its next token; pick the token after it."""
        r.mask = torch.cat([r.mask, r.mask.new_ones((len(r.seqs), 1))], dim=-1)
        r.positions = r.positions + 1
        logits = self._forward(r.next_ids.unsqueeze(-1), r.mask, r.positions, r.cache)
        self._advance_all(r, logits)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        self.steps += 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self._cache_kw: cache}, **self._extra)
        # With the layers spread over several GPUs the logits come out on the last one; every
        # per-row tensor (masks, generators, next tokens) lives on the first.
        return out.logits[:, -1, :].float().to(self.device)

    def _advance_all(self, r: _Running, logits: torch.Tensor) -> None:
        next_ids = self._pick(logits, r.seqs)
        keep: list[int] = []
        for row, (s, token) in enumerate(zip(r.seqs, next_ids.tolist(), strict=True)):
            self._advance(s, token)
            if s.done:
                self._finish(s)
            else:
                keep.append(row)
        r.next_ids = next_ids
        if len(keep) < len(r.seqs):
            # Finished rows leave at once: the rest decode on a smaller batch.
            index = torch.tensor(keep, device=self.device, dtype=torch.long)
            if keep:
                r.cache.batch_select_indices(index)
            r.seqs = [r.seqs[row] for row in keep]
            r.mask, r.positions, r.next_ids = r.mask[index], r.positions[index], next_ids[index]

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _joinable(r: _Running) -> bool:
        """New rows can join only a cache of plain growing layers (not sliding or static)."""
        return all(type(layer) is DynamicLayer for layer in getattr(r.cache, "layers", [None]))

    @staticmethod
    def _merge(a: _Running, b: _Running) -> _Running:
        """One batch of both: the shorter history is left-padded (masked out) to the longer."""
        width = max(a.mask.shape[1], b.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for la, lb in zip(cache_layers(a.cache), cache_layers(b.cache), strict=True):
            la.keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)], dim=0)
            la.values = torch.cat([pad(la.values, 2), pad(lb.values, 2)], dim=0)
        return _Running(a.seqs + b.seqs, a.cache,
                        torch.cat([pad(a.mask, 1), pad(b.mask, 1)], dim=0),
                        torch.cat([a.positions, b.positions], dim=0),
                        torch.cat([a.next_ids, b.next_ids], dim=0))

    # ------------------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next token per row: greedy rows in one argmax, sampled rows each with their seed."""
        for row, s in enumerate(seqs):
            p = s.params.repetition_penalty
            if p != 1.0:
                seen = torch.tensor(s.prompt_ids + s.generated, device=logits.device)
                scores = logits[row].gather(0, seen)
                scores = torch.where(scores < 0, scores * p, scores / p)
                logits[row].scatter_(0, seen, scores)
        next_ids = logits.argmax(dim=-1)
        for row, s in enumerate(seqs):
            if s.params.temperature > 0:
                next_ids[row] = _sample(logits[row], s.params, s.generator)
        return next_ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, s: Sequence, token: int) -> None:
        """Add a token to a sequence; decide whether it finished; stream the new text."""
        if s.cancelled.is_set():
            s.finish_reason = "cancelled"
            return
        s.generated.append(token)
        if token in self.eos_ids:
            s.finish_reason = "stop"
        elif len(s.generated) >= s.params.max_new_tokens:
            s.finish_reason = "length"
        elif s.deadline is not None and time.monotonic() > s.deadline:
            s.finish_reason = "timeout"
        # Text is needed every step only to stream it or to look for stop strings; otherwise
        # it is decoded once, at the end. Every step decodes only the last few tokens and
        # searches only the new text (_Text), so its cost does not grow with the output.
        if not (s.done or s.on_text is not None or s.params.stop):
            return
        decoded = s.decoded
        decoded.advance(self._decode, s.generated,
                        len(s.generated) - (token in self.eos_ids))
        text = decoded.text
        longest = max((len(stop) for stop in s.params.stop), default=0)
        cut = _find_stop(text, s.params.stop, max(0, decoded.searched - longest + 1))
        decoded.searched = len(decoded.stable)
        if cut is not None:
            text = text[:cut]
            s.finish_reason = "stop"
        s.text = text
        if s.on_text is not None:
            # While running, hold back a partial character or a possible stop-string prefix.
            ready = len(text) if s.done else _safe_prefix(text, s.params.stop)
            if ready > s.emitted:
                s.on_text(text[s.emitted:ready])
                s.emitted = ready


def cache_layers(cache: Any) -> list[Any]:
    """A cache's layers. transformers types them as a union of every kind of layer; the engines
    make full-attention and sliding-window layers only, whose ``keys`` and ``values`` are
    tensors once filled."""
    return cache.layers


def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    if p.temperature < MIN_TEMPERATURE:
        # logits / 1e-300 overflow to inf and softmax to nan: this close to 0 is greedy anyway.
        return int(logits.argmax().item())
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
    if not bool(torch.isfinite(probs).all()):
        return int(logits.argmax().item())   # never let one row's numbers fail its batch
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index where the earliest stop string begins at or after ``start``, or None."""
    hits = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be streamed without emitting part of a stop string or char."""
    end = len(text)
    if text.endswith("\ufffd"):      # an incomplete multi-byte character, decoded as U+FFFD
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):      # text[:end] without copying it
                end -= k
                break
    return end

"""Decode with a static KV cache and one compiled, graph-captured step: the GPU's fast path.

Owns ``GraphEngine``, the engine ``tasks/generate.py`` uses when WORKER_DECODE picks the compiled
path. The eager ``engine.Engine`` launches every kernel of every layer from Python at each step;
at batch 1 a small model's step is then bound by those launches, and the GPU waits between them.
Here the step has fixed shapes, so it is compiled once (``torch.compile``, which on CUDA
captures it as a CUDA graph: one launch replays the whole step) and replayed for every token.

The state that makes the shapes fixed:

- a static cache (transformers' ``StaticLayer``, as ``WindowLayer``) of ``slots`` rows and
  ``columns`` tokens, allocated once;
- one write column ``cur`` shared by every row: a row's history ends at ``cur`` and its next
  token is written there, so the library's cache (one write index for the whole batch) serves
  rows of different lengths, each left-padded with masked columns;
- attention over a window of the first columns (a few sizes, one dynamic dimension to the
  compiler: one compilation, a graph per size), not over the whole cache;
- a free slot keeps decoding a masked pad token, so the step never changes shape as sequences
  come and go.

What stays our own, as in ``engine.Engine`` (this class inherits it): the prefill (eager, one
pass over the new prompts, then copied into free slots), per-sequence sampling, seed,
repetition penalty, stop strings with holdback, streaming, cancel and deadlines, and the
out-of-memory retry (``batcher.py``). A prefill wider than ``cur`` shifts the rows right; when
dropping the leading columns no row uses gives a smaller window, or the cache is full, the rows
shift left (a full cache always has such columns: no sequence is longer than ``columns``, the
longest prompt plus the most new tokens a job may ask for, within the model's context).

The worker does not wait for any of it (``SwitchingEngine``): it answers its first jobs on the
eager engine while the step compiles in a thread of its own, then, on the device thread between
two steps, captures the graphs, checks the step against eager decoding (``drift``) and switches;
the sequences in flight carry on in the compiled engine. The static cache is sized from the
device's free memory after the weights and the warm-up (``plan_cache``, with
WORKER_GPU_MEMORY_UTILIZATION as the headroom); the settings are its upper bounds, and a model
that leaves no room for one row decodes eagerly, saying why. Should the compiled step still fail
while serving (anything but running out of memory or a device fault,
which ``batcher.py`` handles), the engine decodes eagerly from then on: the sequences in flight
resume from the tokens they have, as after any failed batch, and no job sees the failure.

``GraphEngine.supports(model)`` says whether a model can take this path (every layer full
attention, one device, a model transformers can compile whole); WORKER_DECODE=auto uses it on
CUDA and falls back to the eager engine otherwise, saying so in the startup line. Compiled code
is cached on disk in WORKER_COMPILE_CACHE_DIR, so a worker that finds it skips the compile.
Never imports runpod or boto3; knows nothing about jobs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs
from transformers.generation.configuration_utils import CompileConfig

from serving import patches
from serving.config import WorkerSettings
from serving.device import DEVICE_THREAD, is_device_fault, is_out_of_memory, release_memory
from serving.engine import Engine, SamplingParams, Sequence, _Running, cache_layers
from serving.errors import SettingsError
from serving.placement import LoadedModel

log = logging.getLogger("worker.graphs")

# Largest drift (``GraphEngine.drift``) the compiled step may show against eager decoding at
# start-up. bfloat16 rounding through every layer moves the logits by a few percent of the
# largest one at most; a step that reads the wrong cache column, mask or position moves them
# by a large share of it. Beyond this, WORKER_DECODE=auto decodes eagerly instead.
MAX_DRIFT = 0.25
# The compile waits for the worker's first answer, or this long without one: a scale-up's first
# job is usually queued before the worker starts, and on few cores a compile beside it slowed
# its answer 1.6x (the gpu-check dry run on two busy CPU cores).
FIRST_ANSWER_GRACE_S = 10.0


def compile_cache(directory: str | None) -> str | None:
    """Point torch's compile caches (inductor's graphs, Triton's kernels) at ``directory``.

    Must run before the first compile. A new worker that finds a graph compiled for the same
    model, shapes, device and versions loads it instead of compiling again; the CUDA graph
    itself is captured in every process (it holds this process's memory addresses).
    """
    if not directory:
        return None
    root = Path(directory).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compile cache %s cannot be created (%s); compiling without it", root, exc)
        return None
    # The setting wins over torch's own variables (torch sets TORCHINDUCTOR_CACHE_DIR itself
    # the first time it looks, so it may already hold torch's default).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    return str(root)


class _StepFailed(Exception):
    """The fixed-shape step itself failed (its cause is the error); the sequences are intact."""


class WindowLayer(StaticLayer):
    """A static cache layer whose attention reads only the first columns, not all of them.

    ``window`` is a tensor whose length is the number of columns this step attends to (the
    engine sets it before each step, from a few sizes); the compiled step treats that length as
    a dynamic size, so one compilation serves every window and CUDA graphs are captured once per
    size. Without it each step would read every slot's whole cache (slots x columns tokens of
    keys and values), which for a long WORKER_MAX_PROMPT_TOKENS costs more than the weights.
    """

    window: torch.Tensor

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        width = self.window.shape[0]
        return keys[:, :, :width], values[:, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.shape[0], 0


class GraphEngine(Engine):
    """``engine.Engine`` with a fixed-shape decode step: static cache, compiled, graph-captured."""

    def __init__(self, loaded: LoadedModel, slots: int, columns: int, *,
                 compile_step: bool = True, min_window: int = 64) -> None:
        super().__init__(loaded)
        self.slots = slots
        self.columns = columns
        self.compiled = compile_step
        layers = len(get_layer_types_and_kwargs(self.model.config.get_text_config(decoder=True))[0])
        # One spare column here too: a window is then never the whole tensor (that slice would
        # be the tensor itself, and compile a second time).
        self.cache = Cache(layers=[WindowLayer(max_cache_len=columns + 1)
                                   for _ in range(layers)])
        self._init_cache()
        # Attention reads a window of the first columns: powers of two from min_window, then all.
        first = max(min_window, 1).bit_length() - 1
        sizes = sorted({columns} | {2**k for k in range(first, columns.bit_length())
                                    if 2**k < columns})
        self.windows = {n: torch.empty(n, dtype=torch.int8, device=self.device) for n in sizes}
        for t in self.windows.values():
            torch._dynamo.maybe_mark_dynamic(t, 0)
        device = self.device
        # One spare column, never attended: every window is then a strided view of the mask
        # (a view of all the columns would be contiguous, and compile a second time).
        self.mask = torch.zeros((slots, columns + 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.next_ids = torch.full((slots,), self.pad_id, dtype=torch.long, device=device)
        self.live = torch.zeros((slots, 1), dtype=torch.long, device=device)
        self.cur = 0                                     # the column the next token goes to
        self.rows: list[Sequence | None] = [None] * slots
        self.starts: list[int] = [0] * slots             # each row's first column, while in use
        self._index: torch.Tensor | None = None          # slots in use, while they do not change
        self._used: list[int] = []
        self.shifts = 0                                  # cache realignments, for tests and benches
        self.window_steps: dict[int, int] = {}           # steps run at each window size
        self.compile_s = 0.0
        self.failed: str | None = None                   # why it decodes eagerly now, if it does
        if compile_step:
            # The step's inputs live at fixed addresses: a replay reads them where they are.
            for t in (self.positions, self.next_ids):
                torch._dynamo.mark_static_address(t)
        # The compiled callable is made at the first step (``_compiled_step``): making it
        # imports inductor, which takes longer than the warm-up (measured on 2 CPU cores: 1.1 s
        # of a 4.5 s cold start), and the worker's first answer must not wait for it.
        self._step_fn: Callable[..., object] | None = None if compile_step else self.model

    @staticmethod
    def supports(loaded: LoadedModel) -> str | None:
        """None when ``loaded`` can take this path, else why not (for the startup line)."""
        model = loaded.model
        if not getattr(model, "_can_compile_fullgraph", False):
            return f"{type(model).__name__} is not compilable in transformers"
        if len({p.device for p in model.parameters()}) > 1:
            return "the model is spread over several devices"
        config = model.config.get_text_config(decoder=True)
        kinds = set(get_layer_types_and_kwargs(config)[0])
        if kinds - {"full_attention"}:
            return f"its layers are not all full attention ({', '.join(sorted(kinds))})"
        return None

    def _init_cache(self) -> None:
        """Allocate every layer's tensors now, shaped as the model's own cache is."""
        probe = cache_layers(_probe_cache(self))
        for static, layer in zip(cache_layers(self.cache), probe, strict=True):
            k, v = layer.keys, layer.values
            static.lazy_initialization(k.new_empty((self.slots, *k.shape[1:])),
                                       v.new_empty((self.slots, *v.shape[1:])))

    # ------------------------------------------------------------------------------------------
    def run(self, sequences: list[Sequence],
            admit: Callable[[int], list[Sequence]] | None = None,
            max_rows: int | None = None) -> None:
        """As ``Engine.run``: decode to the end, taking in arrivals between steps."""
        if self.failed is not None:
            super().run(sequences, admit, max_rows)
            return
        limit = min(max_rows or max(len(sequences), 1), self.slots)
        self._clear()
        waiting = list(sequences)
        with torch.no_grad():
            while True:
                used = self.slots - self.rows.count(None)
                free = limit - used - len(waiting)
                if admit is not None and free > 0:
                    waiting += admit(free)
                room = limit - used
                ready = [s for s in waiting[:room] if not self._finished_before_start(s)]
                waiting = waiting[room:]
                if ready:
                    self._join(self._prefill(ready))
                if all(s is None for s in self.rows):
                    if waiting:
                        continue
                    if admit is None:
                        return
                    waiting = admit(limit)
                    if not waiting:
                        return
                    continue
                try:
                    self._graph_step()
                except _StepFailed as failed:
                    # Every sequence this run holds: in a slot, or taken in and not yet joined.
                    held = [s for s in self.rows if s is not None] + waiting
                    self._give_up(failed.__cause__ or failed)
                    super().run(held, admit, max_rows)
                    return

    def _give_up(self, exc: BaseException) -> None:
        """Decode eagerly from now on, after the compiled step failed with ``exc``."""
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        self.failed = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        log.error("the compiled decode step failed (%s); decoding eagerly from now on, the jobs "
                  "in flight resume where they were (WORKER_DECODE=eager skips the compiled "
                  "path)", self.failed, exc_info=exc)
        self.release()                      # the eager engine's caches may need the memory

    def _clear(self) -> None:
        self.rows = [None] * self.slots
        self.mask.zero_()
        self.positions.zero_()
        self.live.zero_()
        self.next_ids.fill_(self.pad_id)
        self._index = None
        self.cur = 0

    def _join(self, fresh: _Running) -> None:
        """Copy freshly prefilled rows (their own dynamic cache) into free slots."""
        if not fresh.seqs:
            return
        width = fresh.mask.shape[1]
        if all(s is None for s in self.rows):
            self.cur = width
        else:
            self.joins += len(fresh.seqs)        # into a running batch, as Engine counts
        if width > self.cur:
            self._shift(width - self.cur)
        free = [i for i, s in enumerate(self.rows) if s is None][:len(fresh.seqs)]
        index = torch.tensor(free, dtype=torch.long, device=self.device)
        start = self.cur - width
        for static, layer in zip(cache_layers(self.cache), cache_layers(fresh.cache), strict=True):
            static.keys[index, :, start:self.cur] = layer.keys
            static.values[index, :, start:self.cur] = layer.values
        self.mask[index] = 0
        self.mask[index, start:self.cur] = fresh.mask
        self.positions[index] = fresh.positions
        self.next_ids[index] = fresh.next_ids
        self.live[index] = 1
        for slot, s in zip(free, fresh.seqs, strict=True):
            self.rows[slot] = s
            self.starts[slot] = start
        self._index = None
        self._set_write_column()

    def _shift(self, by: int) -> None:
        """Move every row's history ``by`` columns (right if positive, left if negative)."""
        tensors = [t for layer in cache_layers(self.cache) for t in (layer.keys, layer.values)]
        if by > 0:
            for t in tensors:
                t[:, :, by:self.cur + by] = t[:, :, :self.cur].clone()
            self.mask[:, by:self.cur + by] = self.mask[:, :self.cur].clone()
            self.mask[:, :by] = 0
        else:
            n = -by
            for t in tensors:
                t[:, :, :self.cur - n] = t[:, :, n:self.cur].clone()
            self.mask[:, :self.cur - n] = self.mask[:, n:self.cur].clone()
            self.mask[:, self.cur - n:] = 0
        self.cur += by
        self.starts = [start + by for start in self.starts]
        self.shifts += 1
        self._set_write_column()

    def _set_write_column(self) -> None:
        for layer in cache_layers(self.cache):
            layer.cumulative_length.fill_(self.cur)

    def _window(self, columns_needed: int) -> int:
        """The smallest window holding ``columns_needed`` columns (beyond the cache: more)."""
        for n in self.windows:
            if n >= columns_needed:
                return n
        return self.columns + 1

    def _fit_window(self) -> int:
        """The window for this step, after dropping the leading columns no row in use needs
        when that makes the window smaller (always so when the cache is full)."""
        need = self.cur + 1                           # the histories and this step's column
        unused = min(self.starts[i] for i, s in enumerate(self.rows) if s is not None)
        if unused > 0 and self._window(need - unused) < self._window(need):
            self._shift(-unused)
            need -= unused
        window = self._window(need)
        if window > self.columns:
            raise RuntimeError("a sequence outgrew the static cache; this is a bug: columns "
                               "must cover the longest prompt plus max_new_tokens")
        return window

    def _step_logits(self) -> torch.Tensor:
        """Feed every slot its next token in one fixed-shape pass: each slot's next-token
        logits, in the graph's output buffer (the next replay overwrites it)."""
        window = self._fit_window()
        self.mask[:, self.cur] = 1
        self.positions += self.live
        self.steps += 1
        out = self._call_step(window)
        self.window_steps[window] = self.window_steps.get(window, 0) + 1
        self.cur += 1                      # every layer's write index moved on by one in there
        return out.logits[:, -1, :]

    def _graph_step(self) -> None:
        """One step for every slot; pick each sequence's next token; free finished slots."""
        if self._index is None:
            self._used = [i for i, s in enumerate(self.rows) if s is not None]
            self._index = torch.tensor(self._used, dtype=torch.long, device=self.device)
        try:
            # A copy: the next replay overwrites the step's output.
            logits = self._step_logits().index_select(0, self._index).float()
        except Exception as exc:
            if is_out_of_memory(exc) or is_device_fault(exc):
                raise
            raise _StepFailed from exc
        seqs = cast("list[Sequence]", [self.rows[i] for i in self._used])   # used slots: filled
        picked = self._pick(logits, seqs)
        self.next_ids.index_copy_(0, self._index, picked)
        finished = []
        for slot, s, token in zip(self._used, seqs, picked.tolist(), strict=True):
            self._advance(s, token)
            if s.done:
                self._finish(s)
                finished.append(slot)
        if finished:
            for slot in finished:
                self.rows[slot] = None
            gone = torch.tensor(finished, dtype=torch.long, device=self.device)
            self.live[gone] = 0
            self.positions[gone] = 0
            self.mask[gone] = 0
            self._index = None

    def _call_step(self, window: int) -> Any:
        """One pass of every slot's next token, attending to the first ``window`` columns."""
        for layer in cache_layers(self.cache):
            layer.window = self.windows[window]
        mask = self.mask[:, :window]
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        step = self._step_fn or self._compiled_step()
        return step(input_ids=self.next_ids.unsqueeze(-1), attention_mask=mask,
                    position_ids=self.positions, use_cache=True,
                    **{self._cache_kw: self.cache}, **self._extra)

    def _compiled_step(self) -> Callable[..., object]:
        """The model's forward under ``torch.compile`` (made once, on the first step)."""
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self._step_fn = self.model.get_compiled_call(
            CompileConfig(fullgraph=False, dynamic=False, mode=mode))
        return self._step_fn

    # ------------------------------------------------------------------------------------------
    def drift(self, prompt_ids: list[int], steps: int = 4) -> float:
        """How far the step's logits are from an eager forward over the same tokens: the
        largest difference over ``steps`` greedy steps of one sequence, as a share of the
        largest eager logit. About 1e-6 in float32; a step that reads a wrong cache column,
        mask or position is off by a large share. Run after the warm-up (it compiles)."""
        seq = Sequence(list(prompt_ids), SamplingParams(max_new_tokens=steps + 1))
        worst = 0.0
        with torch.no_grad():
            self._clear()
            self._join(self._prefill([seq]))
            slot = self.rows.index(seq)
            for _ in range(steps):
                got = self._step_logits()[slot].float()
                ids = torch.tensor([seq.prompt_ids + seq.generated], device=self.device)
                want = self.model(input_ids=ids, **self._extra).logits[0, -1, :].float()
                gap = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
                worst = max(worst, gap)
                token = int(want.argmax())
                seq.generated.append(token)
                self.next_ids[slot] = token
            self._clear()
        return worst

    def warm_up(self, prompt_ids: list[int], new_tokens: int = 4) -> float:
        """Compile the step, capture it at every window size, and run the prefill at one row
        and at every slot, so that no job pays any of it. Returns the seconds it took.

        The first compiled call traces and compiles (or loads the compiled code from the
        compile cache); each window size is then run a few times, which on CUDA records its
        graph; later steps only replay them.
        """
        start = time.perf_counter()
        params = SamplingParams(max_new_tokens=new_tokens)
        with torch.no_grad():
            for rows in (1, self.slots):
                self.run([Sequence(list(prompt_ids), params) for _ in range(rows)])
            for window in self.windows:
                self._fill_window(window)
                for _ in range(3):               # a warm-up run, the recording, a replay
                    self._call_step(window)
                    self._set_write_column()
            self._clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.compile_s = time.perf_counter() - start
        return self.compile_s

    def compile(self) -> float:
        """Compile the step, or load it from the compile cache, on any thread: one call at
        each window size (one compilation serves them all). Returns the seconds it took.

        Off the job path: the eager engine serves meanwhile. On CUDA each size also runs once
        in this thread's graph tree (a warm-up run, nothing recorded); ``capture`` records the
        graphs on the thread that replays them (a CUDA graph tree belongs to one thread).
        """
        start = time.perf_counter()
        with torch.no_grad():
            for window in self.windows:
                self._fill_window(window)
                self._call_step(window)
            self._clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.compile_s = time.perf_counter() - start
        return self.compile_s

    def capture(self) -> float:
        """Record every window size's CUDA graph on this thread (the device thread, between
        two steps: capture needs the device to itself): a warm-up run in this thread's graph
        tree, the recording, a replay. After ``compile``, so nothing compiles here; on a CPU
        one call per size. Returns the seconds the device was held."""
        runs = 3 if self.compiled and self.device.type == "cuda" else 1
        start = time.perf_counter()
        with torch.no_grad():
            for window in self.windows:
                self._fill_window(window)
                for _ in range(runs):
                    self._call_step(window)
                    self._set_write_column()
            self._clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def _fill_window(self, window: int) -> None:
        """Empty slots, the write column at the window's last: as if histories filled it."""
        self._clear()
        self.cur = window - 1
        self.mask[:, self.cur] = 1
        self._set_write_column()

    def release(self) -> None:
        """Give the static cache's memory back (the engine will not decode again)."""
        self._clear()
        for layer in cache_layers(self.cache):
            layer.keys = layer.values = None
        release_memory()


def _probe_cache(engine: Engine) -> DynamicCache:
    """The model's own cache after one eager forward of one token: each layer's key and value
    shapes and dtype (heads and head sizes may differ between layers)."""
    probe = DynamicCache(config=engine.model.config)
    ids = torch.full((1, 1), engine.pad_id, dtype=torch.long, device=engine.device)
    with torch.no_grad():
        engine.model(input_ids=ids, use_cache=True, **{engine._cache_kw: probe}, **engine._extra)
    return probe


def kv_bytes_per_token(engine: Engine) -> int:
    """Bytes one token takes in the static cache: keys and values of every layer."""
    return sum(layer.keys.numel() * layer.keys.element_size()
               + layer.values.numel() * layer.values.element_size()
               for layer in cache_layers(_probe_cache(engine)))


@dataclass(frozen=True)
class DeviceMemory:
    """The device's memory as the static cache is sized: after the weights and the warm-up."""

    total: int          # bytes on the device
    free: int           # bytes free now (everything else: weights, CUDA context, other users)
    warmup_peak: int    # bytes the warm-up held beyond what stays allocated: a batch's need

    @classmethod
    def measure(cls, device: torch.device) -> DeviceMemory | None:
        """The figures on CUDA (the allocator's cached blocks given back first); None on a
        CPU, where the settings alone size the cache."""
        if device.type != "cuda":
            return None
        release_memory()
        free, total = torch.cuda.mem_get_info(device)
        peak = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
        return cls(total=total, free=free, warmup_peak=max(peak, 0))


@dataclass(frozen=True)
class CachePlan:
    """The static cache chosen: ``slots`` rows of ``columns`` tokens, or none (slots 0)."""

    slots: int
    columns: int
    why: str            # for the startup line: the size and what set it, or why there is none


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def plan_cache(memory: DeviceMemory | None, token_bytes: int, settings: WorkerSettings,
               context: int | None) -> CachePlan:
    """Size the static cache from the device's free memory; the settings are upper bounds.

    A row holds the longest sequence a job may make (WORKER_MAX_PROMPT_TOKENS +
    WORKER_MAX_NEW_TOKENS, within the model's context), so every job the settings admit fits
    it; the rows (slots, at most WORKER_MAX_BATCH_SIZE) are what give way. The budget, as
    vLLM's gpu_memory_utilization: WORKER_GPU_MEMORY_UTILIZATION of the device, less what is in
    use after the weights and the warm-up, less the warm-up's peak (what the eager engine's
    batches need beside the cache while the compiled step is prepared, and the step's own
    activations after). No room for one row: slots 0, and the worker decodes eagerly.
    """
    columns = settings.max_prompt_tokens + settings.max_new_tokens
    if context is not None:
        columns = min(columns, context)
    slots = settings.max_batch_size
    if memory is None:
        return CachePlan(slots, columns, "the settings' bounds: no device memory to measure")
    row = columns * token_bytes
    budget = (int(memory.total * settings.gpu_memory_utilization)
              - (memory.total - memory.free) - memory.warmup_peak)
    fit = max(budget, 0) // max(row, 1)
    share = f"WORKER_GPU_MEMORY_UTILIZATION={settings.gpu_memory_utilization:g}"
    if fit >= slots:
        return CachePlan(slots, columns, f"{_gib(slots * row)} of the {_gib(budget)} left "
                                         f"under {share}")
    if fit >= 1:
        return CachePlan(fit, columns, (
            f"{_gib(fit * row)}: {fit} of WORKER_MAX_BATCH_SIZE={slots} slots fit in the "
            f"{_gib(budget)} left under {share}"))
    return CachePlan(0, columns, (
        f"one slot of {columns} tokens needs {_gib(row)} and {_gib(max(budget, 0))} is left "
        f"under {share} after the weights and the warm-up; lower WORKER_MAX_PROMPT_TOKENS + "
        "WORKER_MAX_NEW_TOKENS or raise the share"))


class SwitchingEngine(Engine):
    """Decodes eagerly from the first job; hands over to a compiled ``GraphEngine`` between two
    steps once it is compiled (off the job path), captured and checked against eager decoding.

    ``start`` sizes the static cache from the device's free memory (``plan_cache``) and
    compiles in a thread of its own while this engine serves, from the first answer on (or
    after ``FIRST_ANSWER_GRACE_S`` without one). The device thread takes over from
    there: capturing the graphs and the drift check run on it between two steps (inside a run,
    or when the device is idle, whichever comes first), and the sequences in flight carry on in
    the compiled engine from the tokens they have, as after a failed batch. A compile, capture
    or check that fails leaves this engine eager for good, logged once with the reason.
    """

    def __init__(self, loaded: LoadedModel, settings: WorkerSettings, context: int | None,
                 cache_dir: str | None) -> None:
        super().__init__(loaded)
        self.settings = settings
        self.context = context
        self.cache_dir = cache_dir
        self.plan: CachePlan | None = None
        self.serving: GraphEngine | None = None   # the compiled engine, once switched to
        self.why_eager: str | None = None          # why it stays eager, once it knows
        self.settled = threading.Event()           # switched, or eager for good
        self.prepared = threading.Event()          # compiled, waiting for the device thread
        self.handed_over = 0                       # sequences in flight at the switch
        self.timings: dict[str, float] = {}        # compile_s, capture_s, drift, ready_after_s
        self._pending: GraphEngine | None = None
        self._answered = threading.Event()          # a job's sequence has finished
        self._probe: list[int] = []
        self._started_at = 0.0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._fx_tracing: threading.RLock | None = None   # held by compile's traces

    def warm_up(self, prompt_ids: list[int], rows: tuple[int, ...]) -> str:
        """The eager warm-up (a run of each of ``rows`` sequences), then ``start``; returns
        the startup line's note."""
        params = SamplingParams(max_new_tokens=4)
        for n in rows:
            super().run([Sequence(list(prompt_ids), params) for _ in range(n)])
        return self.start(prompt_ids)

    def start(self, prompt_ids: list[int], memory: DeviceMemory | None = None) -> str:
        """Size the cache, allocate it and start the compile thread (which waits for the
        first answer, and alone imports the compiler); returns the startup line's note.

        Call on the device thread after the eager warm-up (its peak is in the sizing).
        ``memory``: the device's figures, measured here when not given.
        """
        self._started_at = time.monotonic()
        self._answered.clear()                  # the warm-up's runs are no job's answer
        self._probe = list(prompt_ids)
        graphs = "CUDA graphs, " if self.device.type == "cuda" else ""
        memory = memory or DeviceMemory.measure(self.device)
        self.plan = plan = plan_cache(memory, kv_bytes_per_token(self), self.settings,
                                      self.context)
        if plan.slots == 0:
            self._stay_eager(f"no room for a static cache: {plan.why}")
            return f"decode eager (no room for the compiled step's cache: {plan.why})"
        try:
            graph = GraphEngine(self.loaded, plan.slots, plan.columns)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_memory()
            self._stay_eager(f"its static cache of {plan.slots} x {plan.columns} tokens did "
                             "not fit")
            return f"decode eager ({self.why_eager})"
        # A trace swaps nn.Module's call for every thread: eager passes wait for it (patches).
        self._fx_tracing = patches.guard_fx_tracing()
        self._thread = threading.Thread(target=self._compile, args=(graph,), name="compile",
                                        daemon=True)
        self._thread.start()
        return (f"decode eager now, compiled once ready ({graphs}{plan.slots} slots x "
                f"{plan.columns} tokens: {plan.why}; compile cache "
                f"{self.cache_dir or 'torch default'})")

    def _compile(self, graph: GraphEngine) -> None:
        """The compile thread: compile, then leave the rest to the device thread."""
        self._answered.wait(FIRST_ANSWER_GRACE_S)
        try:
            self.timings["compile_s"] = graph.compile()
        except Exception as exc:  # noqa: BLE001 - a failed compile leaves the worker eager
            log.debug("compiling the decode step failed", exc_info=exc)
            graph.release()
            self._stay_eager(f"compiling failed: {_first_line(exc)}")
            return
        self._pending = graph
        self.prepared.set()
        # Switch even if no job comes: when the device thread is next idle (a run in progress
        # switches between two of its steps first).
        DEVICE_THREAD.submit(self._switch)

    def _switch(self) -> GraphEngine | None:
        """Capture, check and switch (device thread, between steps); the engine to use."""
        with self._lock:
            graph, self._pending = self._pending, None
            if graph is None:
                return self.serving
            try:
                with torch.inference_mode(False):     # called from the eager loop's steps
                    capture_s = graph.capture()
                    drift = graph.drift(self._probe)
            except Exception as exc:
                if is_device_fault(exc):
                    raise
                graph.release()
                self._stay_eager(f"capturing or checking the compiled step failed: "
                                 f"{_first_line(exc)}")
                return None
            if not drift <= MAX_DRIFT:
                graph.release()
                self._stay_eager(f"the compiled step's logits were {drift:.0%} of the largest "
                                 f"away from eager decoding's (at most {MAX_DRIFT:.0%})")
                return None
            self.timings.update(capture_s=capture_s, drift=drift,
                                ready_after_s=time.monotonic() - self._started_at)
            self.serving = graph
            self.settled.set()
            log.info("decode: switched to the compiled step %.1f s after the warm-up (compiled "
                     "in %.1f s off the job path, captured in %.0f ms between two steps, "
                     "%.1e from eager)", self.timings["ready_after_s"],
                     self.timings.get("compile_s", 0.0), capture_s * 1000, drift)
            return graph

    def _stay_eager(self, why: str) -> None:
        self.why_eager = why
        self.settled.set()
        log.warning("decode: the compiled step will not serve (%s); decoding eagerly "
                    "(WORKER_DECODE=eager skips it)", why)

    def run(self, sequences: list[Sequence],
            admit: Callable[[int], list[Sequence]] | None = None,
            max_rows: int | None = None) -> None:
        """As ``Engine.run``, on the compiled engine once it serves."""
        if self.plan is None and self.why_eager is None:     # no warm-up ran (MODEL_WARMUP)
            self.start(list(self.tokenizer("Hello")["input_ids"]))
        engine = self._switch() if self.prepared.is_set() else None
        if engine is not None:
            engine.run(sequences, admit, max_rows)
        else:
            super().run(sequences, admit, max_rows)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """An eager pass; while the compile thread may trace, not during one of its traces."""
        lock = self._fx_tracing
        if lock is None or self.settled.is_set() or self.prepared.is_set():
            return super()._forward(ids, mask, positions, cache)
        with lock:
            return super()._forward(ids, mask, positions, cache)

    def _finish(self, s: Sequence) -> None:
        super()._finish(s)
        self._answered.set()

    def _successor(self, running: list[Sequence]) -> Engine | None:
        """Between two eager steps: the compiled engine, once ready, takes ``running`` on."""
        if not self.prepared.is_set():
            return None
        engine = self._switch()
        if engine is not None:
            self.handed_over += len(running)
        return engine


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def choose_engine(loaded: LoadedModel, settings: WorkerSettings,
                  context: int | None) -> tuple[Engine, str]:
    """The engine WORKER_DECODE asks for, and what the startup line says of it.

    ``compiled`` on a model the path cannot serve is a startup error naming the reason; ``auto``
    takes the compiled path on CUDA only (on a CPU the compile costs minutes and saves little)
    and otherwise decodes eagerly and says why. The compiled path is a ``SwitchingEngine``: it
    answers at once, eagerly, and switches once its compiled step is ready.
    """
    if settings.decode == "eager":
        return Engine(loaded), "decode eager (WORKER_DECODE=eager)"
    if settings.decode == "auto" and loaded.device.type != "cuda":
        return Engine(loaded), "decode eager (WORKER_DECODE=auto on a CPU)"
    why_not = GraphEngine.supports(loaded)
    if why_not is not None:
        if settings.decode == "compiled":
            raise SettingsError(f"WORKER_DECODE=compiled cannot serve this model: {why_not}; "
                                "set WORKER_DECODE=eager (or auto)")
        return Engine(loaded), f"decode eager (WORKER_DECODE=auto: {why_not})"
    cache_dir = compile_cache(settings.compile_cache_dir)
    return (SwitchingEngine(loaded, settings, context, cache_dir),
            "decode eager now, compiled after the first job (no warm-up ran)")

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
``drift`` checks the compiled step against eager decoding before the first job. Should the
compiled step still fail while serving (anything but running out of memory or a device fault,
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs
from transformers.generation.configuration_utils import CompileConfig

from model_loader import LoadedModel
from serving.config import WorkerSettings
from serving.device import is_device_fault, is_out_of_memory, release_memory
from serving.engine import Engine, SamplingParams, Sequence, _Running
from serving.errors import SettingsError

log = logging.getLogger("worker.graphs")

# Largest drift (``GraphEngine.drift``) the compiled step may show against eager decoding at
# start-up. bfloat16 rounding through every layer moves the logits by a few percent of the
# largest one at most; a step that reads the wrong cache column, mask or position moves them
# by a large share of it. Beyond this, WORKER_DECODE=auto decodes eagerly instead.
MAX_DRIFT = 0.25


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
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self._step_fn: Callable[..., object] = self.model.get_compiled_call(
                CompileConfig(fullgraph=False, dynamic=False, mode=mode))
        else:
            self._step_fn = self.model

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
        """Allocate every layer's tensors now, shaped as the model's own cache is.

        One eager forward of one token gives each layer's key and value shapes (heads and head
        sizes may differ between layers); the static layers are sized from them.
        """
        probe = DynamicCache(config=self.model.config)
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.model(input_ids=ids, use_cache=True, **{self._cache_kw: probe}, **self._extra)
        for static, layer in zip(self.cache.layers, probe.layers, strict=True):
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
        self._clear()
        for layer in self.cache.layers:     # the eager engine's caches may need the memory
            layer.keys = layer.values = None
        release_memory()

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
        for static, layer in zip(self.cache.layers, fresh.cache.layers, strict=True):
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
        tensors = [t for layer in self.cache.layers for t in (layer.keys, layer.values)]
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
        for layer in self.cache.layers:
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
        seqs = [self.rows[i] for i in self._used]
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
        for layer in self.cache.layers:
            layer.window = self.windows[window]
        mask = self.mask[:, :window]
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self._step_fn(input_ids=self.next_ids.unsqueeze(-1), attention_mask=mask,
                             position_ids=self.positions, use_cache=True,
                             **{self._cache_kw: self.cache}, **self._extra)

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
                self._clear()
                self.cur = window - 1            # as if the rows' histories filled the window
                self.mask[:, self.cur] = 1
                self._set_write_column()
                for _ in range(3):               # a warm-up run, the recording, a replay
                    self._call_step(window)
                    self._set_write_column()
            self._clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.compile_s = time.perf_counter() - start
        return self.compile_s


def choose_engine(loaded: LoadedModel, settings: WorkerSettings,
                  context: int | None) -> tuple[Engine, str]:
    """The engine WORKER_DECODE asks for, and what the startup line says of it.

    ``compiled`` on a model the path cannot serve is a startup error naming the reason; ``auto``
    takes the compiled path on CUDA only (on a CPU the compile costs minutes and saves little)
    and otherwise, or when the static cache does not fit, decodes eagerly and says why.
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
    # The longest sequence a job may make: the cache never has to drop a row's history.
    columns = settings.max_prompt_tokens + settings.max_new_tokens
    if context is not None:
        columns = min(columns, context)
    cache_dir = compile_cache(settings.compile_cache_dir)
    try:
        engine = GraphEngine(loaded, settings.max_batch_size, columns)
    except Exception as exc:
        if settings.decode == "compiled" or not is_out_of_memory(exc):
            raise
        release_memory()
        return Engine(loaded), (f"decode eager (WORKER_DECODE=auto: a static cache of "
                                f"{settings.max_batch_size} x {columns} tokens does not fit)")
    graphs = "CUDA graphs, " if loaded.device.type == "cuda" else ""
    return engine, (f"decode compiled ({graphs}{engine.slots} slots x {columns} tokens, "
                    f"compile cache {cache_dir or 'torch default'})")

"""Weights, device and dtype: find the model, load it once onto the device, warm it up.

Owns where weights come from and how they are placed. Never imports runpod or boto3, so the GPU
path can be exercised on a machine that has only torch and transformers.

Where the model is looked for, in this order (the first hit wins)::

    1. MODEL_PATH                      an explicit directory; when set, nothing else is searched
    2. MODEL_BAKED_DIR                 what builder/fetch_model.py left (baked into the image)
    3. RUNPOD_HF_CACHE                 RunPod cached models, Hugging Face cache layout
    4. HF_HUB_CACHE                    a Hugging Face cache, e.g. on a network volume
    5. the Hub, only with MODEL_ALLOW_DOWNLOAD=true

Which task serves the model comes from its config (``serving/detect.py`` reads its
architecture in transformers' own auto-class tables as pipeline kinds, its default first) and
each task's ``pipeline_tasks`` (or its own ``serves`` rule), whatever the registry's order; a
model no task serves, a WORKER_TASK that does not fit it, or two tasks claiming it stop the
worker with one line naming its architecture, before any weight is read. The task loads its
model (``Task.load``) with ``place_model`` below, which owns device, dtype and placement. Only
safetensors weights are loaded (pickle checkpoints run code on load) and remote code is never
trusted. When nothing is found, ``ModelNotFound`` lists every place and how to fix it.

The name the worker answers as (``model`` in answers, ``/v1/models``, the startup line) is
MODEL_SERVED_NAME when set; else, for MODEL_PATH, the name recorded in the directory's
``builder.json``, or the directory's own name; else MODEL_NAME.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


def _import_accelerate_without_boto3() -> None:
    """Import accelerate (transformers' loading code imports it) without boto3.

    accelerate imports boto3 whenever it is installed, for its SageMaker config wizard, which a
    worker never runs: about 0.2 s of every cold start, and boto3 is for storage, which loads it
    with the first bucket (storage.py). Hidden for that one import: a None entry in sys.modules
    makes ``importlib.util.find_spec`` answer None, so accelerate takes boto3 for absent.
    """
    if "accelerate" in sys.modules or "boto3" in sys.modules:
        return
    sys.modules["boto3"] = None  # type: ignore[assignment]
    try:
        import accelerate  # noqa: F401
    except ImportError:
        pass              # transformers loads models without it on one device
    finally:
        del sys.modules["boto3"]


_t_import = time.perf_counter()
_import_accelerate_without_boto3()   # imports torch
import torch  # noqa: E402
import transformers  # noqa: E402, F401 - timed here: IMPORT_SECONDS covers it
from transformers import (  # noqa: E402
    AutoConfig,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from serving.config import ModelSettings, WorkerSettings  # noqa: E402
from serving.detect import describe, model_kinds  # noqa: E402
from serving.device import DEVICE_THREAD, is_out_of_memory  # noqa: E402
from serving.errors import ModelNotFound, SettingsError, UnsupportedModel  # noqa: E402

if TYPE_CHECKING:
    from tasks.base import Task

IMPORT_SECONDS = time.perf_counter() - _t_import
hf_logging.disable_progress_bar()   # one startup line instead of per-tensor progress bars

log = logging.getLogger("worker.model")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ----------------------------------------------------------------------------------------------
# Finding the weights
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """A directory that holds a loadable model, and how it was found."""

    path: Path
    origin: str          # "MODEL_PATH" | "baked" | "runpod-cache" | "hf-cache" | "hub-download"


def _has_safetensors(directory: Path) -> bool:
    return any(directory.glob("*.safetensors"))


def check_model_dir(directory: Path) -> str | None:
    """Why ``directory`` cannot be served, or None if it can."""
    if not directory.is_dir():
        return "does not exist"
    if not (directory / "config.json").is_file():
        return "has no config.json"
    if not _has_safetensors(directory):
        if any(p.suffix in PICKLE_SUFFIXES for p in directory.iterdir()):
            return ("holds only pickle weights (.bin/.pt), which can run code when loaded; "
                    "convert them to safetensors or use builder/fetch_model.py")
        return "has no *.safetensors weights"
    return None


def hf_cache_snapshot(cache: Path, model_name: str, revision: str | None) -> Path:
    """The snapshot directory of ``model_name`` in a Hugging Face cache (it may not exist).

    The cache layout is ``models--{org}--{name}/snapshots/{commit}`` with ``refs/{branch}``
    holding the commit of a branch or tag; a full commit hash names the snapshot directly.
    """
    repo = cache / ("models--" + model_name.replace("/", "--"))
    ref = revision or "main"
    ref_file = repo / "refs" / ref
    commit = ref_file.read_text().strip() if ref_file.is_file() else ref
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir() and revision is None:
        # A cache written without refs (copied by hand): a single snapshot is unambiguous.
        snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
        if len(snapshots) == 1:
            return snapshots[0]
    return snapshot


def _baked_mismatch(directory: Path, settings: ModelSettings) -> str | None:
    """The baked directory serves only the model it was built for (served-name mismatches)."""
    manifest = directory / "builder.json"
    if not manifest.is_file():
        return None
    try:
        request = json.loads(manifest.read_text()).get("request", {})
    except (OSError, ValueError):
        return "has an unreadable builder.json; rebuild it with `make model`"
    # A model built from a local directory has no Hub id: any MODEL_NAME may serve it.
    baked = request.get("model")
    if request.get("source") in ("hub", "gguf-wheel") and baked != settings.model_name:
        return f"holds {request.get('model')}, not MODEL_NAME={settings.model_name}"
    return None


def resolve_model_source(settings: ModelSettings) -> ModelSource:
    """Find the model directory, in the documented order, or raise ModelNotFound."""
    if settings.model_path is not None:
        problem = check_model_dir(settings.model_path)
        if problem:
            raise ModelNotFound(f"MODEL_PATH={settings.model_path} {problem}. Point MODEL_PATH "
                                "at a directory with config.json and *.safetensors, or unset it.")
        return ModelSource(settings.model_path, "MODEL_PATH")

    looked: list[str] = []
    candidates = [
        ("baked", settings.baked_dir, "MODEL_BAKED_DIR"),
        ("runpod-cache", hf_cache_snapshot(settings.runpod_cache, settings.model_name,
                                           settings.model_revision), "RUNPOD_HF_CACHE"),
        ("hf-cache", hf_cache_snapshot(settings.hf_cache, settings.model_name,
                                       settings.model_revision), "HF_HUB_CACHE"),
    ]
    for origin, directory, var in candidates:
        problem = check_model_dir(directory)
        if problem is None and origin == "baked":
            problem = _baked_mismatch(directory, settings)
        if problem is None:
            return ModelSource(directory, origin)
        looked.append(f"  - {var}: {directory} {problem}")

    if settings.allow_download:
        return ModelSource(_download(settings), "hub-download")
    looked.append("  - the Hub: not tried, MODEL_ALLOW_DOWNLOAD is false")
    raise ModelNotFound(
        f"no model {settings.model_name} found. Looked in:\n" + "\n".join(looked) + "\n"
        "Fix: run `make model` (or python builder/fetch_model.py) to build it, set MODEL_PATH "
        "to a model directory, or set MODEL_ALLOW_DOWNLOAD=true to download it at startup."
    )


def _download(settings: ModelSettings) -> Path:
    """Download safetensors weights and tokenizer files into the HF cache (opt-in only)."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        settings.model_name,
        revision=settings.model_revision,
        cache_dir=str(settings.hf_cache),
        token=settings.hf_token,
        allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model"],
    )
    problem = check_model_dir(Path(path))
    if problem:
        raise ModelNotFound(f"downloaded {settings.model_name}, but it {problem}")
    return Path(path)


# ----------------------------------------------------------------------------------------------
# What the directory holds, and which task serves it
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFiles:
    """A model directory and its config: what a task's detection rule (``serves``) reads."""

    source: ModelSource
    config: PretrainedConfig

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(getattr(self.config, "architectures", None) or ())

    def has(self, name: str) -> bool:
        """True when the directory holds ``name`` (a file or a folder)."""
        return (self.path / name).exists()

    @property
    def kinds(self) -> tuple[str, ...]:
        """The pipeline tasks the model can serve, its default first (``serving.detect``)."""
        files = [name for name in ("modules.json",) if self.has(name)]
        return model_kinds(self.config, files)


def read_model_files(source: ModelSource) -> ModelFiles:
    """The config of the model in ``source``; quantized checkpoints are refused."""
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - one startup line, never a traceback
        raise ModelNotFound(f"{source.path}/config.json could not be read "
                            f"({_first_line(exc)})") from None
    if getattr(config, "quantization_config", None):
        raise ModelNotFound(f"{source.path} holds a quantized checkpoint; serve full-precision "
                            "safetensors (builder/fetch_model.py converts GGUF)")
    return ModelFiles(source, config)


def pick_task(model: ModelFiles, setting: str, tasks: Mapping[str, type[Task]]) -> type[Task]:
    """The task for ``model``, whatever the registry's order.

    The model's kinds come from its config (``serving.detect``: transformers' own auto-class
    tables), its default first. ``WORKER_TASK=auto`` takes the task that serves the default kind
    (``Task.pipeline_tasks``), or whose own ``serves`` rule claims the model; ``WORKER_TASK``
    names a task, or a kind, to pick another fit. A task's own rule beats a kind. A model no
    task fits, a forced task that does not fit it, or two tasks that both claim it (two rules,
    or two kinds) stop the worker with one line."""
    kinds = model.kinds
    arch = describe(model.config)
    if setting != "auto":
        by_kind = {kind: task for task in tasks.values() for kind in task.pipeline_tasks}
        task = tasks.get(setting) or by_kind.get(setting)
        if task is None:
            raise SettingsError(f"WORKER_TASK={setting!r} is not allowed; use one of "
                                f"auto, {', '.join(tasks)}"
                                + (f", or a kind: {', '.join(sorted(by_kind))}" if by_kind else ""))
        if task.serves(model) or (set(task.pipeline_tasks) & set(kinds)) or (
                not task.pipeline_tasks and not kinds):
            return task
        raise UnsupportedModel(
            f"WORKER_TASK={setting} cannot serve the model in {model.path} ({arch}: "
            f"{_kinds_text(kinds)}); {_fits_text(model, kinds, tasks)}")
    # A task's own rule (a fork's classifier, say) is more specific than a kind, and wins.
    claims = [task for task in tasks.values() if task.serves(model)] or [
        task for task in tasks.values() if kinds and kinds[0] in task.pipeline_tasks]
    if len(claims) == 1:
        return claims[0]
    if claims:
        names = ", ".join(task.name for task in claims)
        raise UnsupportedModel(
            f"tasks {names} all serve the model in {model.path} ({arch}); set WORKER_TASK to "
            "the one that should")
    raise UnsupportedModel(
        f"no task serves the model in {model.path} ({arch}: {_kinds_text(kinds)}); "
        f"{_fits_text(model, kinds, tasks)}")


def _kinds_text(kinds: tuple[str, ...]) -> str:
    if not kinds:
        return "a kind of model this version of transformers does not know"
    return f"read as {kinds[0]}" + (f", also {', '.join(kinds[1:])}" if kinds[1:] else "")


def _fits_text(model: ModelFiles, kinds: tuple[str, ...], tasks: Mapping[str, type[Task]]) -> str:
    """Which WORKER_TASK would serve the model, or how to add a task."""
    fits = [task.name for task in tasks.values()
            if task.serves(model) or set(task.pipeline_tasks) & set(kinds)]
    if fits:
        return f"tasks that fit it: {', '.join(fits)} (set WORKER_TASK to one)"
    return (f"no task here serves it (tasks: {', '.join(tasks)}); add one for it (README: "
            "Fork it, add a task)")


def served_name(settings: ModelSettings, source: ModelSource) -> str:
    """The name answers carry: MODEL_SERVED_NAME; for MODEL_PATH the recorded name or the
    directory's own; else MODEL_NAME."""
    if settings.served_name:
        return settings.served_name
    if source.origin != "MODEL_PATH":
        return settings.model_name
    manifest = source.path / "builder.json"
    try:
        recorded = json.loads(manifest.read_text()).get("request", {}).get("model")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded.strip():
        return recorded.strip()
    return source.path.resolve().name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Device and dtype
# ----------------------------------------------------------------------------------------------
def choose_device(setting: str) -> str:
    """``auto`` is CUDA when present, else CPU. Asking for CUDA without one fails at startup."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"MODEL_DEVICE={setting} but no CUDA device is visible; "
                            "use MODEL_DEVICE=auto or cpu, or run on a GPU worker")
    return setting


def choose_dtype(setting: str, device: str) -> torch.dtype:
    """bf16 on CUDA where supported, else fp16; fp32 on CPU (half types are slow there)."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def choose_device_map(device: str, setting: str, gpus: int) -> str | dict[str, str]:
    """transformers' ``device_map``: with MODEL_DEVICE=auto and several GPUs visible, the layers
    are spread over all of them (``"auto"`` balances them by free memory); otherwise everything
    goes to one device, also with ``MODEL_DEVICE=cuda:1`` on a machine of several."""
    if device == "cuda" and setting == "auto" and gpus > 1:
        return "auto"
    return {"": device}


def describe_placement(model: object) -> str:
    """Where the weights went, as the startup line says it: from the map transformers made."""
    used = {f"cuda:{d}" if isinstance(d, int) else str(d)
            for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(used) <= 1:
        return "one device"
    offloaded = " (layers on cpu or disk run slowly)" if used & {"cpu", "disk"} else ""
    return f"spread over {', '.join(sorted(used))}{offloaded}"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadStats:
    """What the startup line reports. Seconds, bytes."""

    import_s: float
    read_s: float
    place_s: float
    warmup_s: float
    weight_bytes: int
    device: str
    dtype: str
    peak_bytes: int
    placement: str
    task: str = "generate"
    note: str = ""                # what the task adds, e.g. which decode path it runs

    def line(self, source: ModelSource, name: str) -> str:
        gib = 1024**3
        return (f"model ready: {name} ({self.task}) from {source.origin} ({source.path}) | "
                f"import {self.import_s:.2f}s, read {self.read_s:.2f}s "
                f"({self.weight_bytes / gib:.2f} GiB), place {self.place_s:.2f}s, "
                f"warm-up {self.warmup_s:.2f}s | device {self.device} ({self.placement}), "
                f"dtype {self.dtype}, peak memory {self.peak_bytes / gib:.2f} GiB"
                + (f" | {self.note}" if self.note else ""))


@dataclass
class LoadedModel:
    """A model in memory, ready for jobs: what ``place_model`` returns and a task completes.

    ``tokenizer``, ``processor`` and ``generation_config`` are whatever the task's ``load``
    sets: a text task sets the tokenizer, an image task the image processor.
    """

    model: PreTrainedModel
    device: torch.device          # where inputs go (the first layer's device when spread)
    served_name: str
    source: ModelSource
    stats: LoadStats
    task: str = "generate"        # the name of the tasks/ module that serves it
    tokenizer: Any = None
    processor: Any = None
    generation_config: GenerationConfig | None = None


def read_weight_files(directory: Path) -> tuple[int, float]:
    """Read every safetensors file once, in large sequential chunks, into the page cache.

    This is the disk (or network volume) part of loading, timed on its own; nothing is kept in
    host memory. Loading then maps the cached pages instead of faulting them in one by one.
    """
    start = time.perf_counter()
    total = 0
    chunk = bytearray(16 * 1024 * 1024)
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(chunk):
                total += n
    return total, time.perf_counter() - start


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB




def place_model(model: ModelFiles, settings: ModelSettings, model_class: Any,
                **kwargs: Any) -> LoadedModel:
    """Load ``model``'s safetensors with ``model_class`` (a transformers class such as
    ``AutoModelForCausalLM``) onto MODEL_DEVICE in MODEL_DTYPE: the helper every task's
    ``load`` uses. Weights go from the safetensors mmap straight onto the device (no host
    copy); with MODEL_DEVICE=auto and several GPUs the layers are spread over them. ``kwargs``
    go to ``from_pretrained``. Raises ModelNotFound with one line when the weights do not load.
    """
    mapping = getattr(model_class, "_model_mapping", None)     # an Auto class: check first
    if mapping is not None and type(model.config) not in mapping:
        raise UnsupportedModel(f"{model_class.__name__} does not load "
                               f"{type(model.config).__name__} models")
    device = choose_device(settings.device)
    dtype = choose_dtype(settings.dtype, device)
    weight_bytes, read_s = read_weight_files(model.path)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    device_map = choose_device_map(device, settings.device, gpus)
    start = time.perf_counter()
    try:
        loaded = model_class.from_pretrained(
            model.path, dtype=dtype, device_map=device_map, use_safetensors=True,
            trust_remote_code=False, local_files_only=True, **kwargs)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ModelNotFound(f"the model in {model.path} does not fit in {device} memory; "
                                "use a larger GPU or a smaller MODEL_DTYPE") from None
        raise ModelNotFound(f"the weights in {model.path} could not be loaded "
                            f"({_first_line(exc)}); rebuild them with `make model` "
                            "(builder/fetch_model.py --force)") from exc
    loaded.eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    place_s = time.perf_counter() - start
    first_param = next(loaded.parameters())
    return LoadedModel(
        model=loaded,
        device=first_param.device,
        served_name=served_name(settings, model.source),
        source=model.source,
        stats=LoadStats(
            import_s=IMPORT_SECONDS, read_s=read_s, place_s=place_s, warmup_s=0.0,
            weight_bytes=weight_bytes, device=str(first_param.device),
            dtype=str(first_param.dtype).removeprefix("torch."), peak_bytes=0,
            placement=describe_placement(loaded)),
    )


def load_task(settings: ModelSettings, worker_settings: WorkerSettings,
              tasks: Mapping[str, type[Task]], warmup: bool | None = None,
              env: Mapping[str, str] | None = None) -> Task:
    """Find the model, pick its task, load and warm it up on the device thread, and log one
    startup line. ``env`` is where the task's own settings are read (default: os.environ).
    Call once per worker. Raises WorkerError (one line, no traceback)."""
    return DEVICE_THREAD.submit(_load_task, settings, worker_settings, tasks, warmup,
                                env).result()


def _load_task(settings: ModelSettings, worker_settings: WorkerSettings,
               tasks: Mapping[str, type[Task]], warmup: bool | None,
               env: Mapping[str, str] | None = None) -> Task:
    model = read_model_files(resolve_model_source(settings))
    task_class = pick_task(model, settings.task, tasks)
    try:
        loaded = task_class.load(model, settings)
        loaded.task = task_class.name
        loaded.stats.task = task_class.name
        task = task_class(loaded, worker_settings, env)
        if settings.warmup if warmup is None else warmup:
            start = time.perf_counter()
            task.warm_up()
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            loaded.stats.warmup_s = time.perf_counter() - start
    except UnsupportedModel as exc:
        raise _cannot_load(task_class, model, str(exc)) from None
    except (ModelNotFound, SettingsError):
        raise
    except Exception as exc:  # noqa: BLE001 - a model the task cannot load: one line
        log.debug("loading %s failed", model.path, exc_info=True)
        raise _cannot_load(task_class, model, _first_line(exc)) from None
    loaded.stats.peak_bytes = _peak_bytes(str(loaded.device))
    log.info(loaded.stats.line(model.source, loaded.served_name))
    return task


def _cannot_load(task_class: type[Task], model: ModelFiles, reason: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"the {task_class.name} task could not load the model in {model.path} "
        f"({', '.join(model.architectures) or 'no architectures'}: {reason}); set WORKER_TASK "
        "to a task that serves it, or add one (README: Fork it, add a task)")


def load_model(settings: ModelSettings, warmup: bool | None = None,
               tasks: Mapping[str, type[Task]] | None = None) -> LoadedModel:
    """``load_task``'s model, for code that drives the model without a worker (benchmarks).

    The task's settings come from the environment, as a worker's do (WORKER_DECODE, its batch
    size and compile cache decide the engine the warm-up compiles)."""
    if tasks is None:
        from tasks import TASKS
        tasks = TASKS
    worker_settings = WorkerSettings.from_env()
    return load_task(settings, worker_settings, tasks, warmup).loaded

"""Where a model's weights go: device, dtype, placement, and the types of a model in memory.

Owns ``place_model``, the helper every task's ``load`` uses to put safetensors weights onto
MODEL_DEVICE in MODEL_DTYPE (spread over several GPUs with MODEL_DEVICE=auto), and the types the
serving code passes around: ``ModelSource`` (a directory and how it was found), ``ModelFiles``
(it and its config, what a task's ``serves`` rule reads), ``LoadedModel`` and ``LoadStats``
(the startup line). Where the weights come from is the forker's policy (``model_loader.py``),
which returns a ``ModelFiles``; which task serves it and the load itself are ``loading.py``.

Only safetensors weights are loaded (pickle checkpoints run code on load) and remote code is
never trusted. Never imports runpod or boto3: the GPU path runs on a machine with only torch
and transformers.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving import patches

_t_import = time.perf_counter()
patches.import_accelerate_without_boto3()   # imports torch
import torch  # noqa: E402
import transformers  # noqa: E402, F401 - timed here: IMPORT_SECONDS covers it
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from serving.config import ModelSettings  # noqa: E402
from serving.detect import model_kinds  # noqa: E402
from serving.device import is_out_of_memory  # noqa: E402
from serving.errors import ModelNotFound, SettingsError, UnsupportedModel  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - _t_import
hf_logging.disable_progress_bar()   # one startup line instead of per-tensor progress bars


@dataclass(frozen=True)
class ModelSource:
    """A directory that holds a loadable model, how it was found, and the name it answers as
    (``model`` in answers, ``/v1/models``, the startup line; the directory's name if unset)."""

    path: Path
    origin: str          # "MODEL_PATH" | "baked" | "runpod-cache" | "hf-cache" | "hub-download"
    served_name: str = ""


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


def peak_bytes(device: str) -> int:
    """The most memory the process (CPU) or any visible GPU has held so far."""
    if device.startswith("cuda"):
        return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def place_model(model: ModelFiles, settings: ModelSettings, model_class: Any,
                **kwargs: Any) -> LoadedModel:
    """Load ``model``'s safetensors with ``model_class`` (a transformers class such as
    ``AutoModelForCausalLM``) onto MODEL_DEVICE in MODEL_DTYPE: the helper every task's
    ``load`` uses. Weights go from the safetensors mmap straight onto the device (no host copy);
    with MODEL_DEVICE=auto and several GPUs the layers are spread over them. ``kwargs`` go to
    ``from_pretrained``. Raises ModelNotFound with one line when the weights do not load.
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
                            f"({first_line(exc)}); rebuild them with `make model` "
                            "(builder/fetch_model.py --force)") from exc
    loaded.eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    place_s = time.perf_counter() - start
    first_param = next(loaded.parameters())
    return LoadedModel(
        model=loaded,
        device=first_param.device,
        served_name=model.source.served_name or model.path.resolve().name,
        source=model.source,
        stats=LoadStats(
            import_s=IMPORT_SECONDS, read_s=read_s, place_s=place_s, warmup_s=0.0,
            weight_bytes=weight_bytes, device=str(first_param.device),
            dtype=str(first_param.dtype).removeprefix("torch."), peak_bytes=0,
            placement=describe_placement(loaded)),
    )


def first_line(exc: BaseException) -> str:
    """An exception as one short line, for a startup error."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__

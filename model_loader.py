"""Weights, device and dtype: find the model, load it once onto the device, warm it up.

Owns where weights come from and how they are placed. Never imports runpod or boto3, so the GPU
path can be exercised on a machine that has only torch and transformers.

Where the model is looked for, in this order (the first hit wins)::

    1. MODEL_PATH                      an explicit directory; when set, nothing else is searched
    2. MODEL_BAKED_DIR                 what builder/fetch_model.py left (baked into the image)
    3. RUNPOD_HF_CACHE                 RunPod cached models, Hugging Face cache layout
    4. HF_HUB_CACHE                    a Hugging Face cache, e.g. on a network volume
    5. the Hub, only with MODEL_ALLOW_DOWNLOAD=true

Which task the model serves (``WORKER_TASK=auto``) is read from the directory: a
sentence-transformers layout (``modules.json``, ``1_Pooling/``) or architectures without a
language-model head (``BertModel``) are embedding models, loaded with ``AutoModel``; causal
language models are loaded with ``AutoModelForCausalLM``. Only safetensors weights are loaded
(pickle checkpoints run code on load) and remote code is never trusted. When nothing is found,
``ModelNotFound`` lists every place and how to fix it.
"""

from __future__ import annotations

import gc
import json
import logging
import resource
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_t_import = time.perf_counter()
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from config import ModelSettings  # noqa: E402
from errors import ModelNotFound, SettingsError  # noqa: E402

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
# Which task: generate (causal LM) or embed (an encoder, pooled)
# ----------------------------------------------------------------------------------------------
_LM_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def detect_task(directory: Path, config: object, setting: str = "auto") -> str:
    """``generate`` or ``embed``: the setting when explicit, else what the directory holds.

    A sentence-transformers layout means embed; architectures that all lack a language-model
    head (``BertModel``, ``XLMRobertaModel``) mean embed; anything with one means generate.
    """
    if setting != "auto":
        return setting
    if (directory / "modules.json").is_file() or (directory / "1_Pooling").is_dir():
        return "embed"
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(_LM_HEAD_SUFFIXES) for a in architectures):
        return "embed"
    return "generate"


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

    def line(self, source: ModelSource, name: str) -> str:
        gib = 1024**3
        return (f"model ready: {name} ({self.task}) from {source.origin} ({source.path}) | "
                f"import {self.import_s:.2f}s, read {self.read_s:.2f}s "
                f"({self.weight_bytes / gib:.2f} GiB), place {self.place_s:.2f}s, "
                f"warm-up {self.warmup_s:.2f}s | device {self.device} ({self.placement}), "
                f"dtype {self.dtype}, peak memory {self.peak_bytes / gib:.2f} GiB")


@dataclass
class LoadedModel:
    """A model in memory, ready for jobs: the object tasks receive."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    generation_config: GenerationConfig
    device: torch.device          # where inputs go (the first layer's device when spread)
    served_name: str
    source: ModelSource
    stats: LoadStats
    task: str = "generate"        # "generate" | "embed": which tasks/ module serves it


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


DEFAULT_MODEL_CLASSES = {"generate": "AutoModelForCausalLM", "embed": "AutoModel"}


# Every computation on the model runs on this one thread: loading, warm-up, every batch. Each
# thread that calls torch gets its own OpenMP pool, and two pools on the same cores slow each
# other down for good (measured on 2 cores: an 8-row decode took 5.6 s instead of 4.6 s once
# a second thread had run torch).
DEVICE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")


def load_model(settings: ModelSettings, warmup: bool | None = None,
               model_classes: Mapping[str, str] | None = None) -> LoadedModel:
    """Find, load and warm up the model on the device thread; log one startup line."""
    return DEVICE_THREAD.submit(_load_model, settings, warmup, model_classes).result()


def _load_model(settings: ModelSettings, warmup: bool | None = None,
                model_classes: Mapping[str, str] | None = None) -> LoadedModel:
    """Find, load and warm up the model; log one startup line. Call once per worker.

    ``model_classes`` maps each task name to the transformers Auto class that loads its models
    (``tasks.TASKS`` declares them); the task is ``settings.task`` or, for ``auto``, detected.
    """
    classes = dict(model_classes or DEFAULT_MODEL_CLASSES)
    if settings.task != "auto" and settings.task not in classes:
        raise SettingsError(f"WORKER_TASK={settings.task!r} is not allowed; use one of "
                            f"auto, {', '.join(classes)}")
    source = resolve_model_source(settings)
    device = choose_device(settings.device)
    dtype = choose_dtype(settings.dtype, device)

    config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        raise ModelNotFound(f"{source.path} holds a quantized checkpoint; serve full-precision "
                            "safetensors (builder/fetch_model.py converts GGUF)")

    task = detect_task(source.path, config, settings.task)
    weight_bytes, read_s = read_weight_files(source.path)

    # Weights are read from the safetensors mmap straight onto the device: no host copy.
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    device_map = choose_device_map(device, settings.device, gpus)
    start = time.perf_counter()
    model_class = getattr(transformers, classes[task])
    try:
        model = model_class.from_pretrained(
            source.path,
            dtype=dtype,
            device_map=device_map,
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=True,
        )
    except Exception as exc:
        if is_out_of_memory(exc):
            raise ModelNotFound(f"the model in {source.path} does not fit in {device} memory; "
                                "use a larger GPU or a smaller MODEL_DTYPE") from None
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelNotFound(f"the weights in {source.path} could not be loaded ({reason}); "
                            "rebuild them with `make model` (builder/fetch_model.py --force)"
                            ) from exc
    model.eval()
    placement = describe_placement(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    place_s = time.perf_counter() - start

    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only batches pad on the left; encoders on the right (absolute positions).
    tokenizer.padding_side = "left" if task == "generate" else "right"
    try:
        gen_config = GenerationConfig.from_pretrained(source.path)
    except OSError:
        gen_config = GenerationConfig.from_model_config(config)

    first_param = next(model.parameters())
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        generation_config=gen_config,
        device=first_param.device,
        served_name=settings.served_name,
        source=source,
        task=task,
        stats=LoadStats(
            import_s=IMPORT_SECONDS, read_s=read_s, place_s=place_s, warmup_s=0.0,
            weight_bytes=weight_bytes, device=str(first_param.device),
            dtype=str(first_param.dtype).removeprefix("torch."), peak_bytes=0,
            placement=placement, task=task,
        ),
    )
    if settings.warmup if warmup is None else warmup:
        loaded.stats.warmup_s = warm_up(loaded)
    loaded.stats.peak_bytes = _peak_bytes(device)
    log.info(loaded.stats.line(source, settings.served_name))
    return loaded


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the device (or host allocator) running out of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def is_device_fault(exc: BaseException) -> bool:
    """True for a CUDA error that leaves the device unusable for every later job."""
    if is_out_of_memory(exc):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(marker in text for marker in (
        "CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS",
        "cuDNN error", "NCCL error"))


def check_device(loaded: LoadedModel) -> None:
    """A tiny computation on the model's device (on the device thread); raises if unusable."""
    DEVICE_THREAD.submit(_check_device, loaded).result()


def _check_device(loaded: LoadedModel) -> None:
    x = torch.ones((8, 8), device=loaded.device)
    if float((x @ x).sum().item()) != 512.0:
        raise RuntimeError(f"the device {loaded.device} computed a wrong result")
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def release_memory() -> None:
    """Give cached blocks back after a failure, so the next job starts from a clean pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def warm_up(loaded: LoadedModel) -> float:
    """One short greedy generation (or one forward pass of an embedding model) so the first
    job pays no kernel or allocator start-up."""
    start = time.perf_counter()
    inputs = loaded.tokenizer("Hello", return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        if loaded.task == "generate":
            loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False,
                                  pad_token_id=loaded.tokenizer.pad_token_id)
        else:
            loaded.model(**inputs)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start

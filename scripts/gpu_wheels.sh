#!/usr/bin/env bash
# Download the wheels an offline GPU machine needs to run `make gpu-check` with our pins:
#   bash scripts/gpu_wheels.sh [DIR]        (default .whl/), then on the GPU machine
#   GPU_CHECK_WHEELS=DIR make gpu-check
# DIR also gets default-model/: the default model's config and tokenizer files (about 3.5 MB,
# no weights; from models/default, or MODEL_PATH), from which gpu-check makes its random-weight models on a machine without
# models/. `bash scripts/gpu_wheels.sh DIR --model-files-only` writes only that folder.
#
# For Python 3.12 on x86_64 Linux (manylinux), one version of each, no dependency resolution
# (--no-deps): the list below is what our pins need beyond what such a machine already has
# (torch, transformers, accelerate, safetensors, tokenizers, huggingface_hub, aiohttp, httpx,
# uvloop, jinja2, pillow and their own dependencies, hf-xet among them, which offline is never
# imported). It is our transformers, tokenizers and
# huggingface_hub at their pins, and the import needs of the worker (pydantic), its worker loop
# (runpod, boto3) and the peer benchmark (transformers serve: fastapi, uvicorn, openai). The
# runpod SDK declares more for its command line tools (inquirerpy, watchdog, ...), which the
# worker never imports; they are left out to keep the folder small (paramiko is in: the SDK's
# serverless package imports it).
# Versions of packages requirements*.txt pins are checked against those pins; the rest are the
# versions the tests ran with. After downloading, every wheel's Requires-Dist is listed that
# neither the folder nor that machine provides (informational: optional or CLI-only ones).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}

MODEL=${MODEL_PATH:-models/default}
if [ ! -f "$MODEL/config.json" ]; then
  echo "gpu_wheels: no model in $MODEL: run make model (or set MODEL_PATH)" >&2
  exit 1
fi
mkdir -p "$DEST/default-model"
find "$MODEL" -maxdepth 1 -type f ! -name "*.safetensors" ! -name "*.safetensors.index.json" \
  -exec cp {} "$DEST/default-model/" \;
echo "the default model's config and tokenizer: $(ls "$DEST/default-model" | xargs)"
[ "${2:-}" = "--model-files-only" ] && exit 0
WHEELS=(
  # ours over the machine's
  transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0
  # huggingface_hub 2.x and transformers' CLI
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 typer==0.29.2 click==8.5.1
  shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
  annotated-doc==0.0.7
  # the worker: pydantic
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  # the worker loop: runpod and what it imports, boto3
  runpod==1.12.0 aiohttp-retry==2.9.1 backoff==2.2.1 colorama==0.4.6 py-cpuinfo==9.0.0
  requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3 tomli==2.5.0 tomlkit==0.15.2
  tqdm-loggable==0.4.1 prettytable==3.18.0 wcwidth==0.9.4
  # runpod.serverless imports its command line's ssh helpers, and so paramiko
  paramiko==5.1.0 cryptography==50.0.2 bcrypt==5.0.0 pynacl==1.6.2 invoke==3.0.3 cffi==2.1.1
  pycparser==3.12
  boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 python-dateutil==2.9.0.post0
  six==1.17.0
  # the peer: transformers serve
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 openai==3.57.0 jiter==0.19.0
  sniffio==1.3.1 anyio==4.16.0 opentelemetry-api==1.45.2
  # the GPU tests' runner
  pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1
)
# What such a GPU machine has (and with it, their dependencies): not downloaded.
MACHINE="torch accelerate numpy packaging pyyaml regex tqdm filelock fsspec jinja2 markupsafe
  pillow aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna
  httpx httpcore certifi uvloop psutil sympy networkx setuptools triton mpmath hf-xet"

# Pins in requirements*.txt win: a wheel here at another version is a mistake.
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  pinned=$(grep -hiE "^${name//[-_]/[-_]}==" requirements.txt requirements-dev.txt | head -1 || true)
  if [ -n "$pinned" ] && [ "${pinned,,}" != "${spec,,}" ]; then
    echo "gpu_wheels: $spec, but requirements pin $pinned" >&2
    exit 1
  fi
done

mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "${WHEELS[@]}"

"$PY" - "$DEST" "$MACHINE" "${WHEELS[@]}" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
from email.parser import Parser
from packaging.requirements import Requirement

dest, machine, specs = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wanted = {norm(s.split("==")[0]) for s in specs}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
have, total, extra = {}, 0, []
for wheel in sorted(dest.glob("*.whl")):
    name = norm(wheel.name.split("-")[0])
    if name not in wanted:
        extra.append(wheel.name)
        continue
    have[name] = wheel
for wheel in have.values():
    total += wheel.stat().st_size
provided = set(have) | {norm(m) for m in machine}
unmet = {}
for name, wheel in sorted(have.items()):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(z.read(meta).decode())
    for line in headers.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        if norm(req.name) not in provided:
            unmet.setdefault(norm(req.name), []).append(name)
missing = sorted(wanted - set(have))
big = sorted(have.values(), key=lambda w: -w.stat().st_size)[:5]
print(f"{len(have)} wheels, {total / 2**20:.1f} MiB in {dest}; largest: "
      + ", ".join(f"{w.name.split('-')[0]} {w.stat().st_size / 2**20:.1f}" for w in big))
if extra:
    print("not in the list (left from another run?): " + ", ".join(extra))
if unmet:
    print("declared but neither here nor on the machine (never imported by what gpu-check runs):")
    for req, by in sorted(unmet.items()):
        print(f"  {req} (for {', '.join(by)})")
if missing:
    sys.exit("missing: " + ", ".join(missing))
PYEOF

"""A cold start imports only what its path needs, in fresh processes as a worker starts.

Measured by what a process holds in ``sys.modules`` after the work, never by time: the OpenAI
module only for an OpenAI job, the runpod SDK only for the worker loop, and the SDK's import
starts no CPU-probe process. (boto3 still loads with ``storage``: its connection guard subclasses
botocore's connection classes at import.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import PROJECT_ROOT

WATCHED = ("runpod", "serving.openai_compat", "cpuinfo")


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter in the project root; its last line is JSON."""
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADED = ("sorted({m for m in sys.modules if m in " + repr(WATCHED)
          + " or m.split('.')[0] in " + repr(WATCHED) + "})")


@pytest.mark.slow
def test_a_test_mode_job_imports_neither_the_sdk_nor_the_openai_module(default_model_dir):
    """``python -X importtime`` lists every module the process imported, as it imports it."""
    job = json.dumps({"input": {"prompt": "Hello", "max_new_tokens": 1}})
    # clean_env has taken every BUCKET_* and RUNPOD_* setting out of this environment
    done = subprocess.run([sys.executable, "-X", "importtime", "handler.py", "--test_input", job],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MODEL_PATH": str(default_model_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["output"][0]["text"]
    names = {line.rsplit("|", 1)[-1].strip()
             for line in done.stderr.splitlines() if line.startswith("import time:")}
    imported = names | {name.split(".")[0] for name in names}
    assert "torch" in imported                     # the report is there
    assert sorted(imported & set(WATCHED)) == [], "imported on the test-mode path"


@pytest.mark.slow
def test_the_openai_module_loads_with_the_first_openai_job(
        default_model_dir: Path):
    code = f"""
import asyncio, json, sys
from serving import worker
w = worker.build_worker({{"MODEL_PATH": {str(default_model_dir)!r}}})
seen = {{}}

async def jobs():
    [a async for a in w.handle({{"id": "a", "input": {{"prompt": "Hi", "max_new_tokens": 1}}}})]
    seen["plain job"] = {LOADED}
    models = [a async for a in w.handle({{"id": "b", "input": {{"openai_route": "/v1/models"}}}})]
    assert models[0]["object"] == "list", models
    seen["openai job"] = {LOADED}

asyncio.run(jobs())
print(json.dumps(seen))
"""
    seen = _run(code)
    assert seen["plain job"] == []
    assert seen["openai job"] == ["serving.openai_compat"]


def test_the_sdk_imports_without_starting_a_cpu_probe_process():
    """runpod's debugger module runs py-cpuinfo's probe, a second Python, at import."""
    code = """
import json, sys
started = []
sys.addaudithook(lambda event, args: event == "subprocess.Popen" and started.append(
    [str(a) for a in args[1]]))
from serving import sdk
sdk.import_sdk()
import cpuinfo
from runpod.serverless.utils import rp_debugger
print(json.dumps({"started": started, "processor": rp_debugger.PROCESSOR,
                  "probe_restored": cpuinfo.get_cpu_info is not sdk.cpu_name}))
"""
    seen = _run(code)
    pythons = [args for args in seen["started"] if args and "python" in Path(args[0]).name]
    assert pythons == [], f"a Python process was started by the import: {pythons}"
    assert seen["processor"] == sdk_cpu_name()
    assert seen["probe_restored"]


def sdk_cpu_name() -> str:
    from serving import sdk
    return sdk.cpu_name()["brand_raw"]

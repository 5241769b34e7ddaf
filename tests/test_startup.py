"""A cold start imports only what its path needs, in fresh processes as a worker starts.

Measured by what a process holds in ``sys.modules`` after the work, never by time: boto3 only
with storage, the OpenAI module only for an OpenAI job, the runpod SDK only for the worker loop,
and the SDK's import starts no CPU-probe process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import PROJECT_ROOT

WATCHED = ("boto3", "botocore", "s3transfer", "runpod", "openai_compat", "cpuinfo")


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter in the project root; its last line is JSON."""
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADED = ("sorted({m.split('.')[0] for m in sys.modules} & set(" + repr(WATCHED) + "))")


@pytest.mark.slow
def test_a_test_mode_job_without_storage_imports_neither_boto3_nor_the_sdk(default_model_dir):
    """``python -X importtime`` lists every module the process imported, as it imports it."""
    job = json.dumps({"input": {"prompt": "Hello", "max_new_tokens": 1}})
    # clean_env has taken every BUCKET_* and RUNPOD_* setting out of this environment
    done = subprocess.run([sys.executable, "-X", "importtime", "handler.py", "--test_input", job],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MODEL_PATH": str(default_model_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["output"][0]["text"]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported                     # the report is there
    assert sorted(imported & set(WATCHED)) == [], "imported on the storage-free test path"


@pytest.mark.slow
def test_the_openai_module_loads_with_the_first_openai_job_and_boto3_with_a_bucket(
        default_model_dir: Path):
    code = f"""
import asyncio, json, sys
import worker
w = worker.build_worker({{"MODEL_PATH": {str(default_model_dir)!r}}})
seen = {{}}

async def jobs():
    [a async for a in w.handle({{"id": "a", "input": {{"prompt": "Hi", "max_new_tokens": 1}}}})]
    seen["plain job"] = {LOADED}
    models = [a async for a in w.handle({{"id": "b", "input": {{"openai_route": "/v1/models"}}}})]
    assert models[0]["object"] == "list", models
    seen["openai job"] = {LOADED}

asyncio.run(jobs())
from config import StorageSettings
from storage import storage_from_settings
storage_from_settings(StorageSettings.from_env({{
    "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9", "BUCKET_ACCESS_KEY_ID": "id",
    "BUCKET_SECRET_ACCESS_KEY": "secret-value", "BUCKET_NAME": "bucket"}}))
seen["bucket"] = {LOADED}
print(json.dumps(seen))
"""
    seen = _run(code)
    assert seen["plain job"] == []
    assert seen["openai job"] == ["openai_compat"]
    assert {"boto3", "botocore"} <= set(seen["bucket"])


def test_the_sdk_imports_without_starting_a_cpu_probe_process():
    """runpod's debugger module runs py-cpuinfo's probe, a second Python, at import."""
    code = """
import json, sys
started = []
sys.addaudithook(lambda event, args: event == "subprocess.Popen" and started.append(
    [str(a) for a in args[1]]))
import sdk
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
    import sdk
    return sdk.cpu_name()["brand_raw"]

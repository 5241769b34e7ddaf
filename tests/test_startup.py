"""A cold start imports only what its path needs, in fresh processes as a worker starts.

Measured by what a process imported (``python -X importtime``, or ``sys.modules`` after the
work), never by time: the OpenAI module only for an OpenAI job, the runpod SDK only for the worker
loop, boto3 only when a bucket is in use, and the SDK's import starts no CPU-probe process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
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


def _test_mode(job: dict, env: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """``python -X importtime handler.py --test_input JOB``: its printed answer, and each
    module it imported with the module whose import loaded it (``""`` at the top level)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "handler.py", "--test_input",
                           json.dumps(job)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    importers = imported_by(done.stderr)
    assert "torch" in importers                    # the report is there
    return json.loads(done.stdout.strip().splitlines()[-1]), importers


def imported_by(importtime_report: str) -> dict[str, str]:
    """Each module in a ``-X importtime`` report, mapped to the module whose import loaded it.

    The report lists a module when its import ends, after the modules it loaded, which are
    indented deeper: read backwards, a module's importer is the nearest shallower line above.
    """
    rows = [line.rsplit("|", 1)[-1] for line in importtime_report.splitlines()
            if line.startswith("import time:") and not line.rstrip().endswith("package")]
    importers: dict[str, str] = {}
    open_imports: list[tuple[int, str]] = []
    for row in reversed(rows):
        depth, name = len(row) - len(row.lstrip()), row.strip()
        while open_imports and open_imports[-1][0] >= depth:
            open_imports.pop()
        importers.setdefault(name, open_imports[-1][1] if open_imports else "")
        open_imports.append((depth, name))
    return importers


def _package(module: str) -> str:
    return module.split(".")[0]


@pytest.fixture(scope="module")
def plain_test_mode(default_model_dir: Path) -> tuple[dict, dict[str, str]]:
    """A one-token test-mode job as a user runs it, with no bucket settings: clean_env has
    taken every BUCKET_* and RUNPOD_* setting out of this environment."""
    return _test_mode({"input": {"prompt": "Hello", "max_new_tokens": 1}},
                      {"MODEL_PATH": str(default_model_dir)})


@pytest.mark.slow
def test_a_test_mode_job_imports_neither_the_sdk_nor_the_openai_module(plain_test_mode):
    answer, importers = plain_test_mode
    assert answer["output"][0]["text"]
    imported = set(importers) | {_package(name) for name in importers}
    assert sorted(imported & set(WATCHED)) == [], "imported on the test-mode path"


AWS = {"boto3", "botocore", "s3transfer"}


def test_the_storage_free_modules_import_no_boto3():
    """``storage`` and the modules that hand it answers load boto3 with the first bucket only."""
    loaded = _run("import json, sys, storage, serving.delivery, serving.downloads\n"
                  "print(json.dumps(sorted(m for m in sys.modules\n"
                  f"                         if m.split('.')[0] in {sorted(AWS)!r})))")
    assert loaded == []


@pytest.mark.slow
def test_a_test_mode_job_without_a_bucket_never_imports_boto3(plain_test_mode):
    """Not our modules, nor accelerate's SageMaker wizard (serving/patches.py hides boto3 from
    it)."""
    answer, importers = plain_test_mode
    assert answer["output"][0]["usage"]["completion_tokens"] == 1
    loaders = {importer for name, importer in importers.items()
               if _package(name) in AWS and _package(importer) not in AWS}
    assert loaders == set(), f"boto3 or botocore loaded by {sorted(loaders)}"


@pytest.mark.slow
def test_a_test_mode_job_with_its_own_s3config_imports_boto3_and_stores_its_answer(
        default_model_dir: Path, s3_server):
    bucket = s3_server.make_bucket()
    job = {"input": {"prompt": "Hello", "max_new_tokens": 1, "output_mode": "link"},
           "s3Config": {"accessId": s3_server.access_key, "accessSecret": s3_server.secret_key,
                        "bucketName": bucket, "endpointUrl": s3_server.endpoint}}
    # The test server is on loopback: a job's storage there needs DOWNLOAD_ALLOW_PRIVATE.
    answer, importers = _test_mode(job, {"MODEL_PATH": str(default_model_dir),
                                         "DOWNLOAD_ALLOW_PRIVATE": "true"})
    link = answer["output"][0]["output_link"]
    assert f"/{bucket}/" in link["url"]      # printed with its signature redacted: read the key
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id=s3_server.access_key,
                          aws_secret_access_key=s3_server.secret_key)
    body = client.get_object(Bucket=bucket, Key=link["key"])["Body"].read()
    client.close()
    assert hashlib.sha256(body).hexdigest() == link["sha256"]
    assert json.loads(body)["usage"]["completion_tokens"] == 1
    assert {"boto3.s3.transfer", "botocore.config"} <= set(importers)


@pytest.mark.slow
def test_the_openai_module_loads_with_the_first_openai_job(
        default_model_dir: Path):
    code = f"""
import asyncio, json, sys
from handler import parts
from serving import worker
w = worker.build_worker(parts(), {{"MODEL_PATH": {str(default_model_dir)!r}}})
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
from serving import patches
patches.import_runpod()
import cpuinfo
from runpod.serverless.utils import rp_debugger
print(json.dumps({"started": started, "processor": rp_debugger.PROCESSOR,
                  "probe_restored": cpuinfo.get_cpu_info is not patches.cpu_name}))
"""
    seen = _run(code)
    pythons = [args for args in seen["started"] if args and "python" in Path(args[0]).name]
    assert pythons == [], f"a Python process was started by the import: {pythons}"
    assert seen["processor"] == sdk_cpu_name()
    assert seen["probe_restored"]


def sdk_cpu_name() -> str:
    from serving import patches
    return patches.cpu_name()["brand_raw"]

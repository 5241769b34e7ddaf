"""The patches of third-party internals (``serving/patches.py``): each checked against the
version it was read for, and each doing what it says on the real package."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import boto3
import botocore.config
import botocore.exceptions
import pytest

from serving import patches
from serving.config import PROJECT_ROOT


class TestVersions:
    def test_every_patched_package_is_the_version_its_patch_was_checked_against(self):
        """An upgrade fails here: re-read the patch against the new version, then update
        CHECKED_AGAINST."""
        assert patches.version_changes() == {}

    def test_a_pinned_package_is_checked_against_its_pin(self):
        pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$",
                               (PROJECT_ROOT / "requirements.txt").read_text(), re.MULTILINE))
        pinned = {name: pins[name] for name in patches.CHECKED_AGAINST if name in pins}
        assert pinned and pinned == {name: patches.CHECKED_AGAINST[name] for name in pinned}

    def test_a_changed_version_is_reported_with_both_versions(self, monkeypatch):
        monkeypatch.setitem(patches.CHECKED_AGAINST, "runpod", "0.0.1")
        assert patches.version_changes()["runpod"][0] == "0.0.1"


def _run(code: str) -> object:
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_accelerate_imports_without_boto3():
    assert _run("import json, sys\nfrom serving import patches\n"
                "patches.import_accelerate_without_boto3()\n"
                "print(json.dumps(['accelerate' in sys.modules, 'boto3' in sys.modules]))"
                ) == [True, False]


def test_the_fast_intake_replaces_the_sdks_job_scaler():
    assert _run("import json\nfrom serving import patches\nrunpod = patches.import_runpod()\n"
                "from runpod.serverless.modules import rp_scale\n"
                "installed = patches.install_intake()\n"
                "print(json.dumps([installed, rp_scale.JobScaler.__name__]))"
                ) == [True, "Intake"]


class Refused(Exception):
    pass


class _NoConnect:
    """A connection class that refuses every connection: proof the client's pools use it."""

    note = ""

    def _new_conn(self) -> socket.socket:
        raise Refused(self.note)


def test_a_clients_connections_go_through_the_mixin():
    client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                          aws_access_key_id="k" * 8, aws_secret_access_key="s" * 8,
                          config=botocore.config.Config(retries={"max_attempts": 1}))
    try:
        assert patches.guard_botocore_pools(client, _NoConnect, {"note": "guarded"})
        with pytest.raises(botocore.exceptions.HTTPClientError) as raised:
            client.list_buckets()
        assert isinstance(raised.value.__context__, Refused), raised.value
    finally:
        client.close()


def test_an_object_without_botocores_pools_is_left_alone():
    assert patches.guard_botocore_pools(object(), _NoConnect, {}) is False


def test_a_torch_fx_trace_holds_the_lock_while_it_swaps_module_calls():
    """torch.fx swaps nn.Module's call for every thread while it traces (a module called from
    another thread then fails); with the guard, the trace holds the lock meanwhile, so a
    thread that holds it around its own module calls never meets a trace."""
    import threading

    import torch

    lock = patches.guard_fx_tracing()
    assert patches.guard_fx_tracing() is lock       # once, however often it is asked for
    inside, release = threading.Event(), threading.Event()

    class Held(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inside.set()
            release.wait(60)                        # until the checks below are done
            return x + 1

    tracing = threading.Thread(target=torch.fx.symbolic_trace, args=(Held(),))
    tracing.start()
    try:
        assert inside.wait(60)
        with pytest.raises(NameError, match="not installed as a submodule"):
            torch.nn.Linear(2, 2)(torch.ones(2))   # the hazard: this thread's call is traced
        assert not lock.acquire(blocking=False)    # the trace holds the lock
    finally:
        release.set()
        tracing.join(60)
    assert lock.acquire(blocking=False)
    lock.release()

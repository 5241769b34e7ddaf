"""Every change the worker makes to a third-party package's internals, in one place.

Each patch reaches into code that is not a public interface, so each names the version of the
package it was read and tested against (``CHECKED_AGAINST``); ``tests/test_import_rules.py``
fails when an installed version differs, so an upgrade means re-reading each patch here, not a
surprise in production::

    import_runpod()                    runpod, py-cpuinfo: ``import runpod`` without the second
                                       Python process py-cpuinfo starts to name the processor
    install_intake()                   runpod: ``serving.intake.Intake`` as the SDK's JobScaler
    import_accelerate_without_boto3()  accelerate: imported with boto3 hidden
    guard_botocore_pools(client, ...)  botocore: a client's connection pool classes replaced
    filter_output()                    the process's stdout and stderr (where the runpod SDK's
                                       logger prints) wrapped by the secret filter
    guard_fx_tracing()                 torch: every torch.fx trace holds one lock, which a
                                       thread running modules beside a compile holds too

Imports nothing but the standard library until a patch is applied. Never imports torch.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import platform
import sys
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any

# The installed version each patch was read against (runpod and accelerate as pinned in
# requirements.txt; py-cpuinfo comes with runpod, botocore with the pinned boto3).
CHECKED_AGAINST = {
    "runpod": "1.12.0",
    "py-cpuinfo": "9.0.0",
    "accelerate": "1.15.0",
    "botocore": "1.44.8",
    "torch": "2.13.0",              # the release: a build's local label (+cpu, +cu130) aside
}
UNKNOWN_CPU = "Unable to get processor info."   # what the SDK itself says when it cannot tell

log = logging.getLogger("worker.patches")


def cpu_name() -> dict[str, str]:
    """The one field of ``cpuinfo.get_cpu_info()`` the SDK reads, without a second process."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return {"brand_raw": line.split(":", 1)[1].strip()}
    except OSError:
        pass
    return {"brand_raw": platform.processor() or UNKNOWN_CPU}


def import_runpod() -> ModuleType:
    """``import runpod`` with py-cpuinfo's probe replaced by ``cpu_name`` during the import.

    runpod 1.12.0's ``serverless/utils/rp_debugger.py`` calls ``cpuinfo.get_cpu_info()`` at
    import, which runs a second Python process (1.2 s of CPU on a two-core machine, competing
    with the model load) only to name the processor in ``--rp_debugger`` output. Nothing else
    in the worker calls py-cpuinfo, and the probe is put back after the import.
    """
    if "runpod" in sys.modules:
        return sys.modules["runpod"]
    try:
        import cpuinfo
    except ImportError:          # an SDK without py-cpuinfo: nothing to avoid
        cpuinfo = None
    probe = getattr(cpuinfo, "get_cpu_info", None)
    if probe is not None:
        cpuinfo.get_cpu_info = cpu_name
    try:
        import runpod
    finally:
        if probe is not None:
            cpuinfo.get_cpu_info = probe
    return runpod


def install_intake() -> bool:
    """Make ``runpod.serverless.start`` run ``serving.intake.Intake`` (its docstring says why).

    runpod 1.12.0's ``run_worker`` looks ``rp_scale.JobScaler`` up in its module each time it
    starts the loop. On any other SDK version the SDK's own scaler runs, one warning says so,
    and this returns False.
    """
    from runpod.serverless.modules import rp_scale
    from runpod.version import __version__ as sdk_version

    if sdk_version != CHECKED_AGAINST["runpod"]:
        log.warning("runpod %s is not the version the fast intake was written for (%s): the "
                    "SDK's own intake runs (set WORKER_INTAKE=sdk to silence this)",
                    sdk_version, CHECKED_AGAINST["runpod"])
        return False
    from serving.intake import Intake

    rp_scale.JobScaler = Intake
    return True


def import_accelerate_without_boto3() -> None:
    """Import accelerate (transformers' loading code imports it) without boto3.

    accelerate 1.15.0 imports boto3 whenever it is installed, for its SageMaker config wizard,
    which a worker never runs: about 0.2 s of every cold start, and boto3 is for storage, which
    loads it with the first bucket. Hidden for that one import: a None entry in sys.modules
    makes ``importlib.util.find_spec`` answer None, so accelerate takes boto3 for absent.
    """
    if "accelerate" in sys.modules or "boto3" in sys.modules:
        return
    sys.modules["boto3"] = None  # type: ignore[assignment]
    try:
        import accelerate  # noqa: F401
    except ImportError:
        pass              # transformers loads models without it on one device
    finally:
        del sys.modules["boto3"]


def guard_botocore_pools(client: Any, connection_mixin: type, attrs: Mapping[str, Any]) -> bool:
    """Make every connection a boto3 ``client`` opens an instance of ``connection_mixin`` mixed
    into botocore's own connection class, with ``attrs`` as class attributes.

    botocore 1.44.8 has no public hook at the connection level: its ``URLLib3Session`` keeps the
    pool classes in ``_pool_classes_by_scheme`` and hands them to its urllib3 ``PoolManager``;
    both are replaced before the first request. False, and nothing changed, when this botocore
    does not hold them there: the caller must then refuse to connect rather than go unguarded.
    """
    from botocore.awsrequest import (
        AWSHTTPConnection,
        AWSHTTPConnectionPool,
        AWSHTTPSConnection,
        AWSHTTPSConnectionPool,
    )
    from botocore.httpsession import URLLib3Session
    from urllib3 import PoolManager

    http = getattr(getattr(client, "_endpoint", None), "http_session", None)
    manager = getattr(http, "_manager", None)
    if not isinstance(http, URLLib3Session) or not isinstance(manager, PoolManager) or \
            not hasattr(http, "_pool_classes_by_scheme"):
        return False
    name = connection_mixin.__name__
    pools = {
        "http": type(f"{name}HTTPConnectionPool", (AWSHTTPConnectionPool,), {
            "ConnectionCls": type(f"{name}HTTPConnection",
                                  (connection_mixin, AWSHTTPConnection), dict(attrs))}),
        "https": type(f"{name}HTTPSConnectionPool", (AWSHTTPSConnectionPool,), {
            "ConnectionCls": type(f"{name}HTTPSConnection",
                                  (connection_mixin, AWSHTTPSConnection), dict(attrs))}),
    }
    http._pool_classes_by_scheme = pools
    manager.pool_classes_by_scheme = pools
    return True


def filter_output(env: Mapping[str, str] | None = None) -> None:
    """Send this process's stdout and stderr through the secret filter (``serving.redaction``).

    runpod 1.12.0's logger (``serverless/modules/rp_logger.py``) writes with ``print``, which
    looks ``sys.stdout`` up at each call, so replacing the stream reaches every line it prints.
    Call once, before anything logs.
    """
    from serving import redaction

    redaction.install(env)


_FX_TRACING = threading.RLock()


def guard_fx_tracing() -> threading.RLock:
    """Make every torch.fx trace hold one lock, and return it: a thread that runs modules while
    another thread compiles holds it around each call.

    torch 2.13.0's ``torch.fx.Tracer.trace`` (``fx/_symbolic_trace.py``) replaces
    ``torch.nn.Module.__call__`` and ``__getattr__`` on the class while it traces, for every
    thread, not its own: a module called meanwhile on another thread goes through the tracer
    and fails (``NameError: module is not installed as a submodule``). ``torch.compile`` traces
    so (AOTAutograd's ``make_fx``, inductor's lowering), and ``serving/graphs.py`` decodes
    eagerly on the device thread while its step compiles in another. With the lock a trace
    waits for the forward pass in progress, and the next pass for the trace. Idempotent.
    """
    from torch.fx import _symbolic_trace

    tracer = _symbolic_trace.Tracer
    if not getattr(tracer.trace, "_holds_worker_lock", False):
        original = tracer.trace

        @functools.wraps(original)
        def trace(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _FX_TRACING:
                return original(self, *args, **kwargs)

        trace._holds_worker_lock = True  # type: ignore[attr-defined]
        tracer.trace = trace  # type: ignore[method-assign]
    return _FX_TRACING


def version_changes() -> dict[str, tuple[str, str | None]]:
    """Each patched package whose installed version is not the one its patch was checked
    against: ``{package: (checked, installed or None)}``."""
    changed: dict[str, tuple[str, str | None]] = {}
    for package, checked in CHECKED_AGAINST.items():
        try:
            installed: str | None = importlib.metadata.version(package).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != checked:
            changed[package] = (checked, installed)
    return changed

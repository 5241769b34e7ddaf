"""The runpod SDK, imported lean: without its CPU-probe process, and off the start-up path.

Owns how ``handler.py`` imports the SDK (``import runpod``: about 1 s of Python on the worker-loop
path; the test mode never imports it):

- ``import_sdk()`` imports it without the CPU probe: ``runpod.serverless.utils.rp_debugger``
  calls py-cpuinfo's ``get_cpu_info()`` at import, which runs a second Python process (1.2 s
  of CPU on a two-core machine, competing with the model load) only to name the processor in
  ``--rp_debugger`` output. For that import the name is read from /proc/cpuinfo instead.
- ``BackgroundImport`` runs it in a thread, so it overlaps the model load (file reads and
  device work, which leave the interpreter free); ``result()`` waits for it.

Imports nothing but the standard library until ``import_sdk`` is called. Never imports torch.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import threading
from types import ModuleType

UNKNOWN_CPU = "Unable to get processor info."   # what the SDK itself says when it cannot tell


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


def import_sdk() -> ModuleType:
    """``import runpod``, with py-cpuinfo's probe replaced by ``cpu_name`` during the import.

    Nothing else in the worker calls py-cpuinfo, and the probe is put back after, so only what
    the debugger module caches at import (the processor's name) comes from /proc/cpuinfo.
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


class BackgroundImport:
    """``import_sdk()`` in a daemon thread, started at once."""

    def __init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="import-runpod", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A failure is not lost: result() imports again in its own thread and raises it there.
        with contextlib.suppress(BaseException):
            import_sdk()

    def result(self) -> ModuleType:
        """The runpod module, once the thread is done."""
        self._thread.join()
        return import_sdk()

"""Container entry point: ``WORKER_MODE`` picks what the image runs, and nothing else does.

The Dockerfile's ``CMD`` is ``python -u start.py``; this replaces itself (``exec``) with one of::

    WORKER_MODE=serverless (default)  python -u handler.py
        the RunPod worker loop; on a laptop without RunPod's variables, one job from
        ./test_input.json, as RunPod's docs describe
    WORKER_MODE=pod                   python -u local_endpoint.py --host 0.0.0.0 \\
                                          --port WORKER_POD_PORT (8000) [--api-key KEY] \\
                                          -- python -u handler.py
        for development on a GPU pod: the same worker behind a local endpoint that speaks
        RunPod's API (/v2/local/runsync, /run, /status, /stream, ...), reachable over HTTP

``exec`` keeps the worker as PID 1's program, so RunPod's SIGTERM reaches the SDK (or the local
endpoint, which passes it on) directly. An invalid ``WORKER_MODE`` exits 1 with one line naming
the variable and its legal values, before anything is loaded.

This module never imports torch, runpod or boto3: it only chooses a command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from config import PROJECT_ROOT, LaunchSettings
from errors import SettingsError


def launch_command(settings: LaunchSettings, python: str = sys.executable) -> list[str]:
    """The command the container runs for ``settings``, paths relative to the project root."""
    worker = [python, "-u", "handler.py"]
    if settings.mode == "serverless":
        return worker
    key = ["--api-key", settings.pod_api_key] if settings.pod_api_key else []
    return [python, "-u", "local_endpoint.py", "--host", "0.0.0.0",
            "--port", str(settings.pod_port), *key, "--", *worker]


def main(env: Mapping[str, str] | None = None) -> None:
    try:
        settings = LaunchSettings.from_env(env)
    except SettingsError as err:
        print(f"start: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    command = launch_command(settings)
    os.chdir(PROJECT_ROOT)          # handler.py looks for ./test_input.json in its directory
    os.execv(command[0], command)


if __name__ == "__main__":
    main()

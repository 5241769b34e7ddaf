"""Container entry point: ``WORKER_MODE`` picks what the image runs, and nothing else does.

The Dockerfile's ``CMD`` is ``python -u -m serving.launch``; this replaces itself (``exec``)
with one of::

    WORKER_MODE=serverless            python -u handler.py
        the RunPod worker loop; on a laptop without RunPod's variables, one job from
        ./test_input.json, as RunPod's docs describe
    WORKER_MODE=pod                   python -u -m dev.local_endpoint --host 0.0.0.0 \\
                                          --port WORKER_POD_PORT (8000) \\
                                          --key-file WORKER_POD_KEY_FILE \\
                                          --read-timeout-s WORKER_POD_READ_TIMEOUT_S \\
                                          --max-connections-per-peer \\
                                              WORKER_POD_MAX_CONNECTIONS_PER_PEER \\
                                          -- python -u handler.py
        for development on a GPU pod: the same worker behind a local endpoint that speaks
        RunPod's API (/v2/local/runsync, /run, /status, /stream, ...), reachable over HTTP
    WORKER_MODE=auto (default)        pod on a RunPod pod (``RUNPOD_POD_ID`` set and no job
                                      queue, ``RUNPOD_WEBHOOK_GET_JOB``), else serverless

Pod mode is never open: the client key is ``WORKER_POD_API_KEY`` (16 characters at least, or
the container exits 1 naming the variable), or, without one, a key the
endpoint makes at start and writes to ``WORKER_POD_KEY_FILE`` (mode 0600; the log names the
file). The key goes to the endpoint in its environment (``LOCAL_ENDPOINT_API_KEY``), never on a
command line (``/proc/*/cmdline`` is readable by every user), and ``WORKER_POD_API_KEY`` is
dropped from that environment so the worker behind it never holds the key. The worker behind
the endpoint gets RunPod's job URLs from it, so it takes jobs from the endpoint and never runs
./test_input.json: the container keeps serving instead of exiting after one job (which a
restart policy would turn into a loop).

``exec`` keeps the worker as PID 1's program, so RunPod's SIGTERM reaches the SDK (or the local
endpoint, which passes it on) directly. An invalid ``WORKER_MODE`` exits 1 with one line naming
the variable and its legal values, before anything is loaded.

This module never imports torch, runpod or boto3, nor ``dev/`` (the endpoint and aiohttp, 0.2 s
that every serverless start would pay): it only chooses a command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from serving.config import (
    LOCAL_ENDPOINT_API_KEY_ENV,
    PROJECT_ROOT,
    WORKER_POD_API_KEY,
    LaunchSettings,
)
from serving.errors import SettingsError


def launch_command(settings: LaunchSettings, python: str = sys.executable) -> list[str]:
    """The command the container runs for ``settings``, paths relative to the project root.
    It never holds a key: see ``launch_env``."""
    worker = [python, "-u", "handler.py"]
    if settings.mode == "serverless":
        return worker
    return [python, "-u", "-m", "dev.local_endpoint", "--host", "0.0.0.0",
            "--port", str(settings.pod_port), "--key-file", str(settings.pod_key_file),
            "--read-timeout-s", f"{settings.pod_read_timeout_s:g}",
            "--max-connections-per-peer", str(settings.pod_max_connections_per_peer),
            "--", *worker]


def launch_env(settings: LaunchSettings, env: Mapping[str, str]) -> dict[str, str]:
    """The environment for ``launch_command``: ``env``, and in pod mode the client key moved
    from ``WORKER_POD_API_KEY`` to the endpoint's own variable (which it removes before it
    starts the worker)."""
    out = dict(env)
    if settings.mode == "pod":
        out.pop(WORKER_POD_API_KEY.name, None)
        out.pop(LOCAL_ENDPOINT_API_KEY_ENV, None)
        if settings.pod_api_key:
            out[LOCAL_ENDPOINT_API_KEY_ENV] = settings.pod_api_key
    return out


def main(env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    try:
        settings = LaunchSettings.from_env(env)
    except SettingsError as err:
        print(f"start: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    command = launch_command(settings)
    os.chdir(PROJECT_ROOT)          # handler.py looks for ./test_input.json in its directory
    os.execve(command[0], command, launch_env(settings, env))


if __name__ == "__main__":
    main()

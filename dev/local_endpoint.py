"""A local RunPod serverless endpoint: the platform edge, faked on loopback, as measured; and its
command line, which starts a worker behind it.

It speaks both sides of RunPod's queue API so that the real worker loop
(``runpod.serverless.start`` in production mode) and the SDK's real client (``runpod.Endpoint``)
meet on one machine, with nothing of RunPod's own local modes in between. Its parts::

    dev/jobs.py            the platform's job protocol: the queue, job states, and the worker
                           routes (job-take, job-take-batch, job-stop, job-done, job-stream, ping)
    dev/server.py          the HTTP server: client routes (/run, /runsync, /status, /stream,
                           /cancel, /health, /purge-queue, /openai/v1/...), the client key
                           check, header and body timeouts, connections per peer
    dev/worker_process.py  a worker process run against it, stopped as RunPod stops one
    dev/task_example.py    the example input of the task the project's worker serves
    dev/local_endpoint.py  this command line, and the names tests and benchmarks import

Faithful to production, as measured against the runpod SDK, faults included: a job-done body
over the payload limit (/run 10 MiB, /runsync 20 MiB) gets 400 and the job ends COMPLETED with
no output; a non-string ``error`` ends COMPLETED with no output; a FAILED job reports ``error``
and the rest of the answer as ``output``; cancel marks CANCELLED and reaches the worker through
job-stop. Not modelled: webhooks are passed to the worker but never called, no retries, no
queue TTL, no scaling.

Who may call what. Worker routes hand out jobs with their ``s3Config`` secrets and accept
results, so they answer only a caller that sends the worker secret: a random key made per
endpoint and handed to the worker in ``RUNPOD_AI_API_KEY`` (``worker_env``), which is what the
SDK sends as its raw ``Authorization`` header on job-take, job-done, job-stream, job-stop and
ping, as RunPod authenticates its workers. Anything else gets 401 and changes nothing (it is
not even counted as a worker). A secret rather than "loopback peers only": behind a reverse
proxy or an SSH tunnel inside the pod every caller is a loopback peer, so an address check
fails open exactly where pod mode is exposed, while a secret holds whatever the network path.
Client routes check ``api_key`` when one is set; an endpoint bound to anything but loopback
refuses to start without one, or with one shorter than 16 characters.

OpenAI-compatible routes, as RunPod's ``https://api.runpod.ai/v2/{endpoint}/openai/v1``: a
request to ``.../openai/v1/chat/completions`` (or ``completions``, ``embeddings``, ``models``)
becomes a job with ``{"openai_route": "/v1/chat/completions", "openai_input": <the body>}``,
the caller waits for it, and the job's output is the HTTP answer: the single item of the
aggregated output as JSON, or, for ``"stream": true``, the worker's streamed chunks written as
they arrive as ``text/event-stream`` (strings as they are; other chunks as ``data: <json>``
events). Faithful: the job input shape (what worker-vllm reads) and the SSE text worker-vllm
yields. Guessed (RunPod does not document it): a FAILED job answers HTTP 404/400/500 with the
OpenAI error object when the error string holds one as JSON (our workers' choice), else wraps
the error string in one; a stream that fails midway ends with a ``data: {"error": ...}`` event.

Use it from tests with ``LocalEndpoint(...).start()`` and ``WorkerProcess``, or from a shell::

    python -m dev.local_endpoint [--host 127.0.0.1] [--port 8000] [--endpoint-id local] \\
        [--key-file PATH] -- python handler.py

The CLI takes the client key from the environment (``LOCAL_ENDPOINT_API_KEY``), never from its
command line, which any user of the machine can read in ``/proc/*/cmdline``; it removes the
variable before starting the worker, which has no use for it. Without a key it stays keyless
on loopback; with ``--key-file`` it makes a random key and writes it there (mode 0600) instead,
and it refuses to listen on any other address keyless. It logs where the key is, never the key:
a log is copied to consoles, collectors and bug reports, a 0600 file is read only by whoever
could already read the container's files. Once the worker takes jobs it prints how to call the
endpoint, with an example input of the task the worker serves when the worker is this
project's ``handler.py`` (``dev/task_example.py`` asks the task, in a process of its own).

This module never imports runpod or torch: it is the platform, not the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dev.jobs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    FINAL_STATUSES,
    IN_PROGRESS,
    IN_QUEUE,
    TIMED_OUT,
    JobStatusBody,
)
from dev.server import (
    EXECUTION_TIMEOUT_S,
    MAX_CONNECTIONS_PER_PEER,
    MIN_KEY_CHARS,
    READ_TIMEOUT_S,
    RUN_LIMIT_BYTES,
    RUNSYNC_LIMIT_BYTES,
    LocalEndpoint,
    is_loopback,
)
from dev.wire import MIB
from dev.worker_process import WorkerProcess, descendants, sdk_config_key
from serving.config import LOCAL_ENDPOINT_API_KEY_ENV as API_KEY_ENV
from serving.config import PROJECT_ROOT

__all__ = [
    "API_KEY_ENV", "CANCELLED", "COMPLETED", "FAILED", "FINAL_STATUSES", "IN_PROGRESS",
    "IN_QUEUE", "TIMED_OUT", "JobStatusBody", "LocalEndpoint", "WorkerProcess", "descendants",
    "is_loopback", "main", "sdk_config_key", "usage_text", "write_key_file",
]


# -------------------------------------------------------------------------------- the CLI
class _Shutdown(Exception):
    """SIGTERM to the CLI, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _raise_shutdown(signum: int, frame: object) -> None:
    raise _Shutdown


def usage_text(endpoint: LocalEndpoint, command: Sequence[str],
               key_file: Path | None = None,
               example: Mapping[str, Any] | None = None) -> str:
    """What the CLI prints once the worker is ready: how to call the endpoint, with ``example``
    as the job input (the served task's ``example``; None: an empty input for the
    caller to fill). It names where the client key is (``key_file``, if it made one), never
    the key itself."""
    if endpoint.api_key is None:
        auth, key = "", '"local"  # any key; none is checked'
    elif key_file is not None:
        auth = f' -H "Authorization: Bearer $(cat {shlex.quote(str(key_file))})"'
        key = f'open({str(key_file)!r}).read().strip()'
    else:
        auth = " -H 'Authorization: Bearer <your key>'"
        key = '"<your key>"'
    url = f"{endpoint.base_url}/{endpoint.endpoint_id}"
    lines = [
        f"Local RunPod endpoint {endpoint.endpoint_id!r} at {endpoint.base_url}",
        f"  worker: {shlex.join(command)}" if command else "  no worker started",
    ]
    if key_file is not None:
        lines.append(f"  client key: made for this run, in {key_file} (mode 0600); "
                     "clients send it as 'Authorization: Bearer <key>'")
    elif endpoint.api_key is not None:
        lines.append("  client key: the one you set; clients send 'Authorization: Bearer <key>'")
    job_input = dict(example or {})
    if example is None:
        lines.append("  the job input is your worker's: fill in \"input\" below")
    body = json.dumps({"input": job_input})
    return "\n".join([
        *lines,
        "Call it with curl:",
        f"  curl -s -X POST {url}/runsync -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(body)}",
        "or with the runpod SDK:",
        "  import runpod",
        f"  runpod.api_key = {key}",
        f'  runpod.endpoint_url_base = "{endpoint.base_url}"',
        f'  print(runpod.Endpoint("{endpoint.endpoint_id}").run_sync({job_input!r}))',
        "Ctrl-C stops both.",
    ])


def runs_project_handler(command: Sequence[str], cwd: Path | None = None) -> bool:
    """Whether ``command`` (run in ``cwd``) runs this project's ``handler.py``: the one worker
    whose task this project can name."""
    base = cwd or Path.cwd()
    target = PROJECT_ROOT / "handler.py"
    return any(arg.endswith("handler.py") and (base / arg).resolve() == target
               for arg in command)


def task_example(env: Mapping[str, str], timeout_s: float = 120.0) -> dict[str, Any] | None:
    """The example input of the task this project's worker serves under ``env``, asked of
    ``dev/task_example.py`` in a process of its own (the tasks import torch); None when it
    cannot tell (no model found, a model no task serves), with its reason on stderr."""
    try:
        done = subprocess.run([sys.executable, "-m", "dev.task_example"], cwd=PROJECT_ROOT,
                              env={**env, "MODEL_ALLOW_DOWNLOAD": "false"},
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"local_endpoint: no example input ({err})", file=sys.stderr, flush=True)
        return None
    try:
        example = json.loads(done.stdout.strip().splitlines()[-1])["input"]
    except (IndexError, ValueError, KeyError, TypeError):
        reason = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        print(f"local_endpoint: no example input ({reason})", file=sys.stderr, flush=True)
        return None
    return example if isinstance(example, dict) else None


def write_key_file(path: Path) -> str:
    """Make a random client key and write it to ``path``, readable by this user only (0600).

    The file is created under a temporary name with mode 0600 from the start, then renamed
    over ``path``: the key is never readable by others, not even for a moment, and a symlink
    planted at ``path`` is replaced rather than written through. The folder is created 0700.
    """
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return key


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dev.local_endpoint [options] -- WORKER COMMAND``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, command = args[:cut], args[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m dev.local_endpoint",
        description="A local RunPod endpoint, and a worker started against it. Clients must "
                    f"send the key in ${API_KEY_ENV} when it is set (never pass a key as an "
                    "argument: command lines are readable by every user of the machine).",
        epilog="Example: python -m dev.local_endpoint --port 8000 -- python handler.py")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (127.0.0.1); any other needs a client key")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks one")
    parser.add_argument("--endpoint-id", default="local", help="the id in /v2/<id>/...")
    parser.add_argument("--key-file", type=Path, default=None,
                        help=f"without ${API_KEY_ENV}: make a client key and write it to this "
                             "file (mode 0600); the log names the file, never the key")
    parser.add_argument("--worker-id", default="local-worker", help="RUNPOD_POD_ID of the worker")
    parser.add_argument("--run-limit-mb", type=float, default=RUN_LIMIT_BYTES / MIB,
                        help="/run input and result limit, MiB (10)")
    parser.add_argument("--runsync-limit-mb", type=float, default=RUNSYNC_LIMIT_BYTES / MIB,
                        help="/runsync input and result limit, MiB (20)")
    parser.add_argument("--execution-timeout-s", type=float, default=EXECUTION_TIMEOUT_S,
                        help="jobs running longer end TIMED_OUT, seconds (600); 0: never")
    parser.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S,
                        help="a connection whose request headers, or body, have not arrived "
                             f"within this many seconds is closed ({READ_TIMEOUT_S:g})")
    parser.add_argument("--max-connections-per-peer", type=int,
                        default=MAX_CONNECTIONS_PER_PEER,
                        help="open connections one peer address may hold; more are answered "
                             f"429 ({MAX_CONNECTIONS_PER_PEER})")
    opts = parser.parse_args(args)

    # Out of this process's environment at once: the worker started below inherits it.
    api_key = os.environ.pop(API_KEY_ENV, "").strip() or None
    key_file: Path | None = None
    if api_key is None and opts.key_file is not None:
        key_file = opts.key_file.expanduser().absolute()
        try:
            api_key = write_key_file(key_file)
        except OSError as err:
            print(f"local_endpoint: cannot write the client key to {key_file}: {err}; "
                  "choose a writable --key-file", file=sys.stderr, flush=True)
            return 1
    if api_key is not None and len(api_key) < MIN_KEY_CHARS and not is_loopback(opts.host):
        print(f"local_endpoint: {API_KEY_ENV} has {len(api_key)} characters; a client key on "
              f"{opts.host} needs at least {MIN_KEY_CHARS} (or unset it and pass --key-file "
              "PATH to have one made)", file=sys.stderr, flush=True)
        return 2
    try:
        endpoint = LocalEndpoint(
            opts.host, opts.port, opts.endpoint_id, api_key,
            run_limit_bytes=int(opts.run_limit_mb * MIB),
            runsync_limit_bytes=int(opts.runsync_limit_mb * MIB),
            execution_timeout_s=opts.execution_timeout_s or None,
            read_timeout_s=opts.read_timeout_s,
            max_connections_per_peer=opts.max_connections_per_peer,
        )
    except ValueError as err:
        print(f"local_endpoint: {err} (set {API_KEY_ENV}, or pass --key-file PATH to have "
              "one made)", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, _raise_shutdown)
    worker: WorkerProcess | None = None
    try:
        endpoint.start()
        if not command:
            print(usage_text(endpoint, command, key_file), flush=True)
            print("Start a worker with this environment:", flush=True)
            for name, value in endpoint.worker_env(opts.worker_id).items():
                print(f"  export {name}={shlex.quote(value)}", flush=True)
            while True:
                time.sleep(3600)
        worker = WorkerProcess(endpoint, command, opts.worker_id).start()
        worker.wait_ready()
        example = task_example(worker.env) if runs_project_handler(command) else None
        print(usage_text(endpoint, command, key_file, example), flush=True)
        assert worker.process is not None
        return worker.process.wait()
    except (KeyboardInterrupt, _Shutdown):
        return 0 if worker is None else worker.stop()
    except (RuntimeError, ValueError) as err:
        print(f"local_endpoint: {err}", file=sys.stderr, flush=True)
        return 1 if worker is None or worker.returncode is None else worker.returncode
    finally:
        if worker is not None and worker.returncode is None:
            worker.stop()
        endpoint.stop()


if __name__ == "__main__":
    sys.exit(main())

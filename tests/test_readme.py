"""The documentation's shell commands work as written: every ```bash block of README.md and of
every docs/*.md runs, unless marked.

A block is marked by an HTML comment on the line before its fence (invisible on GitHub)::

    <!-- readme-test: skip, REASON -->          not run: needs Docker, a GPU, a RunPod account...
    <!-- readme-test: needs-setup -->           run once `make setup` is current (always in CI,
                                                after `make test`'s own setup); else skipped
    <!-- readme-test: needs-setup, server PORT -->  started in the background; once PORT
                                                listens, the next block (marked ``client``) runs
                                                against it, then the server gets SIGTERM
    <!-- readme-test: client ... -->            run only with the server before it

Any other block runs in the project root with ``bash -euo pipefail`` and must exit 0. Two
adaptations, both no-ops in CI: the pages' ``.venv/bin/python`` is the interpreter running
the tests, and ``MODEL_PATH`` points at the session's default model (a fresh checkout has no
``models/default`` until ``make run`` builds it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- readme-test: (.+?) -->")


@dataclass
class Block:
    page: str                   # the file, relative to the project root
    line: int                   # where the fence opens, 1-based
    code: str
    marker: list[str]           # the marker's comma-separated words; [] when unmarked

    @property
    def kind(self) -> str:
        return self.marker[0].split()[0] if self.marker else "run"

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = lines.index("```", i + 1)
            before = next((x for x in reversed(lines[:i]) if x.strip()), "")
            found = MARKER.fullmatch(before.strip())
            marker = [w.strip() for w in found.group(1).split(",")] if found else []
            blocks.append(Block(page.relative_to(ROOT).as_posix(), i + 1,
                                "\n".join(lines[i + 1:end]), marker))
            i = end
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in page_blocks(page)]
RUNNABLE = [b for b in BLOCKS if b.kind in ("run", "needs-setup") and "server" not in
            " ".join(b.marker)]
SERVERS = [b for b in BLOCKS if any(w.startswith("server ") for w in b.marker)]


def _shell_env(model_dir: Path) -> dict[str, str]:
    return {**os.environ, "MODEL_PATH": str(model_dir)}


def _script(block: Block) -> str:
    return block.code.replace(".venv/bin/python", sys.executable)


def _skip_unless_set_up(block: Block) -> None:
    if "needs-setup" not in block.marker:
        return
    current = subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT,
                             capture_output=True).returncode == 0
    if not current:
        pytest.skip(f"{block}: needs `make setup` done in this checkout (CI has it)")


class TestMarkers:
    def test_every_marker_is_known_and_every_skip_says_why(self):
        for block in BLOCKS:
            assert block.kind in ("run", "skip", "needs-setup", "client"), block
            if block.kind == "skip":
                assert len(block.marker) > 1 and block.marker[1], f"{block}: skip needs a reason"

    def test_blocks_that_need_docker_or_runpod_are_marked(self):
        for block in BLOCKS:
            if re.search(r"\bdocker\b|api\.runpod\.ai|proxy\.runpod\.net", block.code):
                assert block.kind == "skip", f"{block} cannot run here; mark it skip"

    def test_each_server_is_followed_by_its_client(self):
        for server in SERVERS:
            after = BLOCKS[BLOCKS.index(server) + 1]
            assert after.kind == "client" and after.page == server.page, (
                f"{server}: the next block, on the same page, must be its client")
        assert [b for b in BLOCKS if b.kind == "client" and b.page == "README.md"], (
            "the README shows how to call it")

    def test_every_page_is_read(self):
        assert {b.page for b in BLOCKS} >= {"README.md", "docs/deploy.md", "docs/gpu-pod.md",
                                            "docs/job-contract.md"}

    def test_the_pages_have_commands_that_run_here(self):
        assert [b for b in RUNNABLE if b.kind == "run"]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_block_runs(block: Block, request: pytest.FixtureRequest) -> None:
    _skip_unless_set_up(block)
    default_model_dir = request.getfixturevalue("default_model_dir")   # only once not skipped
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", _script(block)], cwd=ROOT,
                          env=_shell_env(default_model_dir), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{block} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("server", SERVERS, ids=str)
def test_server_block_answers_its_client_block(server: Block, request: pytest.FixtureRequest,
                                               tmp_path: Path) -> None:
    _skip_unless_set_up(server)
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port = int(next(w for w in server.marker if w.startswith("server ")).split()[1])
    if _listening(port):
        pytest.skip(f"port {port} is already in use on this machine")
    default_model_dir = request.getfixturevalue("default_model_dir")
    client = BLOCKS[BLOCKS.index(server) + 1]
    log = (tmp_path / "server.log").open("w+")
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", _script(server)], cwd=ROOT,
                               env=_shell_env(default_model_dir), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300       # make serve may build the model first
        while not _listening(port):
            assert process.poll() is None, f"{server} exited:\n{log.seek(0) or log.read()}"
            assert time.monotonic() < deadline, f"{server}: port {port} never listened"
            time.sleep(0.5)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", _script(client)], cwd=ROOT,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"{client} failed: {done.stderr[-2000:]}"
        assert '"COMPLETED"' in done.stdout, f"{client} answered: {done.stdout[-2000:]}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()

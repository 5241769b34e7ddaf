"""The documentation tells the truth: its settings table is the code's, it names what exists,
and every link in README.md and docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from serving import config

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
# Folders that are not the project's own code: environments, weights, caches.
NOT_OURS = {".git", ".venv", "venv", "models", "__pycache__", ".pytest_cache", ".ruff_cache",
            "gpu-results", "node_modules"}
# Tooling around the worker: it may read its own knobs (a test model, a benchmark's target), but
# a worker setting it reads must still be declared. Every other folder is the worker's code.
TOOLING = {"tests", "bench", "scripts"}
LINK = re.compile(r"(?<!\\)\]\(([^)\s]+)\)")


def section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def project_python_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py")
                  if not NOT_OURS & set(p.relative_to(ROOT).parts[:-1]))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found, text = set(), page.read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)   # no headings inside code
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


class TestSettingsTable:
    def test_the_configuration_table_is_exactly_the_declared_settings(self):
        table = section(CONFIGURATION, "<!-- settings:start -->", "<!-- settings:end -->")
        assert table == config.settings_table(), (
            "docs/configuration.md settings table is stale: run `python -m serving.config` and "
            "paste its output between the settings markers")

    def test_every_environment_read_goes_through_config(self):
        """The worker's code, in every module and package, reads settings through config.py,
        never os.environ directly; no .py file of the project reads an undeclared setting."""
        files = project_python_files()
        assert {"tasks", "builder", "tests"} <= {p.relative_to(ROOT).parts[0] for p in files}
        offenders = []
        for path in files:
            where = path.relative_to(ROOT).as_posix()
            worker_code = path.relative_to(ROOT).parts[0] not in TOOLING
            text = path.read_text()
            # Reads only: handing a value on to a library (os.environ["X"] = ...) is not one.
            reads = r"os\.(?:environ(?:\.get)?|getenv)\b[\[(]\s*\"(\w+)\"(?!\]\s*=[^=])"
            for match in re.finditer(reads, text):
                name = match.group(1)
                # The SDK's own variables are the SDK's business; ours are declared.
                if worker_code and path.name != "config.py" and not name.startswith("RUNPOD_"):
                    offenders.append(f"{where}: {name}")
                if name.startswith(("WORKER_", "MODEL_", "BUCKET_", "OUTPUT_")):
                    assert name in config.VARS, f"{where} reads undeclared {name}"
        assert not offenders, offenders

    def test_secrets_are_declared_secret(self):
        for name in ("HF_TOKEN",):
            assert config.VARS[name].secret


class TestPages:
    def test_every_docs_page_opens_with_a_title_and_a_one_line_summary(self):
        for page in DOCS:
            lines = page.read_text().splitlines()
            assert lines[0].startswith("# "), f"{page.name}: open with a '# Title' line"
            assert lines[1] == "" and lines[2] and lines[3] == "", (
                f"{page.name}: the line after the title is a one-line summary")

    def test_the_readme_links_every_docs_page(self):
        readme = (ROOT / "README.md").read_text()
        for page in DOCS:
            assert f"](docs/{page.name})" in readme, f"README.md: link docs/{page.name}"

    def test_every_link_resolves(self):
        broken = []
        for page in PAGES:
            text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
            for target in LINK.findall(text):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):     # https:, mailto: ...
                    continue
                path, _, anchor = target.partition("#")
                linked = (page.parent / path).resolve() if path else page
                if not linked.exists():
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
        assert not broken, broken


class TestCommands:
    def test_make_targets_named_in_the_readme_and_docs_exist(self):
        makefile = (ROOT / "Makefile").read_text()
        targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
        for page in PAGES:
            for target in set(re.findall(r"`make ([a-z][\w-]*)", page.read_text())):
                assert target in targets, (
                    f"{page.relative_to(ROOT)} names `make {target}`, which the Makefile lacks")

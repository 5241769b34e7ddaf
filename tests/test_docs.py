"""The README tells the truth: its settings table is the code's, and it names what exists."""

from __future__ import annotations

import re
from pathlib import Path

from serving import config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_section(start: str, end: str) -> str:
    return README.split(start, 1)[1].split(end, 1)[0].strip()


class TestSettingsTable:
    def test_readme_table_is_exactly_the_declared_settings(self):
        table = readme_section("<!-- settings:start -->", "<!-- settings:end -->")
        assert table == config.settings_table(), (
            "README settings table is stale: run `python config.py` and paste its output")

    def test_every_environment_read_goes_through_config(self):
        """Modules read settings through config.py, never os.environ directly."""
        allowed = {"config.py"}
        offenders = []
        for path in ROOT.glob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"os\.(?:environ(?:\.get)?|getenv)\b[\[(]\s*\"(\w+)\"", text):
                name = match.group(1)
                # The SDK's own variables are the SDK's business; ours are declared.
                if path.name not in allowed and not name.startswith("RUNPOD_"):
                    offenders.append(f"{path.name}: {name}")
                if name.startswith(("WORKER_", "MODEL_", "BUCKET_", "OUTPUT_")):
                    assert name in config.VARS, f"{path.name} reads undeclared {name}"
        assert not offenders, offenders

    def test_secrets_are_declared_secret(self):
        for name in ("HF_TOKEN",):
            assert config.VARS[name].secret


class TestReadmeCommands:
    def test_make_targets_named_in_the_readme_exist(self):
        makefile = (ROOT / "Makefile").read_text()
        targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
        for target in set(re.findall(r"`make ([a-z][\w-]*)", README)):
            assert target in targets, f"README names `make {target}`, which the Makefile lacks"

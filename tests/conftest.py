"""Shared fixtures. Each concern's fixtures live in a plugin module under tests/support/."""

from __future__ import annotations

import os

import pytest

pytest_plugins: list[str] = [
    "tests.support.model_dir",
    "tests.support.fake_hub",
    "tests.support.worker",
    "tests.support.endpoint",
    "tests.support.s3",
    "tests.support.http_server",
]

# A developer's shell must not change results: these prefixes are stripped for every test.
_ENV_PREFIXES = ("BUCKET_", "AWS_", "HF_", "MODEL_", "RUNPOD_", "WORKER_", "OUTPUT_",
                 "DOWNLOAD_", "BATCH_")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove user settings from the environment so every test starts from the defaults."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)

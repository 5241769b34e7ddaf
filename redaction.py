"""Secrets never reach a log line: the worker's stdout and stderr are filtered before they print.

Owns masking. ``install(env)`` wraps ``sys.stdout`` and ``sys.stderr`` (where the SDK's logger
and ours print) so that every line is cleaned of:

- the values of the secret settings (``config.VARS`` entries marked secret, e.g.
  ``BUCKET_SECRET_ACCESS_KEY``, ``HF_TOKEN``) and the platform's API key;
- a job's own bucket secret (``"accessSecret": "..."`` in any printed job or dict);
- presigned-link signatures and credentials (``X-Amz-Signature=...``, ``X-Amz-Credential=...``);
- bearer tokens in printed headers.

It is a second line of defence: our code does not print secrets, and ``handler.py`` lowers the
SDK's default log level from DEBUG (which prints whole jobs and answers) to INFO.
"""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import config

MASK = "***"
MIN_SECRET_LENGTH = 6       # shorter values would mask ordinary words
EXTRA_SECRET_VARS = ("RUNPOD_AI_API_KEY", "RUNPOD_API_KEY", "AWS_SECRET_ACCESS_KEY")

_PATTERNS = [
    # "accessSecret": "value" or 'accessSecret': 'value' (JSON or a printed dict)
    (re.compile(r"""(["']accessSecret["']\s*:\s*["'])[^"']*"""), r"\1" + MASK),
    (re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+", re.I),
     r"\1" + MASK),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._\-]+", re.I), r"\1" + MASK),
]


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The secret values set in ``env``, longest first (so overlaps mask completely)."""
    env = os.environ if env is None else env
    names = [v.name for v in config.VARS.values() if v.secret] + list(EXTRA_SECRET_VARS)
    values = {env[n].strip() for n in names if len(env.get(n, "").strip()) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with secrets and secret-looking fields masked."""
    for value in secrets:
        text = text.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingStream(io.TextIOBase):
    """A text stream that masks secrets in everything written, line by line."""

    def __init__(self, inner: TextIO, secrets: list[str]) -> None:
        self.inner = inner
        self.secrets = secrets
        self._partial = ""

    def write(self, text: str) -> int:
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()          # an unfinished line waits for its end
        if lines:
            self.inner.write("\n".join(redact(line, self.secrets) for line in lines) + "\n")
        if len(self._partial) > 65536:       # a very long line without a newline
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.inner.write(redact(self._partial, self.secrets))
            self._partial = ""
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return self.inner.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def install(env: Mapping[str, str] | None = None) -> None:
    """Filter this process's stdout and stderr. Call once, before anything logs."""
    secrets = secret_values(env)
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout, secrets)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr, secrets)

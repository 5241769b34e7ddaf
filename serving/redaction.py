"""Secrets never reach a log line: the worker's stdout and stderr are filtered before they print.

Owns masking. ``install(env)`` wraps ``sys.stdout`` and ``sys.stderr`` (where the SDK's logger
and ours print) so that every line is cleaned of:

- the values of the secret settings (``config.VARS`` entries marked secret, e.g.
  ``BUCKET_SECRET_ACCESS_KEY``, ``HF_TOKEN``) and the platform's API key, also as they appear
  JSON-escaped (once and twice), as a Python ``repr`` or URL-encoded;
- a job's own bucket secret (``"accessSecret": "..."``, and ``secret_access_key``) in any
  printed job or dict: JSON, JSON inside a JSON string (``{\"accessSecret\": \"...\"}``, as the
  SDK's JSON log lines print a job), a ``repr``, or ``accessSecret=...``; quotes and backslashes
  inside the value are masked with it;
- presigned-link signatures and credentials, in a URL or a header, plain or URL-encoded:
  ``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``X-Goog-Signature``,
  ``X-Goog-Credential``, the ``Signature=`` and ``Credential=`` of a SigV4 ``Authorization``
  header, an Azure SAS ``sig=``;
- bearer tokens (base64 and URL-safe alphabets), and a bare ``Authorization`` header's value.

It is a second line of defence: our code does not print secrets, and ``handler.py`` lowers the
SDK's default log level from DEBUG (which prints whole jobs and answers) to INFO. It masks too
much rather than too little: a quoted value that does not end the way a field ends (a quote,
then ``,`` ``}`` ``]`` ``)`` ``;`` or the end of the line) is masked to the end of the line.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

from serving import config

MASK = "***"
MIN_SECRET_LENGTH = 6       # shorter values would mask ordinary words
MAX_LINE = 65536            # longer lines print this much (RedactingStream)
EXTRA_SECRET_VARS = ("RUNPOD_AI_API_KEY", "RUNPOD_API_KEY", "AWS_SECRET_ACCESS_KEY")

# A field whose value is a secret, however the field is printed: "name", 'name', \"name\" (the
# JSON of a JSON string), then : or =, then the value, quoted the same ways or bare.
_SECRET_FIELD = re.compile(
    r"""(?P<key>\\*["']?(?:accessSecret|access_secret|(?:aws_)?secret_access_key|secretAccessKey)"""
    r"""\\*["']?\s*[:=]\s*)"""
    r"""(?:(?P<open>\\*(?P<q>["']))(?P<value>.*?)"""
    # the closing quote: the opening one, however escaped, where a field can end
    r"""(?:(?P<close>\\*(?P=q)(?=\\*["']?\s*(?:[,;}\])]|$)))|$)"""
    r"""|(?P<bare>[^\s"'\\,;&}\])]+))""",
    re.I | re.M)
# "=" and "&" as they are, or URL-encoded once or more (%3D, %253D; %26, %2526).
_EQ = r"(?:=|%(?:25)*3D)"
_VALUE = r"(?:(?!%(?:25)*26)[^&\s\"'<>,\\])+"
_PATTERNS = [
    # presigned URLs and SigV4 headers: AWS (X-Amz-*, SigV4's Signature=/Credential=, SigV2's
    # Signature=), Google (X-Goog-*), Azure SAS (sig=)
    (re.compile(r"((?<![A-Za-z0-9_])(?:X-(?:Amz|Goog)-)?(?:Signature|Credential|Security-Token)"
                + _EQ + ")" + _VALUE, re.I), r"\1" + MASK),
    (re.compile(r"((?<![A-Za-z0-9_-])sig" + _EQ + ")" + _VALUE), r"\1" + MASK),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/\-]+=*", re.I), r"\1" + MASK),
    # a bare key as the Authorization header (the SDK sends its API key so); Bearer tokens and
    # SigV4 headers are masked above, where their signature is
    (re.compile(r"(Authorization\\*[\"']?\s*[:=]\s*\\*[\"']?(?:Basic\s+)?)"
                r"(?!Bearer\b|AWS4-|\*\*\*)[^\s\"'\\,;}]+", re.I), r"\1" + MASK),
]


def _mask_field(match: re.Match[str]) -> str:
    if match.group("bare") is not None:
        return match.group("key") + MASK
    return match.group("key") + match.group("open") + MASK + (match.group("close") or "")


def _spellings(value: str) -> set[str]:
    """``value`` as it may be printed: as is, JSON-escaped once and twice, in a ``repr``,
    URL-encoded."""
    once = json.dumps(value)[1:-1]
    return {value, once, json.dumps(once)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
            repr(value)[1:-1], quote(value, safe=""), quote_plus(value, safe="")}


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The secret values set in ``env`` and their printed spellings, longest first (so
    overlaps mask completely)."""
    env = os.environ if env is None else env
    names = [v.name for v in config.VARS.values() if v.secret] + list(EXTRA_SECRET_VARS)
    values = {env[n].strip() for n in names if len(env.get(n, "").strip()) >= MIN_SECRET_LENGTH}
    spelled = set().union(*(_spellings(v) for v in values)) if values else set()
    return sorted(spelled, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with secrets and secret-looking fields masked."""
    for value in secrets:
        text = text.replace(value, MASK)
    text = _SECRET_FIELD.sub(_mask_field, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingStream(io.TextIOBase):
    """A text stream that masks secrets in everything written, line by line.

    A line is masked whole, however many writes it comes in. One longer than ``MAX_LINE``
    characters (a whole job printed at DEBUG, with a long prompt) prints its first ``MAX_LINE``
    characters and a note, and not the rest: masking it in pieces would let a secret that a
    piece's end cuts in two print its halves unmasked.
    """

    def __init__(self, inner: TextIO, secrets: list[str]) -> None:
        self.inner = inner
        self.secrets = secrets
        self._partial = ""
        self._dropping = False      # inside the rest of an over-long line

    def write(self, text: str) -> int:
        *ended, rest = text.split("\n")
        printed = []
        for piece in ended:
            if self._dropping:
                self._dropping = False
            elif len(self._partial) + len(piece) > MAX_LINE:
                printed.append(self._cut(self._partial + piece))
            else:
                printed.append(redact(self._partial + piece, self.secrets))
            printed.append("\n")
            self._partial = ""
        if not self._dropping:
            self._partial += rest               # an unfinished line waits for its end
            if len(self._partial) > MAX_LINE:
                printed.append(self._cut(self._partial))
                self._partial, self._dropping = "", True
        if printed:
            self.inner.write("".join(printed))
        return len(text)

    def _cut(self, line: str) -> str:
        """The first MAX_LINE characters of ``line``, masked, less the start of any secret
        value the limit cuts (its end is not there for ``redact`` to find), and a note."""
        head = line[:MAX_LINE]
        for value in self.secrets:
            for k in range(min(len(value) - 1, len(head)), 0, -1):
                if head.endswith(value[:k]):
                    head = head[:-k]
                    break
        return (redact(head, self.secrets)
                + f" [... this line is longer than {MAX_LINE} characters: the rest is not printed]")

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

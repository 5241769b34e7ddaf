"""Secrets in log lines, fed through the real logging path of a worker process.

One subprocess does what ``handler.py`` does before anything logs (``redaction.install()``),
then prints each leaking line through the runpod SDK's logger at DEBUG, in the JSON line format
it uses on RunPod (``RUNPOD_ENDPOINT_ID`` set), and through a stdlib logger on stderr, as ours
does. Each case is a line that leaked before its pattern existed; the test looks for the secret
part in everything the process printed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from serving.config import PROJECT_ROOT
from serving.redaction import MASK, MAX_LINE, RedactingStream, redact, secret_values
from tests.conftest import _ENV_PREFIXES

# A bucket secret setting that contains a quote: JSON log lines print it as bucket\"...
ENV_SECRET = 'bucket"env-secret-9f3k'

_LOG_EVERY_LINE = """
import json, logging, sys
from serving import redaction
redaction.install()                      # as handler.py does, before anything logs
import runpod
sdk = runpod.RunPodLogger()
ours = logging.getLogger("worker")
ours.addHandler(logging.StreamHandler(sys.stderr))
ours.setLevel(logging.INFO)
ours.propagate = False                  # as worker.configure_logging does
for line in json.loads(sys.stdin.read()):
    sdk.debug(line)
    ours.info(line)
sys.stdout.flush()
sys.stderr.flush()
"""


@dataclass(frozen=True)
class Leak:
    line: str        # printed as is; starts with the case's marker
    secret: str      # the part that must never be printed


CASES = {
    "accessSecret in JSON inside a JSON string": Leak(
        r'case-escaped-json body={\"accessSecret\": \"escaped-secret-1x\"}',
        "escaped-secret-1x"),
    "a job secret containing a quote, in JSON": Leak(
        r'case-quote-json {"s3Config": {"accessSecret": "ab\"quoted-secret-2x", "b": 1}}',
        "quoted-secret-2x"),
    "a job secret containing a quote, in a printed dict": Leak(
        """case-quote-repr {'accessSecret': 'ab"repr-secret-3x', 'b': 1}""",
        "repr-secret-3x"),
    "a bearer token with + / =": Leak(
        "case-bearer Authorization: Bearer tok+bearer/secret4x==",
        "bearer/secret4x"),
    "the Signature of a SigV4 Authorization header": Leak(
        "case-sigv4 Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/"
        "us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, "
        "Signature=5ec2e75f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5",
        "5ec2e75f0a1b2c3d"),
    "X-Goog-Signature in a signed Google Cloud Storage URL": Leak(
        "case-goog https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        "&X-Goog-Date=20240101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host"
        "&X-Goog-Signature=9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "9f8e7d6c5b4a3928"),
    "sig in an Azure SAS URL": Leak(
        "case-azure https://acct.blob.core.windows.net/c/blob?sv=2022-11-02&ss=b&srt=o&sp=r"
        "&se=2030-01-01T00:00:00Z&sig=AzureSasSecret7x%2Bab%3D",
        "AzureSasSecret7x"),
    "URL-encoded X-Amz-Signature and X-Amz-Credential": Leak(
        "case-urlencoded next=https%3A%2F%2Fb.s3.amazonaws.com%2Fk%3FX-Amz-Algorithm%3D"
        "AWS4-HMAC-SHA256%26X-Amz-Credential%3DAKIAURLENC8X%252F20240101%252Fus-east-1"
        "%26X-Amz-Signature%3Ddeadbeef8c0ffee8",
        "deadbeef8c0ffee8"),
    "the credential of a URL-encoded presigned link": Leak(
        "case-urlencoded-credential next=https%3A%2F%2Fb.s3.amazonaws.com%2Fk%3F"
        "X-Amz-Credential%3DAKIAURLENC9X%252F20240101%26X-Amz-Date%3D20240101T000000Z",
        "AKIAURLENC9X"),
    "a secret setting that contains a quote": Leak(
        f"case-env-quote connecting with key={ENV_SECRET}", "env-secret-9f3k"),
}


@pytest.fixture(scope="module")
def printed() -> str:
    """Everything a worker process printed while logging every case's line both ways."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    env.update(RUNPOD_LOG_LEVEL="DEBUG", RUNPOD_ENDPOINT_ID="local",
               BUCKET_SECRET_ACCESS_KEY=ENV_SECRET)
    done = subprocess.run([sys.executable, "-c", _LOG_EVERY_LINE], cwd=PROJECT_ROOT, env=env,
                          input=json.dumps([c.line for c in CASES.values()]),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_a_secret_that_leaked_is_masked_in_both_log_formats(printed: str, case: Leak) -> None:
    marker = case.line.split()[0]
    lines = [line for line in printed.splitlines() if marker + " " in line]
    assert len(lines) == 2, f"{marker}: expected the SDK's line and ours:\n{printed[-3000:]}"
    for line in lines:
        assert case.secret not in line, line
        assert MASK in line


class TestWhatStaysReadable:
    def test_the_rest_of_a_line_is_kept(self) -> None:
        text = redact('{"accessSecret": "s3cret-value", "bucketName": "my-bucket"} '
                      "https://x/k?X-Amz-Date=20240101&X-Amz-Signature=abc123&part=2")
        assert '"bucketName": "my-bucket"' in text
        assert "X-Amz-Date=20240101" in text and "&part=2" in text
        assert "s3cret-value" not in text and "abc123" not in text

    def test_words_that_only_resemble_fields_are_kept(self) -> None:
        text = "config=1 design=2 SignedHeaders=host;x-amz-date sigma=3 the secret access key"
        assert redact(text) == text

    def test_a_secret_setting_is_masked_in_every_spelling_it_is_printed_in(self) -> None:
        secrets = secret_values({"HF_TOKEN": 'hf_"tok/en value'})
        for spelling in ('hf_"tok/en value', r'hf_\"tok/en value', r'hf_\\\"tok/en value',
                         "hf_%22tok%2Fen%20value", "hf_%22tok%2Fen+value"):
            assert redact(f"token {spelling} end", secrets) == f"token {MASK} end"


class TestOverLongLines:
    """A line longer than ``MAX_LINE`` (a whole job printed at DEBUG, with a long prompt) is
    printed up to the limit and not beyond, so a secret the limit cuts in two prints no part."""

    SECRET = "per-job-secret-value-5678"

    def _printed(self, *writes: str, secrets: list[str] = ()) -> str:
        sink = io.StringIO()
        stream = RedactingStream(sink, list(secrets))
        for text in writes:
            stream.write(text)
        stream.flush()
        return sink.getvalue()

    @pytest.mark.parametrize("cut_at", [4, 12, len(SECRET) - 1])
    @pytest.mark.parametrize("form", ["field", "setting", "bearer"])
    def test_a_secret_cut_by_the_limit_prints_no_part_of_it(self, form: str, cut_at: int):
        secret = self.SECRET
        lead = {"field": '{"s3Config": {"accessSecret": "', "setting": "key ",
                "bearer": "Authorization: Bearer "}[form]
        # The secret starts cut_at characters before the limit, within one line.
        start = MAX_LINE - cut_at
        line = "x" * (start - len(lead)) + lead + secret + '"}} and more text' + "y" * 5000
        secrets = secret_values({"BUCKET_SECRET_ACCESS_KEY": secret}) if form == "setting" else []
        # One write; two, the first ending inside the secret just past the limit; many small.
        for writes in ([line + "\n"], [line[:MAX_LINE + 1], line[MAX_LINE + 1:] + "\n"],
                       [line[i:i + 7] for i in range(0, len(line), 7)] + ["\n"]):
            printed = self._printed(*writes, "after\n", secrets=secrets)
            for i in range(len(secret) - 5):          # no 6 characters of it in a row
                assert secret[i:i + 6] not in printed, (form, cut_at, secret[i:i + 6])
            first, second = printed.split("\n")[:2]
            assert first.startswith("x" * 1000) and first.endswith("not printed]")
            assert len(first) < MAX_LINE + 100 and "yyy" not in first
            assert second == "after"                  # the next line prints as it is

    def test_a_line_within_the_limit_prints_whole(self):
        line = "z" * (MAX_LINE - 1)
        assert self._printed(line[:100], line[100:] + "\nnext\n") == line + "\nnext\n"

    def test_an_endless_line_prints_at_most_the_limit(self):
        printed = self._printed(*["w" * 65536] * 40, "\n")
        assert len(printed) < MAX_LINE + 100 and printed.endswith("not printed]\n")

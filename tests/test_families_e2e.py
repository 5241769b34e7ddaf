"""A model of another kind (a speech recognizer) behind the real runpod worker loop, the local
endpoint and the SDK's own client, over real HTTP, exactly as a client calls it on RunPod.

Slow: it starts a worker process (``python handler.py`` on a tiny random wav2vec2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import transformers

from serving.audio import decode_audio
from serving.families import to_json
from tests.support.endpoint import RUN_LIMIT, Service, start_handler_service, stop_service
from tests.test_audio_families import RATE, _ctc, data_uri, tone, wav_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "tiny-ctc"
    _ctc(path)
    return path


@pytest.fixture(scope="module")
def speech_service(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("speech-worker") / "worker.log"
    service = start_handler_service(speech_dir, log, "speech-worker", WORKER_CONCURRENCY="4")
    yield service
    stop_service(service)


def test_the_sdk_client_gets_the_pipelines_transcript(speech_service, speech_dir):
    raw = wav_bytes(tone(0.8, seed=4))
    assert len(data_uri(raw)) < RUN_LIMIT
    output = speech_service.client.run_sync(
        {"input": {"inputs": data_uri(raw), "parameters": {"return_timestamps": "char"}}},
        timeout=120)
    samples = decode_audio(raw, sampling_rate=RATE, max_seconds=5, field="f")
    pipe = transformers.pipeline("automatic-speech-recognition", model=str(speech_dir))
    expected = to_json(pipe({"raw": samples, "sampling_rate": RATE}, return_timestamps="char"))
    assert output == [expected]


def test_bad_audio_fails_naming_the_field_and_the_worker_serves_on(speech_service):
    job = speech_service.client.run({"input": {"audio": data_uri(b"not audio" * 50)}})
    final = speech_service.endpoint.wait_for_status(job.job_id, timeout_s=120)
    assert final["status"] == "FAILED"
    assert "input.audio" in final["error"] and "is not audio" in final["error"]
    output = speech_service.client.run_sync(
        {"input": {"audio": data_uri(wav_bytes(tone(0.4)))}}, timeout=120)
    assert output[0]["result"]["text"] is not None

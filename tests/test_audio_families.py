"""The audio families (speech recognition, audio classification, text to speech) served with no
code: audio in any common format is decoded and resampled to the model's rate, answers are what
transformers' pipeline answers, speech comes back as a file, and bad audio of every kind is a
clear error naming the field while the worker serves on.

The models are tiny random ones made from configs (no Hub).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from serving.audio import decode_audio, encode_audio
from serving.families import to_json
from serving.worker import Worker
from tests.support.families import answer, at_once, check_banner_examples, close
from tests.support.tokenizers import whisper_tokenizer
from tests.support.worker import build_worker, collect

RATE = 16000


def _ctc(path: Path) -> None:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4,
             **{c: i + 5 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    transformers.Wav2Vec2CTCTokenizer(str(path / "vocab.json")).save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=RATE).save_pretrained(path)
    config = transformers.Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(path)


def _ast(path: Path) -> None:
    config = transformers.ASTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_length=64, num_mel_bins=16, id2label={0: "dog", 1: "rain"},
        label2id={"dog": 0, "rain": 1})
    transformers.ASTForAudioClassification(config).save_pretrained(path)
    transformers.ASTFeatureExtractor(num_mel_bins=16, max_length=64).save_pretrained(path)


def _vits(path: Path) -> None:
    vocab = {c: i for i, c in enumerate(" abcdefghijklmnopqrstuvwxyz")}
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    transformers.VitsTokenizer(str(path / "vocab.json"), add_blank=True,
                               phonemize=False).save_pretrained(path)
    config = transformers.VitsConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ffn_dim=16, flow_size=16, spectrogram_bins=17, upsample_initial_channel=16,
        upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1,
        duration_predictor_num_flows=1, duration_predictor_filter_channels=16,
        sampling_rate=RATE, noise_scale=0.0, noise_scale_duration=0.0)   # deterministic
    transformers.VitsModel(config).save_pretrained(path)


def _whisper(path: Path) -> None:
    """A multilingual Whisper: a byte-level tokenizer with no merges (every text encodes) and
    Whisper's special tokens, and a generation config that knows three languages."""
    size, ids = whisper_tokenizer(path, [
        "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|fr|>", "<|de|>", "<|translate|>",
        "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
        "<|notimestamps|>"])
    transformers.WhisperFeatureExtractor(feature_size=16).save_pretrained(path)
    config = transformers.WhisperConfig(
        vocab_size=size, num_mel_bins=16, d_model=16, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, max_target_positions=64,
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    model = transformers.WhisperForConditionalGeneration(config)
    generation = model.generation_config
    generation.update(max_length=12, no_timestamps_token_id=ids["<|notimestamps|>"],
                      suppress_tokens=list(ids.values()))      # bytes only: a text to compare
    generation.begin_suppress_tokens = None                 # Whisper's own ids: out of range
    generation._from_model_config = False                   # else loading rebuilds it
    generation.is_multilingual = True
    generation.lang_to_id = {t: ids[t] for t in ("<|en|>", "<|fr|>", "<|de|>")}
    generation.task_to_id = {"transcribe": ids["<|transcribe|>"],
                             "translate": ids["<|translate|>"]}
    model.save_pretrained(path)


MODELS = {"automatic-speech-recognition": _ctc, "audio-classification": _ast,
          "text-to-audio": _vits}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audio-families")
    for kind, make in MODELS.items():
        torch.manual_seed(0)
        make(root / kind)
    return {kind: root / kind for kind in MODELS}


@pytest.fixture(scope="module")
def workers(model_dirs: dict[str, Path]) -> dict[str, Worker]:
    return {kind: build_worker({"MODEL_PATH": str(path), "WORKER_BATCH_WAIT_MS": "30",
                                "WORKER_MAX_AUDIO_SECONDS": "5"})
            for kind, path in model_dirs.items()}


@pytest.fixture(scope="module")
def pipelines(model_dirs: dict[str, Path]) -> dict[str, Any]:
    return {kind: transformers.pipeline(kind, model=str(path), device="cpu")
            for kind, path in model_dirs.items()}


def tone(seconds: float = 1.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.RandomState(seed).randn(t.shape[0]) * 0.05
    return (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = RATE, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
        w.writeframes(np.repeat(pcm, channels).tobytes())
    return out.getvalue()


def encoded(samples: np.ndarray, fmt: str, codec: str, rate: int = RATE) -> bytes:
    """A file written by FFmpeg's own encoders (the formats clients send)."""
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=48000 if codec == "libopus" else rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.rate = rate
        resampler = av.AudioResampler(format=stream.format.name, layout="mono",
                                      rate=stream.rate)
        for part in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(part):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def data_uri(raw: bytes, kind: str = "wav") -> str:
    return f"data:audio/{kind};base64," + base64.b64encode(raw).decode()




class TestDecoding:
    @pytest.mark.parametrize(("fmt", "codec"), [("flac", "flac"), ("mp3", "libmp3lame"),
                                                ("ogg", "libopus"), ("webm", "libopus"),
                                                ("ipod", "aac")])
    def test_common_formats_decode_to_the_models_rate(self, fmt, codec):
        raw = encoded(tone(1.0, 22050), fmt, codec, rate=22050)
        samples = decode_audio(raw, sampling_rate=RATE, max_seconds=5, field="input.audio")
        assert samples.dtype == np.float32
        assert abs(samples.shape[0] - RATE) < RATE * 0.1      # codec priming and padding

    def test_stereo_wav_is_mixed_to_mono_and_resampled(self):
        raw = wav_bytes(tone(1.0, 44100), rate=44100, channels=2)
        samples = decode_audio(raw, sampling_rate=RATE, max_seconds=5, field="f")
        assert abs(samples.shape[0] - RATE) <= 32 and np.abs(samples).max() > 0.2

    def test_wav_and_flac_round_trip(self):
        samples = tone(0.5)
        for fmt in ("wav", "flac"):
            back = decode_audio(encode_audio(samples, RATE, fmt), sampling_rate=RATE,
                                max_seconds=5, field="f")
            assert np.abs(back - samples).max() < 1e-3, fmt


class TestTheHubShapeAnswersWhatThePipelineAnswers:
    @pytest.mark.parametrize(("kind", "parameters"), [
        ("automatic-speech-recognition", {}),
        ("automatic-speech-recognition", {"return_timestamps": "char"}),
        ("audio-classification", {"top_k": 2}),
    ])
    def test_same_json(self, loop, workers, pipelines, kind, parameters):
        clips = [tone(1.0, seed=1), tone(0.5, seed=2)]
        raws = [wav_bytes(c) for c in clips]
        decoded = [decode_audio(r, sampling_rate=RATE, max_seconds=5, field="f") for r in raws]
        expected = pipelines[kind]([{"raw": d, "sampling_rate": RATE} for d in decoded],
                                   batch_size=1, **parameters)
        got = answer(loop, workers[kind], {"inputs": [data_uri(r) for r in raws],
                                           "parameters": parameters})
        assert close(got, to_json(expected)), (got, expected)

    def test_speech_is_a_wav_file_of_the_pipelines_waveform(self, loop, workers, pipelines):
        expected = pipelines["text-to-audio"]("hello world")
        got = answer(loop, workers["text-to-audio"], {"inputs": "hello world"})
        assert got["sampling_rate"] == expected["sampling_rate"] == RATE
        file = got["audio"]
        assert file["content_type"] == "audio/wav"
        back = decode_audio(base64.b64decode(file["data"]), sampling_rate=RATE, max_seconds=5,
                            field="f")
        want = np.asarray(expected["audio"]).reshape(-1)
        assert back.shape == want.shape and np.abs(back - np.clip(want, -1, 1)).max() < 1e-3

    def test_speech_as_mp3_on_request(self, loop, workers):
        got = answer(loop, workers["text-to-audio"], {"text": "hi there",
                                                      "output_format": "mp3"})
        assert got["result"]["audio"]["content_type"] == "audio/mpeg"
        raw = base64.b64decode(got["result"]["audio"]["data"])
        assert decode_audio(raw, sampling_rate=RATE, max_seconds=5, field="f").size > 0


class TestOwnFields:
    def test_an_mp3_by_data_uri_is_transcribed(self, loop, workers, pipelines):
        raw = encoded(tone(1.0, seed=3), "mp3", "libmp3lame")
        decoded = decode_audio(raw, sampling_rate=RATE, max_seconds=5, field="f")
        got = answer(loop, workers["automatic-speech-recognition"],
                     {"audio": data_uri(raw, "mpeg")})
        expected = pipelines["automatic-speech-recognition"](
            {"raw": decoded, "sampling_rate": RATE})
        assert got["result"] == to_json(expected)

    def test_a_model_that_sees_padding_batches_only_equal_lengths(self, loop, workers,
                                                                    pipelines):
        """wav2vec2 without an attention mask: a job's answer never depends on its batch-mates
        (pinned: a padded batch changed a shorter clip's transcript)."""
        clip = wav_bytes(tone(0.5, seed=2))
        alone = answer(loop, workers["automatic-speech-recognition"], {"audio": data_uri(clip)})

        async def jobs() -> list[Any]:
            return await asyncio.gather(
                collect(workers["automatic-speech-recognition"], {"audio": data_uri(clip)}, "a"),
                collect(workers["automatic-speech-recognition"],
                        {"audio": data_uri(wav_bytes(tone(1.5, seed=9)))}, "b"))

        [[beside], _] = loop.run(jobs())
        assert beside == alone

    def test_concurrent_speech_jobs_each_get_their_own_file(self, loop, workers, pipelines):
        """Pins a lost answer: run one per call, a batch's inputs but its last were skipped and
        their jobs COMPLETED with a null result."""
        worker = workers["text-to-audio"]
        texts = ["hello", "hello world", "good day"]

        async def jobs() -> list[Any]:
            return await asyncio.gather(*(collect(worker, {"text": t}, f"t{i}")
                                          for i, t in enumerate(texts)))

        outs = loop.run(jobs())
        for text, [out] in zip(texts, outs, strict=True):
            want = np.asarray(pipelines["text-to-audio"](text)["audio"]).reshape(-1)
            back = decode_audio(base64.b64decode(out["result"]["audio"]["data"]),
                                sampling_rate=RATE, max_seconds=5, field="f")
            assert back.shape == want.shape, text

    def test_concurrent_jobs_share_forward_passes(self, loop, workers):
        worker = workers["audio-classification"]
        before = worker.task.batcher.batches_run

        async def jobs() -> list[Any]:
            return await asyncio.gather(*(collect(worker, {"audio": data_uri(wav_bytes(
                tone(0.5, seed=i)))}, f"j{i}") for i in range(6)))

        outs = loop.run(jobs())
        assert all("result" in out for [out] in outs)
        assert worker.task.batcher.batches_run - before < 6

    @pytest.mark.parametrize("model", ["ctc", "whisper"])
    def test_speech_runs_one_clip_per_call_on_a_cpu(self, loop, workers, whisper, model):
        """Batched, 8 clips ran slower than one by one on a CPU, for a CTC model and for a
        Whisper (bench/families_bench.py)."""
        worker = workers["automatic-speech-recognition"] if model == "ctc" else whisper[0]
        engine = worker.task.batcher.engine
        pipe, sizes = engine.pipe, []

        def counted(inputs: list[Any], **kwargs: Any) -> Any:
            sizes.append(len(inputs))
            return pipe(inputs, **kwargs)

        engine.pipe = counted
        try:
            outs = at_once(loop, worker, [{"audio": data_uri(wav_bytes(tone(0.5, seed=i)))}
                                          for i in range(4)])
        finally:
            engine.pipe = pipe
        assert all("result" in out for out in outs)
        assert sizes == [1, 1, 1, 1]


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Worker, Any]:
    """A tiny Whisper's worker and transformers' pipeline for the same directory."""
    path = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    _whisper(path)
    return (build_worker({"MODEL_PATH": str(path), "WORKER_MAX_AUDIO_SECONDS": "5"}),
            transformers.pipeline("automatic-speech-recognition", model=str(path),
                                  device="cpu"))


class TestWhisperLanguageAndTask:
    @pytest.mark.parametrize("generate", [{"language": "fr", "task": "translate"},
                                          {"language": "german", "task": "transcribe"},
                                          {"language": "<|en|>"}])
    def test_reach_generation_as_the_pipelines_generate_kwargs(self, loop, whisper, generate):
        worker, pipe = whisper
        raw = wav_bytes(tone(1.0, seed=4))
        samples = decode_audio(raw, sampling_rate=RATE, max_seconds=5, field="f")
        expected = pipe({"raw": samples, "sampling_rate": RATE}, generate_kwargs=generate)
        unforced = pipe({"raw": samples, "sampling_rate": RATE})
        assert expected != unforced                   # the forced tokens change the text
        got = answer(loop, worker, {"audio": data_uri(raw), **generate})
        assert got["result"] == to_json(expected)
        hub = answer(loop, worker, {"inputs": data_uri(raw), "parameters": generate})
        assert hub == to_json(expected)

    @pytest.mark.parametrize(("job_input", "field", "says"), [
        ({"language": "klingon"}, "input.language", "use one of de, en, fr"),
        ({"language": "es"}, "input.language", "not a language this model knows"),
        ({"task": "summarize"}, "input.task", "'transcribe' or 'translate'"),
    ])
    def test_a_bad_language_or_task_names_the_field(self, loop, whisper, job_input, field,
                                                    says):
        worker, _ = whisper
        got = answer(loop, worker, {"audio": data_uri(wav_bytes(tone(0.3))), **job_input})
        assert got["error_code"] == "invalid_input", got
        assert field in got["error"] and says in got["error"], got["error"]

    def test_a_ctc_model_takes_no_language(self, loop, workers):
        got = answer(loop, workers["automatic-speech-recognition"],
                     {"inputs": data_uri(wav_bytes(tone(0.3))),
                      "parameters": {"task": "translate"}})
        assert got["error_code"] == "invalid_input", got
        assert "input.parameters.task" in got["error"] and "takes no task" in got["error"]


def truncated_wav() -> bytes:
    """A WAV whose header declares 2 s and that holds 0.5 s (cut in transit)."""
    full = wav_bytes(tone(2.0))
    return full[:44 + RATE]


class TestBadAudio:
    @pytest.mark.parametrize(("raw", "says"), [
        (b"plainly not audio at all" * 40, "is not audio"),
        (truncated_wav(), "is truncated: its header declares 2.00 s but it holds 0.50 s"),
        (encoded(tone(2.0), "flac", "flac")[:8000], "is truncated"),
        (wav_bytes(tone(6.0)), "over the limit of 5 s (WORKER_MAX_AUDIO_SECONDS)"),
        (wav_bytes(np.zeros(0, dtype=np.float32)), "no audio"),
    ])
    def test_is_a_failed_answer_naming_the_field(self, loop, workers, raw, says):
        worker = workers["automatic-speech-recognition"]
        got = answer(loop, worker, {"audio": data_uri(raw)})
        assert got["error_code"] == "invalid_input", got
        assert "input.audio" in got["error"] and says in got["error"], got["error"]
        assert "result" in answer(loop, worker, {"audio": data_uri(wav_bytes(tone(0.3)))})

    def test_an_image_sent_as_audio_names_the_field(self, loop, workers):
        from PIL import Image
        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, format="PNG")
        got = answer(loop, workers["audio-classification"],
                     {"inputs": [data_uri(wav_bytes(tone(0.3))), data_uri(out.getvalue())]})
        assert got["error_code"] == "invalid_input" and "input.inputs.1" in got["error"]

    def test_a_file_url_is_refused(self, loop, workers):
        got = answer(loop, workers["audio-classification"], {"audio": "file:///etc/passwd"})
        assert got["error_code"] == "invalid_input" and "input.audio" in got["error"]


# slow: each test starts a worker process (torch, transformers: ~4 s on 2 cores)
@pytest.mark.slow
def test_handler_transcribes_a_job_file_too_large_for_one_argument(model_dirs, tmp_path):
    """``python handler.py --test_input @job.json``: a 10 s WAV is 430 KiB as a data URI, over
    Linux's 128 KiB cap on one command-line argument."""
    import os
    import subprocess
    import sys

    from tests.support.dockerfile import ROOT

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"input": {"audio": data_uri(wav_bytes(tone(10.0)))}}))
    assert job.stat().st_size > 128 * 1024
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MODEL_", "WORKER_", "BUCKET_", "HF_", "RUNPOD_"))}
    env = {**clean, "MODEL_PATH": str(model_dirs["automatic-speech-recognition"]),
           "WORKER_MAX_AUDIO_SECONDS": "30"}
    done = subprocess.run([sys.executable, "handler.py", "--test_input", f"@{job}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    answer_line = [line for line in done.stdout.splitlines() if line.startswith("{")][-1]
    assert json.loads(answer_line)["output"][0]["result"]["text"]



def test_each_kinds_banner_example_is_a_valid_job(loop, workers, model_dirs):
    """The local endpoint's banner prints ``Task.example_for``: it must answer, not fail."""
    check_banner_examples(loop, workers, model_dirs)

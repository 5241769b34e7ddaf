"""Audio in and out: untrusted bytes to mono samples at the model's rate, and samples to a file.

Owns decoding with PyAV (FFmpeg's own decoders, bundled in its wheel): WAV, FLAC, MP3,
OGG/Vorbis and Opus, M4A/AAC and WebM audio, whatever the container says, mixed down to mono
and resampled to the rate the model was trained at. A job's audio is hostile, so:

- the duration the header declares is checked against the limit before anything is decoded,
  and decoding stops at the limit whatever the header said (a header can lie);
- a file that holds less than its header declares is refused as truncated (decoders decode
  what is there without a word), as is one with no audio stream or a codec FFmpeg lacks;
- every refusal is an ``InputError`` naming the job's field.

Encoding (``encode_audio``) writes WAV (16-bit PCM), FLAC or MP3. Never imports torch, runpod or
boto3; blocking, so callers run it in a thread.
"""

from __future__ import annotations

import io
import wave
from typing import Any

import numpy as np

from serving.errors import InputError

FORMATS = "WAV, FLAC, MP3, OGG/Opus, M4A/AAC or WebM audio"
OUTPUT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}
_TRUNCATED_SHARE = 0.9          # less decoded than this share of the declared length: truncated
_TRUNCATED_SLACK_S = 0.2        # codecs' own padding and priming, whatever the length


def decode_audio(raw: bytes, *, sampling_rate: int, max_seconds: float,
                 field: str) -> np.ndarray:
    """``raw`` as float32 mono samples at ``sampling_rate``; InputError naming ``field``."""
    import av  # 0.1 s of import, only for a worker that takes audio

    try:
        container = av.open(io.BytesIO(raw), mode="r", metadata_errors="ignore")
    except av.error.EOFError:
        raise InputError("is truncated: it ends before its header does", field=field) from None
    except (av.error.FFmpegError, ValueError):
        raise InputError(f"is not audio: send {FORMATS}", field=field) from None
    with container:
        if not container.streams.audio:
            raise InputError(f"holds no audio stream: send {FORMATS}", field=field)
        stream = container.streams.audio[0]
        declared = _wav_declared_seconds(raw) or _declared_seconds(container, stream)
        if declared is not None and declared > max_seconds:
            raise InputError(f"is {declared:,.1f} s long, over the limit of {max_seconds:g} s "
                             "(WORKER_MAX_AUDIO_SECONDS); send a shorter clip", field=field)
        limit = int(max_seconds * sampling_rate) + 1
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray()[0])
                    total += chunks[-1].shape[0]
                if total > limit:
                    raise InputError(f"decodes to more than {max_seconds:g} s "
                                     "(WORKER_MAX_AUDIO_SECONDS); send a shorter clip",
                                     field=field)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray()[0])
        except InputError:
            raise
        except (av.error.FFmpegError, ValueError) as exc:
            if isinstance(exc, av.error.DecoderNotFoundError):
                raise InputError(f"uses a codec this worker cannot decode; send {FORMATS}",
                                 field=field) from None
            raise InputError("could not be decoded: the audio data is corrupt",
                             field=field) from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    seconds = samples.shape[0] / sampling_rate
    if samples.shape[0] == 0:
        raise InputError("holds no audio samples", field=field)
    if declared is not None and seconds < declared * _TRUNCATED_SHARE - _TRUNCATED_SLACK_S:
        raise InputError(f"is truncated: its header declares {declared:,.2f} s but it holds "
                         f"{seconds:,.2f} s", field=field)
    return samples.astype(np.float32, copy=False)


def _wav_declared_seconds(raw: bytes) -> float | None:
    """The length a WAV's own header declares (FFmpeg reads it from the file's size instead,
    so a WAV cut in transit would decode short without a word)."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, 0
    while pos + 8 <= len(raw):
        chunk, size = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
        if chunk == b"fmt " and pos + 16 <= len(raw):
            byte_rate = int.from_bytes(raw[pos + 16:pos + 20], "little")
        if chunk == b"data":
            streaming = size in (0, 0xFFFFFFFF)     # a length left open by a live recorder
            return None if streaming or byte_rate <= 0 else size / byte_rate
        pos += 8 + size + (size & 1)
    return None


def _declared_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000          # microseconds (AV_TIME_BASE)
    return None


def encode_audio(samples: np.ndarray, sampling_rate: int, fmt: str) -> bytes:
    """Mono float samples in [-1, 1] as a WAV (16-bit PCM), FLAC or MP3 file."""
    mono = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    if fmt == "wav":
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sampling_rate)
            w.writeframes((mono * 32767).round().astype("<i2").tobytes())
        return out.getvalue()
    import av

    codec = {"flac": "flac", "mp3": "libmp3lame"}[fmt]
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=sampling_rate)
        assert isinstance(stream, av.AudioStream)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
        frame.rate = sampling_rate
        resampler = av.AudioResampler(format=stream.format.name, layout="mono",
                                      rate=int(stream.rate))
        for part in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(part):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()

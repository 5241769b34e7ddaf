"""Families benchmark: 8 concurrent jobs through the worker, against transformers' pipeline
called one input at a time and with the 8 inputs as one list, in the same run. Not a test.

    .venv/bin/python -m bench.families_bench                 # ~4 min on 2 CPU cores
    .venv/bin/python -m bench.families_bench --kinds text-classification fill-mask

Each kind's model is a small one with random weights, made here: a BERT of 4 layers and 256
wide for the text kinds, a BART of 2+2 layers for summaries, ViT-tiny-sized image models (and
a CLIP, a DPT and a SegFormer-b0), a ViT-tiny + 4-layer GPT-2 captioner, a wav2vec2 of 4 layers,
a Whisper of 2+2 layers and an Audio Spectrogram Transformer of 4. The time of a forward pass
does not depend on the weights' values, and these sizes keep the run short on a CPU while being
large enough that the model, not Python, is most of the time.

- worker: 8 jobs at once through ``Worker.handle`` (the worker's own fields: parsing, media
  decoding, the batcher, the pipeline, JSON), as RunPod's loop would run them.
- one at a time: the same pipeline object called on each input in turn (what a worker without
  batching does at best), images and audio decoded from the same bytes the jobs send; for the
  kinds with no pipeline in transformers 5 (QA, summaries, captioning), the worker's own runner.
- as a list: the pipeline called once on the 8 inputs with ``batch_size=8`` (batching with no
  job machinery at all).

The three take turns in each repeat (the median is kept), so a neighbour's load on a shared
machine falls on all alike; the machine is shared, so repeat a run before trusting a ratio.
A ratio over 1 means the worker's 8 jobs finish sooner. Results go to
``bench/results/<device>-families.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import statistics
import tempfile
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

from serving.device import DEVICE_THREAD
from tests.support.tokenizers import clip_tokenizer, whisper_tokenizer
from tests.support.worker import build_worker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
JOBS = 8
SENTENCES = [
    "The film was a quiet delight from the first scene to the last.",
    "Service was slow and the soup arrived cold, which ruined the evening.",
    "Our flight to Lisbon left on time and landed early.",
    "The new phone's battery lasts two days, but the camera is disappointing.",
    "Researchers in Oslo published the results of the trial on Tuesday.",
    "I would not recommend this hotel to anyone travelling with children.",
    "The orchestra played Brahms, and the hall was full to the last seat.",
    "Prices rose again in March, pushed by energy and food costs.",
]


def word_tokenizer(path: Path) -> Any:
    """A word-piece tokenizer of the benchmark's words (``_vocab``), written in ``path``."""
    # transformers 5's BertTokenizer takes the vocabulary itself (a vocab_file is ignored).
    words = dict.fromkeys(_vocab(path.parent).read_text().split())
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.save_pretrained(path)
    return tokenizer


def _bert(path: Path, head: Any, **config: Any) -> None:
    tokenizer = word_tokenizer(path)
    bert = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=256,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=1024, **config)
    head(bert).save_pretrained(path)


def _vocab(root: Path) -> Path:
    """A word-piece vocabulary of the benchmark's words (no download)."""
    path = root / "vocab.txt"
    if not path.exists():
        words = sorted({w.strip(".,'").lower() for s in SENTENCES for w in s.split()})
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        letters = [chr(c) for c in range(97, 123)] + [f"##{chr(c)}" for c in range(97, 123)]
        path.write_text("\n".join(specials + letters + list(".,'?") + words) + "\n")
    return path


def _labels(*names: str) -> dict[str, Any]:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _image_model(path: Path, model: Any, processor: Any) -> None:
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _ctc(path: Path) -> None:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4,
             **{c: i + 5 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    transformers.Wav2Vec2CTCTokenizer(str(path / "vocab.json")).save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(path)
    config = transformers.Wav2Vec2Config(vocab_size=len(vocab), hidden_size=256,
                                         num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=1024, feat_extract_norm="layer",
                                         pad_token_id=0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(path)


def _captioner(path: Path) -> None:
    """A VisionEncoderDecoder the size of ViT-tiny + a 4-layer GPT-2, writing 16 tokens."""
    tokenizer = word_tokenizer(path)
    ids = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                               intermediate_size=768),
        transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=256, n_layer=4, n_head=4,
                                add_cross_attention=True, is_decoder=True, **ids))
    config.decoder_start_token_id = ids["bos_token_id"]
    config.pad_token_id, config.eos_token_id = ids["pad_token_id"], ids["eos_token_id"]
    model = transformers.VisionEncoderDecoderModel(config)
    model.generation_config.update(decoder_start_token_id=ids["bos_token_id"], max_length=17,
                                   suppress_tokens=[ids["eos_token_id"]], **ids)
    _image_model(path, model, transformers.ViTImageProcessor())


def _summarizer(path: Path) -> None:
    """A BART of 2+2 layers and 256 wide, writing 16 tokens (its end token suppressed)."""
    tokenizer = word_tokenizer(path)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
           "eos_token_id": tokenizer.sep_token_id}
    config = transformers.BartConfig(
        vocab_size=len(tokenizer), d_model=256, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024,
        decoder_ffn_dim=1024, max_position_embeddings=256, forced_eos_token_id=None,
        decoder_start_token_id=ids["eos_token_id"], **ids)
    model = transformers.BartForConditionalGeneration(config)
    model.generation_config.update(max_new_tokens=16, min_new_tokens=16, num_beams=1,
                                   suppress_tokens=[ids["eos_token_id"]])
    model.save_pretrained(path)


def _clip(path: Path) -> None:
    """A CLIP of a ViT-tiny-sized image tower and a 4-layer text tower, with a character-level
    tokenizer (no merges)."""
    vocab = clip_tokenizer(path)
    end = vocab["<|endoftext|>"]
    text = {"vocab_size": len(vocab), "hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": end, "pad_token_id": end}
    vision = {"image_size": 224, "patch_size": 16, "hidden_size": 192,
              "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 3}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=256)
    _image_model(path, transformers.CLIPModel(config), transformers.CLIPImageProcessor())


def _depth(path: Path) -> None:
    """A DPT of a ViT-tiny-sized backbone (4 layers) at 224 pixels."""
    config = transformers.DPTConfig(
        image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=4,
        num_attention_heads=3, intermediate_size=768, neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64, backbone_out_indices=[0, 1, 2, 3], head_hidden_size=32)
    _image_model(path, transformers.DPTForDepthEstimation(config),
                 transformers.DPTImageProcessor(size={"height": 224, "width": 224}))


def _ast(path: Path) -> None:
    """An Audio Spectrogram Transformer of 4 layers and 192 wide over 5 s of 128 mel bins."""
    config = transformers.ASTConfig(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
        max_length=512, num_mel_bins=128, **_labels("speech", "music", "noise"))
    _image_model(path, transformers.ASTForAudioClassification(config),
                 transformers.ASTFeatureExtractor(num_mel_bins=128, max_length=512))


def _whisper(path: Path) -> None:
    """A Whisper of 2+2 layers and 256 wide over Whisper's 30 s of 80 mel bins (whisper-tiny
    is 4+4 and 384), with a byte-level tokenizer (no merges) and Whisper's special tokens,
    writing 16 tokens."""
    size, ids = whisper_tokenizer(path, [
        "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
        "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"])
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    config = transformers.WhisperConfig(
        vocab_size=size, num_mel_bins=80, d_model=256, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_target_positions=448,
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    model = transformers.WhisperForConditionalGeneration(config)
    generation = model.generation_config
    generation.update(max_length=20, no_timestamps_token_id=ids["<|notimestamps|>"],
                      suppress_tokens=list(ids.values()))      # bytes only: 16 of them
    generation.begin_suppress_tokens = None
    generation._from_model_config = False
    model.save_pretrained(path)


MAKERS: dict[str, Callable[[Path], None]] = {
    "text-classification": lambda p: _bert(
        p, transformers.BertForSequenceClassification, **_labels("NEG", "POS")),
    "zero-shot-classification": lambda p: _bert(
        p, transformers.BertForSequenceClassification,
        **_labels("contradiction", "neutral", "entailment")),
    "token-classification": lambda p: _bert(
        p, transformers.BertForTokenClassification, **_labels("O", "B-PER", "B-LOC")),
    "fill-mask": lambda p: _bert(p, transformers.BertForMaskedLM),
    "question-answering": lambda p: _bert(p, transformers.BertForQuestionAnswering),
    # The same model on a one-sentence context (about 20 tokens, not 130): what batching
    # gives QA where a forward pass is small next to its fixed cost, as for the other text kinds.
    "question-answering-short": lambda p: _bert(p, transformers.BertForQuestionAnswering),
    "summarization": _summarizer,
    "image-classification": lambda p: _image_model(
        p, transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
            **_labels("cat", "dog"))),
        transformers.ViTImageProcessor()),
    "object-detection": lambda p: _image_model(
        p, transformers.YolosForObjectDetection(transformers.YolosConfig(
            hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
            image_size=[256, 256], **_labels("a", "b"))),
        transformers.YolosImageProcessor(size={"shortest_edge": 256, "longest_edge": 256})),
    "zero-shot-image-classification": _clip,
    "image-segmentation": lambda p: _image_model(
        p, transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
            **_labels("sky", "road", "tree", "car"))),          # the size of SegFormer-b0
        transformers.SegformerImageProcessor(size={"height": 256, "width": 256})),
    "depth-estimation": _depth,
    "image-to-text": _captioner,
    "speech-recognition-ctc": _ctc,
    "speech-recognition-whisper": _whisper,
    "audio-classification": _ast,
}


IMAGE_KINDS = ("image-classification", "zero-shot-image-classification", "object-detection",
               "image-segmentation", "depth-estimation", "image-to-text")


def _inputs(kind: str, name: str = "") -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(job inputs, pipeline inputs, pipeline parameters) for 8 jobs of ``kind`` (the row
    ``name`` picks a variant)."""
    params: dict[str, Any] = {}
    if kind in IMAGE_KINDS:
        if kind == "zero-shot-image-classification":
            params = {"candidate_labels": ["a cat", "a dog", "a car"]}
        images = [Image.fromarray(np.random.default_rng(i).integers(
            0, 256, (240, 320, 3), dtype=np.uint8)) for i in range(JOBS)]
        jobs = [{"image": _png_uri(image), **params} for image in images]
        return jobs, [_Encoded(_file(job["image"]), "image") for job in jobs], params
    if kind in ("automatic-speech-recognition", "audio-classification"):
        clips = [(np.random.default_rng(i).standard_normal(32000) * 0.1).astype(np.float32)
                 for i in range(JOBS)]
        jobs = [{"audio": _wav_uri(clip)} for clip in clips]
        return jobs, [_Encoded(_file(job["audio"]), "audio") for job in jobs], params
    texts = list(SENTENCES)
    if kind == "fill-mask":
        texts = [s.replace("the", "[MASK]", 1) if "the" in s else "[MASK] " + s for s in texts]
    if kind == "zero-shot-classification":
        params = {"candidate_labels": ["travel", "food", "music"]}
    if kind == "token-classification":      # our field's default; the pipeline's is "none"
        params = {"aggregation_strategy": "simple"}
    if kind == "question-answering":
        contexts = (SENTENCES if name.endswith("-short") else [" ".join(SENTENCES)] * JOBS)
        jobs = [{"question": f"What happened {i}?", "context": context}
                for i, context in enumerate(contexts)]
        return jobs, [dict(j) for j in jobs], params
    return [{"text": t, **params} for t in texts], texts, params


class _Encoded:
    """A file as the job sends it: the direct calls decode it too, as any caller must (the
    pipeline opens images itself; it needs an ffmpeg binary for audio bytes, so this uses the
    worker's own decoder), so both sides pay for decoding."""

    def __init__(self, data: bytes, kind: str) -> None:
        self.data, self.kind = data, kind

    def decoded(self) -> Any:
        if self.kind == "image":
            return Image.open(io.BytesIO(self.data)).convert("RGB")
        from serving.audio import decode_audio
        return {"raw": decode_audio(self.data, sampling_rate=16000, max_seconds=60, field="f"),
                "sampling_rate": 16000}


def _file(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def _png_uri(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _wav_uri(clip: np.ndarray) -> str:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((clip.clip(-1, 1) * 32767).astype("<i2").tobytes())
    return "data:audio/wav;base64," + base64.b64encode(out.getvalue()).decode()


def _direct(kind: str, pipe: Any, inputs: list[Any], params: dict[str, Any]) -> Any:
    from serving import text_runners

    if kind == "question-answering":        # no pipeline in transformers 5: our runner alone
        qa = {"top_k": 1, "max_answer_len": 15, "doc_stride": 128,
              "handle_impossible_answer": False}
        return text_runners.question_answering(pipe, inputs, qa, kind)
    if kind == "image-to-text":             # likewise: the 4.x pipeline's computation
        images = [x.decoded() for x in inputs]
        return text_runners.image_to_text(pipe, images, params, kind)
    if kind in ("text2text-generation", "summarization", "translation"):
        return text_runners.text2text(pipe, inputs, params, kind)
    # The pipeline takes an audio dict apart: each call gets its own copies, as the worker's do.
    inputs = [x.decoded() if isinstance(x, _Encoded) else dict(x) if isinstance(x, dict) else x
              for x in inputs]
    return pipe(inputs, batch_size=len(inputs), **params)


def bench_kind(name: str, root: Path, repeats: int) -> dict[str, Any]:
    path = root / name
    torch.manual_seed(0)
    MAKERS[name](path)
    worker = build_worker({"MODEL_PATH": str(path), "WORKER_MAX_BATCH_SIZE": str(JOBS),
                           "WORKER_BATCH_WAIT_MS": "10"})
    pipe = worker.task.pipe
    kind = worker.task.family.kind          # the kind detected from the model's config
    jobs, inputs, params = _inputs(kind, name)

    async def run_jobs() -> None:
        async def one(n: int, job: dict[str, Any]) -> None:
            async for out in worker.handle({"id": f"j{n}", "input": job}):
                assert "error" not in out and out.get("result") is not None, out
        await asyncio.gather(*(one(n, job) for n, job in enumerate(jobs)))

    # One event loop for every repeat, as RunPod's loop is one for every job (a new loop per
    # repeat would start new executor threads each time and time them too).
    loop = asyncio.new_event_loop()
    # The direct calls run on the worker's device thread too: torch's OpenMP threads belong
    # to the thread that calls it, and a second caller's would spin beside the first's.
    ways: dict[str, Callable[[], Any]] = {
        "worker": lambda: loop.run_until_complete(run_jobs()),
        "one": lambda: DEVICE_THREAD.submit(
            lambda: [_direct(kind, pipe, [x], params) for x in inputs]).result(),
        "list": lambda: DEVICE_THREAD.submit(_direct, kind, pipe, inputs, params).result(),
    }
    try:
        worker_s, one_s, list_s = _timed(ways, repeats).values()
    finally:
        pending = asyncio.all_tasks(loop)        # the batcher's, waiting for the next job
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    return {"kind": name, "worker_8_jobs_s": worker_s, "one_at_a_time_s": one_s,
            "as_one_list_s": list_s, "vs_one_at_a_time": one_s / worker_s,
            "vs_one_list": list_s / worker_s}


def _timed(ways: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Each way's median seconds. The ways take turns in each repeat, so a neighbour's load on
    a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in ways}

    def run() -> None:
        start = time.perf_counter()
        for fn in ways.values():
            fn()                                 # warm: allocator, kernels, caches
        # A kind whose round takes milliseconds is repeated more (up to 5x, about 2 s of
        # rounds): one noisy round moves the median of a few much more than of many.
        rounds = max(repeats, min(5 * repeats, int(2.0 / (time.perf_counter() - start))))
        for _ in range(rounds):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    thread = threading.Thread(target=run, name="bench")
    thread.start()
    thread.join()
    if len({len(t) for t in times.values()}) != 1 or any(len(t) < repeats
                                                          for t in times.values()):
        raise RuntimeError("a timed call failed; see the traceback above")
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="*", default=list(MAKERS), choices=list(MAKERS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            row = bench_kind(kind, Path(tmp), args.repeats)
            rows.append(row)
            print(f"{kind:32} 8 jobs {row['worker_8_jobs_s']:.3f}s | one at a time "
                  f"{row['one_at_a_time_s']:.3f}s ({row['vs_one_at_a_time']:.2f}x) | as one "
                  f"list {row['as_one_list_s']:.3f}s ({row['vs_one_list']:.2f}x)", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = RESULTS / f"{device}-families.json"
    out.write_text(json.dumps({"device": device, "machine": platform.machine(),
                               "threads": torch.get_num_threads(), "jobs": JOBS,
                               "torch": torch.__version__,
                               "transformers": transformers.__version__, "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

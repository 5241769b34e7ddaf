"""Tokenizers the tests and benchmarks write themselves, with no Hub: a character-level CLIP
tokenizer and a byte-level Whisper one."""

from __future__ import annotations

import json
from pathlib import Path

import transformers


def clip_tokenizer(path: Path) -> dict[str, int]:
    """A character-level CLIP tokenizer (no merges) written in ``path``; its vocabulary."""
    chars = "abcdefghijklmnopqrstuvwxyz.,"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")
                               ).save_pretrained(path)
    return vocab


def whisper_tokenizer(path: Path, specials: list[str]) -> tuple[int, dict[str, int]]:
    """A byte-level Whisper tokenizer with no merges (every text encodes) and ``specials``
    (``<|endoftext|>`` first: the pad token, as Whisper's own) written in ``path``; its size
    and each special's id."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = transformers.WhisperTokenizer(
        vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[],
        additional_special_tokens=specials[1:], pad_token=specials[0])
    tokenizer.save_pretrained(path)
    return len(tokenizer), {s: tokenizer.convert_tokens_to_ids(s) for s in specials}

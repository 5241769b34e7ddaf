"""The kinds transformers 5 dropped the pipelines of, computed as the 4.x pipelines did.

Owns the runners ``serving/families.py`` names, each called on the device thread with a batch
of inputs that share their parameters and with ``pipe`` (the model and its preprocessors, as a
pipeline holds them), answering one JSON result per input:

- ``text2text``: seq2seq models (T5, BART, Marian): ``generate`` with the model's own generation
  config, the job's parameters over it; ``{"generated_text"}``, or ``summary_text`` /
  ``translation_text`` when the worker serves the model as summarization or translation.
- ``question_answering``: extractive QA (SQuAD-style heads): the best spans by start and end
  logits within the context, over windows of the context (``doc_stride`` tokens of overlap) so a
  long context is read whole; ``{"answer", "score", "start", "end"}`` with character offsets,
  a list of the ``top_k`` best when it is over 1.
- ``image_to_text``: captioners (BLIP, GIT, VisionEncoderDecoder, Pix2Struct): the image
  processor's pixels (and the prompt, where the model goes on from one), ``generate`` with the
  model's generation config, ``{"generated_text"}``. transformers 5's ``image-text-to-text``
  pipeline needs a prompt and a multimodal processor, so it captions none of these as they are.

Never imports runpod or boto3; knows nothing about jobs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def token_limit(model: Any, tokenizer: Any) -> int:
    """The most tokens the model reads: its position embeddings and its tokenizer's limit,
    whichever is smaller (a tokenizer without one says 1e30); 512 when neither says."""
    limits = [int(x) for x in (getattr(tokenizer, "model_max_length", None),
                               getattr(model.config, "max_position_embeddings", None))
              if isinstance(x, int | float) and 0 < x < 1e6]
    return min(limits, default=512)


def _generation_config(model: Any, params: dict[str, Any]) -> Any:
    """The model's own generation config, the job's parameters over it."""
    config = copy.deepcopy(model.generation_config)
    config.update(**params)
    if not config.do_sample:                     # greedy or beams: sampling knobs unused
        config.temperature = config.top_p = config.top_k = None
    return config


def text2text(pipe: Any, texts: list[str], params: dict[str, Any],
              kind: str) -> list[dict[str, str]]:
    model, tokenizer = pipe.model, pipe.tokenizer
    key = {"summarization": "summary_text", "translation": "translation_text"}.get(
        kind, "generated_text")
    config = _generation_config(model, params)
    batch = tokenizer(texts, return_tensors="pt", padding=True,
                      return_token_type_ids=False).to(model.device)
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=config)
    return [{key: text} for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def refuse_image_to_text(model: Any, params: dict[str, Any]) -> tuple[str, str] | None:
    """A VisionEncoderDecoder model only captions: it goes on from no prompt."""
    if params.get("prompt") is not None and model.config.model_type == "vision-encoder-decoder":
        return "prompt", "this model (a vision encoder-decoder) takes no prompt; leave it out"
    return None


def image_to_text(pipe: Any, images: list[Any], params: dict[str, Any],
                  kind: str) -> list[dict[str, str]]:
    model, tokenizer, processor = pipe.model, pipe.tokenizer, pipe.image_processor
    params = dict(params)
    prompt = params.pop("prompt", None)
    model_type = model.config.model_type
    if prompt is not None and model_type == "pix2struct":     # the prompt is drawn as a header
        inputs = processor(images=images, header_text=prompt, return_tensors="pt")
    else:
        inputs = processor(images=images, return_tensors="pt")
    if prompt is not None and model_type == "git":
        # As the 4.x pipeline: GIT goes on from [CLS] + the prompt's tokens.
        ids = [tokenizer.cls_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        inputs["input_ids"] = torch.tensor([ids] * len(images))
    elif prompt is not None and model_type != "pix2struct":
        inputs.update(tokenizer([prompt] * len(images), return_tensors="pt",
                                return_token_type_ids=False))
    # Images of one call share the prompt: no row is padded, so none depends on its batch-mates.
    inputs = dict(inputs.to(model.device, dtype=model.dtype))
    config = _generation_config(model, params)
    with torch.inference_mode():       # GIT's main input is its text: None with no prompt
        out = model.generate(inputs.pop(model.main_input_name, None), **inputs,
                             generation_config=config)
    return [{"generated_text": text}
            for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def question_answering(pipe: Any, inputs: list[dict[str, str]],
                       params: dict[str, Any], kind: str) -> list[Any]:
    model, tokenizer = pipe.model, pipe.tokenizer
    max_length = token_limit(model, tokenizer)
    question_first = tokenizer.padding_side == "right"
    questions = [i["question"] for i in inputs]
    contexts = [i["context"] for i in inputs]
    stride = min(params["doc_stride"], max_length // 2)
    enc = tokenizer(questions if question_first else contexts,
                    contexts if question_first else questions,
                    truncation="only_second" if question_first else "only_first",
                    max_length=max_length, stride=stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding=True, return_tensors="pt")
    owners = enc.pop("overflow_to_sample_mapping").tolist()
    offsets = enc.pop("offset_mapping").tolist()
    context_id = 1 if question_first else 0
    with torch.inference_mode():
        out = model(**{k: v.to(model.device) for k, v in enc.items()})
    starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()
    candidates: list[list[tuple[float, int, int]]] = [[] for _ in inputs]
    impossible = [0.0 for _ in inputs]
    for window, owner in enumerate(owners):
        in_context = torch.tensor([sid == context_id for sid in enc.sequence_ids(window)])
        start_p = starts[window].masked_fill(~in_context, float("-inf")).softmax(-1)
        end_p = ends[window].masked_fill(~in_context, float("-inf")).softmax(-1)
        null = float(starts[window].softmax(-1)[0] * ends[window].softmax(-1)[0])
        impossible[owner] = max(impossible[owner], null)
        scores = torch.triu(start_p[:, None] * end_p[None, :])
        scores = torch.tril(scores, params["max_answer_len"] - 1)
        flat = scores.flatten()
        k = min(params["top_k"], int((flat > 0).sum()))
        for value, index in zip(*flat.topk(k), strict=True):
            i, j = divmod(int(index), scores.shape[1])
            begin, end = offsets[window][i][0], offsets[window][j][1]
            candidates[owner].append((float(value), begin, end))
    results: list[Any] = []
    for n, found in enumerate(candidates):
        best: dict[tuple[int, int], float] = {}
        for score, begin, end in found:          # windows overlap: one span, its best score
            best[(begin, end)] = max(score, best.get((begin, end), 0.0))
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:params["top_k"]]
        answers: list[dict[str, Any]] = [
            {"score": score, "start": begin, "end": end, "answer": contexts[n][begin:end]}
            for (begin, end), score in ranked]
        if params["handle_impossible_answer"]:
            answers.append({"score": impossible[n], "start": 0, "end": 0, "answer": ""})
            answers = sorted(answers, key=lambda a: -a["score"])[:params["top_k"]]
        results.append(answers[0] if params["top_k"] == 1 else answers)
    return results

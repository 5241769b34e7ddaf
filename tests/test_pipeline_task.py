"""The text families (classifiers, zero-shot, NER, fill-mask) served with no code: each answers
what transformers' pipeline answers for the same model and input, in the Hugging Face API's shape
and in the worker's own, batched across concurrent jobs, and bad inputs name their field.

The models are tiny random ones made from configs with all-MiniLM-L6-v2's tokenizer (no Hub).
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from serving.worker import Worker
from tests.support.families import answer, at_once, check_banner_examples, close
from tests.support.worker import build_worker, collect

NLI = {"contradiction": 0, "neutral": 1, "entailment": 2}
NER = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def tiny_model(path: Path, minilm_dir: Path, head: type, **config: Any) -> Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    bert = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, **config)
    head(bert).save_pretrained(path)
    return path


MODELS: dict[str, tuple[type, dict[str, Any]]] = {
    "sentiment": (transformers.BertForSequenceClassification,
                  {"id2label": {0: "NEG", 1: "POS"}, "label2id": {"NEG": 0, "POS": 1}}),
    "nli": (transformers.BertForSequenceClassification,
            {"id2label": {v: k for k, v in NLI.items()}, "label2id": NLI}),
    "ner": (transformers.BertForTokenClassification,
            {"id2label": NER, "label2id": {v: k for k, v in NER.items()}}),
    "mlm": (transformers.BertForMaskedLM, {}),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: tiny_model(root / name, minilm_dir, head, **config)
            for name, (head, config) in MODELS.items()}


@pytest.fixture(scope="module")
def workers(model_dirs: dict[str, Path]) -> dict[str, Worker]:
    return {name: build_worker({"MODEL_PATH": str(path), "WORKER_BATCH_WAIT_MS": "30"})
            for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def pipelines(model_dirs: dict[str, Path]) -> dict[str, Any]:
    kinds = {"sentiment": "text-classification", "nli": "zero-shot-classification",
             "ner": "token-classification", "mlm": "fill-mask"}
    return {name: transformers.pipeline(kinds[name], model=str(path), device="cpu")
            for name, path in model_dirs.items()}




CASES = [
    ("sentiment", "I loved it", {}),
    ("sentiment", ["I loved it", "awful"], {"top_k": None}),
    ("sentiment", "meh", {"top_k": 2, "function_to_apply": "sigmoid"}),
    ("nli", "the match ended late", {"candidate_labels": ["sport", "politics"]}),
    ("nli", ["a", "b c"], {"candidate_labels": ["x", "y", "z"], "multi_label": True}),
    ("ner", "John Smith lives in Paris", {}),
    ("ner", "John Smith lives in Paris", {"aggregation_strategy": "simple"}),
    ("mlm", "Paris is the [MASK] of France.", {}),
    ("mlm", ["a [MASK] b", "[MASK] c"], {"top_k": 3}),
]


class TestTheHubShapeAnswersWhatThePipelineAnswers:
    @pytest.mark.parametrize(("model", "inputs", "parameters"), CASES)
    def test_same_json(self, loop, workers, pipelines, model, inputs, parameters):
        expected = pipelines[model](inputs, **parameters)
        got = answer(loop, workers[model], {"inputs": inputs, "parameters": parameters})
        from serving.families import to_json
        assert close(got, to_json(expected)), (got, expected)


class TestOwnFields:
    def test_a_classifier_answers_its_result_and_model(self, loop, workers, pipelines,
                                                       model_dirs):
        got = answer(loop, workers["sentiment"], {"text": "I loved it"})
        assert got["model"] == model_dirs["sentiment"].name
        assert close(got["result"], pipelines["sentiment"](["I loved it"])[0])

    def test_ner_defaults_to_grouped_entities(self, loop, workers, pipelines):
        got = answer(loop, workers["ner"], {"text": "John Smith lives in Paris"})
        from serving.families import to_json
        expected = pipelines["ner"]("John Smith lives in Paris", aggregation_strategy="simple")
        assert close(got["result"], to_json(expected))

    def test_zero_shot_takes_its_labels_as_fields(self, loop, workers, pipelines):
        got = answer(loop, workers["nli"], {"text": "t", "candidate_labels": ["a", "b"]})
        assert got["result"]["labels"] and set(got["result"]["labels"]) == {"a", "b"}


class TestBadInput:
    @pytest.mark.parametrize(("model", "job_input", "field", "says"), [
        ("sentiment", {"text": "x", "colour": "red"}, "input.colour", "unknown field"),
        ("sentiment", {"inputs": "x", "parameters": {"top_p": 1}}, "input.parameters.top_p",
         "unknown field"),
        ("sentiment", {"inputs": []}, "input.inputs", "1..64 inputs"),
        ("sentiment", {"text": ""}, "input.text", ""),
        ("nli", {"text": "x"}, "input.candidate_labels", ""),
        ("nli", {"inputs": "x", "parameters": {"candidate_labels": ["a"],
                                               "hypothesis_template": "no slot"}},
         "input.parameters.hypothesis_template", "'{}' exactly once"),
        ("mlm", {"text": "no mask here"}, "input.text", "[MASK]"),
        ("ner", {"text": "word " * 600}, "input.text", "tokens, over the model's 512"),
    ])
    def test_is_refused_naming_the_field(self, loop, workers, model, job_input, field, says):
        got = answer(loop, workers[model], job_input)
        assert got["error_code"] == "invalid_input", got
        assert field in got["error"] and says in got["error"], got["error"]

    def test_the_worker_serves_on_after_a_bad_input(self, loop, workers):
        answer(loop, workers["mlm"], {"text": "no mask"})
        assert "result" in answer(loop, workers["mlm"], {"text": "a [MASK] b"})


def test_concurrent_jobs_share_pipeline_calls(loop, workers, pipelines):
    worker = workers["sentiment"]
    before = worker.task.batcher.batches_run
    texts = [f"text number {i}" for i in range(8)]

    async def all_jobs() -> list[Any]:
        return await asyncio.gather(*(collect(worker, {"text": t}, f"j{i}")
                                      for i, t in enumerate(texts)))

    outs = loop.run(all_jobs())
    assert worker.task.batcher.batches_run - before < len(texts)
    for [out], text in zip(outs, texts, strict=True):
        assert close(out["result"], pipelines["sentiment"]([text])[0])


def test_a_tokenizer_with_no_pad_token_runs_each_text_alone_not_a_failing_batch(
        loop, tmp_path, caplog):
    """Pins every batch of a GPT-2 classifier failing (the pipeline cannot pad without a pad
    token) and each job then retried alone, logged at every batch."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = transformers.GPT2Tokenizer(vocab=vocab, merges=[])
    assert tokenizer.pad_token_id is None
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, bos_token_id=len(vocab) - 1,
        eos_token_id=len(vocab) - 1, id2label={0: "NEG", 1: "POS"},
        label2id={"NEG": 0, "POS": 1})).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        worker = build_worker({"MODEL_PATH": str(tmp_path)})
    assert "has no pad token" in caplog.text
    texts = ["hello", "a longer text", "x", "yes no"]
    pipe = transformers.pipeline("text-classification", model=str(tmp_path), device="cpu")
    caplog.clear()

    with caplog.at_level(logging.WARNING):
        outs = at_once(loop, worker, [{"text": t} for t in texts])
    assert "failed" not in caplog.text, caplog.text
    for out, text in zip(outs, texts, strict=True):
        assert close(out["result"], pipe(text)[0])


# ---------------------------------------------------------------------------------------------
# The kinds transformers 5 has no pipeline for: seq2seq text and extractive question answering
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("bart") / "tiny-bart"
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=tokenizer.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.sep_token_id, forced_eos_token_id=None)
    model = transformers.BartForConditionalGeneration(config)
    model.generation_config.max_new_tokens = 6
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    return tiny_model(tmp_path_factory.mktemp("qa") / "tiny-qa", minilm_dir,
                      transformers.BertForQuestionAnswering, max_position_embeddings=64)


def reference_generate(path: Path, text: str, **overrides: Any) -> str:
    """What 4.x's text2text pipeline answered: generate with the model's generation config."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path)
    config = model.generation_config
    config.update(**overrides)
    batch = tokenizer([text], return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**batch, generation_config=config)
    return tokenizer.decode(out[0], skip_special_tokens=True)


class TestText2Text:
    def test_a_seq2seq_model_is_served_as_text2text(self, loop, seq2seq_dir):
        worker = build_worker({"MODEL_PATH": str(seq2seq_dir)})
        got = answer(loop, worker, {"inputs": "translate this"})
        assert got == [{"generated_text": reference_generate(seq2seq_dir, "translate this")}]
        own = answer(loop, worker, {"text": "translate this", "max_new_tokens": 3})
        assert own["result"] == {"generated_text": reference_generate(
            seq2seq_dir, "translate this", max_new_tokens=3)}

    def test_summarization_answers_summary_text(self, loop, seq2seq_dir):
        worker = build_worker({"MODEL_PATH": str(seq2seq_dir), "WORKER_TASK": "summarization"})
        got = answer(loop, worker, {"inputs": ["one", "two words"],
                                    "parameters": {"num_beams": 2}})
        assert got == [[{"summary_text": reference_generate(seq2seq_dir, t, num_beams=2)}]
                       for t in ("one", "two words")]


def reference_spans(path: Path, question: str, context: str, max_answer_len: int = 15,
                    stride: int = 16) -> list[tuple[float, str]]:
    """Every span the windows allow, scored start-probability x end-probability, by brute force
    over (start, end) pairs: the 4.x pipeline's rule, written independently."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(path)
    enc = tokenizer(question, context, truncation="only_second", max_length=64, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding=True, return_tensors="pt")
    enc.pop("overflow_to_sample_mapping")
    offsets = enc.pop("offset_mapping").tolist()
    with torch.inference_mode():
        out = model(**enc)
    spans: dict[str, float] = {}
    for w in range(len(offsets)):
        ctx = [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]
        start = out.start_logits[w][ctx].softmax(-1)
        end = out.end_logits[w][ctx].softmax(-1)
        for a, i in enumerate(ctx):
            for b, j in enumerate(ctx):
                if 0 <= j - i < max_answer_len:
                    text = context[offsets[w][i][0]:offsets[w][j][1]]
                    spans[text] = max(spans.get(text, 0.0), float(start[a] * end[b]))
    return sorted(((s, t) for t, s in spans.items()), reverse=True)


class TestQuestionAnswering:
    CONTEXT = " ".join(f"word{i}" for i in range(120))    # several windows of 64 tokens

    def test_the_best_span_over_every_window(self, loop, qa_dir):
        worker = build_worker({"MODEL_PATH": str(qa_dir)})
        job = {"inputs": {"question": "which word?", "context": self.CONTEXT},
               "parameters": {"top_k": 3, "doc_stride": 16}}
        got = answer(loop, worker, job)
        expected = reference_spans(qa_dir, "which word?", self.CONTEXT)[:3]
        assert [a["answer"] for a in got] == [t for _, t in expected]
        assert all(math.isclose(a["score"], s, rel_tol=1e-4) for a, (s, _) in
                   zip(got, expected, strict=True))
        assert all(self.CONTEXT[a["start"]:a["end"]] == a["answer"] for a in got)

    def test_own_fields_answer_one_span(self, loop, qa_dir):
        worker = build_worker({"MODEL_PATH": str(qa_dir)})
        got = answer(loop, worker, {"question": "which?", "context": "alpha beta gamma"})
        assert set(got["result"]) == {"answer", "score", "start", "end"}
        assert got["result"]["answer"] in "alpha beta gamma"

    def test_an_input_without_its_context_names_the_field(self, loop, qa_dir):
        worker = build_worker({"MODEL_PATH": str(qa_dir)})
        got = answer(loop, worker, {"inputs": {"question": "q"}})
        assert got["error_code"] == "invalid_input" and "input.inputs.context" in got["error"]



def test_each_kinds_banner_example_is_a_valid_job(loop, workers, model_dirs):
    """The local endpoint's banner prints ``Task.example_for``: it must answer, not fail."""
    check_banner_examples(loop, workers, model_dirs)

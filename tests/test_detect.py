"""Which task serves a model: read exactly from its config, whatever the registry's order.

Models are config-only directories (no weights): detection reads nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

from model_loader import ModelSource, read_model_files
from serving.detect import KINDS, model_kinds
from serving.errors import SettingsError, UnsupportedModel
from serving.loading import pick_task
from tasks import TASKS
from tests.support.dockerfile import ROOT


def config_dir(path: Path, config: transformers.PretrainedConfig, architecture: str) -> Path:
    config.architectures = [architecture]
    config.save_pretrained(path)
    return path


def files(path: Path):
    return read_model_files(ModelSource(path, "MODEL_PATH"))


@pytest.fixture
def whisper(tmp_path: Path) -> Path:
    return config_dir(tmp_path / "whisper", transformers.WhisperConfig(),
                      "WhisperForConditionalGeneration")


@pytest.fixture
def vits(tmp_path: Path) -> Path:
    return config_dir(tmp_path / "vits", transformers.VitsConfig(), "VitsModel")


def kinds(*architectures: str, **config: object) -> tuple[str, ...]:
    return model_kinds(SimpleNamespace(architectures=list(architectures), **config))


class TestKinds:
    @pytest.mark.parametrize(("architecture", "expected"), [
        ("LlamaForCausalLM", ("text-generation",)),
        ("WhisperForConditionalGeneration", ("automatic-speech-recognition",)),
        ("Wav2Vec2ForCTC", ("automatic-speech-recognition",)),
        ("VitsModel", ("text-to-audio",)),
        ("ASTForAudioClassification", ("audio-classification",)),
        ("ViTForImageClassification", ("image-classification",)),
        ("DetrForObjectDetection", ("object-detection",)),
        ("SegformerForSemanticSegmentation", ("image-segmentation",)),
        ("DPTForDepthEstimation", ("depth-estimation",)),
        ("BlipForConditionalGeneration", ("image-to-text", "image-text-to-text")),
        ("VisionEncoderDecoderModel", ("image-to-text", "image-text-to-text")),
        ("LlavaForConditionalGeneration", ("image-text-to-text",)),
        ("BertForTokenClassification", ("token-classification",)),
        ("BertForQuestionAnswering", ("question-answering",)),
        ("T5ForConditionalGeneration", ("text2text-generation",)),
        ("MarianMTModel", ("text2text-generation",)),
        ("Swin2SRForImageSuperResolution", ("image-to-image",)),
    ])
    def test_an_architecture_is_looked_up_in_transformers_tables(self, architecture, expected):
        assert kinds(architecture) == expected

    def test_a_dual_encoder_defaults_to_zero_shot_image_classification(self):
        assert kinds("CLIPModel") == ("zero-shot-image-classification",)
        assert kinds("SiglipModel") == ("zero-shot-image-classification",)

    def test_a_masked_lm_head_is_fill_mask_and_a_bare_encoder_is_feature_extraction(self):
        assert kinds("BertForMaskedLM") == ("fill-mask",)
        assert kinds("BertModel") == ("feature-extraction",)

    def test_bart_is_a_seq2seq_model_first(self):
        assert kinds("BartForConditionalGeneration") == ("text2text-generation",)

    def test_a_classifier_with_entailment_labels_is_zero_shot_first(self):
        nli = {"contradiction": 0, "neutral": 1, "entailment": 2}
        assert kinds("BartForSequenceClassification", label2id=nli) == (
            "zero-shot-classification", "text-classification")
        assert kinds("BertForSequenceClassification", label2id={"NEG": 0, "POS": 1}) == (
            "text-classification",)

    def test_a_captioner_that_is_also_a_causal_lm_defaults_to_captioning(self):
        assert kinds("GitForCausalLM") == ("image-to-text", "image-text-to-text",
                                           "text-generation")

    def test_a_sentence_transformers_folder_is_feature_extraction(self):
        assert model_kinds(SimpleNamespace(architectures=["MPNetModel"]),
                           ["modules.json"])[0] == "feature-extraction"

    def test_a_name_suffix_alone_is_not_enough(self):
        """Pins a guess by suffix: an unknown class ending in ForCausalLM is no causal LM."""
        assert kinds("MadeUpForCausalLM") == ()

    def test_every_kind_a_task_declares_is_known(self):
        for task in TASKS.values():
            assert set(task.pipeline_tasks) <= set(KINDS), task.name


class TestPickTask:
    def test_a_vits_speech_model_is_text_to_audio_not_embed(self, vits):
        """Pins a misdetection: embed claimed VITS, started, then failed every job."""
        assert pick_task(files(vits), "auto", TASKS).name == "pipeline"
        with pytest.raises(UnsupportedModel, match="WORKER_TASK=embed cannot serve.*VitsModel: "
                                                   "read as text-to-audio"):
            pick_task(files(vits), "embed", TASKS)

    def test_whisper_forced_to_generate_stops_with_one_line(self, whisper):
        """Pins a misdetection: WORKER_TASK=generate half-loaded Whisper and answered garbage."""
        with pytest.raises(UnsupportedModel) as err:
            pick_task(files(whisper), "generate", TASKS)
        message = str(err.value)
        assert message.startswith("WORKER_TASK=generate cannot serve the model")
        assert "WhisperForConditionalGeneration: read as automatic-speech-recognition" in message
        assert "\n" not in message

    def test_worker_task_takes_a_kind_name_too(self, default_model_dir):
        assert pick_task(files(default_model_dir), "text-generation", TASKS).name == "generate"

    def test_a_forced_task_that_fits_another_kind_of_the_model_is_taken(self, tmp_path):
        git = config_dir(tmp_path / "git", transformers.GitConfig(), "GitForCausalLM")
        assert pick_task(files(git), "generate", TASKS).name == "generate"
        assert pick_task(files(git), "auto", TASKS).name == "pipeline"      # captioning

    def test_a_chat_vision_language_model_is_served_as_image_text_to_text(self, tmp_path):
        llava = config_dir(tmp_path / "llava", transformers.LlavaConfig(),
                           "LlavaForConditionalGeneration")
        assert model_kinds(transformers.AutoConfig.from_pretrained(llava)) == (
            "image-text-to-text",)
        assert pick_task(files(llava), "auto", TASKS).name == "pipeline"

    def test_an_unknown_worker_task_lists_tasks_and_kinds(self, whisper):
        with pytest.raises(SettingsError, match=r"use one of auto, .*or a kind: .*text-generation"):
            pick_task(files(whisper), "rank", TASKS)

    @pytest.mark.parametrize("name", ["default", "minilm", "swin2sr"])
    def test_the_registry_order_does_not_matter(self, name, request):
        path = request.getfixturevalue(f"{name}_dir" if name != "default" else
                                       "default_model_dir")
        reversed_tasks = dict(reversed(list(TASKS.items())))
        assert (pick_task(files(path), "auto", TASKS)
                is pick_task(files(path), "auto", reversed_tasks))

    def test_two_tasks_claiming_one_model_stop_the_worker(self, default_model_dir):
        class Chat(TASKS["generate"]):
            name = "chat"

        tasks = {**TASKS, "chat": Chat}
        with pytest.raises(UnsupportedModel, match="tasks generate, chat all serve the model.*"
                                                   "set WORKER_TASK"):
            pick_task(files(default_model_dir), "auto", tasks)
        assert pick_task(files(default_model_dir), "chat", tasks) is Chat


    def test_a_tasks_own_rule_beats_a_kind(self, tmp_path):
        """A fork's classifier (its own serves rule) serves a classifier that the built-in
        pipeline task would also take by its kind."""
        classifier = config_dir(tmp_path / "cls", transformers.BertConfig(),
                                "BertForSequenceClassification")

        class Classify(TASKS["pipeline"]):
            name = "classify"

            @classmethod
            def serves(cls, model) -> bool:
                return "BertForSequenceClassification" in model.architectures

        assert pick_task(files(classifier), "auto", TASKS).name == "pipeline"
        assert pick_task(files(classifier), "auto", {**TASKS, "classify": Classify}) is Classify


# slow: each test starts a worker process (torch, transformers: ~4 s on 2 cores)
@pytest.mark.slow
def test_handler_stops_on_whisper_forced_to_generate_with_one_line(whisper):
    """The whole startup: exit 1, one line naming the architecture and what to do."""
    (whisper / "model.safetensors").write_bytes(b"")   # found; never read, detection stops first
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MODEL_", "WORKER_", "BUCKET_", "HF_", "RUNPOD_"))}
    result = subprocess.run([sys.executable, "handler.py"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120,
                            env={**clean, "MODEL_PATH": str(whisper), "WORKER_TASK": "generate"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if "startup failed" in line]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "WhisperForConditionalGeneration" in lines[0]
    assert "tasks that fit it: pipeline" in lines[0]

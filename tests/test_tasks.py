"""The task seam: which task serves a model, the name it answers as, and models none serves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import VideoMAEConfig

from model_loader import ModelSource, read_model_files, served_name
from serving.config import ModelSettings
from serving.errors import SettingsError, UnsupportedModel
from serving.loading import pick_task
from tasks import TASKS
from tests.support.dockerfile import ROOT
from tests.support.worker import build_worker, collect


def files(path: Path, origin: str = "MODEL_PATH"):
    return read_model_files(ModelSource(path, origin))


def video_classifier(path: Path) -> Path:
    """A video classifier: a kind of model no task of this worker serves (config and an empty
    weights file: detection stops before any weight is read)."""
    config = VideoMAEConfig(architectures=["VideoMAEForVideoClassification"])
    config.save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"")
    return path


class TestDetection:
    def test_the_default_causal_lm_is_generate(self, default_model_dir):
        assert pick_task(files(default_model_dir), "auto", TASKS).name == "generate"

    def test_a_sentence_transformers_model_is_embed(self, minilm_dir):
        assert pick_task(files(minilm_dir), "auto", TASKS).name == "embed"

    def test_a_bert_model_without_sentence_transformers_files_is_embed(self, minilm_dir,
                                                                      tmp_path):
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            shutil.copy(minilm_dir / name, tmp_path / name)
        (tmp_path / "model.safetensors").write_bytes(b"")
        assert pick_task(files(tmp_path), "auto", TASKS).name == "embed"

    def test_swin2sr_is_upscale(self, swin2sr_dir):
        assert pick_task(files(swin2sr_dir), "auto", TASKS).name == "upscale"

    def test_worker_task_that_does_not_fit_the_model_names_the_tasks_that_do(self, minilm_dir):
        with pytest.raises(UnsupportedModel, match="WORKER_TASK=generate cannot serve.*BertModel"
                                                   ".*tasks that fit it: embed"):
            pick_task(files(minilm_dir), "generate", TASKS)

    def test_an_unknown_worker_task_names_the_choices(self, minilm_dir):
        """Pins: the choices are the registry's, in its order, whatever a fork registers."""
        choices = ", ".join(["auto", *TASKS])
        with pytest.raises(SettingsError, match=f"WORKER_TASK='rank' is not allowed; use one "
                                                f"of {choices}, or a kind: "):
            pick_task(files(minilm_dir), "rank", TASKS)

    def test_a_model_no_task_serves_names_its_architecture(self, tmp_path):
        with pytest.raises(UnsupportedModel, match="VideoMAEForVideoClassification.*add one"):
            pick_task(files(video_classifier(tmp_path / "video")), "auto", TASKS)


# slow: each test starts a worker process (torch, transformers: ~4 s on 2 cores)
@pytest.mark.slow
class TestStartupWithAModelNoTaskServes:
    """`python handler.py` exits 1 with one line, no traceback (pinned: it used to crash in
    transformers with "Couldn't instantiate the backend tokenizer")."""

    @staticmethod
    def start(env: dict[str, str]) -> str:
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("MODEL_", "WORKER_", "BUCKET_", "HF_", "RUNPOD_"))}
        result = subprocess.run([sys.executable, "handler.py"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env={**clean, **env})
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr + result.stdout
        lines = [line for line in result.stderr.splitlines() if "startup failed" in line]
        assert len(lines) == 1, result.stderr[-2000:]
        return lines[0]

    def test_a_video_classifier(self, tmp_path):
        line = self.start({"MODEL_PATH": str(video_classifier(tmp_path / "video"))})
        assert "no task serves the model" in line and "VideoMAEForVideoClassification" in line
        assert "README: Fork it, add a task" in line

    def test_a_task_forced_onto_a_model_it_does_not_fit(self, swin2sr_dir):
        """Refused from the config, before any weight is read (no half-loaded model)."""
        line = self.start({"MODEL_PATH": str(swin2sr_dir), "WORKER_TASK": "generate"})
        assert "WORKER_TASK=generate cannot serve the model" in line
        assert "Swin2SRForImageSuperResolution" in line and "tasks that fit it: upscale" in line


class TestServedName:
    """The model's own identity in answers, /v1/models and the startup line, for every source."""

    def settings(self, **env: str) -> ModelSettings:
        return ModelSettings.from_env(env)

    def test_model_path_uses_the_name_recorded_by_the_builder(self, tmp_path):
        (tmp_path / "builder.json").write_text(json.dumps({"request": {"model": "org/recorded"}}))
        source = ModelSource(tmp_path, "MODEL_PATH")
        assert served_name(self.settings(MODEL_PATH=str(tmp_path)), source) == "org/recorded"

    def test_model_path_without_a_record_uses_the_folder_name(self, tmp_path):
        folder = tmp_path / "my-model"
        folder.mkdir()
        source = ModelSource(folder, "MODEL_PATH")
        assert served_name(self.settings(MODEL_PATH=str(folder)), source) == "my-model"

    @pytest.mark.parametrize("origin", ["baked", "runpod-cache", "hf-cache", "hub-download"])
    def test_other_sources_use_model_name(self, tmp_path, origin):
        source = ModelSource(tmp_path, origin)
        assert served_name(self.settings(MODEL_NAME="org/named"), source) == "org/named"

    @pytest.mark.parametrize("origin", ["MODEL_PATH", "baked", "hf-cache"])
    def test_model_served_name_overrides_every_source(self, tmp_path, origin):
        source = ModelSource(tmp_path, origin)
        settings = self.settings(MODEL_NAME="org/named", MODEL_SERVED_NAME="public-name")
        assert served_name(settings, source) == "public-name"

    def test_minilm_by_model_path_answers_as_its_folder_everywhere(self, loop, minilm_dir,
                                                                   caplog):
        worker = build_worker({"MODEL_PATH": str(minilm_dir), "MODEL_WARMUP": "false"})
        assert worker.loaded.served_name == minilm_dir.name == "model"
        (out,) = loop.run(collect(worker, {"text": "hello"}))
        assert out["model"] == "model"
        (models,) = loop.run(collect(worker, {"openai_route": "/v1/models"}))
        assert [m["id"] for m in models["data"]] == ["model"]


class TestOpenAIRoutesThatDoNotFit:
    def test_chat_on_an_image_model_refuses_in_openai_shape(self, loop, upscale_worker):
        body = {"model": upscale_worker.loaded.served_name,
                "messages": [{"role": "user", "content": "hi"}]}
        (out,) = loop.run(collect(upscale_worker, {"openai_route": "/v1/chat/completions",
                                                   "openai_input": body}))
        error = json.loads(out["error"])["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "openai_route"
        assert "upscale task" in error["message"] and "/runsync" in error["message"]

    def test_embeddings_on_a_chat_model_points_at_the_routes_it_has(self, loop, worker):
        body = {"model": worker.loaded.served_name, "input": "hi"}
        (out,) = loop.run(collect(worker, {"openai_route": "/v1/embeddings",
                                           "openai_input": body}))
        error = json.loads(out["error"])["error"]
        assert "/v1/chat/completions" in error["message"]

    def test_models_still_lists_an_image_model(self, loop, upscale_worker):
        (out,) = loop.run(collect(upscale_worker, {"openai_route": "/v1/models"}))
        assert [m["id"] for m in out["data"]] == [upscale_worker.loaded.served_name]

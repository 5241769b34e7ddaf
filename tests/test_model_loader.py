"""Where the loader looks for weights, and what it refuses. Tmp directories, no model load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_loader import resolve_model_source
from serving.config import ModelSettings
from serving.errors import ModelNotFound, SettingsError
from serving.placement import choose_device, choose_device_map, choose_dtype, describe_placement

NAME = "org/tiny-model"
# These assert what happens without a GPU; on a CUDA machine the answer is rightly different.
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")


def make_model_dir(path: Path, weights: str = "model.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / weights).write_bytes(b"\0")
    return path


def make_cache(cache: Path, name: str = NAME, commit: str = "abc123", ref: str | None = "main"
               ) -> Path:
    """A model in the Hugging Face cache layout: models--org--name/{refs,snapshots}."""
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshot = make_model_dir(repo / "snapshots" / commit)
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    """Settings whose every place is an empty tmp directory."""
    return {
        "MODEL_NAME": NAME,
        "MODEL_BAKED_DIR": str(tmp_path / "baked"),
        "RUNPOD_HF_CACHE": str(tmp_path / "runpod"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
    }


def resolve(env: dict[str, str]):
    return resolve_model_source(ModelSettings.from_env(env))


class TestResolutionOrder:
    def test_model_path_wins_over_everything(self, tmp_path, places):
        make_model_dir(Path(places["MODEL_BAKED_DIR"]))
        explicit = make_model_dir(tmp_path / "explicit")
        source = resolve({**places, "MODEL_PATH": str(explicit)})
        assert (source.path, source.origin) == (explicit, "MODEL_PATH")

    def test_broken_model_path_fails_instead_of_searching_on(self, tmp_path, places):
        make_model_dir(Path(places["MODEL_BAKED_DIR"]))
        with pytest.raises(ModelNotFound, match="MODEL_PATH=.* does not exist"):
            resolve({**places, "MODEL_PATH": str(tmp_path / "missing")})

    def test_baked_dir_comes_before_the_caches(self, places):
        make_model_dir(Path(places["MODEL_BAKED_DIR"]))
        make_cache(Path(places["RUNPOD_HF_CACHE"]))
        assert resolve(places).origin == "baked"

    def test_runpod_cache_comes_before_the_hf_cache(self, places):
        snapshot = make_cache(Path(places["RUNPOD_HF_CACHE"]))
        make_cache(Path(places["HF_HUB_CACHE"]))
        source = resolve(places)
        assert (source.path, source.origin) == (snapshot, "runpod-cache")

    def test_hf_cache_on_a_network_volume_is_found(self, places):
        snapshot = make_cache(Path(places["HF_HUB_CACHE"]))
        assert resolve(places).path == snapshot

    def test_revision_follows_its_ref(self, places):
        cache = Path(places["RUNPOD_HF_CACHE"])
        make_cache(cache, commit="aaa")
        tagged = make_cache(cache, commit="bbb", ref="v2")
        assert resolve({**places, "MODEL_REVISION": "v2"}).path == tagged

    def test_revision_can_be_a_commit_hash(self, places):
        cache = Path(places["RUNPOD_HF_CACHE"])
        make_cache(cache, commit="aaa")
        pinned = make_cache(cache, commit="ccc", ref=None)
        assert resolve({**places, "MODEL_REVISION": "ccc"}).path == pinned

    def test_a_single_snapshot_without_refs_is_used(self, places):
        snapshot = make_cache(Path(places["HF_HUB_CACHE"]), ref=None)
        assert resolve(places).path == snapshot

    def test_baked_model_of_another_name_is_skipped(self, places):
        baked = make_model_dir(Path(places["MODEL_BAKED_DIR"]))
        (baked / "builder.json").write_text(json.dumps(
            {"request": {"source": "hub", "model": "other/model"}}))
        snapshot = make_cache(Path(places["HF_HUB_CACHE"]))
        assert resolve(places).path == snapshot


class TestNothingFound:
    def test_error_lists_every_place_and_the_fixes(self, places):
        with pytest.raises(ModelNotFound) as err:
            resolve(places)
        message = str(err.value)
        for place in ("MODEL_BAKED_DIR", "RUNPOD_HF_CACHE", "HF_HUB_CACHE",
                      "MODEL_ALLOW_DOWNLOAD is false", "make model", "MODEL_PATH"):
            assert place in message

    def test_pickle_only_weights_are_refused_by_name(self, tmp_path, places):
        pickled = make_model_dir(tmp_path / "pickled", weights="pytorch_model.bin")
        with pytest.raises(ModelNotFound, match="pickle"):
            resolve({**places, "MODEL_PATH": str(pickled)})

    def test_a_directory_without_config_is_refused(self, tmp_path, places):
        (tmp_path / "noconfig").mkdir()
        (tmp_path / "noconfig" / "model.safetensors").write_bytes(b"\0")
        with pytest.raises(ModelNotFound, match="no config.json"):
            resolve({**places, "MODEL_PATH": str(tmp_path / "noconfig")})


class TestDeviceAndDtype:
    @without_cuda
    def test_auto_device_is_cpu_without_cuda(self):
        assert choose_device("auto") == "cpu"

    @without_cuda
    def test_asking_for_cuda_without_one_fails_at_startup(self):
        with pytest.raises(SettingsError, match="MODEL_DEVICE=cuda"):
            choose_device("cuda")

    def test_cpu_runs_in_float32_and_an_explicit_dtype_is_kept(self):
        import torch
        assert choose_dtype("auto", "cpu") == torch.float32
        assert choose_dtype("bfloat16", "cpu") == torch.bfloat16

    def test_several_gpus_spread_the_layers_only_when_the_device_is_auto(self):
        assert choose_device_map("cuda", "auto", 4) == "auto"
        assert choose_device_map("cuda", "auto", 1) == {"": "cuda"}
        assert choose_device_map("cuda:1", "cuda:1", 4) == {"": "cuda:1"}
        assert choose_device_map("cpu", "cpu", 0) == {"": "cpu"}

    def test_the_startup_line_names_the_devices_the_layers_went_to(self):
        class Spread:
            hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                             "lm_head": 1}

        class Offloaded:
            hf_device_map = {"model.layers.0": 0, "model.layers.1": "cpu"}

        class Whole:
            hf_device_map = {"": "cuda:0"}

        assert describe_placement(Spread()) == "spread over cuda:0, cuda:1"
        assert describe_placement(Offloaded()).startswith("spread over cpu, cuda:0 (layers on")
        assert describe_placement(Whole()) == "one device"
        assert describe_placement(object()) == "one device"

    def test_unknown_device_is_refused_naming_the_legal_values(self):
        with pytest.raises(SettingsError, match="MODEL_DEVICE='tpu'.*auto, cpu, cuda"):
            ModelSettings.from_env({"MODEL_DEVICE": "tpu"})

"""The RunPod Hub files agree with the code: settings, defaults, limits, disk and the test job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serving import config
from serving.errors import SettingsError
from serving.validation import parse_input
from tasks.generate import GenerateInput

ROOT = Path(__file__).resolve().parent.parent
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
INPUTS = [e for e in HUB["config"]["env"] if "input" in e]

# Which settings class reads each group of variables.
READERS = {"model": config.ModelSettings, "worker": config.WorkerSettings,
           "storage": config.StorageSettings, "download": config.DownloadSettings,
           "launch": config.LaunchSettings}


def _hub_text(value: Any) -> str:
    """A hub.json default as the text the worker reads from its environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# Settings read together (the default must not exceed the limit): a value offered for one is
# checked with the other at its most permissive legal value, as a user would set both.
PARTNERS = {"WORKER_MAX_NEW_TOKENS": {"WORKER_DEFAULT_MAX_NEW_TOKENS": "1"},
            "WORKER_DEFAULT_MAX_NEW_TOKENS": {"WORKER_MAX_NEW_TOKENS": "131072"}}

# What "/" holds in a worker besides the weights: the unpacked base image
# (pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime: torch with its CUDA and cuDNN libraries,
# an upper estimate) and the packages of requirements.txt.
BASE_IMAGE_GB = 8.0
PACKAGES_GB = 1.0
# runpod's SDK exits a worker whose "/" has less than this share free (RUNPOD_MIN_DISK_PERCENT).
SDK_MIN_FREE = 0.10


def _reads(name: str, value: str) -> bool:
    """Whether the settings class of ``name`` accepts ``value`` for it."""
    try:
        READERS[config.VARS[name].group].from_env({**PARTNERS.get(name, {}), name: value})
    except SettingsError:
        return False
    return True


class TestHubListing:
    def test_the_listing_has_the_required_fields(self):
        assert HUB["type"] == "serverless"
        assert HUB["category"] in ("audio", "embedding", "language", "video", "image")
        assert HUB["title"] and HUB["description"]
        cfg = HUB["config"]
        assert cfg["runsOn"] == "GPU" and cfg["gpuCount"] >= 1 and cfg["gpuIds"]
        assert isinstance(cfg["containerDiskInGb"], int)
        assert all(v >= "12.6" for v in cfg["allowedCudaVersions"]), (
            "the base image is built for CUDA 12.6: older drivers cannot run it")

    def test_the_container_disk_holds_the_image_and_twice_the_weights(self, default_model_dir):
        # Twice: room for a second copy of the weights (a download to a cache, a conversion)
        # on top of the baked one, and still the SDK's free share left over.
        weights_gb = sum(p.stat().st_size for p in default_model_dir.glob("*.safetensors")) / 1e9
        needed = (BASE_IMAGE_GB + PACKAGES_GB + 2 * weights_gb) / (1 - SDK_MIN_FREE)
        disk = HUB["config"]["containerDiskInGb"]
        assert disk >= needed, (
            f"containerDiskInGb {disk} is too small for a {weights_gb:.1f} GB model: set it to "
            f"at least {needed:.0f} in .runpod/hub.json (and docs/deploy.md's Container disk)")
        guide = (ROOT / "docs" / "deploy.md").read_text()
        assert f"**Container disk**: {disk} GB" in guide, "say the same in docs/deploy.md"

    @pytest.mark.parametrize("entry", INPUTS, ids=[e["key"] for e in INPUTS])
    def test_each_input_is_a_declared_setting_with_its_default_and_meaning(self, entry):
        var = config.VARS.get(entry["key"])
        assert var is not None, f"{entry['key']} is not declared in config.py"
        field = entry["input"]
        assert field["description"] == var.meaning, "keep hub.json's text equal to config.py's"
        if var.default is None:
            assert "default" not in field
        else:
            assert _hub_text(field["default"]) == var.default
        assert not var.secret or "default" not in field

    @pytest.mark.parametrize("entry", INPUTS, ids=[e["key"] for e in INPUTS])
    def test_each_input_offers_only_values_the_worker_accepts(self, entry):
        field, name = entry["input"], entry["key"]
        if field["type"] == "boolean":
            assert _reads(name, field["trueValue"]) and _reads(name, field["falseValue"])
        for option in field.get("options", []):
            assert _reads(name, option["value"]), f"{name}: option {option['value']!r}"
        if "min" in field:
            assert _reads(name, str(field["min"])) and _reads(name, str(field["max"]))
            assert not _reads(name, str(field["min"] - 1)), f"{name}: min is not the limit"
            assert not _reads(name, str(field["max"] + 1)), f"{name}: max is not the limit"

    @pytest.mark.parametrize("entry", INPUTS, ids=[e["key"] for e in INPUTS])
    def test_a_number_is_bounded_as_its_declaration_says(self, entry):
        field = entry["input"]
        if field["type"] != "number":
            return
        assert "min" in field and "max" in field, f"{entry['key']}: give it a min and a max"
        var = config.VARS[entry["key"]]
        assert field["min"] == var.ge, f"{entry['key']}: min disagrees with config.py's ge"
        if var.le is not None:      # else bounded by another setting (PARTNERS)
            assert field["max"] == var.le, f"{entry['key']}: max disagrees with config.py's le"

    def test_the_launch_switch_is_not_offered_on_serverless(self):
        assert not {"WORKER_MODE", "WORKER_POD_PORT", "WORKER_POD_API_KEY"} & {
            e["key"] for e in HUB["config"]["env"]}


class TestHubTests:
    def test_each_test_job_is_valid_input_for_the_task(self):
        limits = config.WorkerSettings.from_env({})
        for test in TESTS["tests"]:
            parse_input(GenerateInput, test["input"], {"limits": limits})
            # Milliseconds. A first job on a new worker waits for the image pull and the model
            # load: 300 s, as worker-vllm allows.
            assert 300_000 <= test["timeout"] <= 600_000, "room for a cold start"

    def test_the_test_job_is_the_readme_smoke_job(self):
        smoke = json.loads((ROOT / "test_input.json").read_text())["input"]
        assert [t["input"] for t in TESTS["tests"]] == [smoke]

    def test_the_test_machine_is_one_the_listing_allows(self):
        cfg = TESTS["config"]
        assert cfg["gpuCount"] == HUB["config"]["gpuCount"]
        assert set(cfg["allowedCudaVersions"]) <= set(HUB["config"]["allowedCudaVersions"])
        assert cfg["gpuTypeId"] == "NVIDIA GeForce RTX 4090"   # in the ADA_24 pool
        assert "ADA_24" in HUB["config"]["gpuIds"].split(",")
        for entry in cfg.get("env", []):
            assert entry["key"] in config.VARS

"""Each setting is declared once: its variable, type, default, range, meaning and secrecy in one
field, from which reading, error messages and the docs table all follow."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import ClassVar

import pytest

from builder.settings import EnvSettings, ModelSource, setting, settings
from serving import config
from serving.config import (
    DownloadSettings,
    LaunchSettings,
    ModelSettings,
    StorageSettings,
    WorkerSettings,
)
from serving.errors import SettingsError

ROOT = Path(__file__).resolve().parent.parent


@settings
class PinSettings(EnvSettings):
    group: ClassVar[str] = "test"
    pin: int = setting("TEST_PIN", 1234, "A secret number", ge=1000, le=9999, secret=True)
    tries: int = setting("TEST_TRIES", 3, "Tries", ge=1, le=5)


class TestOneLineErrors:
    @pytest.mark.parametrize(("env", "line"), [
        ({"WORKER_MAX_BATCH_SIZE": "0"},
         "WORKER_MAX_BATCH_SIZE=0 is out of range: an integer from 1 to 256"),
        ({"WORKER_MAX_STOP": "65"}, "WORKER_MAX_STOP=65 is out of range: an integer from 0 to 64"),
        ({"WORKER_JOB_TIMEOUT_S": "0.5"},
         "WORKER_JOB_TIMEOUT_S=0.5 is out of range: a number from 1 to 86400"),
        ({"WORKER_MAX_TEXTS": "many"},
         "WORKER_MAX_TEXTS='many' is not an integer; use an integer from 1 to 1000000"),
        ({"WORKER_DECODE": "fast"},
         "WORKER_DECODE='fast' is not allowed; use one of auto, compiled, eager"),
        ({"WORKER_MAX_NEW_TOKENS": "100", "WORKER_DEFAULT_MAX_NEW_TOKENS": "101"},
         "WORKER_DEFAULT_MAX_NEW_TOKENS=101 is out of range: an integer from 1 to "
         "WORKER_MAX_NEW_TOKENS (100)"),
    ])
    def test_a_bad_value_names_the_variable_and_its_range_in_one_line(self, env, line):
        with pytest.raises(SettingsError) as err:
            WorkerSettings.from_env(env)
        assert str(err.value) == line

    def test_a_flag_names_its_two_values(self):
        with pytest.raises(SettingsError, match="MODEL_WARMUP='sometimes' is not a boolean; "
                                                "use true or false"):
            ModelSettings.from_env({"MODEL_WARMUP": "sometimes"})

    @pytest.mark.parametrize("value", ["12", "123456", "12ab"])
    def test_a_secret_value_is_never_echoed(self, value):
        with pytest.raises(Exception) as err:
            PinSettings.from_env({"TEST_PIN": value})
        assert str(err.value).startswith("TEST_PIN is ")
        assert value not in str(err.value)
        assert "1234" not in repr(PinSettings.from_env({}))

    def test_the_builders_errors_are_its_own_and_the_workers_are_settings_errors(self):
        from builder.settings import SettingsError as BuilderSettingsError

        with pytest.raises(BuilderSettingsError):
            PinSettings.from_env({"TEST_TRIES": "9"})
        with pytest.raises(SettingsError, match="MODEL_DTYPE"):
            ModelSettings.from_env({"MODEL_DTYPE": "int4"})


class TestReading:
    def test_a_blank_variable_means_the_default_and_choices_ignore_case(self):
        s = WorkerSettings.from_env({"WORKER_CONCURRENCY": "  ", "WORKER_INTAKE": "SDK"})
        assert (s.concurrency, s.intake) == (16, "sdk")

    def test_a_changed_copy_keeps_the_rules_across_settings(self):
        limits = WorkerSettings.from_env({})
        assert dataclasses.replace(limits, max_batch_size=4).max_batch_size == 4
        with pytest.raises(SettingsError, match="WORKER_DEFAULT_MAX_NEW_TOKENS=2048"):
            dataclasses.replace(limits, default_max_new_tokens=2048)
        with pytest.raises(SettingsError, match="storage is partly configured"):
            dataclasses.replace(StorageSettings.from_env({}), endpoint_url="http://s3")

    def test_the_worker_reuses_the_builders_model_settings(self):
        env = {"MODEL_NAME": "org/model", "MODEL_REVISION": "abc", "HF_ENDPOINT": "http://hub"}
        built, served = ModelSource.from_env(env), ModelSettings.from_env(env)
        for name in ("model_name", "model_revision", "baked_dir", "hf_token", "hub_endpoint"):
            assert getattr(built, name) == getattr(served, name)
        assert {d.name for d in ModelSource.declared()} <= {
            d.name for d in ModelSettings.declared()}


class TestDeclaredOnce:
    def test_every_group_reads_only_what_it_declares(self):
        groups = (ModelSettings, WorkerSettings, StorageSettings, DownloadSettings,
                  LaunchSettings)
        names = [d.name for g in groups for d in g.declared()]
        assert len(names) == len(set(names)) == len(config.VARS)

    def test_every_number_has_its_range_in_the_docs_table(self):
        table = config.settings_table()
        numbers = [v for v in config.VARS.values() if v.kind in ("an integer", "a number")]
        assert len(numbers) > 20
        for v in numbers:
            assert v.ge is not None, f"{v.name}: declare its range"
            row = next(line for line in table.splitlines() if line.startswith(f"| `{v.name}` |"))
            assert f"| {v.legal} |" in row and str(v.ge) in v.legal

    def test_the_write_command_puts_the_table_between_the_markers(self, tmp_path):
        doc = tmp_path / "configuration.md"
        doc.write_text(f"# Title\n\n{config.TABLE_START}\n| stale |\n{config.TABLE_END}\nafter\n")
        assert config.write_table(doc)
        assert doc.read_text() == (f"# Title\n\n{config.TABLE_START}\n{config.settings_table()}"
                                   f"\n{config.TABLE_END}\nafter\n")
        assert not config.write_table(doc)


class TestTheBuilderStandsAlone:
    def test_builder_imports_nothing_of_serving(self):
        """The Dockerfile's weights stage copies builder/ alone: a settings edit in serving/
        must not rebuild the weights layer."""
        for path in sorted((ROOT / "builder").glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                assert not [n for n in names if n.split(".")[0] in ("serving", "tasks")], (
                    f"{path.name} imports {names}")

"""The README's "add a task" recipe works as written, as a forker would follow it.

In a copy of the project: the README's task module is written to ``tasks/classify.py`` and its
registry line added to ``tasks/__init__.py``; then ``python handler.py`` runs behind the local
endpoint on a small text-classification model made here, and the SDK's client answers jobs.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification

from tests.support.dockerfile import ROOT
from tests.support.endpoint import Service, call, start_worker_service, stop_service
from tests.support.project import copy_project

pytestmark = pytest.mark.slow

RECIPE = re.compile(r"<!-- readme-recipe: (\S+) -->\n```python\n(.*?)```", re.S)


def readme_recipe() -> dict[str, str]:
    """The README's recipe blocks, by the file each is for."""
    return {path: code for path, code in RECIPE.findall((ROOT / "README.md").read_text())}


def follow_recipe(project: Path) -> None:
    recipe = readme_recipe()
    (project / "tasks" / "classify.py").write_text(recipe["tasks/classify.py"])
    import_line, entry = [line.split("#")[0].rstrip()
                          for line in recipe["tasks/__init__.py"].splitlines() if line.strip()]
    registry = project / "tasks" / "__init__.py"
    text = registry.read_text()
    last_import = max(m.end() for m in re.finditer(r"^from tasks\.\w+ import .*$", text, re.M))
    text = text[:last_import] + "\n" + import_line + text[last_import:]
    marker = "TASKS: dict[str, type[Task]] = {"
    opening = text.index(marker) + len(marker)
    registry.write_text(text[:opening] + "\n" + entry + text[opening:])


def make_classifier(path: Path, tokenizer_dir: Path) -> Path:
    """A tiny random BERT sentiment classifier with all-MiniLM's tokenizer."""
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16, num_labels=2,
                        id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("fork")
    project = copy_project(root / "project", leave_out=("tests/", "bench/"))
    follow_recipe(project)
    model = make_classifier(root / "sentiment", minilm_dir)
    service = start_worker_service([sys.executable, "handler.py"], root / "worker.log",
                                   extra_env={"MODEL_PATH": str(model)}, cwd=project)
    yield service
    stop_service(service)


class TestTheForkersRecipe:
    def test_the_readme_has_both_recipe_blocks(self):
        assert set(readme_recipe()) == {"tasks/classify.py", "tasks/__init__.py"}

    def test_the_new_task_answers_through_the_real_worker_loop(self, forked):
        out = forked.client.run_sync({"text": "I loved it"}, timeout=60)
        assert isinstance(out, list) and len(out) == 1
        assert out[0]["label"] in ("negative", "positive")
        assert 0.5 <= out[0]["score"] <= 1.0
        assert out[0]["model"] == "sentiment"
        assert "(classify)" in forked.log_tail()       # the startup line names the task

    def test_its_contract_refuses_bad_input_naming_the_field(self, forked):
        _, body = call(forked.endpoint, "POST", "runsync", {"input": {"text": ""}})
        assert body["status"] == "FAILED" and body["error"].startswith("input.text")
        _, body = call(forked.endpoint, "POST", "runsync", {"input": {"txt": "hi"}})
        assert body["status"] == "FAILED"
        assert "input.txt: unknown field; allowed fields: text" in body["error"]

    def test_the_generic_parts_work_for_it_batch_jobs_included(self, forked):
        out = forked.client.run_sync({"batch": [{"text": "good"}, {"text": ""}]}, timeout=60)
        (answer,) = out
        assert answer["failed"] == 1 and answer["results"][1]["index"] == 1
        assert answer["results"][0]["label"] in ("negative", "positive")

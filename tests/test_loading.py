"""Checked loading of the language model and the codec: strict keys, corrupt safetensors, pickle-only checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_codec_config, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from modeling_moss_speech import CheckpointError, MossSpeechCodecModel, MossSpeechForCausalLM, MossSpeechModel
from modeling_moss_speech.loading import check_safetensors_file, one_line, read_json_file

MODELS = {
    "lm": (MossSpeechForCausalLM, AutoModelForCausalLM, tiny_config, "text_lm_head.weight"),
    "codec": (MossSpeechCodecModel, AutoModel, tiny_codec_config, "flow.input_embedding.weight"),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny LM or codec saved as transformers saves it (single model.safetensors)."""
    model_class, _, make_config, _ = MODELS[request.param]
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(request.param)
    model_class(make_config()).save_pretrained(directory)
    return request.param, directory


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_weights(directory: Path, edit) -> None:
    """Rewrite `model.safetensors` with `edit(tensors)` applied (metadata kept, so transformers reads it as ours)."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_saved_checkpoint_loads_strictly_and_equal(saved):
    kind, directory = saved
    model_class, auto_class, _, key = MODELS[kind]
    loaded, info = auto_class.from_pretrained(directory, output_loading_info=True)
    assert type(loaded) is model_class and not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.state_dict()[key], load_file(directory / "model.safetensors")[key])


def test_missing_tensor_is_an_error_naming_it(saved, tmp_path):
    kind, directory = saved
    model_class, auto_class, _, key = MODELS[kind]
    broken = copy_checkpoint(directory, tmp_path / "broken")
    edit_weights(broken, lambda tensors: tensors.pop(key))
    with pytest.raises(CheckpointError, match=rf"does not match {model_class.__name__} \(missing {key}\)\. "
                                              "Pass strict=False"):
        model_class.from_pretrained(broken)
    # The documented opt-out: transformers' own behaviour (the missing tensor freshly initialised, reported).
    model, info = auto_class.from_pretrained(broken, strict=False, output_loading_info=True)
    assert isinstance(model, model_class) and info["missing_keys"] == {key}
    assert "strict" not in model.config.to_dict()  # a loading option, not a config field


def test_unexpected_tensor_is_an_error_naming_it(saved, tmp_path):
    kind, directory = saved
    model_class, _, _, _ = MODELS[kind]
    broken = copy_checkpoint(directory, tmp_path / "broken")
    edit_weights(broken, lambda tensors: tensors.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"\(unexpected extra\.weight\)"):
        MODELS[kind][1].from_pretrained(broken)  # through the Auto class too
    with pytest.raises(TypeError, match="strict must be True or False, got 'no'"):
        model_class.from_pretrained(directory, strict="no")


def test_many_mismatched_keys_are_listed_then_counted(tmp_path):
    torch.manual_seed(0)
    MossSpeechForCausalLM(tiny_config()).save_pretrained(tmp_path)
    edit_weights(tmp_path, lambda tensors: [tensors.pop(k) for k in list(tensors) if ".layers." in k])
    with pytest.raises(CheckpointError, match=r"missing model\.audio_block\.layers\.0\..*and \d+ more\)"):
        MossSpeechForCausalLM.from_pretrained(tmp_path)


def test_base_model_loads_a_full_checkpoint_without_its_heads(tmp_path):
    torch.manual_seed(0)
    MossSpeechForCausalLM(tiny_config()).save_pretrained(tmp_path)
    assert isinstance(MossSpeechModel.from_pretrained(tmp_path), MossSpeechModel)  # heads: ignored by design


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_is_an_error_naming_the_file(saved, tmp_path, damage):
    kind, directory = saved
    model_class = MODELS[kind][0]
    broken = copy_checkpoint(directory, tmp_path / "broken")
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 4,
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable safetensors file .*corrupt or truncated"):
        model_class.from_pretrained(broken)


def test_sharded_checkpoint_checks_every_shard_and_the_index(tmp_path):
    torch.manual_seed(0)
    MossSpeechForCausalLM(tiny_config()).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert isinstance(MossSpeechForCausalLM.from_pretrained(tmp_path), MossSpeechForCausalLM)
    last = tmp_path / shards[-1]
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{last} is not a readable safetensors file"):
        MossSpeechForCausalLM.from_pretrained(tmp_path)
    last.unlink()
    with pytest.raises(CheckpointError, match=rf"names shards that are not in .*\['{shards[-1]}'\]"):
        MossSpeechForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a readable safetensors index"):
        MossSpeechForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_directory_is_refused_without_unpickling(saved, tmp_path, monkeypatch, pickle_name):
    kind, directory = saved
    model_class = MODELS[kind][0]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(directory / "config.json", pickled / "config.json")
    torch.save(load_file(directory / "model.safetensors"), pickled / pickle_name)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    what = "language model" if kind == "lm" else "codec"
    with pytest.raises(CheckpointError) as caught:
        model_class.from_pretrained(pickled)
    message = str(caught.value)
    assert "\n" not in message
    assert f"the {what} weights are pickled ({pickle_name})" in message
    assert "moss-speech convert" in message and "convert_moss_speech_original_to_hf.py" in message
    with pytest.raises(CheckpointError, match="weights are pickled"):
        model_class.from_pretrained(pickled / pickle_name)
    with pytest.raises(ValueError, match="use_safetensors=False: .* never opened"):
        model_class.from_pretrained(directory, use_safetensors=False)


def test_pickle_next_to_safetensors_is_ignored(saved, tmp_path, monkeypatch):
    kind, directory = saved
    model_class = MODELS[kind][0]
    both = copy_checkpoint(directory, tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(b"never read")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    assert isinstance(model_class.from_pretrained(both), model_class)


def hub_cache(tmp_path: Path, source: Path, files: list[str], repo: str = "someone/tiny") -> Path:
    """A Hugging Face cache holding `files` of `source` as revision main of `repo` (for offline Hub loading)."""
    cache = tmp_path / "cache"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    for name in files:
        shutil.copy(source / name, snapshot / name)
    return cache


def test_hub_checkpoint_corrupt_file_or_pickles_only(saved, tmp_path, monkeypatch):
    kind, directory = saved
    model_class = MODELS[kind][0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = copy_checkpoint(directory, tmp_path / "work")
    if kind == "lm":  # the cache layout works (the codec's loading is the same code, and slower)
        cache = hub_cache(tmp_path / "good", work, ["config.json", "model.safetensors"])
        assert isinstance(model_class.from_pretrained("someone/tiny", cache_dir=cache), model_class)

    weights = work / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cache = hub_cache(tmp_path / "corrupt", work, ["config.json", "model.safetensors"])
    with pytest.raises(CheckpointError, match=r"models--someone--tiny/snapshots/0+/model\.safetensors is not a "
                                              "readable safetensors file"):
        model_class.from_pretrained("someone/tiny", cache_dir=cache)

    torch.save({"w": torch.zeros(1)}, work / "pytorch_model.bin")
    cache = hub_cache(tmp_path / "pickled", work, ["config.json", "pytorch_model.bin"])
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(CheckpointError, match="has no safetensors weights .* `moss-speech convert`"):
        model_class.from_pretrained("someone/tiny", cache_dir=cache)


def test_check_safetensors_file_accepts_a_good_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3)}, path)
    check_safetensors_file(path)  # no error
    path.write_bytes(path.read_bytes() + b"tail")
    with pytest.raises(CheckpointError, match="ok.safetensors is not a readable safetensors file"):
        check_safetensors_file(path)


def test_read_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    assert read_json_file(path) == {"a": 1}
    assert read_json_file(tmp_path / "absent.json", missing_ok=True) is None
    with pytest.raises(ValueError, match=r"no absent.json \(codec config\)"):
        read_json_file(tmp_path / "absent.json", "codec config")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got array"):
        read_json_file(path)
    assert read_json_file(path, expect=(list, dict)) == [1, 2]

    class OwnError(Exception):
        pass

    path.write_text("{not json")
    with pytest.raises(OwnError, match="config.json is not valid JSON"):
        read_json_file(path, error=OwnError)


def test_one_line():
    assert one_line(ValueError("two\n  lines ")) == "two lines"
    assert one_line(KeyboardInterrupt()) == "KeyboardInterrupt"

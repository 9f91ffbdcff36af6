"""The shipped checkpoint: `nano_path()` / `shipped_voices()`, package data, and the CLI defaults that use them.

A nano-like directory (tiny random LM, its processor, the codec in `codec/`, voice prompts in `voices/`) stands in
for the real checkpoint by patching `pretrained.nano_path`; the real one is checked when it is installed.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import tiny_codec_config, tiny_config, tiny_tokenizer, tone

from modeling_moss_speech import (
    MossSpeechCodecModel,
    MossSpeechFeatureExtractor,
    MossSpeechForCausalLM,
    MossSpeechVoicePrompt,
    pretrained,
)
from modeling_moss_speech.apps.cli.main import main
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor

ROOT = Path(__file__).resolve().parents[1]
NANO_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "processor_config.json", "codec/config.json", "codec/model.safetensors", "voices/canonical.safetensors")


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------- locating


def test_nano_path_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PRETRAINED_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="MOSS-Speech-Nano checkpoint is not installed: .* has no config.json"):
        pretrained.nano_path()
    with pytest.raises(FileNotFoundError, match="not installed"):
        pretrained.shipped_voices()
    (tmp_path / pretrained.NANO_NAME).mkdir()  # a directory without the weights' config is not a checkpoint
    with pytest.raises(FileNotFoundError, match="pip install -e"):
        pretrained.nano_path()


def test_nano_path_and_shipped_voices(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PRETRAINED_ROOT", tmp_path)
    nano = tmp_path / pretrained.NANO_NAME
    (nano / "voices" / "sub").mkdir(parents=True)
    (nano / "config.json").write_text("{}")
    assert pretrained.nano_path() == nano
    assert pretrained.shipped_voices() == {}
    for name in ("zoe.safetensors", "canonical.safetensors", "notes.txt"):
        (nano / "voices" / name).write_bytes(b"")
    voices = pretrained.shipped_voices()
    assert list(voices) == ["canonical", "zoe"]
    assert voices["zoe"] == nano / "voices" / "zoe.safetensors"
    assert pretrained.shipped_voices(nano) == voices  # any checkpoint directory
    assert pretrained.shipped_voices(tmp_path) == {}  # no voices/ folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.shipped_voices(tmp_path / "missing")


def test_the_nano_directory_is_package_data(tmp_path):
    from setuptools.config.setupcfg import read_configuration

    options = read_configuration(str(ROOT / "setup.cfg"))["options"]
    patterns = options["package_data"]["modeling_moss_speech"]
    package = tmp_path / "modeling_moss_speech"
    for name in NANO_FILES:
        (package / "pretrained" / pretrained.NANO_NAME / name).parent.mkdir(parents=True, exist_ok=True)
        (package / "pretrained" / pretrained.NANO_NAME / name).write_text("{}")
    # How setuptools' build_py expands package_data patterns (recursive glob relative to the package).
    matched = {Path(path).relative_to(package).as_posix() for pattern in patterns
               for path in glob.glob(str(package / pattern), recursive=True) if Path(path).is_file()}
    assert matched == {f"pretrained/{pretrained.NANO_NAME}/{name}" for name in NANO_FILES}
    assert pretrained.PRETRAINED_ROOT == ROOT / "modeling_moss_speech" / "pretrained"


@pytest.mark.slow
def test_a_wheel_carries_the_checkpoint_and_finds_it(tmp_path):
    """Build a wheel of a copy of the checkout with a stand-in checkpoint, install it elsewhere, locate it there."""
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("tests/"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    shutil.copy2(ROOT / "setup.cfg", source / "setup.cfg")
    nano = source / "modeling_moss_speech" / "pretrained" / pretrained.NANO_NAME
    for name in NANO_FILES:
        (nano / name).parent.mkdir(parents=True, exist_ok=True)
        (nano / name).write_text("{}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"modeling_moss_speech/pretrained/{pretrained.NANO_NAME}/{n}" for n in NANO_FILES} <= names
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    code = ("from modeling_moss_speech.pretrained import nano_path, shipped_voices; "
            "print(nano_path()); print(sorted(shipped_voices()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(tmp_path / "site" / "modeling_moss_speech" / "pretrained" /
                                            pretrained.NANO_NAME), "['canonical']"]


def test_the_shipped_checkpoint_loads_offline():
    try:
        path = pretrained.nano_path()
    except FileNotFoundError:
        pytest.skip("the MOSS-Speech-Nano checkpoint is not installed in this checkout yet")
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, MossSpeechForCausalLM) and isinstance(processor, MossSpeechProcessor)
    assert isinstance(processor.codec, MossSpeechCodecModel)
    voices = pretrained.shipped_voices()
    assert voices, "the nano checkpoint ships voice prompts"
    for voice in voices.values():
        MossSpeechVoicePrompt.load(str(voice))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"the shipped checkpoint is {size / 2**20:.1f} MiB, more than 30 MB"


# ------------------------------------------------------------------------------------------ CLI defaults


@pytest.fixture(scope="module")
def nano_like(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint laid out as the shipped one, and a variant whose processor names no codec."""
    root = tmp_path_factory.mktemp("nano_like")
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(tiny_codec_config()).eval()
    model = MossSpeechForCausalLM(tiny_config()).eval()
    extractor = MossSpeechFeatureExtractor()
    nano = root / "nano"
    model.save_pretrained(nano)
    MossSpeechProcessor.from_model_config(model.config, tiny_tokenizer(), extractor, codec=codec).save_pretrained(nano)
    (nano / "voices").mkdir()
    codec.voice_prompt(tone(1.0, seed=3), sampling_rate=16000).save(str(nano / "voices" / "tone.safetensors"))

    loose = root / "loose"  # processor without a codec reference, codec beside it in codec/
    model.save_pretrained(loose)
    MossSpeechProcessor.from_model_config(model.config, tiny_tokenizer(), extractor).save_pretrained(loose)
    codec.save_pretrained(loose / "codec")
    sf.write(root / "question.wav", tone(0.8, seed=4).numpy(), 16000)
    return {"nano": nano, "loose": loose, "question": root / "question.wav"}


def test_chat_defaults_to_the_shipped_checkpoint_and_its_voices(nano_like, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(pretrained, "nano_path", lambda: nano_like["nano"])
    code, out, err = run(capsys, "chat", "--text", "hello", "--output-modality", "text", "--greedy",
                         "--max-new-tokens", 3)
    assert code == 0, err
    assert "rows generated" in err

    loaded = []
    original = MossSpeechVoicePrompt.load.__func__
    monkeypatch.setattr(MossSpeechVoicePrompt, "load", classmethod(lambda cls, p: loaded.append(p) or original(cls, p)))
    out_wav = tmp_path / "answer.wav"
    code, out, err = run(capsys, "chat", "--wav", nano_like["question"], "--voice", "tone", "--greedy",
                         "--min-new-tokens", 2, "--max-new-tokens", 3, "--out", out_wav)
    assert code == 0, err
    assert loaded == [str(nano_like["nano"] / "voices" / "tone.safetensors")]
    wave, rate = sf.read(out_wav)
    assert rate == 24000 and wave.size >= 2 * 1920

    code, _, err = run(capsys, "chat", "--text", "hello", "--voice", "nobody")
    assert code == 2
    assert f"--voice: 'nobody' is neither a file nor a voice of '{nano_like['nano']}' (its voices: tone)" in err


def test_chat_takes_the_codec_folder_beside_the_model(nano_like, capsys, tmp_path):
    out_wav = tmp_path / "answer.wav"
    code, _, err = run(capsys, "chat", "--model", nano_like["loose"], "--wav", nano_like["question"], "--greedy",
                       "--min-new-tokens", 1, "--max-new-tokens", 2, "--out", out_wav)
    assert code == 0, err
    assert out_wav.is_file()
    code, _, err = run(capsys, "chat", "--model", nano_like["loose"], "--text", "hi", "--voice", "tone")
    assert code == 2 and "(its voices: none)" in err


def test_chat_without_a_model_when_none_is_shipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "PRETRAINED_ROOT", tmp_path)
    code, out, err = run(capsys, "chat", "--text", "hello")
    assert code == 2 and out == ""
    assert err.startswith("moss-speech: error: --model not given, and the shipped MOSS-Speech-Nano checkpoint is not "
                          "installed")
    assert len(err.strip().splitlines()) == 1


def test_encode_decode_and_analyze_layers_default_to_the_shipped_checkpoint(nano_like, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(pretrained, "nano_path", lambda: nano_like["nano"])
    code, _, err = run(capsys, "encode", nano_like["question"], "-o", tmp_path / "q.npy")
    assert code == 0, err
    codes = np.load(tmp_path / "q.npy")
    wave, rate = sf.read(nano_like["question"], dtype="float32")
    codec = MossSpeechCodecModel.from_pretrained(str(nano_like["nano"] / "codec")).eval()
    expected = codec.encode(torch.from_numpy(wave), sampling_rate=rate).codes[0]
    assert codes.tolist() == expected.tolist()  # the codec of the nano directory's codec/ folder
    code, _, err = run(capsys, "decode", tmp_path / "q.npy", "-o", tmp_path / "q.wav", "--seed", 0)
    assert code == 0, err
    assert sf.info(str(tmp_path / "q.wav")).frames == codes.size * 1920
    code, out, err = run(capsys, "analyze-layers", "--audio", nano_like["question"], "--transcript", "a tone",
                         "--device", "cpu")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["num_pairs"] == 1


def test_codec_commands_without_a_codec_when_none_is_shipped(nano_like, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "PRETRAINED_ROOT", tmp_path)
    code, out, err = run(capsys, "encode", nano_like["question"], "-o", tmp_path / "q.npy")
    assert code == 2 and out == ""
    assert err.startswith("moss-speech: error: --codec not given, and the shipped MOSS-Speech-Nano checkpoint is not "
                          "installed")

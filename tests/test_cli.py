"""The `moss-speech` console script, run in-process through `main([...])` (and once as the installed executable).

A tiny random LM, a tiny random codec and a processor are saved to a temporary directory. The LM's weights are
edited (`fix_answers`) so that what it generates is fixed whatever is sampled: the end-of-speech row of the audio
head and the "hello" row of the text head dominate. Speech therefore lasts exactly `--min-new-tokens` codes
(end-of-speech is forbidden before), then end-of-speech, then "hello" until `--max-new-tokens`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import EOSP, espeak, fix_answers, tiny_codec_config, tiny_config, tiny_tokenizer

from modeling_moss_speech import (
    MossSpeechCodecModel,
    MossSpeechFeatureExtractor,
    MossSpeechForCausalLM,
)
from modeling_moss_speech.apps.cli.main import build_parser, main
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor

SAMPLES_PER_CODE = 1920
COMMANDS = ("chat", "encode", "decode", "info")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny LM (+ processor in the same directory), codec, a codec-less processor, audio and a voice file."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(tiny_codec_config()).eval()
    codec.save_pretrained(root / "codec")

    config = tiny_config()  # its special ids are the tiny tokenizer's; eosp 64 = the codec's 64 codes
    assert config.eosp_token_id == codec.config.num_codes
    model = MossSpeechForCausalLM(config).eval()
    tokenizer = tiny_tokenizer()
    fix_answers(model, audio={EOSP: 50.0}, text={tokenizer.convert_tokens_to_ids("hello"): 50.0})
    model.save_pretrained(root / "lm")
    extractor = MossSpeechFeatureExtractor()
    MossSpeechProcessor.from_model_config(config, tokenizer, extractor, codec_path=str(root / "codec")).save_pretrained(
        root / "lm")
    MossSpeechProcessor.from_model_config(config, tokenizer, extractor).save_pretrained(root / "no_codec")

    for name, text, voice in (("question", "What is two plus three?", "en-us"), ("other", "Blue.", "en-gb"),
                              ("speaker", "Paris is the capital of France.", "en+f3")):
        wav, rate = espeak(text, voice)
        sf.write(root / f"{name}.wav", wav.numpy(), rate)
    speaker, rate = sf.read(root / "speaker.wav", dtype="float32")
    codec.voice_prompt(speaker, sampling_rate=rate).save(str(root / "voice.safetensors"))
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x01\x02garbage, not a wav file" * 20)
    (root / "empty").mkdir()
    return {path.stem if path.is_file() else path.name: path for path in root.iterdir()}


def run(capsys, *args) -> tuple[int, str, str]:
    """main(args) in-process: exit code, stdout, stderr."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_speech(path: Path) -> np.ndarray:
    """A written answer: 24 kHz, finite, not silent, a whole number of codes long."""
    wave, rate = sf.read(path, dtype="float32")
    assert rate == 24000
    assert wave.ndim == 1 and wave.size > 0 and wave.size % SAMPLES_PER_CODE == 0
    assert np.isfinite(wave).all() and np.abs(wave).max() > 0
    return wave


# ---------------------------------------------------------------------------------------------------- help


def test_installed_executable_help():
    exe = Path(sys.executable).with_name("moss-speech")
    if not exe.exists():
        pytest.fail("the moss-speech console script is missing: run `.venv/bin/pip install -e '.[dev]'`")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: moss-speech")
    for command in COMMANDS:
        assert command in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_every_command_is_documented(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for action in commands.choices[command]._actions:
        assert action.help and len(action.help) > 10, action.dest
        for option in action.option_strings:
            assert option in out
    assert "examples:" in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("moss-speech ")


# ---------------------------------------------------------------------------------------------------- chat


def test_spoken_question_spoken_answer(assets, capsys, tmp_path):
    out = tmp_path / "answer.wav"
    code, stdout, stderr = run(capsys, "chat", "--wav", assets["question"], "--model", assets["lm"], "--out", out,
                               "--min-new-tokens", 6, "--max-new-tokens", 9, "--seed", 0)
    assert code == 0, stderr
    assert stdout == "hello hello\n"  # the text rows after the speech segment
    assert read_speech(out).size == 6 * SAMPLES_PER_CODE
    summary = stderr.strip().splitlines()[-1]
    assert summary.startswith("moss-speech: 9 rows generated (6 speech codes), 0.48 s of audio ->"), summary


def test_streamed_answer_has_the_offline_length(assets, capsys, tmp_path):
    lengths, chunk_lines = {}, {}
    for stream in (False, True):
        out = tmp_path / f"answer_{stream}.wav"
        extra = ["--stream", "--chunk-size", 3] if stream else []
        code, _, stderr = run(capsys, "chat", "--wav", assets["question"], "--model", assets["lm"], "--out", out,
                              "--min-new-tokens", 16, "--max-new-tokens", 18, "--greedy", *extra)
        assert code == 0, stderr
        lengths[stream] = read_speech(out).size
        chunk_lines[stream] = [line for line in stderr.splitlines() if line.startswith("moss-speech: chunk ")]
    assert lengths[True] == lengths[False] == 16 * SAMPLES_PER_CODE
    # 16 codes, chunks of 3: the first once 3 + 5 (HiFT's held-back audio) + 3 (flow lookahead) codes are in, the
    # next 3 codes later, then the flush.
    assert len(chunk_lines[True]) == 3 and not chunk_lines[False]
    assert "(total 1.28 s)" in chunk_lines[True][-1]


def test_streaming_progress_is_silenced_by_quiet(assets, capsys, tmp_path):
    code, _, stderr = run(capsys, "--quiet", "chat", "--text", "hello", "--model", assets["lm"], "--stream",
                          "--chunk-size", 3, "--out", tmp_path / "a.wav", "--min-new-tokens", 8, "--max-new-tokens", 9)
    assert code == 0
    assert stderr.strip().splitlines() == [line for line in stderr.strip().splitlines() if "rows generated" in line]
    assert read_speech(tmp_path / "a.wav").size == 8 * SAMPLES_PER_CODE


def test_written_question_text_answer(assets, capsys, tmp_path):
    out = tmp_path / "answer.wav"
    code, stdout, stderr = run(capsys, "chat", "--text", "What is two plus three?", "--system", "Be brief.",
                               "--model", assets["lm"], "--output-modality", "text", "--max-new-tokens", 3,
                               "--greedy", "--out", out)
    assert code == 0, stderr
    assert stdout == "hello hello hello\n"
    assert not out.exists()
    assert "3 rows generated (0 speech codes), no speech" in stderr


@pytest.mark.parametrize("voice", ["speaker", "voice"])
def test_answer_in_a_voice_with_bfloat16_lm(assets, capsys, tmp_path, voice):
    out = tmp_path / "answer.wav"
    code, _, stderr = run(capsys, "chat", "--text", "hello", "--model", assets["lm"], "--voice", assets[voice],
                          "--out", out, "--min-new-tokens", 5, "--max-new-tokens", 6, "--dtype", "bfloat16",
                          "--temperature", 0.8, "--top-k", 5, "--top-p", 0.9, "--repetition-penalty", 1.2,
                          "--audio-temperature", 0.7, "--text-temperature", 0.5, "--device", "cpu")
    assert code == 0, stderr
    assert read_speech(out).size == 5 * SAMPLES_PER_CODE


def test_processor_without_codec(assets, capsys, tmp_path):
    args = ("chat", "--text", "hello", "--model", assets["lm"], "--processor", assets["no_codec"])
    code, _, stderr = run(capsys, *args)
    assert code == 2
    assert stderr.strip() == (f"moss-speech: error: --output-modality audio needs a speech codec, but the processor "
                              f"in '{assets['no_codec']}' names none; pass --codec DIR")
    code, stdout, stderr = run(capsys, *args, "--output-modality", "text", "--max-new-tokens", 2)
    assert code == 0 and stdout == "hello hello\n", stderr
    code, _, stderr = run(capsys, *args, "--codec", assets["codec"], "--out", tmp_path / "a.wav",
                          "--min-new-tokens", 4, "--max-new-tokens", 5)
    assert code == 0, stderr
    assert read_speech(tmp_path / "a.wav").size == 4 * SAMPLES_PER_CODE


# --------------------------------------------------------------------------------------------- encode/decode


def test_encode_decode_round_trip(assets, capsys, tmp_path):
    code, _, stderr = run(capsys, "encode", assets["question"], "--codec", assets["codec"], "-o", tmp_path / "q.npy")
    assert code == 0, stderr
    codes = np.load(tmp_path / "q.npy")
    info = sf.info(str(assets["question"]))
    assert codes.dtype == np.int64 and codes.size == math.ceil(info.frames / info.samplerate * 12.5)
    code, _, stderr = run(capsys, "decode", tmp_path / "q.npy", "--codec", assets["codec"], "-o", tmp_path / "q.wav")
    assert code == 0, stderr
    assert read_speech(tmp_path / "q.wav").size == codes.size * SAMPLES_PER_CODE


def test_encode_several_files_to_json_and_decode_them(assets, capsys, tmp_path):
    inputs = [str(assets["question"]), str(assets["other"])]
    code, _, stderr = run(capsys, "encode", *inputs, "--codec", assets["codec"], "-o", tmp_path / "codes.json")
    assert code == 0, stderr
    assert "encoding: 100%" in stderr  # the progress bar of several files
    codes = json.loads((tmp_path / "codes.json").read_text())
    assert list(codes) == inputs
    code, _, stderr = run(capsys, "decode", tmp_path / "codes.json", "--codec", assets["codec"],
                          "--voice", assets["voice"], "-o", tmp_path / "speech", "--seed", 0, "--batch-size", 1)
    assert code == 0, stderr
    for name, values in codes.items():
        assert read_speech(tmp_path / "speech" / f"{Path(name).stem}.wav").size == len(values) * SAMPLES_PER_CODE
    code, _, stderr = run(capsys, "--quiet", "encode", *inputs, "--codec", assets["codec"], "-o", tmp_path / "c.json")
    assert code == 0 and "encoding" not in stderr


# ------------------------------------------------------------------------------------------------------ info


def test_info_on_the_lm_directory(assets, capsys):
    code, out, _ = run(capsys, "info", assets["lm"], "--json")
    assert code == 0
    report = json.loads(out)
    assert report["holds"] == ["model", "processor"]
    counts = report["model"]["parameters"]
    model = MossSpeechForCausalLM.from_pretrained(assets["lm"])
    total = sum(p.numel() for p in model.parameters())
    assert set(counts) == {"text_embedding", "audio_embedding", "trunk", "text_tail", "audio_tail", "text_head",
                           "audio_head", "total"}
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"] == total
    assert counts["trunk"] == sum(p.numel() for p in model.model.shared_block.parameters())
    assert counts["audio_head"] == model.audio_lm_head.weight.numel()
    weights = report["model"]["weights"]
    assert weights["files"] == ["model.safetensors"] and weights["matches_config"]
    assert weights["stored_values"] == total and weights["bytes"] == (assets["lm"] / "model.safetensors").stat().st_size
    assert report["model"]["num_shared_layers"] == 2 and report["model"]["special_ids"]["sosp_token_id"] == 290
    assert report["processor"]["codec"]["path"] == str(assets["codec"])
    assert report["processor"]["special_ids"]["sosp_token_id"]["token"] == "<|object_ref_start|>"

    code, out, _ = run(capsys, "info", assets["lm"])
    assert code == 0
    for text in ("MOSS-Speech language model", "2 shared (trunk) + 1 per tail", "text_tail", f"{total:,}",
                 "every tensor matches", "Processor (MossSpeechProcessor)"):
        assert text in out


def test_info_on_codec_and_processor_directories(assets, capsys):
    code, out, _ = run(capsys, "info", assets["codec"], "--json")
    assert code == 0
    report = json.loads(out)
    counts = report["codec"]["parameters"]
    codec = MossSpeechCodecModel.from_pretrained(assets["codec"])
    assert list(counts) == ["encoder", "flow", "hift", "speaker_encoder", "total"]
    assert sum(counts.values()) - counts["total"] == counts["total"] == sum(p.numel() for p in codec.parameters())
    assert report["codec"]["samples_per_code"] == SAMPLES_PER_CODE and report["codec"]["weights"]["matches_config"]
    code, out, _ = run(capsys, "info", assets["no_codec"])
    assert code == 0
    assert out.startswith(f"{assets['no_codec']}: processor") and "none (speech needs --codec)" in out


# ---------------------------------------------------------------------------------------------------- errors


ERRORS = [
    (["chat", "--wav", "{empty}/missing.wav", "--model", "{lm}"], "--wav: file '{empty}/missing.wav' does not exist"),
    (["chat", "--wav", "{question}", "--text", "hi", "--model", "{lm}"], "argument --text: not allowed with"),
    (["chat", "--model", "{lm}"], "one of the arguments --wav --text is required"),
    (["chat", "--text", "hi", "--model", "{lm}", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["chat", "--wav", "{corrupt}", "--model", "{lm}"], "--wav: cannot read '{corrupt}' as audio"),
    (["chat", "--text", "hi", "--model", "{codec}"], "holds a 'moss_speech_codec' checkpoint, expected 'moss_speech'"),
    (["chat", "--text", "hi", "--model", "{empty}"], "--model: '{empty}' has no config.json"),
    (["chat", "--text", "hi", "--model", "{lm}", "--top-p", "1.5"], "argument --top-p: expected a number in (0, 1]"),
    (["chat", "--text", "hi", "--model", "{lm}", "--voice", "{corrupt}"], "--voice: cannot read"),
    (["chat", "--text", "hi", "--model", "{lm}", "--out", "{empty}/nowhere/a.wav"], "--out: directory"),
    (["encode", "{corrupt}", "--codec", "{codec}", "-o", "{empty}/c.npy"], "encode: cannot read '{corrupt}' as audio"),
    (["encode", "{question}", "{other}", "--codec", "{codec}", "-o", "{empty}/c.npy"], "use .json"),
    (["decode", "{question}", "--codec", "{codec}", "-o", "{empty}/a.wav"], "must be a .npy or .json file"),
    (["info", "{empty}"], "holds no MOSS-Speech model, codec or processor"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS)
def test_bad_input_is_one_line_and_exit_code_2(assets, capsys, args, message):
    names = {key: str(value) for key, value in assets.items()}
    code, out, err = run(capsys, *[a.format(**names) for a in args])
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("moss-speech: error: ") and "Traceback" not in err
    assert message.format(**names) in err


def test_bad_codes_are_reported_after_loading_the_codec(assets, capsys, tmp_path):
    (tmp_path / "codes.json").write_text(json.dumps({"a.wav": [1, 2, 999], "b.wav": [3]}))
    code, _, err = run(capsys, "decode", tmp_path / "codes.json", "--codec", assets["codec"], "-o", tmp_path / "x.wav")
    assert code == 2 and "which need a directory" in err
    code, _, err = run(capsys, "-q", "decode", tmp_path / "codes.json", "--codec", assets["codec"], "-o", tmp_path)
    assert code == 2
    assert err == "moss-speech: error: decode: entry 'a.wav' holds code 999, outside the codebook [0, 64)\n"


def test_debug_prints_the_traceback(assets, capsys):
    code, _, err = run(capsys, "chat", "--wav", assets["corrupt"], "--model", assets["lm"], "--debug")
    assert code == 2
    assert err.startswith("Traceback (most recent call last):")
    assert "LibsndfileError" in err and err.splitlines()[-1].startswith("moss-speech: error: --wav: cannot read")
    code, _, err = run(capsys, "--debug", "chat", "--text", "hi", "--model", assets["lm"], "--dtype", "int8")
    assert code == 2 and "Traceback" in err

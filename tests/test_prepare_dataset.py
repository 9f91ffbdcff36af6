"""processing/prepare_dataset.py: real espeak-ng speech (22.05 and 44.1 kHz, stereo) → codec tokens in every mode.

`datasets` 5.2 encodes and decodes `Audio` values only through torchcodec, which the test environment does not
install: the raw datasets here store `{"array", "sampling_rate"}` structs, and the `Audio` column is built from wav
bytes and cast to `datasets.Audio()` (a cast needs no codec); the script reads such columns with soundfile.
"""

from __future__ import annotations

import importlib.util
import io
import math
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from helpers import espeak, tiny_codec_config, tiny_config, tiny_tokenizer

from modeling_moss_speech import MossSpeechCodecModel
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor

SCRIPT = Path(__file__).resolve().parents[1] / "processing" / "prepare_dataset.py"
SOSP, MODALITY_PAD, AUDIO_PAD, EOSP, PAD = 290, 291, 10, 64, 280
SENTENCES = ["what is the weather today", "paris is the capital of france", "yes", "tell me a short story"]


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_dataset"] = module
    spec.loader.exec_module(module)
    return module


prep = _load_script()


@pytest.fixture(scope="module")
def codec() -> MossSpeechCodecModel:
    torch.manual_seed(0)
    return MossSpeechCodecModel(tiny_codec_config()).eval()


@pytest.fixture(scope="module")
def processor() -> MossSpeechProcessor:
    return MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer())


@pytest.fixture(scope="module")
def speech() -> list[tuple[np.ndarray, int]]:
    """Each sentence spoken by espeak-ng: even rows at 22.05 kHz mono, odd rows at 44.1 kHz mono."""
    out = []
    for index, text in enumerate(SENTENCES):
        wav, rate = espeak(text, "en-us" if index % 2 == 0 else "en+f3")
        if index % 2:
            wav, rate = torchaudio.functional.resample(wav, rate, 44100), 44100
        out.append((wav.numpy().astype(np.float32), rate))
    return out


def raw_dataset(speech, **extra) -> datasets.Dataset:
    data = {"audio": [{"array": wav, "sampling_rate": rate} for wav, rate in speech], "text": SENTENCES[: len(speech)]}
    data.update(extra)
    return datasets.Dataset.from_dict(data)


def expected_codes(codec, wav: np.ndarray, rate: int) -> list[int]:
    return codec.encode(torch.from_numpy(wav), sampling_rate=rate).codes[0].tolist()


def ids(text: str) -> list[int]:
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def speech_rows(codes: list[int]) -> list[list[int]]:
    return [[SOSP, AUDIO_PAD]] + [[MODALITY_PAD, c] for c in codes] + [[MODALITY_PAD, EOSP]]


def text_rows(tokens: list[int]) -> list[list[int]]:
    return [[t, AUDIO_PAD] for t in tokens]


def test_speech_mode_grid_and_ceil_rule(tmp_path, codec, processor, speech):
    out = prep.prepare_dataset(raw_dataset(speech), tmp_path / "out", processor, codec, mode="speech",
                               batch_size=3, progress=False)
    assert out.column_names == ["input_ids"] and len(out) == len(SENTENCES)
    assert out.features["input_ids"] == datasets.List(datasets.List(datasets.Value("int32"), length=2))
    for row, (wav, rate) in zip(out, speech):
        codes = expected_codes(codec, wav, rate)
        assert len(codes) == math.ceil(wav.shape[-1] / rate * 12.5) == MossSpeechCodecModel.expected_num_codes(
            wav.shape[-1], rate)
        assert row["input_ids"] == speech_rows(codes)
    assert datasets.load_from_disk(str(tmp_path / "out"))[2]["input_ids"] == out[2]["input_ids"]


def test_interleaved_alternates_both_orders_and_add_eos(tmp_path, codec, processor, speech):
    out = prep.prepare_dataset(raw_dataset(speech), tmp_path / "out", processor, codec, mode="interleaved",
                               add_eos=True, progress=False)
    for index, (row, (wav, rate), text) in enumerate(zip(out, speech, SENTENCES)):
        text_part, speech_part = text_rows(ids(text)), speech_rows(expected_codes(codec, wav, rate))
        body = text_part + speech_part if index % 2 == 0 else speech_part + text_part
        assert row["input_ids"] == body + [[PAD, AUDIO_PAD]]
    first = prep.prepare_dataset(raw_dataset(speech), tmp_path / "speech_first", processor, codec,
                                 mode="interleaved", interleave="speech-first", progress=False)
    assert all(row["input_ids"][0] == [SOSP, AUDIO_PAD] for row in first)


def test_text_mode_needs_no_audio_and_no_codec(tmp_path, processor):
    data = datasets.Dataset.from_dict({"sentence": ["  Hello world.  ", "yes, please"]})
    out = prep.prepare_dataset(data, tmp_path / "out", processor, None, mode="text", text_column="sentence",
                               progress=False)
    assert [row["input_ids"] for row in out] == [text_rows(ids("Hello world.")), text_rows(ids("yes, please"))]
    assert all(a == AUDIO_PAD for row in out for _, a in row["input_ids"])


def test_sft_conversations_hold_codes_and_feed_the_processor(tmp_path, codec, processor, speech):
    answer_audio = [{"array": speech[3][0], "sampling_rate": speech[3][1]}, None, None]
    data = datasets.Dataset.from_dict({
        "question_audio": [{"array": speech[0][0], "sampling_rate": speech[0][1]},
                           {"array": speech[1][0], "sampling_rate": speech[1][1]}, None],
        "question_text": [SENTENCES[0], SENTENCES[1], "what is two plus two"],
        "answer_text": [SENTENCES[3], "it is paris", "four"],
        "answer_audio": answer_audio,
    })
    out = prep.prepare_dataset(data, tmp_path / "out", processor, codec, mode="sft", progress=False)
    assert out.column_names == ["messages", "output_modality", "question_text", "answer_text"]
    first, second, third = out
    assert first["messages"][0] == {"role": "user", "content": {
        "type": "audio", "text": None, "codes": expected_codes(codec, *speech[0])}}
    assert first["messages"][1]["content"]["codes"] == expected_codes(codec, *speech[3])
    assert first["output_modality"] == "audio" and second["output_modality"] == "text"
    assert second["messages"][1] == {"role": "assistant",
                                     "content": {"type": "text", "text": "it is paris", "codes": None}}
    assert third["messages"][0]["content"] == {"type": "text", "text": "what is two plus two", "codes": None}
    # The stored conversations go through the processor as they are (no codec needed: codes are pre-encoded).
    grid = processor([first["messages"]], output_modality="audio", add_generation_prompt=False)["input_ids"][0]
    codes = first["messages"][0]["content"]["codes"]
    assert grid[:, 1].tolist().count(EOSP) == 2 and len(codes) == math.ceil(len(speech[0][0]) / 22050 * 12.5)


def test_cli_main_with_audio_column_stereo_44k(tmp_path, codec, processor, speech):
    """An `Audio` feature column (wav bytes, stereo, 44.1 kHz) read from a save_to_disk input through main()."""
    stereo = []
    for wav, rate in speech[:3]:
        wav44 = wav if rate == 44100 else torchaudio.functional.resample(torch.from_numpy(wav), rate, 44100).numpy()
        buffer = io.BytesIO()
        sf.write(buffer, np.stack([wav44, 0.5 * wav44], axis=1), 44100, format="WAV", subtype="FLOAT")
        stereo.append((np.stack([wav44, 0.5 * wav44]), buffer.getvalue()))
    data = datasets.Dataset.from_dict({"speech": [{"bytes": b, "path": None} for _, b in stereo],
                                       "text": SENTENCES[:3]}).cast_column("speech", datasets.Audio())
    data.save_to_disk(str(tmp_path / "input"))
    codec.save_pretrained(tmp_path / "codec")
    processor.save_pretrained(tmp_path / "processor")
    argv = ["--input", str(tmp_path / "input"), "--codec", str(tmp_path / "codec"), "--processor",
            str(tmp_path / "processor"), "--mode", "speech", "--output", str(tmp_path / "out"), "--audio_column",
            "speech", "--batch_size", "2", "--num_shards", "2", "--quiet", "--device", "cpu"]
    assert prep.main(argv) == 0
    out = datasets.load_from_disk(str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["00000", "00001", "manifest.json"]
    for row, (wav, _) in zip(out, stereo):
        codes = codec.encode(torch.from_numpy(wav), sampling_rate=44100).codes[0].tolist()
        assert row["input_ids"] == speech_rows(codes) and len(codes) == math.ceil(wav.shape[1] / 44100 * 12.5)


def test_resume_skips_finished_shards(tmp_path, codec, processor, speech, monkeypatch):
    data = raw_dataset(speech)
    calls = []
    original = MossSpeechCodecModel.encode

    def counting(self, audio, *args, **kwargs):
        calls.append(len(audio))
        if fail["on"] is not None and len(calls) == fail["on"]:
            raise RuntimeError("simulated crash")
        return original(self, audio, *args, **kwargs)

    fail = {"on": 3}
    monkeypatch.setattr(MossSpeechCodecModel, "encode", counting)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies on the third of four shards
        prep.prepare_dataset(data, tmp_path / "out", processor, codec, mode="speech", num_shards=4, batch_size=1,
                             progress=False)
    shards = tmp_path / "out" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["00000", "00001", "manifest.json"]
    calls.clear()
    fail["on"] = None
    out = prep.prepare_dataset(data, tmp_path / "out", processor, codec, mode="speech", num_shards=4,
                               batch_size=1, progress=False)
    assert calls == [1, 1]  # only the two unfinished shards were encoded
    calls.clear()
    reference = prep.prepare_dataset(data, tmp_path / "fresh", processor, codec, mode="speech", num_shards=4,
                                     batch_size=1, progress=False)
    assert out["input_ids"] == reference["input_ids"] and len(calls) == 4
    calls.clear()
    prep.prepare_dataset(data, tmp_path / "out", processor, codec, mode="speech", num_shards=4, progress=False)
    assert calls == []  # everything done: only the concatenation is rewritten
    with pytest.raises(ValueError, match="other settings.*mode"):
        prep.prepare_dataset(data, tmp_path / "out", processor, codec, mode="interleaved", num_shards=4,
                             progress=False)


def test_bad_inputs_name_the_column_or_the_row(tmp_path, codec, processor, speech):
    with pytest.raises(ValueError, match="needs the column 'audio'.*'sentence'"):
        prep.prepare_dataset(datasets.Dataset.from_dict({"sentence": ["hi"]}), tmp_path / "a", processor, codec,
                             mode="speech", progress=False)
    with pytest.raises(ValueError, match="needs the column 'text'"):
        prep.prepare_dataset(datasets.Dataset.from_dict({"audio": [{"array": speech[0][0], "sampling_rate": 22050}]}),
                             tmp_path / "b", processor, codec, mode="interleaved", progress=False)
    empty = raw_dataset([speech[0], (np.zeros(0, np.float32), 22050), speech[2], speech[3]])
    with pytest.raises(ValueError, match=r"row 1, column 'audio': the audio is empty"):
        prep.prepare_dataset(empty, tmp_path / "c", processor, codec, mode="speech", progress=False)
    skipped = prep.prepare_dataset(empty, tmp_path / "d", processor, codec, mode="speech", skip_invalid=True,
                                   progress=False)
    assert len(skipped) == 3
    missing_text = raw_dataset(speech[:2]).remove_columns("text").add_column("text", ["hello", None])
    with pytest.raises(ValueError, match=r"row 1, column 'text': expected a string, got NoneType \(null\)"):
        prep.prepare_dataset(missing_text, tmp_path / "e", processor, codec, mode="interleaved", progress=False)
    no_answer = datasets.Dataset.from_dict({"question_audio": [{"array": speech[0][0], "sampling_rate": 22050}],
                                            "answer_text": [None]})
    with pytest.raises(ValueError, match="row 0: no 'answer_audio' and 'answer_text' is null"):
        prep.prepare_dataset(no_answer, tmp_path / "f", processor, codec, mode="sft", progress=False)
    # Skipping a row whose question audio was already read keeps the next row's codes its own.
    mixed = datasets.Dataset.from_dict({"question_audio": [{"array": a, "sampling_rate": r} for a, r in speech[:2]],
                                        "answer_text": [None, "fine"]})
    kept = prep.prepare_dataset(mixed, tmp_path / "f2", processor, codec, mode="sft", skip_invalid=True,
                                progress=False)
    assert len(kept) == 1 and kept[0]["messages"][0]["content"]["codes"] == expected_codes(codec, *speech[1])
    with pytest.raises(ValueError, match="mode must be one of"):
        prep.prepare_dataset(raw_dataset(speech), tmp_path / "g", processor, codec, mode="tts", progress=False)
    with pytest.raises(ValueError, match="encodes audio: pass --codec"):
        prep.prepare_dataset(raw_dataset(speech), tmp_path / "h", processor, None, mode="speech", progress=False)


def test_push_to_hub_is_called_with_the_final_dataset(tmp_path, processor, monkeypatch):
    pushed = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: pushed.append((len(self), repo, kw)))
    prep.prepare_dataset(datasets.Dataset.from_dict({"text": ["hello", "yes"]}), tmp_path / "out", processor,
                         mode="text", push_to_hub="me/moss-text", private=True, progress=False)
    assert pushed == [(2, "me/moss-text", {"private": True})]


def test_input_loading_disk_dict_split_and_data_directory(tmp_path, processor):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["hello"]}),
                          "test": datasets.Dataset.from_dict({"text": ["yes", "no"]})}).save_to_disk(
        str(tmp_path / "dict"))
    assert len(prep.load_input_dataset(str(tmp_path / "dict"), split="test")) == 2
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; --split 'dev'"):
        prep.load_input_dataset(str(tmp_path / "dict"), split="dev")
    with pytest.raises(ValueError, match="does not exist"):
        prep.load_input_dataset(str(tmp_path / "missing"))
    # A plain data directory goes through datasets.load_dataset (offline, local files).
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "train.jsonl").write_text('{"line": "hello world"}\n{"line": "yes"}\n')
    processor.save_pretrained(tmp_path / "processor")
    argv = ["--input", str(tmp_path / "jsonl"), "--processor", str(tmp_path / "processor"), "--mode", "text",
            "--text_column", "line", "--output", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--quiet"]
    assert prep.main(argv) == 0
    assert [row["input_ids"] for row in datasets.load_from_disk(str(tmp_path / "out"))] == [
        text_rows(ids("hello world")), text_rows(ids("yes"))]

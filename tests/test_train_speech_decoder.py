"""training/train_speech_decoder.py on a tiny espeak corpus and a tiny codec: runs, freezes the tokenizer, trains and
saves the flow with the Griffin-Lim vocoder, writes voice prompts, reports the round trip."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torchaudio
from helpers import espeak, tiny_codec_config

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechVoicePrompt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import train_speech_decoder  # noqa: E402

ROWS = [  # text, voice, kind, canonical
    ("what is one plus two", "en-us+f1", "question", False),
    ("three", "en-us+f1", "answer", False),
    ("what is two plus two", "en+m3", "question", False),
    ("four", "en+m3", "answer", False),
    ("three", "en-us", "answer", True),
    ("four", "en-us", "answer", True),
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the script sets --threads for the process


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from datasets import Audio, Dataset, DatasetDict

    def rows(specs):
        out = []
        for i, (text, voice, kind, canonical) in enumerate(specs):
            wav, rate = espeak(text, voice)
            buffer = io.BytesIO()
            sf.write(buffer, torchaudio.functional.resample(wav, rate, 16000).numpy(), 16000, format="FLAC")
            out.append({"utt_id": f"{kind}-{i}/{voice}", "text": text, "voice": voice, "kind": kind,
                        "canonical": canonical, "audio": {"bytes": buffer.getvalue(), "path": None}})
        return Dataset.from_list(out).cast_column("audio", Audio(sampling_rate=16000))

    path = tmp_path_factory.mktemp("decoder") / "corpus"
    DatasetDict(train=rows(ROWS), validation=rows([("what is one plus one", "en+m2", "question", False)])) \
        .save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_codec(tmp_path_factory) -> Path:
    """A tiny codec 'after tokenizer training' (random weights), with a CTC head, HiFT and CAM++ still in."""
    config = tiny_codec_config()
    encoder = {**config.encoder_config.to_dict(), "ctc_alphabet": " abcdefghijklmnopqrstuvwxyz'"}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("decoder") / "codec_tokenizer"
    MossSpeechCodecModel(tiny_codec_config(encoder_config=encoder)).save_pretrained(path)
    return path


def test_trains_the_flow_and_saves_a_griffin_lim_codec(corpus, tokenizer_codec, tmp_path):
    summary = train_speech_decoder.main([
        "--codec", str(tokenizer_codec), "--corpus", str(corpus), "--output", str(tmp_path / "codec"),
        "--max_steps", "40", "--batch_size", "3", "--threads", "1", "--warmup_steps", "5", "--log_every", "10",
        "--save_voices", str(tmp_path / "voices"), "--learning_rate", "3e-3",
    ])
    assert summary["steps"] == 40 and summary["train_utterances"] == len(ROWS)
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    assert summary["vocoder_type"] == "griffin_lim" and summary["validation_loss"] > 0
    trip = summary["round_trip"]  # the tiny codec has a CTC head: the check runs (on noise-level transcripts)
    assert trip["utterances"] == 1 and set(trip) >= {"original", "roundtrip", "vocoder_only"}

    source = MossSpeechCodecModel.from_pretrained(tokenizer_codec)
    codec = MossSpeechCodecModel.from_pretrained(tmp_path / "codec").eval()
    saved = json.loads((tmp_path / "codec" / "config.json").read_text())
    assert saved["vocoder_type"] == "griffin_lim" and codec.hift is None
    assert not any(key.startswith("hift.") for key in codec.state_dict())
    for key, value in source.encoder.state_dict().items():  # the tokenizer is frozen
        assert torch.equal(codec.encoder.state_dict()[key], value), key
    assert any(not torch.equal(a, b) for a, b in zip(codec.flow.parameters(), source.flow.parameters()))
    out = codec.decode([torch.tensor([1, 2, 3])])
    assert out.lengths.tolist() == [3 * 1920]

    voices = {p.stem: MossSpeechVoicePrompt.load(str(p)) for p in (tmp_path / "voices").glob("*.safetensors")}
    assert set(voices) == {"canonical", "female", "male"}
    assert voices["canonical"].metadata["voice"] == "en-us" and voices["male"].metadata["voice"] == "en+m3"
    assert voices["female"].metadata["text"] == "what is one plus two"  # a question when the voice has one
    assert codec.decode([torch.tensor([4, 5])], voice_prompt=voices["female"]).lengths.tolist() == [2 * 1920]


def test_config_replaces_the_decoder_and_drops_the_speaker_encoder(corpus, tokenizer_codec, tmp_path):
    flow = {**tiny_codec_config().flow_config.to_dict(), "input_size": 16, "encoder_linear_units": 32}
    (tmp_path / "nano.json").write_text(json.dumps({"flow_config": flow, "speaker_config": None,
                                                    "griffin_lim_iters": 2, "encoder_config": {"ignored": 1}}))
    summary = train_speech_decoder.main([
        "--codec", str(tokenizer_codec), "--corpus", str(corpus), "--output", str(tmp_path / "codec"),
        "--codec_config", str(tmp_path / "nano.json"), "--max_steps", "3", "--batch_size", "2", "--threads", "1",
        "--eval_examples", "1",
    ])
    codec = MossSpeechCodecModel.from_pretrained(tmp_path / "codec")
    assert codec.config.flow_config.input_size == 16 and codec.config.griffin_lim_iters == 2
    assert codec.speaker_encoder is None and summary["steps"] == 3
    with pytest.raises(ValueError, match="--batch_size must be positive"):
        train_speech_decoder.main(["--codec", "x", "--corpus", "y", "--output", "z", "--batch_size", "0"])


def test_canonical_fine_tune_continues_the_flow_on_the_assistant_voice(corpus, tokenizer_codec, tmp_path):
    first = tmp_path / "codec"
    train_speech_decoder.main(["--codec", str(tokenizer_codec), "--corpus", str(corpus), "--output", str(first),
                               "--max_steps", "2", "--batch_size", "2", "--threads", "1", "--eval_examples", "1"])
    summary = train_speech_decoder.main([
        "--codec", str(first), "--corpus", str(corpus), "--output", str(tmp_path / "voice"), "--canonical_only",
        "--inference_noise_scale", "0", "--max_steps", "1", "--batch_size", "1", "--threads", "1",
        "--learning_rate", "1e-9", "--warmup_steps", "1", "--eval_examples", "1",
    ])
    assert summary["train_utterances"] == sum(canonical for *_, canonical in ROWS)
    before, after = (MossSpeechCodecModel.from_pretrained(p) for p in (first, tmp_path / "voice"))
    assert after.config.flow_config.inference_noise_scale == 0.0
    assert before.config.flow_config.inference_noise_scale == 1.0
    # a changed inference setting keeps the trained weights (one step at lr 1e-9 leaves them within 1e-6)
    for a, b in zip(before.flow.parameters(), after.flow.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

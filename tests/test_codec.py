"""MossSpeechCodecModel: release key layout, encode/decode contract, voice prompts, streaming, loading, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_VOCODER, espeak, tiny_codec_config, tone
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

from modeling_moss_speech import (
    MossSpeechCodecConfig,
    MossSpeechCodecModel,
    MossSpeechFeatureExtractor,
    MossSpeechVoicePrompt,
)

SPEC = Path(__file__).resolve().parent / "data" / "codec_keys_release.json"  # copy of shared/spec


@pytest.fixture(scope="module")
def codec() -> MossSpeechCodecModel:
    torch.manual_seed(0)
    return MossSpeechCodecModel(tiny_codec_config()).eval()


def test_release_size_parameter_names_and_shapes():
    spec = json.loads(SPEC.read_text())
    with torch.device("meta"):
        model = MossSpeechCodecModel(MossSpeechCodecConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    for part, prefix in (("encoder", "encoder."), ("flow", "flow."), ("hift", "hift.")):
        mine = {k[len(prefix):]: v for k, v in ours.items() if k.startswith(prefix)}
        assert mine == spec[part], part
    assert {k.split(".")[0] for k in ours} == {"encoder", "flow", "hift", "speaker_encoder"}


def test_token_counts_follow_the_ceil_rule(codec):
    out = codec.encode([tone(1.0), tone(2.4), tone(31.0)], sampling_rate=16000)
    assert out.lengths.tolist() == [13, 30, 388]
    assert all(c.dtype == torch.long and int(c.max()) < 64 for c in out.codes)


def test_real_speech_batch_equals_each_alone(codec):
    utterances = [espeak("What is two plus three?")[0], espeak("Paris is the capital of France.", "en+f3")[0],
                  espeak("Blue.", "en-gb")[0]]
    batch = codec.encode(utterances, sampling_rate=22050)
    for wav, codes in zip(utterances, batch.codes):
        assert codes.numel() == math.ceil(wav.numel() / 22050 * 12.5)
        assert torch.equal(codec.encode(wav, sampling_rate=22050).codes[0], codes)


def test_any_rate_and_stereo(codec):
    assert codec.encode(tone(1.0, 8000), sampling_rate=8000).lengths.tolist() == [13]
    assert codec.encode(tone(1.0, 44100).numpy(), sampling_rate=44100).lengths.tolist() == [13]
    stereo = torch.stack([tone(1.0), tone(1.0, seed=1)])
    assert codec.encode(stereo, sampling_rate=16000).lengths.tolist() == [13]


def test_decode_length_determinism_and_batching(codec):
    codes = [torch.randint(0, 64, (7,)), torch.randint(0, 64, (4,))]
    out = codec.decode(codes, generator=torch.Generator().manual_seed(1))
    assert out.sampling_rate == 24000
    assert out.lengths.tolist() == [7 * 1920, 4 * 1920]
    assert out.waveforms.dtype == torch.float32 and out.waveforms.shape == (2, 7 * 1920)
    again = codec.decode(codes, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.waveforms, again.waveforms)
    assert torch.isfinite(out.waveforms).all()
    assert out.waveforms[1, 4 * 1920 :].abs().max() == 0


def test_voice_prompt_changes_output_and_round_trips(codec, tmp_path):
    speech, rate = espeak("Hello, this is the voice you should speak in.", "en+f3")
    prompt = codec.voice_prompt(speech, sampling_rate=rate)
    assert prompt.mel.shape == (4 * prompt.tokens.numel(), 80) and prompt.speaker_embedding.shape == (192,)
    codes = torch.randint(0, 64, (1, 6))
    plain = codec.decode(codes, generator=torch.Generator().manual_seed(0)).waveforms
    voiced = codec.decode(codes, voice_prompt=prompt, generator=torch.Generator().manual_seed(0)).waveforms
    assert voiced.shape == plain.shape and not torch.allclose(voiced, plain)
    path = tmp_path / "voice.safetensors"
    prompt.save(str(path))
    loaded = MossSpeechVoicePrompt.load(str(path))
    for name in ("tokens", "mel", "speaker_embedding"):
        assert torch.equal(getattr(loaded, name), getattr(prompt, name))
    again = codec.decode(codes, voice_prompt=loaded, generator=torch.Generator().manual_seed(0)).waveforms
    # the reloaded prompt's tensors may be unaligned (SIMD summation order): float32 tolerance
    torch.testing.assert_close(again, voiced)


def test_stream_decode_matches_offline(codec):
    codes = torch.randint(0, 64, (23,))
    offline = codec.decode(codes[None], generator=torch.Generator().manual_seed(0)).waveforms[0]
    chunks = list(codec.stream_decode(iter(codes.tolist()), chunk_size=5, generator=torch.Generator().manual_seed(0)))
    assert len(chunks) >= 3
    assert torch.cat(chunks).numel() == offline.numel() == 23 * 1920


def test_stream_decode_is_close_to_offline():
    """With the vocoder's random source switched off, chunking is the only difference from the offline decode."""
    torch.manual_seed(0)
    config = tiny_codec_config(vocoder_config=dict(**TINY_VOCODER, nsf_alpha=0.0,
                                                   nsf_sigma=0.0))
    codec = MossSpeechCodecModel(config).eval()
    codes = torch.randint(0, 64, (60,))
    offline = codec.decode(codes[None]).waveforms[0]

    def snr_db(reference, estimate):
        return float(10 * torch.log10(reference.pow(2).sum() / (reference - estimate).pow(2).sum()))

    other = snr_db(offline, codec.decode(torch.randint(0, 64, (1, 60))).waveforms[0])
    streamed = {
        overlap: torch.cat(list(codec.stream_decode(codes.split(7), chunk_size=10, overlap_frames=overlap)))
        for overlap in (0, 8)
    }
    assert all(s.numel() == offline.numel() for s in streamed.values())
    assert snr_db(offline, streamed[8]) > other + 10  # far closer to its offline decode than another utterance is
    assert snr_db(offline, streamed[8]) > snr_db(offline, streamed[0]) + 6  # the cross-fade is what makes it so


@pytest.mark.parametrize(
    ("codes", "error", "message"),
    [
        (torch.tensor([[1, 64]]), ValueError, "outside the codebook \\[0, 64\\)"),
        (torch.tensor([[-1, 3]]), ValueError, "outside the codebook"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "codes must be"),
        (torch.zeros(1, 3), TypeError, "integer ids"),
    ],
)
def test_bad_codes(codec, codes, error, message):
    with pytest.raises(error, match=message):
        codec.decode(codes)


@pytest.mark.parametrize(
    ("audio", "rate", "error", "message"),
    [
        (torch.zeros(0), 16000, ValueError, "empty"),
        (torch.tensor([0.0, float("nan")] * 1000), 16000, ValueError, "NaN"),
        (torch.tensor([0.0, float("inf")] * 1000), 16000, ValueError, "inf"),
        (torch.zeros(1000, dtype=torch.int16), 16000, TypeError, "float"),
        (torch.zeros(1, 1, 1000), 16000, ValueError, "must be 1-D"),
        (torch.zeros(1000), 0, ValueError, "sampling_rate"),
    ],
)
def test_bad_audio(codec, audio, rate, error, message):
    with pytest.raises(error, match=message):
        codec.encode(audio, sampling_rate=rate)


def test_save_and_auto_load_round_trip(codec, tmp_path):
    codec.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert type(AutoConfig.from_pretrained(tmp_path)) is MossSpeechCodecConfig
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is MossSpeechCodecModel and loaded.dtype == torch.float32
    audio = tone(1.3)
    assert torch.equal(loaded.encode(audio, 16000).codes[0], codec.encode(audio, 16000).codes[0])
    codes = torch.randint(0, 64, (1, 5))
    a = codec.decode(codes, generator=torch.Generator().manual_seed(2)).waveforms
    b = loaded.decode(codes, generator=torch.Generator().manual_seed(2)).waveforms
    torch.testing.assert_close(a, b)  # across a safetensors load: float32 tolerance, not bitwise
    MossSpeechFeatureExtractor(feature_size=128).save_pretrained(tmp_path)
    assert isinstance(AutoFeatureExtractor.from_pretrained(tmp_path), MossSpeechFeatureExtractor)


def test_float32_by_default_and_dtype_honoured(tmp_path, codec):
    codec.save_pretrained(tmp_path)
    half = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert AutoModel.from_pretrained(tmp_path).dtype == torch.float32
    assert np.isfinite(half.decode(torch.randint(0, 64, (1, 3))).waveforms.float().numpy()).all()


def test_push_decoder_equals_stream_decode_and_rejects_bad_codes(codec):
    codes = torch.randint(0, 64, (19,))
    pulled = torch.cat(list(codec.stream_decode(iter(codes.tolist()), chunk_size=4,
                                                generator=torch.Generator().manual_seed(0))))
    decoder = codec.stream_decoder(chunk_size=4, generator=torch.Generator().manual_seed(0))
    pieces = []
    for group in codes.split(3):  # codes arrive in groups of 3 while the decoder works in chunks of 4
        pieces += decoder.push(group)
    pieces.append(decoder.flush())
    assert torch.equal(torch.cat(pieces), pulled)
    with pytest.raises(ValueError, match="flushed"):
        decoder.push(1)
    with pytest.raises(ValueError, match="outside the codebook"):
        codec.stream_decoder().push([3, 64])
    assert codec.stream_decoder().flush().numel() == 0

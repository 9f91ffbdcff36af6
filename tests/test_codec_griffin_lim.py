"""Codec options of the nano checkpoints: the weight-free Griffin-Lim vocoder (`vocoder_type="griffin_lim"`) and no
speaker encoder (`speaker_config=None`)."""

from __future__ import annotations

import json

import pytest
import torch
import torchaudio
from helpers import espeak, tiny_codec_config

from modeling_moss_speech import MossSpeechCodecModel
from modeling_moss_speech.configuration_moss_speech_codec import MossSpeechCodecVocoderConfig
from modeling_moss_speech.modeling_moss_speech_codec import prompt_mel_spectrogram
from modeling_moss_speech.modeling_moss_speech_codec_griffin_lim import MossSpeechCodecGriffinLim

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def speech_24k() -> torch.Tensor:
    wav, rate = espeak("what is three plus four", "en+f3")
    return torchaudio.functional.resample(wav, rate, 24000)


@pytest.fixture(scope="module")
def nano_codec() -> MossSpeechCodecModel:
    torch.manual_seed(0)
    return MossSpeechCodecModel(tiny_codec_config(vocoder_type="griffin_lim", griffin_lim_iters=4,
                                                  speaker_config=None)).eval()


def test_griffin_lim_inverts_the_flow_mel_in_place(speech_24k):
    """Re-analysing the reconstruction gives back the mel, frame for frame (no time shift)."""
    vocoder = MossSpeechCodecGriffinLim(MossSpeechCodecVocoderConfig(), n_iter=32)
    mel = prompt_mel_spectrogram(speech_24k)  # (T, 80)
    waveform, lengths = vocoder(mel.T[None])
    assert waveform.shape == (1, mel.shape[0] * 480) and lengths.tolist() == [mel.shape[0] * 480]
    again = prompt_mel_spectrogram(waveform[0])
    assert again.shape == mel.shape
    speech = mel.mean(1) > mel.mean(1).median()  # frames with speech energy
    error = (again - mel).abs()[speech].mean()
    assert error < 0.35
    # The loudness contour lines up best without a shift: frame t's audio sits where frame t was analysed.
    contour, rebuilt = mel.mean(1), again.mean(1)

    def agreement(lag: int) -> float:
        a, b = contour[max(0, lag) : len(contour) + min(0, lag)], rebuilt[max(0, -lag) : len(rebuilt) - max(0, lag)]
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert agreement(0) > max(agreement(-1), agreement(1))


def test_griffin_lim_batches_exactly_and_is_deterministic(speech_24k):
    vocoder = MossSpeechCodecGriffinLim(MossSpeechCodecVocoderConfig(), n_iter=4)
    mel = prompt_mel_spectrogram(speech_24k).T
    batch = torch.full((2, 80, 40), 3.0)  # padding values must not matter
    batch[0], batch[1, :, :25] = mel[:, :40], mel[:, 10:35]
    state = torch.get_rng_state()
    waveform, lengths = vocoder(batch, torch.tensor([40, 25]), generator=torch.Generator())
    assert torch.equal(torch.get_rng_state(), state)
    assert lengths.tolist() == [40 * 480, 25 * 480]
    # a batch and a single item take different kernels (shape-dependent SIMD blocking): float32 tolerance
    torch.testing.assert_close(waveform[0], vocoder(mel[None, :, :40])[0][0])
    torch.testing.assert_close(waveform[1, : 25 * 480], vocoder(mel[None, :, 10:35])[0][0])
    assert waveform[1, 25 * 480 :].abs().max() == 0
    assert waveform.abs().max() <= 0.99
    assert not list(vocoder.state_dict()) and not list(vocoder.parameters())


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((torch.zeros(1, 40, 5),), ValueError, "mel must be \\(batch, 80"),
        ((torch.zeros(1, 80, 5, dtype=torch.long),), TypeError, "floating-point"),
        ((torch.zeros(2, 80, 5), torch.tensor([5, 6])), ValueError, "mel_lengths must lie in \\[1, 5\\]"),
        ((torch.zeros(2, 80, 5), torch.tensor([5])), ValueError, "mel_lengths must be a 1-D integer tensor of 2"),
    ],
)
def test_griffin_lim_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        MossSpeechCodecGriffinLim(MossSpeechCodecVocoderConfig(), n_iter=1)(*args)


def test_config_options_are_validated():
    with pytest.raises(ValueError, match="vocoder_type must be one of \\('hift', 'griffin_lim'\\), got 'wavenet'"):
        tiny_codec_config(vocoder_type="wavenet")
    with pytest.raises(ValueError, match="griffin_lim_iters must be a positive integer"):
        tiny_codec_config(vocoder_type="griffin_lim", griffin_lim_iters=0)
    with pytest.raises(ValueError, match="hop .* must be sampling_rate / 50"):
        tiny_codec_config(vocoder_type="griffin_lim", vocoder_config=dict(base_channels=32, upsample_rates=[8, 5, 2]))
    # Omitting speaker_config keeps the release's CAM++; only an explicit None removes it.
    assert tiny_codec_config(speaker_config=None).speaker_config is None
    default = MossSpeechCodecModel.config_class(encoder_config=dict(d_model=32, encoder_attention_heads=2,
                                                                    encoder_layers=2, quantize_position=2,
                                                                    pooling_position=2))
    assert default.speaker_config is not None and default.vocoder_type == "hift"


def test_nano_codec_has_no_vocoder_or_speaker_weights(nano_codec):
    assert {key.split(".")[0] for key in nano_codec.state_dict()} == {"encoder", "flow"}
    assert nano_codec.hift is None and nano_codec.speaker_encoder is None
    assert isinstance(nano_codec.vocoder, MossSpeechCodecGriffinLim)
    assert nano_codec.config.samples_per_code == 1920


def test_nano_codec_decodes_streams_and_prompts(nano_codec):
    codes = [torch.randint(0, 64, (7,)), torch.randint(0, 64, (4,))]
    out = nano_codec.decode(codes)
    assert out.lengths.tolist() == [7 * 1920, 4 * 1920] and out.sampling_rate == 24000
    assert torch.isfinite(out.waveforms).all() and out.waveforms[1, 4 * 1920 :].abs().max() == 0
    assert torch.equal(nano_codec.decode(codes).waveforms, out.waveforms)  # deterministic without a generator

    speech, rate = espeak("hello this is the voice", "en+f3")
    prompt = nano_codec.voice_prompt(speech, sampling_rate=rate)
    assert torch.equal(prompt.speaker_embedding, torch.zeros(192))
    assert prompt.mel.shape == (4 * prompt.tokens.numel(), 80) and prompt.tokens.numel() > 0
    voiced = nano_codec.decode(codes[:1], voice_prompt=prompt).waveforms
    assert voiced.shape == (1, 7 * 1920) and not torch.allclose(voiced, out.waveforms[:1])

    stream = torch.randint(0, 64, (23,))
    chunks = list(nano_codec.stream_decode(iter(stream.tolist()), voice_prompt=prompt, chunk_size=5))
    assert len(chunks) >= 3 and torch.cat(chunks).numel() == 23 * 1920


def test_nano_codec_save_load_round_trip(nano_codec, tmp_path):
    nano_codec.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["speaker_config"] is None and saved["vocoder_type"] == "griffin_lim"
    assert saved["griffin_lim_iters"] == 4
    loaded = MossSpeechCodecModel.from_pretrained(tmp_path).eval()
    assert loaded.speaker_encoder is None and isinstance(loaded.vocoder, MossSpeechCodecGriffinLim)
    codes = torch.randint(0, 64, (1, 6))
    # float32 tolerance across the safetensors load (unaligned weights change the SIMD summation order)
    torch.testing.assert_close(loaded.decode(codes).waveforms, nano_codec.decode(codes).waveforms)

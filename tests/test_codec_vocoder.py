"""MossSpeechCodecVocoder (HiFT): lengths, RNG contract, voiced source, padded batches, streaming source cache,
legacy weight-norm checkpoints, input validation and the release's parameter names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_vocoder_config

from modeling_moss_speech.configuration_moss_speech_codec import MossSpeechCodecVocoderConfig
from modeling_moss_speech.modeling_moss_speech_codec_vocoder import (
    MossSpeechCodecVocoder,
    convert_legacy_weight_norm_keys,
)

SPEC = Path(__file__).resolve().parent / "data" / "codec_keys_release.json"  # copy of shared/spec
HOP = 480  # 8 · 5 · 3 · 4, as at release size
RATE = 24000


def tiny_vocoder(f0_hz: float | None = None, seed: int = 0) -> MossSpeechCodecVocoder:
    """Tiny channels, release upsampling/iSTFT; `f0_hz` pins the F0 predictor (random weights predict ~0 Hz)."""
    torch.manual_seed(seed)
    model = MossSpeechCodecVocoder(tiny_vocoder_config()).eval()
    if f0_hz is not None:
        with torch.no_grad():
            model.f0_predictor.classifier.weight.zero_()
            model.f0_predictor.classifier.bias.fill_(f0_hz)
    return model


def mels(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 80, frames, generator=g) * 2 - 6  # log-mel-like range


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_output_is_hop_samples_per_frame():
    model = tiny_vocoder()
    assert model.config.hop_length == HOP
    wave, lengths = model(mels(2, 7), torch.tensor([7, 4]), generator=seeded(0))
    assert wave.shape == (2, 7 * HOP) and wave.dtype == torch.float32
    assert lengths.tolist() == [7 * HOP, 4 * HOP]
    assert torch.isfinite(wave).all() and wave.abs().max() <= model.config.audio_limit
    wave, lengths = model(mels(1, 3))
    assert wave.shape == (1, 3 * HOP) and lengths.tolist() == [3 * HOP]


def test_randomness_comes_from_the_generator():
    model = tiny_vocoder()
    mel = mels(1, 4)
    global_state = torch.get_rng_state()
    a, _ = model(mel, generator=seeded(3))
    b, _ = model(mel, generator=seeded(3))
    c, _ = model(mel, generator=seeded(4))
    assert torch.equal(torch.get_rng_state(), global_state), "a given generator must not touch the global RNG"
    assert torch.equal(a, b)
    assert not torch.allclose(a, c), "the excitation noise must depend on the seed"
    # Without a generator the global RNG is used: reproducible under torch.manual_seed, the same stream.
    torch.manual_seed(3)
    d, _ = model(mel)
    assert torch.equal(a, d)
    # The generator advances: two consecutive calls (e.g. streaming chunks) get different noise.
    g = seeded(3)
    first, _ = model(mel, generator=g)
    second, _ = model(mel, generator=g)
    assert torch.equal(first, a) and not torch.allclose(first, second)


def _peak_hz(source: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(source[0, 0] - source[0, 0].mean()).abs()
    return float(spectrum.argmax()) * RATE / source.shape[-1]


def test_voiced_frames_excite_harmonics_of_the_predicted_f0():
    mel = mels(1, 10)  # 0.2 s: 5 Hz FFT bins, 150 Hz on a bin
    voiced = tiny_vocoder(f0_hz=150.0)
    unvoiced = tiny_vocoder(f0_hz=0.0)
    for model in (voiced, unvoiced):
        with torch.no_grad():  # the merge layer passes the fundamental only
            model.m_source.l_linear.weight.copy_(torch.eye(1, model.config.nb_harmonics + 1))
            model.m_source.l_linear.bias.zero_()
    wave_v, source_v = voiced.inference(mel, generator=seeded(0))
    _, source_u = unvoiced.inference(mel, generator=seeded(0))
    assert abs(_peak_hz(source_v) - 150.0) < 2.0
    # Voiced: tanh(0.1 sin + 0.003 noise); unvoiced: tanh(0.1 / 3 noise) only.
    assert 0.09 < source_v.abs().max() < 0.11
    assert abs(source_v.std().item() - 0.1 / 2**0.5) < 0.01
    assert abs(source_u.std().item() - 0.1 / 3) < 0.005
    assert abs(_peak_hz(source_u) - 150.0) > 2.0
    assert torch.isfinite(wave_v).all()


def test_padded_batch_equals_each_row_alone():
    model = tiny_vocoder(f0_hz=150.0)
    with torch.no_grad():  # make f0 vary over frames and rows
        model.f0_predictor.classifier.weight.normal_(0, 0.5)
    frames = [7, 4, 2]
    mel = mels(3, 7, seed=1)
    for row, n in enumerate(frames):
        mel[row, :, n:] = 4.0  # padding content must not matter
    wave, lengths = model(mel, torch.tensor(frames), generator=seeded(5))
    assert lengths.tolist() == [n * HOP for n in frames]
    for row, n in enumerate(frames):
        alone, _ = model(mel[row : row + 1, :, :n], generator=seeded(5))
        torch.testing.assert_close(wave[row, : n * HOP], alone[0], atol=2e-6, rtol=1e-4)
        assert not wave[row, n * HOP :].any(), "samples past a row's length must be zero"


def test_cache_source_continues_the_previous_chunk():
    model = tiny_vocoder(f0_hz=150.0)
    mel = mels(1, 7)
    _, source_1 = model.inference(mel[:, :, :4], generator=seeded(0))
    cache = source_1[:, :, -HOP:]
    wave_2, source_2 = model.inference(mel[:, :, 4:], cache_source=cache, generator=seeded(1))
    plain_2, plain_source = model.inference(mel[:, :, 4:], generator=seeded(1))
    assert torch.equal(source_2[:, :, :HOP], cache)
    assert torch.equal(source_2[:, :, HOP:], plain_source[:, :, HOP:])
    assert not torch.allclose(wave_2, plain_2)
    empty, _ = model.inference(mel[:, :, 4:], cache_source=torch.zeros(1, 1, 0), generator=seeded(1))
    assert torch.equal(empty, plain_2)


def test_legacy_weight_g_weight_v_checkpoints_load(tmp_path):
    model = tiny_vocoder(f0_hz=150.0, seed=0)
    state = model.state_dict()
    legacy = {}
    for key, value in state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        legacy[key.replace("parametrizations.weight.original1", "weight_v")] = value
    assert any(k.endswith("weight_g") for k in legacy) and not any("parametrizations" in k for k in legacy)
    torch.save(legacy, tmp_path / "hift.pt")
    loaded_legacy = torch.load(tmp_path / "hift.pt", weights_only=True)

    assert convert_legacy_weight_norm_keys(loaded_legacy).keys() == state.keys()
    mel = mels(1, 3)
    expected, _ = model(mel, generator=seeded(0))
    for source in (loaded_legacy, convert_legacy_weight_norm_keys(loaded_legacy)):
        fresh = tiny_vocoder(seed=1)  # different weights before loading
        fresh.load_state_dict(dict(source), strict=True)
        out, _ = fresh(mel, generator=seeded(0))
        assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mel=torch.zeros(80, 5)), ValueError, "mel must have shape"),
        (dict(mel=torch.zeros(1, 81, 5)), ValueError, "mel must have shape"),
        (dict(mel=torch.zeros(1, 80, 0)), ValueError, "mel must have shape"),
        (dict(mel=torch.zeros(1, 80, 5, dtype=torch.long)), TypeError, "floating-point"),
        (dict(mel=torch.full((1, 80, 5), float("nan"))), ValueError, "NaN"),
        (dict(mel_lengths=torch.tensor([5])), ValueError, r"shape \(2,\)"),
        (dict(mel_lengths=torch.tensor([5, 0])), ValueError, r"\[1, 5\]"),
        (dict(mel_lengths=torch.tensor([5, 6])), ValueError, r"\[1, 5\]"),
        (dict(mel_lengths=torch.tensor([5.0, 4.0])), TypeError, "integer"),
        (dict(generator=3), TypeError, "torch.Generator"),
    ],
)
def test_invalid_inputs_raise_clear_errors(kwargs, error, match):
    model = tiny_vocoder()
    args = dict(mel=torch.zeros(2, 80, 5), mel_lengths=None, generator=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        model(**args)


def test_invalid_cache_source_and_config():
    model = tiny_vocoder()
    with pytest.raises(ValueError, match="cache_source must have shape"):
        model.inference(torch.zeros(1, 80, 2), cache_source=torch.zeros(1, 1, 2 * HOP + 1))
    with pytest.raises(ValueError, match="cache_source must have shape"):
        model.inference(torch.zeros(1, 80, 2), cache_source=torch.zeros(2, 1, 10))
    with pytest.raises(ValueError, match="differ by an even number"):
        MossSpeechCodecVocoder(tiny_vocoder_config(upsample_kernel_sizes=[16, 10, 7]))


def test_release_size_parameter_names_and_shapes():
    spec = json.loads(SPEC.read_text())
    with torch.device("meta"):
        model = MossSpeechCodecVocoder(MossSpeechCodecVocoderConfig())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == spec["hift"]
    assert sum(p.numel() for p in model.parameters()) == spec["numel"]["hift"]
    assert model.hop_length == HOP

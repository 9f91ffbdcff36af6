"""load_audio, the package's one audio reader: every input form gives the same float32 mono waveform (channels
averaged, resampled by torchaudio), and bad input names the argument."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from modeling_moss_speech.apps.cli.common import CLIError, _read_audio
from modeling_moss_speech.feature_extraction_moss_speech import load_audio

RATE = 22050


@pytest.fixture(scope="module")
def stereo(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A stereo wav (float samples, so the file holds exactly the array) and its (channels, samples) array."""
    t = np.arange(RATE // 5) / RATE
    left = 0.5 * np.sin(2 * np.pi * 220 * t)
    channels = np.stack([left, 0.25 * np.cos(2 * np.pi * 330 * t)]).astype(np.float32)
    path = tmp_path_factory.mktemp("audio") / "stereo.wav"
    sf.write(path, channels.T, RATE, subtype="FLOAT")
    return path, channels


def test_every_form_gives_the_mean_of_the_channels(stereo):
    path, channels = stereo
    mono = torch.from_numpy(channels).mean(dim=0)
    forms = [str(path), path, path.read_bytes(), {"bytes": path.read_bytes(), "path": "ignored.wav"},
             {"bytes": None, "path": str(path)}, {"array": channels, "sampling_rate": RATE},
             {"array": channels, "sampling_rate": np.array(RATE)}]  # Arrow hands numpy scalars
    for form in forms:
        wave, rate = load_audio(form)
        assert rate == RATE and wave.dtype == torch.float32 and wave.ndim == 1
        assert torch.equal(wave, mono)
    for array in (channels, torch.from_numpy(channels), channels.tolist()):
        wave, rate = load_audio(array, sampling_rate=RATE)
        assert rate == RATE and torch.equal(wave, mono)
    # A torchcodec AudioDecoder (what datasets returns for decoded Audio columns): its samples are (channels, time).
    decoder = type("Decoder", (), {"get_all_samples": lambda self: type(
        "Samples", (), {"data": torch.from_numpy(channels), "sample_rate": RATE})()})()
    assert torch.equal(load_audio(decoder)[0], mono)


def test_resampled_by_torchaudio(stereo):
    path, channels = stereo
    wave, rate = load_audio(path, target_rate=16000)
    assert rate == 16000
    expected = torchaudio.functional.resample(torch.from_numpy(channels).mean(dim=0), RATE, 16000)
    assert torch.equal(wave, expected)
    assert torch.equal(load_audio(channels, RATE, target_rate=RATE)[0], load_audio(path)[0])


def test_the_cli_reads_with_it(stereo):
    path, _ = stereo
    wave, rate = _read_audio(path, "--wav")
    assert rate == RATE and torch.equal(wave, load_audio(path)[0])
    corrupt = path.with_name("corrupt.wav")
    corrupt.write_bytes(b"RIFF0000WAVEfmt garbage")
    with pytest.raises(CLIError, match=r"--wav: cannot read '.*corrupt.wav' as audio \(corrupt.wav: could not read"):
        _read_audio(corrupt, "--wav")


def _empty_wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(0, np.float32), RATE, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("missing.wav",), {"where": "q"}, FileNotFoundError, r"q: audio file 'missing.wav' does not exist"),
    ((b"not audio",), {}, ValueError, r"audio: could not read audio file '<bytes>' with soundfile"),
    ((_empty_wav(),), {}, ValueError, r"audio: the audio is empty \(audio file '<bytes>' holds no samples\)"),
    ((np.zeros((2, 0), np.float32), 16000), {"where": "row 1"}, ValueError, r"row 1: the audio is empty \(0 samples\)"),
    ((np.zeros(10, np.float32),), {"where": "x"}, ValueError, r"x: an audio array needs its sampling rate"),
    ((np.zeros(10, np.int16), 16000), {}, TypeError, r"audio: `raw_speech` must have a float dtype"),
    ((np.zeros((100, 2), np.float32), 16000), {}, ValueError, r"expected \(channels, samples\)"),
    ((np.array([0.0, np.nan], np.float32), 16000), {}, ValueError, r"NaN or infinite"),
    ((np.zeros(10, np.float32), 0), {}, ValueError, r"`sampling_rate` must be a positive integer"),
    (({"array": np.zeros(10, np.float32), "sampling_rate": 8000}, 16000), {}, ValueError,
     r"sampling_rate=16000 was given, but the audio carries its own rate 8000"),
    (({"text": "hi"},), {}, ValueError, r"an audio dict needs 'array' and 'sampling_rate', or 'bytes' or 'path'"),
    ((None,), {"where": "row 3"}, ValueError, r"row 3: no audio \(None\)"),
    ((3.5,), {}, TypeError, r"audio must be an audio file path, its bytes, a datasets Audio value or a waveform, "
                            r"got float"),
])
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_audio(*args, **kwargs)


def test_loud_samples_are_clipped_with_a_warning(caplog):
    wave, _ = load_audio(np.array([0.5, 1.5, -2.0], np.float32), 16000)
    assert wave.tolist() == [0.5, 1.0, -1.0]
    assert "clipped to [-1, 1]" in caplog.text

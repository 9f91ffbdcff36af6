"""Feature extraction for the MOSS-Speech speech tokenizer: waveform → Whisper-style 128-bin log-mel at 16 kHz.

The release feeds its Whisper-VQ encoder with transformers' `WhisperFeatureExtractor` (128 bins, hop 160, n_fft 400,
padding to the longest item rounded up to 1280 samples = one code). This extractor computes the same features with
torchaudio, validates its inputs, downmixes and resamples, and makes every row of a batch identical to what the
release computes for that utterance alone (see `MossSpeechFeatureExtractor.extract_features`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.utils import logging

logger = logging.get_logger(__name__)

AudioInput = np.ndarray | torch.Tensor


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def split_into_chunks(waveform_16k: torch.Tensor | np.ndarray, chunk_samples: int = 480000) -> list[torch.Tensor]:
    """Split a mono waveform into consecutive chunks of `chunk_samples` (the last one shorter).

    The release encodes long audio as independent 30 s chunks (480,000 samples at 16 kHz) and concatenates the codes;
    the chunks are views of the input, in order.
    """
    if isinstance(waveform_16k, np.ndarray):
        waveform_16k = torch.from_numpy(waveform_16k)
    if not isinstance(waveform_16k, torch.Tensor):
        raise TypeError(f"`waveform_16k` must be a 1-D torch tensor or numpy array, got {type(waveform_16k).__name__}.")
    if waveform_16k.dim() != 1:
        raise ValueError(f"`waveform_16k` must be 1-D (mono samples), got shape {tuple(waveform_16k.shape)}.")
    if waveform_16k.numel() == 0:
        raise ValueError("`waveform_16k` is empty (0 samples).")
    _check_positive_int("chunk_samples", chunk_samples)
    return list(torch.split(waveform_16k, chunk_samples))


def prepare_waveforms(
    raw_speech: AudioInput | Sequence[AudioInput], sampling_rate: int | None, target_rate: int | None = None
) -> list[torch.Tensor]:
    """Validate one waveform or a list of them and return 1-D float32 CPU tensors, resampled to `target_rate`.

    Each waveform is a numpy array or torch tensor with a float dtype, 1-D (samples) or 2-D (channels, samples);
    a 2-D array is ONE multi-channel waveform, never a batch. Channels are averaged to mono (the release kept only
    the first channel). `target_rate=None` keeps `sampling_rate`; otherwise `torchaudio.functional.resample` (its
    defaults, as the release's `torchaudio.transforms.Resample`) converts. Samples beyond [-1, 1] (after downmixing,
    before resampling) are clipped to it with a warning. Raises `ValueError` for a missing or non-positive
    `sampling_rate`, empty audio, NaN/inf samples or wrong dimensions, `TypeError` for integer dtypes and
    unsupported types.
    """
    if sampling_rate is None:
        raise ValueError("`sampling_rate` is required: pass the sampling rate of the audio in Hz.")
    sampling_rate = _as_rate("sampling_rate", sampling_rate)
    if target_rate is not None:
        target_rate = _as_rate("target_rate", target_rate)

    if isinstance(raw_speech, (np.ndarray, torch.Tensor)):
        items, single = [raw_speech], True
    elif isinstance(raw_speech, (list, tuple)):
        items, single = list(raw_speech), False
        if not items:
            raise ValueError("`raw_speech` is an empty list: pass at least one waveform.")
    else:
        raise TypeError("`raw_speech` must be a numpy array, a torch tensor or a list of them, got "
                        f"{type(raw_speech).__name__}.")

    waveforms = []
    for index, item in enumerate(items):
        wave = _to_mono_float32(item, "raw_speech" if single else f"raw_speech[{index}]")
        if target_rate is not None and sampling_rate != target_rate:
            wave = torchaudio.functional.resample(wave, sampling_rate, target_rate)
        waveforms.append(wave.contiguous())
    return waveforms


def load_audio(
    audio: Any, sampling_rate: int | None = None, target_rate: int | None = None, where: str = "audio"
) -> tuple[torch.Tensor, int]:
    """Read audio as a 1-D float32 mono CPU tensor at `target_rate` (its own rate when `None`): `(waveform, rate)`.

    The one audio reader of the package. `audio` is one of:

    - a path (`str` / `os.PathLike`) or the file's `bytes`, read with soundfile (wav, flac, ogg, ...);
    - a `datasets` Audio value: decoded `{"array", "sampling_rate"}`, or undecoded `{"bytes", "path"}` (bytes win;
      read with soundfile, so no torchcodec is needed), or a torchcodec `AudioDecoder` (`get_all_samples()`);
    - a waveform (numpy array, torch tensor or list of floats) with its `sampling_rate`.

    Channel rule: a 2-D waveform is `(channels, samples)` and its channels are averaged to mono; files are read as
    `(channels, samples)` too (soundfile's frames x channels, transposed), so a stereo file and the same samples as
    an array give the same waveform. Resampling is `torchaudio.functional.resample` with its defaults; samples are
    validated and clipped to [-1, 1] as [`prepare_waveforms`] does. Raises `FileNotFoundError` for a missing file,
    `ValueError` (naming `where`) for an unreadable or empty file, a missing or wrong rate, NaN/inf samples or
    wrong dimensions, and `TypeError` for any other kind of input or integer samples.
    """
    own_rate = None
    if audio is None:
        raise ValueError(f"{where}: no audio (None).")
    if callable(getattr(audio, "get_all_samples", None)):  # a torchcodec AudioDecoder (datasets' decoded Audio)
        samples = audio.get_all_samples()
        array, own_rate = samples.data, samples.sample_rate
    elif isinstance(audio, Mapping) and audio.get("array") is not None:
        array, own_rate = audio["array"], audio.get("sampling_rate")
    elif isinstance(audio, Mapping) and (audio.get("bytes") is not None or audio.get("path") is not None):
        array, own_rate = _read_audio_file(audio["bytes"] if audio.get("bytes") is not None else audio["path"], where)
    elif isinstance(audio, Mapping):
        raise ValueError(f"{where}: an audio dict needs 'array' and 'sampling_rate', or 'bytes' or 'path'; got keys "
                         f"{sorted(map(str, audio))}.")
    elif isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)):
        array, own_rate = _read_audio_file(audio, where)
    elif isinstance(audio, (np.ndarray, torch.Tensor, list, tuple)):
        array = audio
    else:
        raise TypeError(f"{where} must be an audio file path, its bytes, a datasets Audio value or a waveform, got "
                        f"{type(audio).__name__}.")
    if own_rate is not None and sampling_rate is not None and int(sampling_rate) != int(own_rate):
        raise ValueError(f"{where}: sampling_rate={sampling_rate} was given, but the audio carries its own rate "
                         f"{own_rate}.")
    rate = own_rate if own_rate is not None else sampling_rate
    if isinstance(rate, (np.generic, np.ndarray)) and np.ndim(rate) == 0:  # numpy / Arrow scalars
        rate = rate.item()
    if rate is None:
        raise ValueError(f"{where}: an audio array needs its sampling rate; pass (waveform, sampling_rate) or "
                         "{'array': waveform, 'sampling_rate': rate}.")
    if isinstance(array, (list, tuple)):
        array = np.asarray(array, dtype=np.float32)
    if isinstance(array, np.ndarray) and array.dtype == object:  # nested Arrow lists: one array per channel
        array = np.stack([np.asarray(a, dtype=np.float32) for a in array]) if array.size else np.zeros(0, np.float32)
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        array = array.copy()  # Arrow-backed arrays are read-only; torch.from_numpy warns on those
    if (array.numel() if isinstance(array, torch.Tensor) else getattr(array, "size", 1)) == 0:
        raise ValueError(f"{where}: the audio is empty (0 samples).")
    try:
        (waveform,) = prepare_waveforms(array, rate, target_rate=target_rate)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from error
    return waveform, int(target_rate if target_rate is not None else rate)


def _read_audio_file(source: str | os.PathLike | bytes | bytearray | memoryview, where: str) -> tuple[np.ndarray, int]:
    """(channels, samples) float32 and the rate of an audio file (path or bytes) read with soundfile."""
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{where}: audio file {name!r} does not exist.")
    else:
        name, source = "<bytes>", io.BytesIO(bytes(source))
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, TypeError) as error:
        raise ValueError(f"{where}: could not read audio file {name!r} with soundfile ({error}); expected a "
                         "readable wav/flac/ogg file.") from error
    if data.shape[0] == 0:
        raise ValueError(f"{where}: the audio is empty (audio file {name!r} holds no samples).")
    return np.ascontiguousarray(data.T), int(rate)


def _as_rate(name: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer number of Hz, got {value!r}.")
    return value


def _to_mono_float32(item: AudioInput, name: str) -> torch.Tensor:
    if isinstance(item, np.ndarray):
        if not np.issubdtype(item.dtype, np.floating):
            raise TypeError(f"`{name}` must have a float dtype (samples in [-1, 1]), got numpy {item.dtype}; "
                            "convert integer PCM first, e.g. `x.astype(np.float32) / 32768`.")
        wave = torch.from_numpy(np.ascontiguousarray(item))
    elif isinstance(item, torch.Tensor):
        if not item.is_floating_point():
            raise TypeError(f"`{name}` must have a float dtype (samples in [-1, 1]), got {item.dtype}; "
                            "convert integer PCM first, e.g. `x.float() / 32768`.")
        wave = item.detach().cpu()
    else:
        raise TypeError(f"`{name}` must be a numpy array or a torch tensor, got {type(item).__name__}.")

    if wave.dim() not in (1, 2):
        raise ValueError(f"`{name}` must be 1-D (samples) or 2-D (channels, samples), got shape "
                         f"{tuple(wave.shape)}.")
    if wave.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(wave.shape)}): audio needs at least one sample.")
    if wave.dim() == 2:
        if wave.shape[0] > wave.shape[1]:
            raise ValueError(f"`{name}` has shape {tuple(wave.shape)}: expected (channels, samples) with fewer "
                             "channels than samples; transpose (samples, channels) audio, e.g. soundfile's.")
        wave = (wave if wave.dtype == torch.float64 else wave.float()).mean(dim=0)
    wave = wave.to(torch.float32)
    if not torch.isfinite(wave).all():
        raise ValueError(f"`{name}` contains NaN or infinite samples (after conversion to float32).")
    peak = float(wave.abs().max())
    if peak > 1.0:
        # Float audio lives in [-1, 1]; beyond it is what a recorder or 16-bit PCM would clip, so clip it the same
        # way, audibly (a warning), rather than refuse a loud file or silently feed the codec out-of-range input.
        logger.warning(f"`{name}` has samples up to {peak:.3g} in magnitude, outside float audio's [-1, 1]: clipped "
                       "to [-1, 1]. Scale it first (e.g. `x / abs(x).max()`) to keep its waveform.")
        wave = wave.clamp(-1.0, 1.0)
    return wave


class MossSpeechFeatureExtractor(SequenceFeatureExtractor):
    r"""Whisper-style log-mel features for the MOSS-Speech tokenizer (Whisper-VQ encoder).

    Features: power mel spectrogram (periodic Hann window, centered reflect-padded STFT, slaney mel scale and norm,
    0-8 kHz), last STFT frame dropped as Whisper does (frames = samples // hop_length), then
    `log10(clamp(1e-10))`, floored at the utterance's maximum minus 8, and mapped by `(x + 4) / 4`.

    Inputs: one waveform or a list of them, each a float numpy array or torch tensor, 1-D (mono) or 2-D
    `(channels, samples)`. Multi-channel audio is downmixed to mono by averaging the channels (the release kept only
    the first channel). Any sampling rate is accepted and resampled to `sampling_rate` with
    `torchaudio.functional.resample`. Samples beyond [-1, 1] (after downmixing) are clipped to it, with a warning.

    Args:
        feature_size: Number of mel bins (128 for the release's encoder).
        sampling_rate: Rate the features are computed at, in Hz.
        hop_length: STFT hop in samples (10 ms at 16 kHz).
        n_fft: STFT size and window length in samples.
        chunk_length: Longest audio, in seconds, the encoder takes in one pass; longer audio is split into chunks
            of this length (see [`split_into_chunks`]).
        padding_value: Waveform padding value.
        pad_to_multiple_of: Waveforms are right-padded to the longest of the batch, rounded up to a multiple of this
            many samples (1280 = one 12.5 Hz code).
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 128,
        sampling_rate: int = 16000,
        hop_length: int = 160,
        n_fft: int = 400,
        chunk_length: int = 30,
        padding_value: float = 0.0,
        pad_to_multiple_of: int = 1280,
        **kwargs,
    ):
        kwargs.setdefault("return_attention_mask", True)
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        for name, value in (("feature_size", feature_size), ("sampling_rate", sampling_rate),
                            ("hop_length", hop_length), ("n_fft", n_fft), ("chunk_length", chunk_length),
                            ("pad_to_multiple_of", pad_to_multiple_of)):
            _check_positive_int(name, value)
        if pad_to_multiple_of % hop_length:
            raise ValueError(f"`pad_to_multiple_of` ({pad_to_multiple_of}) must be a multiple of `hop_length` "
                             f"({hop_length}).")
        # Every padded row must be long enough for the STFT's reflect padding of n_fft // 2 samples.
        if pad_to_multiple_of < n_fft:
            raise ValueError(f"`pad_to_multiple_of` ({pad_to_multiple_of}) must be at least `n_fft` ({n_fft}).")
        self.hop_length = hop_length
        self.n_fft = n_fft
        self.chunk_length = chunk_length
        self.pad_to_multiple_of = pad_to_multiple_of

    @property
    def n_samples(self) -> int:
        """Samples in one encoder chunk (`chunk_length` seconds at `sampling_rate`): 480,000 at release size."""
        return self.chunk_length * self.sampling_rate

    # ------------------------------------------------------------------ inputs

    def prepare_waveforms(
        self, raw_speech: AudioInput | Sequence[AudioInput], sampling_rate: int | None
    ) -> list[torch.Tensor]:
        """Validate waveforms and return them as 1-D float32 CPU tensors at `self.sampling_rate`.

        See the module-level [`prepare_waveforms`] for the accepted inputs and errors.
        """
        return prepare_waveforms(raw_speech, sampling_rate, target_rate=self.sampling_rate)

    # ---------------------------------------------------------------- features

    def extract_features(
        self,
        waveforms: Sequence[torch.Tensor],
        device: str | torch.device | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Log-mel features of already validated mono waveforms at `self.sampling_rate` (see `prepare_waveforms`).

        Each waveform is right-padded with `padding_value` to its own multiple of `pad_to_multiple_of` (as the
        release pads one utterance), then to the longest of the batch. The release computes a batch in one centered
        STFT, so a short row's last frames would see the batch's zero padding instead of the reflection the same
        utterance gets alone; here each row's STFT reflect padding is placed at its own padded end, so every row's
        features equal the release's for that utterance alone, whatever it is batched with.

        Returns `input_features` (B, feature_size, frames) float32 and `attention_mask` (B, frames) with
        `frames = padded samples // hop_length`; frame `t` of a row is valid when `t * hop_length < samples`.
        """
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"`return_tensors` must be 'pt' or 'np', got {return_tensors!r}.")
        if len(waveforms) == 0:
            raise ValueError("`waveforms` is empty: pass at least one waveform.")
        device = torch.device(device) if device is not None else torch.device("cpu")
        lengths = torch.tensor([w.shape[-1] for w in waveforms], dtype=torch.long)
        multiple = self.pad_to_multiple_of
        own_lengths = (lengths + multiple - 1) // multiple * multiple
        total = int(own_lengths.max())

        batch = torch.full((len(waveforms), total), float(self.padding_value), dtype=torch.float32, device=device)
        for row, wave in enumerate(waveforms):  # copying inputs, not model math
            batch[row, : wave.shape[-1]] = wave.to(device=device, dtype=torch.float32)

        # Reflect each shorter row at its own padded end, exactly as torch's centered STFT reflects the batch's end.
        half = self.n_fft // 2
        rows = torch.nonzero(own_lengths < total).flatten()
        if rows.numel():
            offsets = torch.arange(half)
            ends = own_lengths[rows].unsqueeze(1)
            rows_d, ends_d, offsets_d = rows.to(device).unsqueeze(1), ends.to(device), offsets.to(device)
            batch[rows_d, ends_d + offsets_d] = batch[rows_d, ends_d - 2 - offsets_d]

        mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sampling_rate,
            n_fft=self.n_fft,
            win_length=self.n_fft,
            hop_length=self.hop_length,
            f_min=0.0,
            f_max=self.sampling_rate / 2,
            n_mels=self.feature_size,
            window_fn=torch.hann_window,
            power=2.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        ).to(device)
        spec = mel(batch)[..., :-1]  # Whisper drops the last STFT frame

        frames = torch.arange(spec.shape[-1], device=device)
        own_frames = (own_lengths // self.hop_length).to(device)
        # Frames past a row's own padded length are silence, as the same utterance alone would not have them.
        spec = spec.masked_fill((frames.unsqueeze(0) >= own_frames.unsqueeze(1)).unsqueeze(1), 0.0)
        log_spec = torch.clamp(spec, min=1e-10).log10()
        row_max = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, row_max - 8.0)
        features = (log_spec + 4.0) / 4.0

        valid_frames = ((lengths + self.hop_length - 1) // self.hop_length).to(device)
        attention_mask = (frames.unsqueeze(0) < valid_frames.unsqueeze(1)).long()
        data = {"input_features": features, "attention_mask": attention_mask}
        if return_tensors == "np":
            data = {key: value.cpu().numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(
        self,
        raw_speech: AudioInput | Sequence[AudioInput],
        sampling_rate: int | None = None,
        return_tensors: str = "pt",
        device: str | torch.device | None = None,
    ) -> BatchFeature:
        """Featurize one waveform or a list of them (see the class docstring for accepted inputs).

        Args:
            raw_speech: Float waveform(s), numpy or torch, 1-D or (channels, samples).
            sampling_rate: Sampling rate of `raw_speech` in Hz (required; resampled to `self.sampling_rate`).
            return_tensors: "pt" or "np".
            device: Where the features are computed and returned (CPU by default).

        Returns:
            `BatchFeature` with `input_features` (B, feature_size, frames) float32 and `attention_mask`
            (B, frames), frames = padded samples // hop_length.
        """
        waveforms = self.prepare_waveforms(raw_speech, sampling_rate)
        return self.extract_features(waveforms, device=device, return_tensors=return_tensors)


__all__ = ["MossSpeechFeatureExtractor", "load_audio", "prepare_waveforms", "split_into_chunks"]

"""Weight-free vocoder of the MOSS-Speech codec: the flow's 80-bin log-mel → 24 kHz speech by inverse mel + Griffin-Lim.

Used by checkpoints with `vocoder_type="griffin_lim"` (MOSS-Speech-Nano, whose budget cannot train a HiFT). It inverts
exactly the mel the flow is trained on (`prompt_mel_spectrogram`): magnitude STFT with n_fft = window = 4 × hop
(1920 at 24 kHz), hop = rate / 50 (480), Hann window, slaney-scale slaney-normalised filters over 0-8 kHz, natural log
clamped at 1e-5. `torchaudio.transforms.InverseMelScale` (least squares) recovers the linear magnitude and
`torchaudio.functional.griffinlim` its phase. The call contract is the HiFT module's: (B, 80, T) mel and lengths →
(B, T × hop) waveform and lengths in samples, so `decode` and the streaming decoder use either unchanged.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from .configuration_moss_speech_codec import MossSpeechCodecVocoderConfig

# The mel of `prompt_mel_spectrogram` (modeling_moss_speech_codec.py): the flow's training target.
MEL_F_MIN, MEL_F_MAX = 0.0, 8000.0
MEL_LOG_FLOOR = 1e-5
FRAMES_PER_SECOND = 50
WINDOW_HOPS = 4


class MossSpeechCodecGriffinLim(nn.Module):
    """Inverse mel + Griffin-Lim phase reconstruction; no parameters and no state-dict entries.

    Deterministic: phases start at zero (not random), so the same mel always gives the same samples and the global
    RNG is never used; the `generator` argument exists only for call compatibility with the HiFT vocoder. Frame t's
    audio lands where the mel analysed it (samples t·hop … (t+1)·hop around the window centre), as HiFT's does.
    """

    def __init__(self, config: MossSpeechCodecVocoderConfig, n_iter: int = 32, momentum: float = 0.99) -> None:
        super().__init__()
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter (griffin_lim_iters) must be a positive integer, got {n_iter!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}.")
        rate = config.sampling_rate
        if rate % FRAMES_PER_SECOND:
            raise ValueError(f"vocoder_config.sampling_rate must be a multiple of {FRAMES_PER_SECOND}, got {rate}.")
        self.sampling_rate, self.n_mels = rate, config.in_channels
        self.hop_length = rate // FRAMES_PER_SECOND
        self.n_fft = WINDOW_HOPS * self.hop_length
        if config.hop_length != self.hop_length:
            raise ValueError(f"Griffin-Lim inverts the flow's mel of hop {self.hop_length} (sampling_rate / 50); the "
                             f"vocoder config's hop_length is {config.hop_length}: they must agree.")
        self.n_iter, self.momentum, self.audio_limit = n_iter, momentum, config.audio_limit
        # Per-device inverse-mel transforms and windows, kept out of the module tree so that nothing of this
        # deterministic machinery lands in a checkpoint (torchaudio registers its filter bank as a buffer).
        self._tools: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    def _tools_for(self, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
        key = str(device)
        if key not in self._tools:
            inverse_mel = torchaudio.transforms.InverseMelScale(
                n_stft=self.n_fft // 2 + 1, n_mels=self.n_mels, sample_rate=self.sampling_rate, f_min=MEL_F_MIN,
                f_max=MEL_F_MAX, norm="slaney", mel_scale="slaney",
                # gels needs full rank and differs by platform; gelsd (SVD) gives the minimum-norm solution on CPU.
                driver="gelsd" if device.type == "cpu" else "gels",
            ).to(device)
            self._tools[key] = (inverse_mel, torch.hann_window(self.n_fft, device=device))
        return self._tools[key]

    def magnitude(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) log-mel → (B, n_fft / 2 + 1, T) non-negative linear STFT magnitude (least squares)."""
        inverse_mel, _ = self._tools_for(mel.device)
        return inverse_mel(mel.float().exp())

    def _vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """Rows of one length: (G, n_mels, T) → (G, T × hop)."""
        _, window = self._tools_for(mel.device)
        hop, frames = self.hop_length, mel.shape[-1]
        # The mel's frame t is centred on sample t·hop + hop/2 (uncentred STFT after reflect-padding 3·hop/2);
        # torch's centred STFT puts frame k on k·hop. With the first frame repeated in front (a stand-in for the
        # mel's reflect padding), frame t sits at (t + 1)·hop, so the waveform is the reconstruction from hop/2 on.
        magnitude = self.magnitude(mel)
        magnitude = torch.cat([magnitude[..., :1], magnitude], dim=-1)
        waveform = torchaudio.functional.griffinlim(
            magnitude, window, self.n_fft, hop, self.n_fft, power=1.0, n_iter=self.n_iter, momentum=self.momentum,
            length=frames * hop + hop // 2, rand_init=False,
        )
        return waveform[..., hop // 2 :].clamp(-self.audio_limit, self.audio_limit)

    def forward(
        self,
        mel: torch.Tensor,
        mel_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode a batch of log-mels.

        Args:
            mel: (B, n_mels, T) log-mel at 50 Hz; rows shorter than T are padded (any value).
            mel_lengths: (B,) valid frames per row (default: all T).
            generator: unused (Griffin-Lim here is deterministic); accepted for the HiFT vocoder's signature.

        Returns:
            waveform (B, T × hop) float32, zero past each row's length, and its lengths (B,) in samples. A padded row
            gives exactly the samples it gives alone (rows are vocoded in groups of equal length).
        """
        if not isinstance(mel, torch.Tensor) or not mel.is_floating_point():
            raise TypeError(f"mel must be a floating-point torch.Tensor, got {type(mel).__name__}.")
        if mel.dim() != 3 or mel.shape[1] != self.n_mels or mel.shape[2] < 1:
            raise ValueError(f"mel must be (batch, {self.n_mels}, frames >= 1), got {tuple(mel.shape)}.")
        batch, _, frames = mel.shape
        if mel_lengths is None:
            mel_lengths = torch.full((batch,), frames, dtype=torch.long, device=mel.device)
        if not isinstance(mel_lengths, torch.Tensor) or mel_lengths.shape != (batch,) \
                or mel_lengths.dtype.is_floating_point or mel_lengths.dtype == torch.bool:
            raise ValueError(f"mel_lengths must be a 1-D integer tensor of {batch} lengths, got {mel_lengths!r}.")
        if bool((mel_lengths < 1).any()) or bool((mel_lengths > frames).any()):
            raise ValueError(f"mel_lengths must lie in [1, {frames}], got {mel_lengths.tolist()}.")
        waveform = torch.zeros(batch, frames * self.hop_length, device=mel.device)
        lengths = mel_lengths.to(mel.device).long()
        for length in sorted(set(lengths.tolist())):
            rows = (lengths == length).nonzero().squeeze(1)
            waveform[rows, : length * self.hop_length] = self._vocode(mel[rows, :, :length])
        return waveform, lengths * self.hop_length


__all__ = ["MossSpeechCodecGriffinLim"]

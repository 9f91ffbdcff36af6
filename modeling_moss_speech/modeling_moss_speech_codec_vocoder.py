"""HiFT vocoder of the MOSS-Speech codec: 80-bin log-mel at 50 Hz → 24 kHz waveform.

A neural source-filter + iSTFT HiFi-GAN (CosyVoice2's `HiFTGenerator`, HiFTNet): an F0 predictor drives a harmonic
source whose STFT is fused into every upsampling stage; the last layer predicts an STFT magnitude and phase that an
inverse STFT turns into audio. Parameter names are those of the release's `flow/hift.pt`, so it loads unchanged
(weight norm in either the `parametrizations.weight.original0/1` or the legacy `weight_g`/`weight_v` form).

Batches may mix lengths: every convolution sees zeros past a row's end (as a row alone sees its zero padding) and
the STFT/iSTFT edges are handled per row, so a padded row gives the samples it gives alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .configuration_moss_speech_codec import MossSpeechCodecVocoderConfig

_LEGACY_WEIGHT_NORM_SUFFIXES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


def convert_legacy_weight_norm_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `torch.nn.utils.weight_norm` keys (`*.weight_g`, `*.weight_v`) to the parametrization form.

    `load_state_dict` accepts both forms already (torch registers a compatibility hook); this is for loaders that
    assign tensors by name without calling the module hooks. Other keys pass through unchanged.
    """
    converted = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _LEGACY_WEIGHT_NORM_SUFFIXES:
            key = f"{prefix}.{_LEGACY_WEIGHT_NORM_SUFFIXES[leaf]}" if prefix else _LEGACY_WEIGHT_NORM_SUFFIXES[leaf]
        converted[key] = value
    return converted


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _length_mask(lengths: torch.Tensor | None, size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, 1, size) mask of the valid positions, or None when nothing is padded."""
    if lengths is None:
        return None
    return (torch.arange(size, device=lengths.device) < lengths[:, None]).to(dtype)[:, None, :]


class MossSpeechCodecVocoderSnake(nn.Module):
    """Snake activation with a per-channel linear-scale frequency: x + sin²(αx) / α."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        # The release's epsilon: keeps a zero-trained alpha finite.
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class MossSpeechCodecVocoderResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations: per dilation, snake → dilated conv → snake → conv, + input."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d)))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size)))
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(MossSpeechCodecVocoderSnake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(MossSpeechCodecVocoderSnake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # `x` is zero past each row's end; snake(0) = 0, so re-masking after each conv (whose bias fills the padding)
        # keeps every conv input zero there.
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            xt = _masked(conv1(act1(x)), mask)
            xt = _masked(conv2(act2(xt)), mask)
            x = xt + x
        return x


class MossSpeechCodecVocoderF0Predictor(nn.Module):
    """Frame-level F0 (Hz) from the mel: 5 weight-normed k=3 convs with ELU, a linear head and |·|."""

    def __init__(self, in_channels: int, channels: int, num_layers: int = 5):
        super().__init__()
        layers = []
        for i in range(num_layers):
            layers += [weight_norm(nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1)), nn.ELU()]
        # Conv at even indices, ELU at odd ones: the release's `condnet.{0,2,4,6,8}` names.
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mel (B, C, T), zero past each row's end → f0 (B, T), zero past each row's end."""
        x = mel
        for layer in self.condnet:
            x = layer(x)
            if isinstance(layer, nn.ELU):
                x = _masked(x, mask)
        f0 = self.classifier(x.transpose(1, 2)).squeeze(-1).abs()
        return f0 if mask is None else f0 * mask[:, 0]


class MossSpeechCodecVocoderSource(nn.Module):
    """Harmonic-plus-noise excitation (NSF, SineGen2 flavour): f0 → a single-channel source at the output rate.

    Harmonics k·f0 (k = 1..nb_harmonics+1) are integrated at frame rate and linearly upsampled, so each frame keeps
    an exactly periodic phase; unvoiced frames (f0 ≤ threshold) get only Gaussian noise of std alpha/3, voiced ones
    sines of amplitude alpha plus noise of std sigma. A linear layer and tanh merge the harmonics.
    """

    def __init__(self, config: MossSpeechCodecVocoderConfig):
        super().__init__()
        self.num_harmonics = config.nb_harmonics + 1
        self.sampling_rate = config.sampling_rate
        self.sine_amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.upsample_scale = config.hop_length
        self.l_linear = nn.Linear(self.num_harmonics, 1)

    def draw_noise(
        self, sample_lengths: list[int], total: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Standard normal noise (B, H, total), zero past each row's length, every row drawn from the same state.

        Each row restarts from the generator's current state, so a row's noise does not depend on its batch (the
        flow decoder's fixed noise is shared by rows in the same way); afterwards the generator is left where the
        longest row's draw left it. Numbers are drawn on the generator's device, in the release's order: H uniforms
        (its initial harmonic phases, which never reach the output: see `forward`), then the noise in (H, time)
        memory order through a transposed view, as the release's `randn_like` of a (time, H) view draws it, so a
        seeded generator reproduces the release's source for a single row (checked on CPU).
        """
        if generator is None:
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                generator = torch.cuda.default_generators[index]
            else:
                generator = torch.default_generator
        start = generator.get_state()
        longest = max(sample_lengths)
        draws, end = {}, None
        for length in sorted(set(sample_lengths)):
            generator.set_state(start)
            torch.rand(self.num_harmonics, generator=generator, device=generator.device)
            noise = torch.empty(self.num_harmonics, length, device=generator.device)
            noise.t().normal_(generator=generator)
            draws[length] = F.pad(noise.to(device), (0, total - length))
            if length == longest:
                end = generator.get_state()
        generator.set_state(end)
        return torch.stack([draws[length] for length in sample_lengths])

    def forward(
        self, f0: torch.Tensor, sample_lengths: list[int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """f0 (B, T) in Hz, zero past each row's end → source (B, 1, T × hop), float32."""
        f0 = f0.float()
        hop = self.upsample_scale
        with torch.no_grad():
            harmonics = torch.arange(1, self.num_harmonics + 1, dtype=torch.float32, device=f0.device)
            # Cycles per sample of each harmonic. The release computes this per sample on the nearest-upsampled f0,
            # adds random initial phases to sample 0 and linearly downsamples by `hop` — which reads samples
            # hop·j + hop/2 ± 1/2 only, so the frame value is exact and the initial phases are dropped.
            rad = (f0[:, :, None] * harmonics / self.sampling_rate) % 1
            phase = torch.cumsum(rad, dim=1) * 2 * math.pi
            phase = F.interpolate(phase.transpose(1, 2) * hop, scale_factor=float(hop), mode="linear")
            voiced = (f0 > self.voiced_threshold).float().repeat_interleave(hop, dim=1)[:, None, :]
            noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
            noise = self.draw_noise(sample_lengths, phase.shape[-1], generator, f0.device)
            sines = torch.sin(phase) * self.sine_amp * voiced + noise_amp * noise
        # (B, L, H) view: the layout the release applies its linear layer to.
        merged = torch.tanh(F.linear(sines.transpose(1, 2), self.l_linear.weight.float(), self.l_linear.bias.float()))
        return merged.transpose(1, 2)


class MossSpeechCodecVocoder(nn.Module):
    """HiFT vocoder: mel (B, in_channels, T) → waveform (B, T × hop_length) at `sampling_rate`.

    Release size: 80 mel bins at 50 Hz → 24 kHz, hop 480 (upsampling 8·5·3, then an iSTFT with n_fft 16, hop 4).
    Random numbers (source noise) come from `generator` when given, else from the default generator of the mel's
    device; every row draws from the same state, so a batch equals its rows decoded alone.
    """

    def __init__(self, config: MossSpeechCodecVocoderConfig):
        super().__init__()
        self.config = config
        rates, kernels = list(config.upsample_rates), list(config.upsample_kernel_sizes)
        for rate, kernel in zip(rates, kernels):
            if (kernel - rate) % 2:
                raise ValueError(
                    f"MossSpeechCodecVocoder: upsample kernel {kernel} and rate {rate} must differ by an even number, "
                    "so that each stage multiplies the length exactly by its rate."
                )
        if config.base_channels % 2 ** len(rates):
            raise ValueError(
                f"MossSpeechCodecVocoder: base_channels ({config.base_channels}) must be divisible by "
                f"2 ** len(upsample_rates) = {2 ** len(rates)}."
            )
        if len(config.source_resblock_dilation_sizes) != len(rates):
            raise ValueError("MossSpeechCodecVocoder: one source_resblock_dilation_sizes entry per stage is needed.")
        self.n_fft = config.istft_n_fft
        self.istft_hop = config.istft_hop_len
        self.hop_length = config.hop_length
        self.num_kernels = len(config.resblock_kernel_sizes)
        stft_channels = self.n_fft + 2
        channels = [config.base_channels // 2**i for i in range(len(rates) + 1)]

        self.m_source = MossSpeechCodecVocoderSource(config)
        self.conv_pre = weight_norm(nn.Conv1d(config.in_channels, channels[0], 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(channels[i], channels[i + 1], k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(rates, kernels))
        )
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (kernel, dilations) in enumerate(
            zip(config.source_resblock_kernel_sizes, config.source_resblock_dilation_sizes)
        ):
            # From the source STFT's frame rate down to stage i's rate.
            stride = math.prod(rates[i + 1 :])
            if stride == 1:
                self.source_downs.append(nn.Conv1d(stft_channels, channels[i + 1], 1))
            else:
                self.source_downs.append(
                    nn.Conv1d(stft_channels, channels[i + 1], 2 * stride, stride, padding=stride // 2)
                )
            self.source_resblocks.append(MossSpeechCodecVocoderResBlock(channels[i + 1], kernel, dilations))
        self.resblocks = nn.ModuleList(
            MossSpeechCodecVocoderResBlock(channels[i + 1], kernel, dilations)
            for i in range(len(rates))
            for kernel, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
        )
        self.conv_post = weight_norm(nn.Conv1d(channels[-1], stft_channels, 7, padding=3))
        self.f0_predictor = MossSpeechCodecVocoderF0Predictor(config.in_channels, config.f0_predictor_channels)

    # ------------------------------------------------------------------ validation

    def _check_inputs(
        self,
        mel: torch.Tensor,
        mel_lengths: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor | None:
        if not isinstance(mel, torch.Tensor):
            raise TypeError(f"mel must be a torch.Tensor of shape (B, {self.config.in_channels}, T), got {type(mel)}.")
        if not mel.is_floating_point():
            raise TypeError(f"mel must be a floating-point tensor, got dtype {mel.dtype}.")
        if mel.dim() != 3 or mel.shape[1] != self.config.in_channels or mel.shape[0] == 0 or mel.shape[2] == 0:
            raise ValueError(
                f"mel must have shape (B, {self.config.in_channels}, T) with B, T >= 1, got {tuple(mel.shape)}."
            )
        if not torch.isfinite(mel).all():
            raise ValueError("mel contains NaN or infinite values.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}.")
        if mel_lengths is None:
            return None
        if (not isinstance(mel_lengths, torch.Tensor) or mel_lengths.is_floating_point() or mel_lengths.is_complex()
                or mel_lengths.dtype == torch.bool):
            raise TypeError(f"mel_lengths must be an integer torch.Tensor of shape (B,), got {mel_lengths!r}.")
        if mel_lengths.shape != (mel.shape[0],):
            raise ValueError(
                f"mel_lengths must have shape ({mel.shape[0]},) (one length per row of mel), "
                f"got {tuple(mel_lengths.shape)}."
            )
        if (mel_lengths < 1).any() or (mel_lengths > mel.shape[2]).any():
            raise ValueError(f"mel_lengths must lie in [1, {mel.shape[2]}] (mel frames), got {mel_lengths.tolist()}.")
        mel_lengths = mel_lengths.to(device=mel.device, dtype=torch.long)
        # Nothing padded: skip the masks (identical result, less work).
        return None if bool((mel_lengths == mel.shape[2]).all()) else mel_lengths

    # ------------------------------------------------------------------ STFT helpers

    def _window(self, device: torch.device) -> torch.Tensor:
        # Periodic Hann computed in float64 then rounded, as the release's scipy window.
        return torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64, device=device).float()

    def _source_stft(self, source: torch.Tensor, sample_lengths: torch.Tensor | None) -> torch.Tensor:
        """source (B, 1, L) → [real ‖ imag] (B, n_fft + 2, L / hop + 1) of a centred, reflect-padded STFT."""
        s = source[:, 0].float()
        if sample_lengths is not None:
            # A row alone is reflect-padded at its own end: write that reflection just past each row's end.
            pos = torch.arange(s.shape[-1], device=s.device)
            mirrored = (2 * (sample_lengths[:, None] - 1) - pos).clamp(min=0)
            index = torch.where(pos < sample_lengths[:, None], pos, mirrored)
            s = torch.gather(s, 1, index)
        spec = torch.stft(s, self.n_fft, self.istft_hop, self.n_fft, window=self._window(s.device), center=True,
                          pad_mode="reflect", return_complex=True)
        spec = torch.cat([spec.real, spec.imag], dim=1)
        if sample_lengths is not None:
            frames = sample_lengths // self.istft_hop + 1
            spec = spec * _length_mask(frames, spec.shape[-1], spec.dtype)
        return spec

    def _istft(self, spec: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """Complex one-sided spectrum (B, n_fft/2 + 1, F) → (B, hop·(F − 1)): centred overlap-add iSTFT.

        Same as `torch.istft(center=True)`, but the window-square envelope only counts each row's own frames, so a
        padded row is normalised at its end as it is alone.
        """
        batch, _, num_frames = spec.shape
        window = self._window(spec.device)
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=1) * window[None, :, None]
        envelope = (window**2)[None, :, None].expand(1, self.n_fft, num_frames)
        if frame_mask is not None:
            frames = frames * frame_mask
            envelope = envelope * frame_mask
        full = self.n_fft + self.istft_hop * (num_frames - 1)
        fold = {"output_size": (1, full), "kernel_size": (1, self.n_fft), "stride": (1, self.istft_hop)}
        audio = F.fold(frames, **fold)[:, 0, 0]
        envelope = F.fold(envelope, **fold)[:, 0, 0]
        start, length = self.n_fft // 2, self.istft_hop * (num_frames - 1)
        audio, envelope = audio[:, start : start + length], envelope[:, start : start + length]
        # Past a row's last frame the envelope is 0 (those samples are zeroed by the caller).
        return audio / torch.where(envelope > 1e-11, envelope, torch.ones_like(envelope))

    # ------------------------------------------------------------------ model

    def _decode(
        self, mel: torch.Tensor, source: torch.Tensor, frame_lengths: torch.Tensor | None
    ) -> torch.Tensor:
        """mel (B, C, T) zero past each row's end, source (B, 1, T·hop) → waveform (B, T·hop), float32."""
        slope = self.config.lrelu_slope
        num_frames = mel.shape[-1]
        sample_lengths = None if frame_lengths is None else frame_lengths * self.hop_length
        s_stft = self._source_stft(source, sample_lengths).to(mel.dtype)

        stage_masks, scale = [], 1
        for i, rate in enumerate(self.config.upsample_rates):
            scale *= rate
            extra = int(i == len(self.ups) - 1)  # the last stage is reflection-padded by one on the left
            lengths = None if frame_lengths is None else frame_lengths * scale + extra
            stage_masks.append(_length_mask(lengths, num_frames * scale + extra, mel.dtype))

        x = _masked(self.conv_pre(mel), _length_mask(frame_lengths, num_frames, mel.dtype))
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = _masked(x, stage_masks[i])
            si = _masked(self.source_downs[i](s_stft), stage_masks[i])
            x = x + self.source_resblocks[i](si, stage_masks[i])
            xs = None
            for j in range(self.num_kernels):
                out = self.resblocks[i * self.num_kernels + j](x, stage_masks[i])
                xs = out if xs is None else xs + out
            x = xs / self.num_kernels

        x = self.conv_post(F.leaky_relu(x)).float()  # default slope 0.01 here, as in the release
        bins = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])  # redundant sin kept: the release's weights were trained through it
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        audio = self._istft(spec, None if frame_lengths is None else stage_masks[-1].float())
        audio = audio.clamp(-self.config.audio_limit, self.config.audio_limit)
        if sample_lengths is not None:
            audio = audio * _length_mask(sample_lengths, audio.shape[-1], audio.dtype)[:, 0]
        return audio

    def _run(
        self,
        mel: torch.Tensor,
        mel_lengths: torch.Tensor | None,
        cache_source: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frame_lengths = self._check_inputs(mel, mel_lengths, generator)
        batch, _, num_frames = mel.shape
        total = num_frames * self.hop_length
        if cache_source is not None:
            if not isinstance(cache_source, torch.Tensor) or not cache_source.is_floating_point():
                raise TypeError(f"cache_source must be a floating-point torch.Tensor (B, 1, n), got {cache_source!r}.")
            if cache_source.dim() != 3 or cache_source.shape[:2] != (batch, 1) or cache_source.shape[2] > total:
                raise ValueError(
                    f"cache_source must have shape ({batch}, 1, n) with n <= {total} (mel frames x hop), "
                    f"got {tuple(cache_source.shape)}."
                )
        mel = mel.to(self.conv_pre.bias.dtype)
        frame_mask = _length_mask(frame_lengths, num_frames, mel.dtype)
        mel = _masked(mel, frame_mask)
        if frame_lengths is None:
            sample_lengths = [total] * batch
            out_lengths = torch.full((batch,), total, dtype=torch.long, device=mel.device)
        else:
            out_lengths = frame_lengths * self.hop_length
            sample_lengths = out_lengths.tolist()

        f0 = self.f0_predictor(mel, frame_mask)
        source = self.m_source(f0, sample_lengths, generator)
        if cache_source is not None and cache_source.shape[2] > 0:
            # Continue the previous chunk's excitation, as the release's streaming decode does.
            source = source.clone()
            source[:, :, : cache_source.shape[2]] = cache_source.to(source)
        waveform = self._decode(mel, source, frame_lengths)
        return waveform, out_lengths, source

    def forward(
        self,
        mel: torch.Tensor,
        mel_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode a batch of mels.

        Args:
            mel: (B, in_channels, T) log-mel at the flow's frame rate; rows shorter than T are padded (any value).
            mel_lengths: (B,) valid frames per row (default: all T).
            generator: source of the excitation noise (default: the global generator of mel's device).

        Returns:
            waveform (B, T × hop_length) float32, zero past each row's length, and its lengths (B,) in samples.
        """
        waveform, lengths, _ = self._run(mel, mel_lengths, None, generator)
        return waveform, lengths

    @torch.no_grad()
    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        mel_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming-friendly decode (the release's `HiFTGenerator.inference`).

        Args:
            mel: (B, in_channels, T) log-mel.
            cache_source: (B, 1, n) excitation to reuse for the first n samples (the tail of the previous chunk's
                returned source), so the harmonic phase continues across chunks; None or n = 0 for none.
            generator: source of the excitation noise (default: the global generator of mel's device).
            mel_lengths: (B,) valid frames per row (default: all T).

        Returns:
            waveform (B, T × hop_length) float32 and the excitation source (B, 1, T × hop_length) that was used.
        """
        waveform, _, source = self._run(mel, mel_lengths, cache_source, generator)
        return waveform, source


__all__ = ["MossSpeechCodecVocoder", "convert_legacy_weight_norm_keys"]

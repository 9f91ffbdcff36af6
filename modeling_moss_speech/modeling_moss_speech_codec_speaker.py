"""CAM++ speaker encoder of the MOSS-Speech codec: 16 kHz voice prompt → 192-d x-vector.

The release ships this network as `flow/campplus.onnx` (3D-Speaker's CAM++, as in CosyVoice). This is a plain torch
implementation whose state-dict names follow the upstream PyTorch model (`head.*` for the 2-D convolutional front
end, `xvector.*` for the densely connected TDNN), so an upstream checkpoint, or the ONNX file converted by
`hub/convert_campplus_onnx.py`, loads unchanged.

Architecture: FCM (2-D conv + residual blocks, frequency downsampled 8×) → TDNN (k5, stride 2 in time) → three
CAM-dense-TDNN blocks, each followed by a transit layer halving the channels → BN-ReLU → mean+std statistics pooling
→ 1×1 dense layer with a non-affine BatchNorm.

Padding: every time-mixing operation (the 3×3 and TDNN convolutions, the context-aware masking's global and
segment averages, the statistics pooling) sees padded frames as exact zeros or excludes them, so an utterance in a
padded batch gives the same x-vector as alone (up to float summation order). BatchNorm always uses running
statistics: the encoder is a frozen, inference-only feature extractor in the release.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from .configuration_moss_speech_codec import MossSpeechCodecSpeakerConfig

# Kaldi fbank with default framing: 25 ms windows (400 samples at 16 kHz), 10 ms hop, snip_edges.
FBANK_FRAME_LENGTH_MS = 25.0
FBANK_FRAME_SHIFT_MS = 10.0
# The TDNN halves time ((T - 1) // 2 + 1 frames) and the unbiased std pooling needs at least 2 frames after it.
MIN_FRAMES = 3
# Context-aware masking: segment length (frames after the TDNN) and channel reduction of its attention MLP.
CAM_SEGMENT_LENGTH = 100
CAM_REDUCTION = 2


class _FrozenBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that always normalises with its running statistics (padding-safe in train mode too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class CamBatchNormReLU(nn.Module):
    """BN → ReLU over channels; the `batchnorm` child name matches upstream's `nonlinear.batchnorm.*` keys."""

    def __init__(self, channels: int):
        super().__init__()
        self.batchnorm = _FrozenBatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.batchnorm(x))


class _NonAffineBatchNorm(nn.Module):
    """The dense layer's BN without affine parameters (upstream's `batchnorm_` config string)."""

    def __init__(self, channels: int):
        super().__init__()
        self.batchnorm = _FrozenBatchNorm1d(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.batchnorm(x)


def _mask_time(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded frames (last axis) so that a following conv sees what it would see on the lone input."""
    if mask is None:
        return x
    return x * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1]).to(x.dtype)


def _frames_after_tdnn(lengths: torch.Tensor) -> torch.Tensor:
    return torch.div(lengths - 1, 2, rounding_mode="floor") + 1


class CamResBlock(nn.Module):
    """2-D residual block of the FCM front end; `stride` downsamples frequency only (time keeps its rate)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = _FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _FrozenBatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False), _FrozenBatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = _mask_time(F.relu(self.bn1(self.conv1(x))), mask)
        out = self.bn2(self.conv2(out))
        return _mask_time(F.relu(out + self.shortcut(x)), mask)


class CamFCM(nn.Module):
    """Feature context module: (B, F, T) fbank → 2-D convs → (B, C·F/8, T)."""

    def __init__(self, config: MossSpeechCodecSpeakerConfig):
        super().__init__()
        channels = config.fcm_channels
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = _FrozenBatchNorm2d(channels)
        self.layer1 = self._make_layer(channels, config.fcm_num_blocks[0])
        self.layer2 = self._make_layer(channels, config.fcm_num_blocks[1])
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = _FrozenBatchNorm2d(channels)
        freq = config.feat_dim
        for _ in range(3):  # layer1, layer2 and conv2 each halve frequency (kernel 3, padding 1, stride 2)
            freq = (freq - 1) // 2 + 1
        self.out_channels = channels * freq

    @staticmethod
    def _make_layer(channels: int, num_blocks: int) -> nn.Sequential:
        return nn.Sequential(*[CamResBlock(channels, channels, 2 if i == 0 else 1) for i in range(num_blocks)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = _mask_time(F.relu(self.bn1(self.conv1(x.unsqueeze(1)))), mask)
        for block in (*self.layer1, *self.layer2):
            out = block(out, mask)
        out = F.relu(self.bn2(self.conv2(out)))
        return out.flatten(1, 2)


class CamTDNNLayer(nn.Module):
    """Conv1d (no bias, "same" padding) → BN → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"CamTDNNLayer: kernel_size must be odd for symmetric padding, got {kernel_size}.")
        self.linear = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                                padding=(kernel_size - 1) // 2 * dilation, dilation=dilation, bias=False)
        self.nonlinear = CamBatchNormReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


def _masked_segment_average(x: torch.Tensor, mask: torch.Tensor | None, seg_len: int) -> torch.Tensor:
    """Average over consecutive `seg_len`-frame segments (last one partial), broadcast back to every frame.

    Equals upstream's `avg_pool1d(kernel=stride=seg_len, ceil_mode=True)` + repeat on the lone input: a partial
    segment is averaged over its real frames only, here counting valid (unpadded) frames.
    """
    time = x.shape[-1]
    num_segments = -(-time // seg_len)
    pad = num_segments * seg_len - time
    sums = F.pad(x, (0, pad)).unflatten(-1, (num_segments, seg_len)).sum(-1)
    if mask is None:
        counts = torch.tensor([seg_len] * (num_segments - 1) + [seg_len - pad], dtype=x.dtype, device=x.device)
    else:
        counts = F.pad(mask.to(x.dtype), (0, pad)).unflatten(-1, (num_segments, seg_len)).sum(-1).unsqueeze(1)
    segment_means = sums / counts.clamp(min=1.0)
    return segment_means.repeat_interleave(seg_len, dim=-1)[..., :time]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean over time of (already zero-padded) x, keeping the time axis."""
    if mask is None:
        return x.mean(-1, keepdim=True)
    return x.sum(-1, keepdim=True) / lengths.view(-1, 1, 1).to(x.dtype)


class CamLayer(nn.Module):
    """Context-aware masking: a local TDNN output gated by a sigmoid of (global mean + segment mean) context."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.linear_local = nn.Conv1d(bn_channels, out_channels, kernel_size,
                                      padding=(kernel_size - 1) // 2 * dilation, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // CAM_REDUCTION, 1)
        self.linear2 = nn.Conv1d(bn_channels // CAM_REDUCTION, out_channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, lengths: torch.Tensor | None) -> torch.Tensor:
        local = self.linear_local(x)
        context = _masked_mean(x, mask, lengths) + _masked_segment_average(x, mask, CAM_SEGMENT_LENGTH)
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return local * gate


class CamDenseTDNNLayer(nn.Module):
    """BN-ReLU → 1×1 bottleneck → BN-ReLU → CAM layer; its `growth_rate` outputs are appended to the input."""

    def __init__(self, in_channels: int, out_channels: int, bn_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"CamDenseTDNNLayer: kernel_size must be odd for symmetric padding, got {kernel_size}.")
        self.nonlinear1 = CamBatchNormReLU(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = CamBatchNormReLU(bn_channels)
        self.cam_layer = CamLayer(bn_channels, out_channels, kernel_size, dilation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, lengths: torch.Tensor | None) -> torch.Tensor:
        hidden = _mask_time(self.nonlinear2(self.linear1(self.nonlinear1(x))), mask)
        return self.cam_layer(hidden, mask, lengths)


class CamDenseTDNNBlock(nn.ModuleList):
    """Densely connected CAM-TDNN layers named `tdnnd1`, `tdnnd2`, … as upstream."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_channels: int, kernel_size: int,
                 dilation: int):
        super().__init__()
        for i in range(num_layers):
            layer = CamDenseTDNNLayer(in_channels + i * growth_rate, growth_rate, bn_channels, kernel_size, dilation)
            self.add_module(f"tdnnd{i + 1}", layer)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, lengths: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            x = torch.cat([x, layer(x, mask, lengths)], dim=1)
        return x


class CamTransitLayer(nn.Module):
    """BN-ReLU → 1×1 conv (no bias) between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = CamBatchNormReLU(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class CamDenseLayer(nn.Module):
    """1×1 conv (no bias) on the pooled statistics → non-affine BN: the x-vector."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = _NonAffineBatchNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CamXVector(nn.Module):
    """Container mirroring upstream's `xvector` Sequential (children tdnn, block1, transit1, …, out_nonlinear, dense)
    so that state-dict names match; the forward lives in the encoder, which threads the padding mask through."""

    def __init__(self, config: MossSpeechCodecSpeakerConfig, in_channels: int):
        super().__init__()
        self.tdnn = CamTDNNLayer(in_channels, config.init_channels, 5, stride=2)
        channels = config.init_channels
        blocks = zip(config.block_layers, config.block_kernel_sizes, config.block_dilations)
        for i, (num_layers, kernel_size, dilation) in enumerate(blocks, start=1):
            self.add_module(f"block{i}", CamDenseTDNNBlock(num_layers, channels, config.growth_rate,
                                                           config.bn_size * config.growth_rate, kernel_size,
                                                           dilation))
            channels += num_layers * config.growth_rate
            self.add_module(f"transit{i}", CamTransitLayer(channels, channels // 2))
            channels //= 2
        self.out_nonlinear = CamBatchNormReLU(channels)
        self.dense = CamDenseLayer(channels * 2, config.embedding_size)
        self.num_blocks = len(config.block_layers)
        self.out_channels = channels


def _validate_config(config: MossSpeechCodecSpeakerConfig) -> None:
    if not isinstance(config, MossSpeechCodecSpeakerConfig):
        raise TypeError(f"config must be a MossSpeechCodecSpeakerConfig, got {type(config).__name__}.")
    if len(config.fcm_num_blocks) != 2 or min(config.fcm_num_blocks) < 1:
        raise ValueError(f"config.fcm_num_blocks must be two positive block counts, got {config.fcm_num_blocks}.")
    for name in ("feat_dim", "embedding_size", "growth_rate", "bn_size", "init_channels", "fcm_channels"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name} must be a positive integer, got {value!r}.")
    if (config.bn_size * config.growth_rate) % CAM_REDUCTION:
        raise ValueError(f"config.bn_size * config.growth_rate must be even (CAM reduction {CAM_REDUCTION}), got "
                         f"{config.bn_size * config.growth_rate}.")


class MossSpeechCodecSpeakerEncoder(nn.Module):
    """CAM++ x-vector extractor: 80-bin Kaldi fbank (mean-normalised) of 16 kHz speech → (B, embedding_size).

    `forward(feats, lengths)` takes padded features; `compute_fbank` builds them from waveforms and `embed` does both.
    """

    def __init__(self, config: MossSpeechCodecSpeakerConfig):
        super().__init__()
        _validate_config(config)
        self.config = config
        self.head = CamFCM(config)
        self.xvector = CamXVector(config, self.head.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream's initialisation: Kaiming-normal convolution weights, zero biases, default BatchNorm."""
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                if module.weight.is_meta:
                    continue
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def min_num_samples(self) -> int:
        """Shortest waveform `embed` accepts: `MIN_FRAMES` Kaldi frames (720 samples = 45 ms at 16 kHz)."""
        rate = self.config.sampling_rate
        return int(rate * FBANK_FRAME_LENGTH_MS / 1000) + (MIN_FRAMES - 1) * int(rate * FBANK_FRAME_SHIFT_MS / 1000)

    def compute_fbank(self, waveforms_16k: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Kaldi fbank (`feat_dim` bins, dither 0, other Kaldi defaults) minus its per-utterance mean over time.

        Args:
            waveforms_16k: mono waveforms at `config.sampling_rate` (16 kHz), each of shape (N,) or (1, N), float in
                [-1, 1], at least 400 samples (one 25 ms window).
        Returns:
            `feats` (B, T_max, feat_dim) float32, zero-padded after each utterance's frames, and `lengths` (B,) int64.
        """
        if isinstance(waveforms_16k, torch.Tensor) or not isinstance(waveforms_16k, (list, tuple)):
            raise TypeError(f"waveforms_16k must be a list of 1-D tensors, got {type(waveforms_16k).__name__}.")
        if len(waveforms_16k) == 0:
            raise ValueError("waveforms_16k must contain at least one waveform, got an empty list.")
        window = int(self.config.sampling_rate * FBANK_FRAME_LENGTH_MS / 1000)
        feats = []
        for i, wav in enumerate(waveforms_16k):
            if not isinstance(wav, torch.Tensor):
                raise TypeError(f"waveforms_16k[{i}] must be a torch.Tensor, got {type(wav).__name__}.")
            if wav.dim() == 2 and wav.shape[0] == 1:
                wav = wav[0]
            if wav.dim() != 1:
                raise ValueError(f"waveforms_16k[{i}] must be mono, shape (N,) or (1, N), got {tuple(wav.shape)}.")
            if not wav.is_floating_point():
                raise TypeError(f"waveforms_16k[{i}] must be a float waveform in [-1, 1], got dtype {wav.dtype}.")
            if wav.shape[0] < window:
                raise ValueError(f"waveforms_16k[{i}] has {wav.shape[0]} samples; Kaldi fbank needs at least {window} "
                                 f"({FBANK_FRAME_LENGTH_MS:g} ms at {self.config.sampling_rate} Hz).")
            # kaldi.fbank is single-utterance; this loop is feature extraction, not model math.
            feat = torchaudio.compliance.kaldi.fbank(
                wav.float().unsqueeze(0), num_mel_bins=self.config.feat_dim, dither=0.0,
                sample_frequency=float(self.config.sampling_rate),
                frame_length=FBANK_FRAME_LENGTH_MS, frame_shift=FBANK_FRAME_SHIFT_MS,
            )
            feats.append(feat - feat.mean(dim=0, keepdim=True))
        lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long, device=feats[0].device)
        return nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths

    def _validate_features(self, feats: torch.Tensor, lengths: torch.Tensor | None) -> None:
        if not isinstance(feats, torch.Tensor):
            raise TypeError(f"feats must be a torch.Tensor, got {type(feats).__name__}.")
        if feats.dim() != 3 or feats.shape[-1] != self.config.feat_dim:
            raise ValueError(f"feats must have shape (batch, frames, {self.config.feat_dim}), got "
                             f"{tuple(feats.shape)}.")
        if not feats.is_floating_point():
            raise TypeError(f"feats must be a float tensor, got dtype {feats.dtype}.")
        if feats.shape[0] == 0:
            raise ValueError("feats must hold at least one utterance, got batch size 0.")
        if lengths is None:
            if feats.shape[1] < MIN_FRAMES:
                raise ValueError(f"feats has {feats.shape[1]} frames; CAM++ needs at least {MIN_FRAMES} (the std "
                                 f"pooling needs 2 frames after the stride-2 TDNN).")
            return
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != feats.shape[0]:
            shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be a 1-D tensor of {feats.shape[0]} frame counts, got {shape}.")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}.")
        low, high = int(lengths.min()), int(lengths.max())
        if low < MIN_FRAMES or high > feats.shape[1]:
            raise ValueError(f"lengths must lie in [{MIN_FRAMES}, {feats.shape[1]}] (frames of feats; CAM++ needs "
                             f"{MIN_FRAMES} frames for its std pooling), got {lengths.tolist()}.")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """X-vectors of padded fbank features.

        Args:
            feats: (B, T, feat_dim) mean-normalised fbank (see `compute_fbank`); frames at or after `lengths[b]` are
                ignored (whatever their values).
            lengths: (B,) valid frame counts, each ≥ 3; `None` means all T frames are valid.
        Returns:
            (B, embedding_size) speaker embeddings (not L2-normalised; the flow normalises them).
        """
        self._validate_features(feats, lengths)
        feats = feats.to(self.xvector.dense.linear.weight.dtype)
        mask = None
        if lengths is not None:
            lengths = lengths.to(device=feats.device, dtype=torch.long)
            if int(lengths.min()) == feats.shape[1]:
                lengths = None  # nothing padded: the unmasked path is the same computation, cheaper
            else:
                mask = torch.arange(feats.shape[1], device=feats.device) < lengths.unsqueeze(1)
        x = self.head(_mask_time(feats.transpose(1, 2), mask), mask)
        x = self.xvector.tdnn(_mask_time(x, mask))
        if mask is not None:
            lengths = _frames_after_tdnn(lengths)
            mask = torch.arange(x.shape[-1], device=x.device) < lengths.unsqueeze(1)
        for i in range(1, self.xvector.num_blocks + 1):
            x = getattr(self.xvector, f"block{i}")(x, mask, lengths)
            x = getattr(self.xvector, f"transit{i}")(x)
        x = self.xvector.out_nonlinear(x)
        return self.xvector.dense(self._statistics_pooling(x, mask, lengths))

    @staticmethod
    def _statistics_pooling(x: torch.Tensor, mask: torch.Tensor | None, lengths: torch.Tensor | None) -> torch.Tensor:
        """Concatenated mean and unbiased standard deviation over the valid frames: (B, C, T) → (B, 2C)."""
        if mask is None:
            return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)
        weights = mask.unsqueeze(1).to(x.dtype)
        count = lengths.view(-1, 1).to(x.dtype)
        mean = (x * weights).sum(-1) / count
        var = (((x - mean.unsqueeze(-1)) * weights) ** 2).sum(-1) / (count - 1)
        return torch.cat([mean, var.sqrt()], dim=-1)

    @torch.no_grad()
    def embed(self, waveforms_16k: Sequence[torch.Tensor]) -> torch.Tensor:
        """X-vectors (B, embedding_size) of 16 kHz mono waveforms, each at least `min_num_samples` long."""
        if isinstance(waveforms_16k, (list, tuple)):
            for i, wav in enumerate(waveforms_16k):
                if isinstance(wav, torch.Tensor) and wav.shape[-1] < self.min_num_samples:
                    raise ValueError(f"waveforms_16k[{i}] has {wav.shape[-1]} samples; the speaker encoder needs at "
                                     f"least {self.min_num_samples} ({MIN_FRAMES} fbank frames).")
        feats, lengths = self.compute_fbank(waveforms_16k)
        device = self.xvector.dense.linear.weight.device
        return self.forward(feats.to(device), lengths.to(device))


__all__ = ["MossSpeechCodecSpeakerEncoder"]

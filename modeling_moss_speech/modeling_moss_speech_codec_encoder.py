"""The MOSS-Speech speech tokenizer: a causal Whisper-VQ encoder, 16 kHz log-mel (100 Hz) → 12.5 Hz codes.

Parameter names are the release's (`encoder.` prefix stripped from the codec's model.safetensors): `conv1`, `conv2`,
`embed_positions`, `layers.{i}` (transformers' own `WhisperEncoderLayer`, run with causal self-attention),
`layer_norm` (only when `quantize_encoder_only` is false), `codebook` and `embed_positions2`; nano checkpoints add
`ctc_head` (a CTC recogniser on the codes, absent from the release).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig
from transformers.masking_utils import eager_mask, sliding_window_causal_mask_function
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer, sinusoids
from transformers.utils import ModelOutput

from .configuration_moss_speech_codec import MossSpeechCodecEncoderConfig
from .feature_extraction_moss_speech import MossSpeechFeatureExtractor, split_into_chunks

# Both convolutions of the release have kernel 3; conv1 has stride 1, conv2 stride 2.
_CONV_KERNEL = 3
_CONV2_STRIDE = 2
# Cap on the (rows × codebook) distance matrix built at once by `quantize` (128 MiB in float32).
_MAX_DISTANCE_ELEMENTS = 1 << 25
# Default audio per encoder call in `encode_waveforms`: four 30 s chunks. Peak memory grows with the audio of one call
# (features and activations of every chunk in it), so ten minutes of audio cost what two do (measured:
# release-size encoder, 10 min of audio, peak 1741 MB with one call for everything vs 577 MB in 120 s groups).
MAX_BATCH_SECONDS = 120.0


@dataclass
class MossSpeechCodecEncoderOutput(ModelOutput):
    """Output of [`MossSpeechCodecEncoder`].

    Args:
        codes: Code ids (B, T'), T' = ceil(ceil(T / 2) / pooling_kernel_size) for T input frames.
        codes_mask: True for codes that carry audio (B, T'); a row with `v` valid frames has ceil(v / 8) of them.
        last_hidden_state: Pooled hidden states the codes were chosen from, before quantization (B, T', d_model).
    """

    codes: torch.LongTensor | None = None
    codes_mask: torch.BoolTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class MossSpeechCodecEncoder(nn.Module):
    """Causal Whisper-VQ speech tokenizer (GLM-4-Voice style), as in the MOSS-Speech codec.

    conv1 (k3) → GELU → conv2 (k3, stride 2) → GELU → + `embed_positions` → causal pre-LN transformer layers; after
    layer `pooling_position` the 50 Hz states are average-pooled ×4 (12.5 Hz) and each frame takes the id of its
    nearest `codebook` row (squared L2). Only the token path runs: layers after `quantize_position` and
    `layer_norm` (present when `quantize_encoder_only` is false) are kept for checkpoint compatibility only.

    Right padding is required: attention is causal and no padding mask is applied (as in the release), so valid
    frames never see padding and a row's valid codes do not depend on what it is batched with.

    With `encoder_attention_window` set (nano checkpoints, not the release) the encoder is local: no `embed_positions`
    table, and each layer's attention reaches back `encoder_attention_window` frames only, so a code depends on the
    last `receptive_field` feature frames and not on where in the utterance they are.
    """

    main_input_name = "input_features"

    def __init__(self, config: MossSpeechCodecEncoderConfig):
        super().__init__()
        if not isinstance(config, MossSpeechCodecEncoderConfig):
            raise TypeError(f"`config` must be a MossSpeechCodecEncoderConfig, got {type(config).__name__}.")
        if not config.encoder_causal_attention:
            raise ValueError("MossSpeechCodecEncoder implements the release's causal tokenizer only; got "
                             "encoder_causal_attention=False (expected True).")
        self.config = config
        d_model = config.d_model
        self.causal_convolution = config.encoder_causal_convolution
        conv_padding = 0 if self.causal_convolution else 1  # causal: left pad in forward instead
        self.conv1 = nn.Conv1d(config.num_mel_bins, d_model, kernel_size=_CONV_KERNEL, padding=conv_padding)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=_CONV_KERNEL, stride=_CONV2_STRIDE, padding=conv_padding)
        self.attention_window = config.encoder_attention_window
        # Position tables are checkpoint tensors (loaded, never regenerated) and frozen, as in the release.
        self.embed_positions = None
        if self.attention_window is None:
            self.embed_positions = nn.Embedding(config.max_source_positions, d_model)
            self.embed_positions.requires_grad_(False)

        layer_config = WhisperConfig(
            d_model=d_model,
            encoder_attention_heads=config.encoder_attention_heads,
            encoder_ffn_dim=config.encoder_ffn_dim,
            activation_function=config.activation_function,
            dropout=getattr(config, "dropout", 0.0),
            attention_dropout=getattr(config, "attention_dropout", 0.0),
            activation_dropout=getattr(config, "activation_dropout", 0.0),
            # SDPA with `is_causal` and no mask: the release's kernel call, hence its numerics.
            attn_implementation="sdpa",
        )
        self.layers = nn.ModuleList(WhisperEncoderLayer(layer_config) for _ in range(config.num_layers_built))
        for layer in self.layers:
            layer.self_attn.is_causal = True
            layer.self_attn_layer_norm.eps = config.layer_norm_eps
            layer.final_layer_norm.eps = config.layer_norm_eps
        if not config.quantize_encoder_only:
            self.layer_norm = nn.LayerNorm(d_model, eps=config.layer_norm_eps)

        self.codebook = nn.Embedding(config.quantize_vocab_size, d_model)
        self.embed_positions2 = nn.Embedding(config.max_source_positions // config.pooling_kernel_size, d_model)
        self.embed_positions2.requires_grad_(False)
        # A fresh encoder gets Whisper's sinusoidal tables (a checkpoint overwrites them; they are never trained).
        with torch.no_grad():
            if self.embed_positions is not None:
                self.embed_positions.weight.copy_(sinusoids(*self.embed_positions.weight.shape))
            self.embed_positions2.weight.copy_(sinusoids(*self.embed_positions2.weight.shape))
        self.ctc_head = MossSpeechCodecCTCHead(config, layer_config) if config.ctc_alphabet else None

    def code_vectors(self, codes: torch.LongTensor) -> torch.Tensor:
        """Codebook vectors of `codes` (B, T') plus the 12.5 Hz position table: the CTC head's input."""
        return self.with_code_positions(self.codebook(codes))

    def with_code_positions(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, T', d_model) 12.5 Hz vectors plus the position table (training feeds straight-through vectors)."""
        return vectors + self.embed_positions2.weight[: vectors.shape[1]]

    @property
    def receptive_field(self) -> int | None:
        """Feature frames (100 Hz) a code of a local encoder depends on, counted back from its last frame; None for
        the release's encoder, whose codes depend on everything before them."""
        if self.attention_window is None:
            return None
        # conv1 and conv2 each reach kernel - 1 frames back (conv2's inputs are conv1's 100 Hz frames); each layer
        # adds window - 1 frames at 50 Hz, and a code pools pooling_kernel_size of those.
        return 2 * (_CONV_KERNEL - 1) + _CONV2_STRIDE * (
            self.config.quantize_position * (self.attention_window - 1) + self.config.pooling_kernel_size - 1) + 1

    @property
    def max_input_frames(self) -> int:
        """Longest input in feature frames (3000 = 30 s at release size): 2 × max_source_positions."""
        return _CONV2_STRIDE * self.config.max_source_positions

    def quantize(self, hidden_states: torch.Tensor) -> torch.LongTensor:
        """Nearest-codebook ids of `hidden_states` (..., d_model) → (...): argmin of ‖x‖² + ‖c‖² − 2 x·c."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.shape[-1:] != (self.config.d_model,):
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"`hidden_states` must be a tensor (..., {self.config.d_model}), got {shape}.")
        codebook = self.codebook.weight
        flat = hidden_states.reshape(-1, codebook.shape[1]).to(codebook.dtype)
        codebook_sq = codebook.pow(2).sum(dim=1)
        rows = max(1, _MAX_DISTANCE_ELEMENTS // codebook.shape[0])
        codes = []
        for block in flat.split(rows):
            # Same expression and order as the release, so near-ties resolve to the same id.
            distances = torch.addmm(codebook_sq + block.pow(2).sum(dim=1, keepdim=True), block, codebook.t(),
                                    beta=1.0, alpha=-2.0)
            codes.append(distances.argmin(dim=1))
        codes = torch.cat(codes) if codes else flat.new_zeros(0, dtype=torch.long)
        return codes.reshape(hidden_states.shape[:-1])

    def _check_inputs(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(input_features, torch.Tensor) or not input_features.is_floating_point():
            raise TypeError("`input_features` must be a float tensor (batch, num_mel_bins, frames), got "
                            f"{getattr(input_features, 'dtype', type(input_features).__name__)}.")
        if input_features.dim() != 3 or input_features.shape[1] != self.config.num_mel_bins:
            raise ValueError(f"`input_features` must have shape (batch, {self.config.num_mel_bins}, frames), got "
                             f"{tuple(input_features.shape)}.")
        frames = input_features.shape[-1]
        if frames == 0 or input_features.shape[0] == 0:
            raise ValueError(f"`input_features` is empty: shape {tuple(input_features.shape)}.")
        if frames + frames % 2 > self.max_input_frames:
            raise ValueError(
                f"`input_features` has {frames} frames, more than the encoder takes ({self.max_input_frames} = "
                "2 × max_source_positions, 30 s at release size); split long audio into 30 s chunks first "
                "(`split_into_chunks`, or `encode_waveforms` which does it)."
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_features.shape[::2]:
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise ValueError(f"`attention_mask` must be a tensor of shape {tuple(input_features.shape[::2])} "
                                 f"(batch, frames), got {shape}.")
            mask = attention_mask.bool()
            if (mask[:, 1:] & ~mask[:, :-1]).any():
                raise ValueError("`attention_mask` must be right-padded (ones then zeros in every row): the causal "
                                 "encoder applies no padding mask.")

    def forward(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> MossSpeechCodecEncoderOutput:
        """Encode log-mel features to codes.

        Args:
            input_features: (B, num_mel_bins, T) log-mel frames at 100 Hz (from [`MossSpeechFeatureExtractor`]),
                T ≤ 2 × max_source_positions (30 s).
            attention_mask: (B, T), 1 for valid frames, right padding only; all frames valid if omitted.

        Returns:
            [`MossSpeechCodecEncoderOutput`] with `codes` and `codes_mask` (B, T') and the pre-quantization
            `last_hidden_state` (B, T', d_model).
        """
        self._check_inputs(input_features, attention_mask)
        batch_size, _, frames = input_features.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, frames, dtype=torch.bool, device=input_features.device)
        attention_mask = attention_mask.bool()
        if frames % 2:  # the release pads odd inputs by one zero frame
            input_features = nn.functional.pad(input_features, (0, 1))
            attention_mask = nn.functional.pad(attention_mask, (0, 1))

        hidden = input_features.to(self.conv1.weight.dtype)
        if self.causal_convolution:
            hidden = nn.functional.pad(hidden, (_CONV_KERNEL - 1, 0))
        hidden = nn.functional.gelu(self.conv1(hidden))
        if self.causal_convolution:
            hidden = nn.functional.pad(hidden, (_CONV_KERNEL - 1, 0))
        hidden = nn.functional.gelu(self.conv2(hidden)).transpose(1, 2)
        local = None
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions.weight[: hidden.shape[1]]
        else:
            # additive (1, 1, T, T) mask: frame t sees frames t - window + 1 … t
            local = eager_mask(1, hidden.shape[1], hidden.shape[1], dtype=hidden.dtype, device=hidden.device,
                               mask_function=sliding_window_causal_mask_function(self.attention_window))
        frame_mask = attention_mask[:, ::_CONV2_STRIDE]

        for index, layer in enumerate(self.layers[: self.config.quantize_position]):
            # The release's path passes no mask (SDPA's `is_causal`); a local encoder passes its window.
            hidden = layer(hidden, attention_mask=local)
            if index + 1 == self.config.pooling_position:
                hidden = self._pool(hidden)
                frame_mask = frame_mask[:, :: self.config.pooling_kernel_size]

        return MossSpeechCodecEncoderOutput(codes=self.quantize(hidden), codes_mask=frame_mask,
                                            last_hidden_state=hidden)

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        kernel = self.config.pooling_kernel_size
        hidden = hidden.transpose(1, 2)
        hidden = nn.functional.pad(hidden, (0, -hidden.shape[-1] % kernel))  # zeros, as the release
        if self.config.pooling_type == "avg":
            hidden = nn.functional.avg_pool1d(hidden, kernel)
        else:
            hidden = nn.functional.max_pool1d(hidden, kernel)
        return hidden.transpose(1, 2)


class MossSpeechCodecCTCHead(nn.Module):
    """CTC recogniser on the codes (nano checkpoints): bidirectional `WhisperEncoderLayer`s over the code vectors,
    then `ctc_upsample` character distributions per code. Trained with the tokenizer so its codes carry the words;
    kept in the checkpoint as a small speech recogniser for evaluation."""

    def __init__(self, config: MossSpeechCodecEncoderConfig, layer_config: WhisperConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(WhisperEncoderLayer(layer_config) for _ in range(config.ctc_layers))
        for layer in self.layers:
            layer.self_attn.is_causal = False
            layer.self_attn_layer_norm.eps = config.layer_norm_eps
            layer.final_layer_norm.eps = config.layer_norm_eps
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.proj = nn.Linear(config.d_model, config.ctc_upsample * (len(config.ctc_alphabet) + 1))

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T', d_model) code vectors and (B, T') validity → (B, T' × ctc_upsample, alphabet + 1) log-probs."""
        hidden = vectors
        attention = None
        if mask is not None and not bool(mask.all()):
            # Additive key-padding mask; every row keeps at least its first code, so no row is fully masked.
            keys = mask.bool()[:, None, None, :]
            attention = torch.zeros(keys.shape, dtype=hidden.dtype, device=hidden.device)
            attention = attention.masked_fill(~keys, torch.finfo(hidden.dtype).min)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=attention)
        logits = self.proj(self.layer_norm(hidden))
        batch, length, _ = logits.shape
        logits = logits.reshape(batch, length * self.config.ctc_upsample, -1)
        return logits.float().log_softmax(dim=-1)

    def greedy_decode(self, log_probs: torch.Tensor, frame_lengths: torch.Tensor) -> list[str]:
        """Best-path CTC decoding: argmax per frame, merge repeats, drop blanks."""
        alphabet = self.config.ctc_alphabet
        texts = []
        for row, length in zip(log_probs.argmax(dim=-1).tolist(), frame_lengths.tolist()):
            chars, previous = [], 0
            for index in row[:length]:
                if index != previous and index != 0:
                    chars.append(alphabet[index - 1])
                previous = index
            texts.append(" ".join("".join(chars).split()))
        return texts

    def words_per_code(self, log_probs: torch.Tensor, text: str) -> list[int]:
        """Which word of `text` each code says: CTC forced alignment of `text` on one utterance's log-probs.

        Args:
            log_probs: (T' × ctc_upsample, alphabet + 1) log-probs of one utterance's T' codes (`forward`'s output
                for one row, without padding).
            text: What was said; lowercased, words separated by single spaces, every character in the alphabet.

        Returns:
            T' word indices (0-based, non-decreasing): the word most of a code's character frames emit; codes of
            silence (only blanks) belong to the next word, trailing ones to the last.
        """
        import torchaudio.functional as audio_functional  # torchaudio is a dependency; loaded only when aligning

        alphabet, upsample = self.config.ctc_alphabet, self.config.ctc_upsample
        words = text.split()
        if not words or " ".join(words) != text:
            raise ValueError(f"text must be words separated by single spaces, got {text!r}.")
        unknown = sorted({c for c in text if c not in alphabet})
        if unknown:
            raise ValueError(f"text {text!r} has characters outside the CTC alphabet: {unknown}.")
        if log_probs.ndim != 2 or log_probs.shape[0] % upsample or log_probs.shape[1] != len(alphabet) + 1:
            raise ValueError(f"log_probs must be (codes x {upsample}, {len(alphabet) + 1}), got "
                             f"{tuple(log_probs.shape)}.")
        targets = torch.tensor([[alphabet.index(c) + 1 for c in text]], dtype=torch.int32)
        repeats = sum(a == b for a, b in zip(text, text[1:]))
        if log_probs.shape[0] < len(text) + repeats:
            raise ValueError(f"{log_probs.shape[0] // upsample} codes are too few to align {text!r}.")
        path, _ = audio_functional.forced_align(log_probs[None].float().cpu(), targets, blank=0)
        word_of_char = [text[:k].count(" ") if c != " " else None for k, c in enumerate(text)]
        frame_word: list[int | None] = []
        char, previous = -1, 0
        for frame, token in enumerate(path[0].tolist()):
            if token != 0 and (token != previous or frame == 0):
                char += 1
            frame_word.append(word_of_char[char] if token != 0 else None)
            previous = token
        codes: list[int | None] = []
        for start in range(0, len(frame_word), upsample):
            said = [w for w in frame_word[start:start + upsample] if w is not None]
            codes.append(max(set(said), key=said.count) if said else None)
        following = len(words) - 1
        for k in range(len(codes) - 1, -1, -1):
            if codes[k] is None:
                codes[k] = following
            following = codes[k]
        return [int(w) for w in codes]


@torch.no_grad()
def encode_waveforms(
    encoder: MossSpeechCodecEncoder,
    feature_extractor: MossSpeechFeatureExtractor,
    audio: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    sampling_rate: int,
    batch_size: int = 32,
    max_batch_seconds: float = MAX_BATCH_SECONDS,
) -> list[torch.LongTensor]:
    """Speech codes of one waveform or a list of them: one 1-D CPU LongTensor per utterance.

    Each utterance (float numpy/torch, 1-D or (channels, samples), any rate; channels averaged) is resampled to
    16 kHz and split into 30 s chunks encoded independently (as the release); the chunks of all utterances are
    sorted by length (to limit padding) and encoded in groups of at most `batch_size` chunks and at most
    `max_batch_seconds` of padded audio (a chunk longer than that goes alone), which bounds peak memory whatever
    the length of the audio. An utterance of `s` seconds gets ceil(s × 12.5) codes. Runs without gradients on the
    encoder's device and dtype.
    """
    if not isinstance(encoder, MossSpeechCodecEncoder):
        raise TypeError(f"`encoder` must be a MossSpeechCodecEncoder, got {type(encoder).__name__}.")
    if not isinstance(feature_extractor, MossSpeechFeatureExtractor):
        raise TypeError(f"`feature_extractor` must be a MossSpeechFeatureExtractor, got "
                        f"{type(feature_extractor).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if (isinstance(max_batch_seconds, bool) or not isinstance(max_batch_seconds, (int, float))
            or not 0 < max_batch_seconds < float("inf")):
        raise ValueError(f"`max_batch_seconds` must be a positive number of seconds, got {max_batch_seconds!r}.")
    if feature_extractor.feature_size != encoder.config.num_mel_bins:
        raise ValueError(f"feature_extractor.feature_size ({feature_extractor.feature_size}) must equal the "
                         f"encoder's num_mel_bins ({encoder.config.num_mel_bins}).")
    chunk_samples = feature_extractor.n_samples
    if chunk_samples // feature_extractor.hop_length > encoder.max_input_frames:
        raise ValueError(f"feature_extractor.chunk_length ({feature_extractor.chunk_length} s) is longer than the "
                         f"encoder takes ({encoder.max_input_frames} frames).")

    waveforms = feature_extractor.prepare_waveforms(audio, sampling_rate)
    chunks, owners = [], []
    for owner, waveform in enumerate(waveforms):
        pieces = split_into_chunks(waveform, chunk_samples)
        chunks.extend(pieces)
        owners.extend([owner] * len(pieces))

    device, dtype = encoder.codebook.weight.device, encoder.conv1.weight.dtype
    order = sorted(range(len(chunks)), key=lambda i: chunks[i].shape[0], reverse=True)
    budget = max_batch_seconds * feature_extractor.sampling_rate
    groups: list[list[int]] = []
    for chunk_id in order:  # longest first: a group's first chunk sets its padded length
        group = groups[-1] if groups else None
        if group is None or len(group) == batch_size or (len(group) + 1) * chunks[group[0]].shape[0] > budget:
            groups.append([chunk_id])
        else:
            group.append(chunk_id)
    chunk_codes: list[torch.Tensor | None] = [None] * len(chunks)
    for batch_ids in groups:
        features = feature_extractor.extract_features([chunks[i] for i in batch_ids], device=device)
        output = encoder(features["input_features"].to(dtype), features["attention_mask"])
        counts = output.codes_mask.sum(dim=1).tolist()
        for chunk_id, codes in zip(batch_ids, output.codes[output.codes_mask].cpu().split(counts)):
            chunk_codes[chunk_id] = codes

    per_utterance: list[list[torch.Tensor]] = [[] for _ in waveforms]
    for owner, codes in zip(owners, chunk_codes):
        per_utterance[owner].append(codes)
    return [torch.cat(parts) for parts in per_utterance]


__all__ = [
    "MAX_BATCH_SECONDS", "MossSpeechCodecCTCHead", "MossSpeechCodecEncoder", "MossSpeechCodecEncoderOutput",
    "encode_waveforms",
]

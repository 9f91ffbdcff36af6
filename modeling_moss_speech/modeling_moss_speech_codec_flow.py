"""Flow-matching decoder of the MOSS-Speech codec: speech codes → 80-bin mel at 50 Hz.

The release's `CausalMaskedDiffWithXvec` (CosyVoice2 recipe): the codes (voice-prompt codes first) are embedded and
encoded by an `UpsampleConformerEncoder` (pre-lookahead convolution, 6 relative-position conformer layers, ×4
upsampling, 4 more conformer layers), projected to 80 channels (`mu`), and a `CausalConditionalCFM` integrates a
causal 1-D U-Net velocity field from fixed noise in `n_timesteps` Euler steps with classifier-free guidance,
conditioned on `mu`, the speaker x-vector and the prompt mel. Parameter names equal the release's `flow/flow.pt`.

Batching: each row's prompt and new codes are packed left-aligned, so positions, chunk masks and the noise slice of a
row are those it has alone. Every operation that mixes time is causal (convolutions padded on the left) or masked
(attention), and the pre-lookahead convolution, the only right-looking one, sees exact zeros past a row's codes, so
a row in a padded batch gives the same mel as alone (up to float summation order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_moss_speech_codec import MossSpeechCodecFlowConfig

# The release's conformer layers use espnet/wenet's LayerNorm epsilon, not the config's 1e-5 (used by the input
# embeddings and the encoder's final norm).
CONFORMER_LAYER_NORM_EPS = 1e-12
# Additive attention bias for masked keys in the estimator (the release's value, not -inf).
ESTIMATOR_MASK_BIAS = -1.0e10
# Sinusoidal time embedding of the estimator: t is scaled by 1000 before the sin/cos (Matcha-TTS recipe).
TIME_EMBEDDING_SCALE = 1000.0


def _length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) draws from `generator` (on its own device) moved to `like`'s device and dtype."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like)


def _normal(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, 1) draws from `generator` (on its own device) moved to `like`'s device and dtype."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like)


def _chunk_mask(size: int, chunk_size: int, device: torch.device) -> torch.Tensor:
    """(size, size) bool: query i sees every key before the end of its own chunk (all left chunks)."""
    positions = torch.arange(size, device=device)
    chunk_end = (positions // chunk_size + 1) * chunk_size
    return positions.unsqueeze(0) < chunk_end.unsqueeze(1)


def _attention_mask(valid: torch.Tensor, chunk_size: int, left_chunks: int | None = None,
                    prefix: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) valid positions → bool key mask, (B, 1, T) without chunks or (B, T, T) with static chunks.

    With `left_chunks`, a query sees only the keys of its own chunk and of the `left_chunks` chunks before it, plus
    each row's first `prefix[b]` positions (the voice prompt's frames)."""
    mask = valid.unsqueeze(1)
    if chunk_size > 0:
        mask = mask & _chunk_mask(valid.size(1), chunk_size, valid.device).unsqueeze(0)
        if left_chunks is not None:
            positions = torch.arange(valid.size(1), device=valid.device)
            low = (positions // chunk_size - left_chunks) * chunk_size  # first visible key of each query's window
            visible = positions.unsqueeze(0) >= low.unsqueeze(1)
            if prefix is not None:
                visible = visible | (positions.view(1, 1, -1) < prefix.to(valid.device).view(-1, 1, 1))
            mask = mask & visible
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Encoder: UpsampleConformerEncoder
# ----------------------------------------------------------------------------------------------------------------


class _RelPositionalEncoding(nn.Module):
    """ESPnet relative positional encoding: scales the input by √d and returns sinusoids for the relative
    distances T-1 … -(T-1) (no parameters; computed for the length at hand)."""

    def __init__(self, d_model: int, dropout_rate: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = x.size(1)
        # Relative distance i - j for key index k = T-1-(i-j): from T-1 down to -(T-1).
        distance = torch.arange(length - 1, -length, -1, device=x.device, dtype=torch.float32).unsqueeze(1)
        inv_freq = torch.exp(
            torch.arange(0, self.d_model, 2, device=x.device, dtype=torch.float32)
            * -(math.log(10000.0) / self.d_model)
        )
        angles = distance * inv_freq
        pos_emb = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1).unsqueeze(0).to(x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)


class _LinearEmbedding(nn.Module):
    """Linear → LayerNorm → dropout, then the relative positional encoding (`embed`, `up_embed`)."""

    def __init__(self, config: MossSpeechCodecFlowConfig) -> None:
        super().__init__()
        size = config.input_size
        self.out = nn.Sequential(nn.Linear(size, size), nn.LayerNorm(size, eps=config.layer_norm_eps),
                                 nn.Dropout(config.encoder_dropout_rate))
        self.pos_enc = _RelPositionalEncoding(size, config.encoder_positional_dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x))


class _RelPositionAttention(nn.Module):
    """Transformer-XL multi-head self-attention with relative positions and the learned biases u, v:
    scores = ((q + u)·kᵀ + shift((q + v)·pᵀ)) / √d_head."""

    def __init__(self, config: MossSpeechCodecFlowConfig) -> None:
        super().__init__()
        size, heads = config.input_size, config.encoder_attention_heads
        self.num_heads, self.head_dim = heads, size // heads
        self.linear_q = nn.Linear(size, size)
        self.linear_k = nn.Linear(size, size)
        self.linear_v = nn.Linear(size, size)
        self.linear_out = nn.Linear(size, size)
        self.linear_pos = nn.Linear(size, size, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(config.encoder_attention_dropout_rate)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self._heads(self.linear_q(x))  # (B, T, H, D)
        k = self._heads(self.linear_k(x)).transpose(1, 2)
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self._heads(self.linear_pos(pos_emb)).transpose(1, 2)  # (1, H, 2T-1, D)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B, H, T, 2T-1)
        # Relative shift: score (i, j) reads the column of distance i - j, i.e. index T-1-i+j.
        index = torch.arange(length, device=x.device)
        index = (length - 1 - index.unsqueeze(1) + index.unsqueeze(0)).expand(batch, self.num_heads, length, length)
        position = position.gather(-1, index)
        scores = (content + position) / math.sqrt(self.head_dim)
        masked = ~mask.unsqueeze(1)  # (B, 1, 1 or T, T)
        weights = torch.softmax(scores.masked_fill(masked, -float("inf")), dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(self.dropout(weights), v).transpose(1, 2).reshape(batch, length, -1)
        return self.linear_out(out)


class _FeedForward(nn.Module):
    """Position-wise feed-forward w_2(dropout(SiLU(w_1(x))))."""

    def __init__(self, config: MossSpeechCodecFlowConfig) -> None:
        super().__init__()
        self.w_1 = nn.Linear(config.input_size, config.encoder_linear_units)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(config.encoder_dropout_rate)
        self.w_2 = nn.Linear(config.encoder_linear_units, config.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class _ConformerLayer(nn.Module):
    """Pre-norm conformer layer of the release: self-attention and feed-forward only (no macaron, no conv module)."""

    def __init__(self, config: MossSpeechCodecFlowConfig) -> None:
        super().__init__()
        eps = getattr(config, "conformer_layer_norm_eps", CONFORMER_LAYER_NORM_EPS)
        self.self_attn = _RelPositionAttention(config)
        self.feed_forward = _FeedForward(config)
        self.norm_ff = nn.LayerNorm(config.input_size, eps=eps)
        self.norm_mha = nn.LayerNorm(config.input_size, eps=eps)
        self.dropout = nn.Dropout(config.encoder_dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm_mha(x), mask, pos_emb))
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))


class _PreLookaheadLayer(nn.Module):
    """Looks `lookahead` codes ahead: conv1 (kernel lookahead+1) over the codes right-padded with zeros or followed by
    real lookahead codes → leaky ReLU → causal conv2 (kernel 3) → residual."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor, out_len: int) -> torch.Tensor:
        """x: (B, T, C), zero past each row's codes (lookahead codes included); returns the first `out_len`."""
        h = F.pad(x.transpose(1, 2), (0, self.lookahead))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (self.conv2.kernel_size[0] - 1, 0)))
        return h[:, :, :out_len].transpose(1, 2) + x[:, :out_len]


class _UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling in time by `stride`, then a causal conv of kernel 2·stride + 1."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T) → (B, C, stride·T)."""
        x = torch.repeat_interleave(x, self.stride, dim=2)
        return self.conv(F.pad(x, (2 * self.stride, 0)))


class MossSpeechCodecFlowEncoder(nn.Module):
    """The release's `UpsampleConformerEncoder`: code embeddings (B, T, 512) → hidden states (B, 4·T', 512)."""

    def __init__(self, config: MossSpeechCodecFlowConfig) -> None:
        super().__init__()
        self.config = config
        size = config.input_size
        self.embed = _LinearEmbedding(config)
        self.pre_lookahead_layer = _PreLookaheadLayer(size, config.pre_lookahead_len)
        self.encoders = nn.ModuleList(_ConformerLayer(config) for _ in range(config.encoder_num_blocks))
        self.up_layer = _UpsampleLayer(size, config.token_mel_ratio)
        self.up_embed = _LinearEmbedding(config)
        self.up_encoders = nn.ModuleList(_ConformerLayer(config) for _ in range(config.encoder_num_up_blocks))
        self.after_norm = nn.LayerNorm(size, eps=config.layer_norm_eps)

    def forward(
        self, xs: torch.Tensor, xs_lens: torch.Tensor, context_len: int = 0, streaming: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode left-aligned rows.

        Args:
            xs: (B, T, input_size) code embeddings.
            xs_lens: (B,) codes per row, including the `context_len` trailing lookahead codes.
            context_len: trailing codes of each row used only as pre-lookahead context (not encoded).
            streaming: apply the static chunk masks (`encoder_static_chunk_size` codes, ×ratio after upsampling).

        Returns:
            (B, ratio·(T - context_len), input_size) hidden states and their (B,) valid lengths.
        """
        ratio = self.config.token_mel_ratio
        chunk = self.config.encoder_static_chunk_size if streaming else 0
        out_lens = xs_lens - context_len
        out_len = xs.size(1) - context_len

        x, pos_emb = self.embed(xs)
        # Right of a row's codes (and context) the release's lookahead sees zeros, not embedded padding.
        x = x * _length_mask(xs_lens, xs.size(1)).unsqueeze(-1).to(x.dtype)
        x = self.pre_lookahead_layer(x, out_len)
        pos_emb = pos_emb[:, context_len : pos_emb.size(1) - context_len]
        mask = _attention_mask(_length_mask(out_lens, out_len), chunk)
        for layer in self.encoders:
            x = layer(x, mask, pos_emb)

        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        out_lens = out_lens * ratio
        x, pos_emb = self.up_embed(x)
        mask = _attention_mask(_length_mask(out_lens, x.size(1)), chunk * ratio)
        for layer in self.up_encoders:
            x = layer(x, mask, pos_emb)
        return self.after_norm(x), out_lens


# ----------------------------------------------------------------------------------------------------------------
# Estimator: CausalConditionalDecoder (1-D U-Net with transformer blocks)
# ----------------------------------------------------------------------------------------------------------------


class _CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only (kernel - 1 zeros): output frame t sees input frames ≤ t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class _Transpose(nn.Module):
    """Swaps the channel and time axes (so LayerNorm normalises over channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _CausalBlock1D(nn.Module):
    """Causal conv (k=3) → LayerNorm over channels → Mish, on masked input, masked output."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_CausalConv1d(dim, dim_out, 3), _Transpose(), nn.LayerNorm(dim_out), _Transpose(),
                                   nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class _CausalResnetBlock1D(nn.Module):
    """Two causal blocks with the time embedding (Mish → Linear) added in between, plus a 1×1 residual conv."""

    def __init__(self, dim: int, dim_out: int, time_embed_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_embed_dim, dim_out))
        self.block1 = _CausalBlock1D(dim, dim_out)
        self.block2 = _CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(time_emb).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x * mask)


class _SelfAttention(nn.Module):
    """Multi-head self-attention (q/k/v without bias) with an additive float mask, as diffusers' `Attention`."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x)),
                                             attn_mask=bias.unsqueeze(1))
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.to_out[1](self.to_out[0](out))


class _GELUProjection(nn.Module):
    """Linear followed by exact GELU (diffusers' `GELU` activation module, `proj` inside)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _EstimatorFeedForward(nn.Module):
    """GELU feed-forward with a 4× hidden size: net = [GELU projection, dropout, Linear]."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.ModuleList([_GELUProjection(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class _TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU feed-forward (Matcha's `BasicTransformerBlock`; no cross-attention)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = _SelfAttention(dim, num_heads, head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = _EstimatorFeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class _TimestepEmbedding(nn.Module):
    """linear_1 → SiLU → linear_2 on the sinusoidal embedding of t."""

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _sinusoidal_time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) flow times in [0, 1] → (N, dim): [sin(1000·t·f_k), cos(1000·t·f_k)], f_k = 10000^(-k/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angles = TIME_EMBEDDING_SCALE * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(t.dtype)


class MossSpeechCodecFlowEstimator(nn.Module):
    """The release's `CausalConditionalDecoder`: the velocity field v(x, t | mu, spks, cond), a one-stage causal
    U-Net (down: resnet + transformers + causal conv; mid blocks; up: skip concat + resnet + transformers + causal
    conv) over the channel concatenation x ‖ mu ‖ spks ‖ cond (4 × 80 channels)."""

    def __init__(self, config: MossSpeechCodecFlowConfig) -> None:
        super().__init__()
        self.config = config
        in_channels = 4 * config.output_size
        channels, time_dim = config.estimator_channels, config.estimator_time_embed_dim
        heads, head_dim = config.estimator_num_heads, config.estimator_attention_head_dim

        def transformers() -> nn.ModuleList:
            return nn.ModuleList(_TransformerBlock(channels, heads, head_dim) for _ in range(config.estimator_n_blocks))

        self.time_mlp = _TimestepEmbedding(in_channels, time_dim)
        # One U-Net stage (the release's channels=[256]): [resnet, transformer blocks, causal conv] on the way down
        # and, after the skip concatenation, on the way up; no time resampling.
        down = _CausalResnetBlock1D(in_channels, channels, time_dim)
        self.down_blocks = nn.ModuleList([nn.ModuleList([down, transformers(), _CausalConv1d(channels, channels, 3)])])
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([_CausalResnetBlock1D(channels, channels, time_dim), transformers()])
            for _ in range(config.estimator_num_mid_blocks)
        )
        up = _CausalResnetBlock1D(2 * channels, channels, time_dim)
        self.up_blocks = nn.ModuleList([nn.ModuleList([up, transformers(), _CausalConv1d(channels, channels, 3)])])
        self.final_block = _CausalBlock1D(channels, channels)
        self.final_proj = nn.Conv1d(channels, config.output_size, 1)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        streaming: bool = False,
        prompt_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x, mu, cond: (N, 80, T); mask: (N, 1, T); t: (N,); spks: (N, 80) → velocity (N, 80, T).

        `prompt_frames` (N,): frames of each row's voice prompt, visible to every query when streaming with
        `estimator_left_chunks` (default: none)."""
        t = self.time_mlp(_sinusoidal_time_embedding(t, 4 * self.config.output_size))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(-1)), cond], dim=1)
        chunk = self.config.estimator_static_chunk_size if streaming else 0
        keys = _attention_mask(mask[:, 0].bool(), chunk, self.config.estimator_left_chunks if streaming else None,
                               prompt_frames).expand(-1, x.size(-1), -1)
        bias = (1.0 - keys.to(h.dtype)) * ESTIMATOR_MASK_BIAS

        def run(transformer_blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            h = h.transpose(1, 2)
            for block in transformer_blocks:
                h = block(h, bias)
            return h.transpose(1, 2)

        skips = []
        for resnet, transformer_blocks, downsample in self.down_blocks:
            h = run(transformer_blocks, resnet(h, mask, t))
            skips.append(h)
            h = downsample(h * mask)
        for resnet, transformer_blocks in self.mid_blocks:
            h = run(transformer_blocks, resnet(h, mask, t))
        for resnet, transformer_blocks, upsample in self.up_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = run(transformer_blocks, resnet(h, mask, t))
            h = upsample(h * mask)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask


class MossSpeechCodecFlowCFM(nn.Module):
    """The release's `CausalConditionalCFM`: Euler integration of the estimator from fixed noise, with
    classifier-free guidance (velocity = (1 + r)·v(mu, spks, cond) − r·v(0, 0, 0))."""

    def __init__(self, config: MossSpeechCodecFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.estimator = MossSpeechCodecFlowEstimator(config)
        # Not a checkpoint tensor: the release draws it at construction from seed 0 (see `reset_noise`).
        self.register_buffer("rand_noise", self._draw_noise(torch.device("cpu")), persistent=False)

    def _draw_noise(self, device: torch.device) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(self.config.noise_seed)
        noise = torch.randn(1, self.config.output_size, self.config.noise_max_frames, generator=generator,
                            device="cpu")
        return noise.to(device)

    def reset_noise(self) -> None:
        """Redraw the fixed noise (e.g. after a loader left the non-persistent buffer uninitialised), leaving the
        global RNG untouched. Values equal `torch.manual_seed(seed); torch.randn(1, 80, frames)` on CPU."""
        device = self.rand_noise.device
        self.rand_noise = self._draw_noise(torch.device("cpu") if device.type == "meta" else device)

    def time_steps(self, device: torch.device) -> torch.Tensor:
        """The n_timesteps + 1 flow times: linspace(0, 1), warped by 1 − cos(t·π/2) for the cosine scheduler."""
        t_span = torch.linspace(0, 1, self.config.n_timesteps + 1, device=device)
        if self.config.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        return t_span

    def forward(
        self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, streaming: bool = False,
        prompt_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mu, cond: (B, 80, T); mask: (B, 1, T); spks: (B, 80) → mel (B, 80, T); prompt_frames: (B,) frames of
        each row's voice prompt (see the estimator)."""
        batch, _, length = mu.shape
        x = self.rand_noise[:, :, :length].to(mu).expand(batch, -1, -1) * self.config.inference_noise_scale
        t_span = self.time_steps(mu.device).to(mu.dtype)
        rate = self.config.inference_cfg_rate
        # Unconditional half: mu, spks and cond zeroed; both halves run as one estimator batch.
        mask_in = torch.cat([mask, mask])
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        prompt_in = None if prompt_frames is None else torch.cat([prompt_frames, prompt_frames])
        # The release advances t by dt and takes the next dt against the accumulated t: kept for parity.
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            velocity = self.estimator(torch.cat([x, x]), mask_in, mu_in, t.expand(2 * batch), spks_in, cond_in,
                                      streaming=streaming, prompt_frames=prompt_in)
            v_cond, v_uncond = velocity.split(batch)
            x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x

    def compute_loss(
        self,
        x1: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        streaming: bool = False,
        generator: torch.Generator | None = None,
        prompt_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Conditional flow-matching loss (the release's `CausalConditionalCFM.compute_loss`, CosyVoice2 recipe).

        t ~ U(0, 1) warped by the scheduler, z ~ N(0, I), y = (1 − (1 − σ_min)·t)·z + t·x1; the estimator predicts
        the velocity u = x1 − (1 − σ_min)·z from (y, t | mu, spks, cond), with mu, spks and cond zeroed together for
        a `training_cfg_rate` share of the rows (what classifier-free guidance needs at inference).

        Args:
            x1: (B, 80, T) target mel; mask: (B, 1, T) valid frames; mu, cond: (B, 80, T); spks: (B, 80).
            loss_mask: (B, 1, T) frames that count (default: `mask`; prompt frames given in `cond` are left out).
            streaming: use the estimator's static chunk attention masks.
            generator: source of t, z and the guidance dropout (default: the global RNG).
            prompt_frames: (B,) frames of each row's prompt (`cond`), visible to every query with
                `estimator_left_chunks`.

        Returns:
            The mean squared velocity error over the counted frames and mel bins (a scalar).
        """
        batch = mu.size(0)
        config = self.config
        t = _uniform((batch, 1, 1), generator, mu)
        if config.t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * torch.pi)
        z = _normal(x1.shape, generator, x1)
        y = (1 - (1 - config.sigma_min) * t) * z + t * x1
        u = x1 - (1 - config.sigma_min) * z
        if config.training_cfg_rate > 0:
            keep = (_uniform((batch,), generator, mu) >= config.training_cfg_rate).to(mu.dtype)
            mu, spks, cond = mu * keep.view(-1, 1, 1), spks * keep.view(-1, 1), cond * keep.view(-1, 1, 1)
        prediction = self.estimator(y, mask, mu, t.view(batch), spks, cond, streaming=streaming,
                                    prompt_frames=prompt_frames)
        weight = mask if loss_mask is None else loss_mask
        error = F.mse_loss(prediction * weight, u * weight, reduction="sum")
        return error / (weight.sum() * u.size(1)).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# The flow model
# ----------------------------------------------------------------------------------------------------------------


def _check_lengths(name: str, lengths: torch.Tensor, batch: int, max_len: int, min_len: int) -> None:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.size(0) != batch:
        shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {batch} lengths, got {shape}.")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {lengths.dtype}.")
    if lengths.numel() and (int(lengths.min()) < min_len or int(lengths.max()) > max_len):
        raise ValueError(f"{name} must lie in [{min_len}, {max_len}], got {lengths.tolist()}.")


def _check_codes(name: str, codes: torch.Tensor, lengths: torch.Tensor, num_codes: int) -> None:
    valid = _length_mask(lengths, codes.size(1))
    bad = valid & ((codes < 0) | (codes >= num_codes))
    if bool(bad.any()):
        row, position = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must hold speech codes in [0, {num_codes}), got {int(codes[row, position])} at "
                         f"row {row}, position {position}.")


class MossSpeechCodecFlow(nn.Module):
    """Flow-matching speech decoder of the MOSS-Speech codec (the release's `CausalMaskedDiffWithXvec`): speech codes
    → 80-bin log-mel at 50 Hz, `token_mel_ratio` (4) frames per code, optionally in the voice of a prompt (its
    codes, mel and CAM++ x-vector). Deterministic: the initial noise is a fixed buffer drawn from `noise_seed`."""

    def __init__(self, config: MossSpeechCodecFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = MossSpeechCodecFlowEncoder(config)
        self.encoder_proj = nn.Linear(config.input_size, config.output_size)
        self.decoder = MossSpeechCodecFlowCFM(config)

    def reset_noise(self) -> None:
        """Redraw the fixed CFM noise buffer from `config.noise_seed` (the global RNG is not touched)."""
        self.decoder.reset_noise()

    def _validate(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding,
                  finalize: bool, num_codes: int | None) -> None:
        config = self.config
        for name, value in (("token", token), ("prompt_token", prompt_token)):
            if not isinstance(value, torch.Tensor) or value.dim() != 2:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a (batch, length) tensor of speech codes, got {shape}.")
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}.")
        batch = token.size(0)
        if prompt_token.size(0) != batch:
            raise ValueError(f"prompt_token has {prompt_token.size(0)} rows, expected {batch} (the rows of token).")
        context = 0 if finalize else config.pre_lookahead_len
        _check_lengths("token_len", token_len, batch, token.size(1), 1 + context)
        _check_lengths("prompt_token_len", prompt_token_len, batch, prompt_token.size(1), 0)
        if not isinstance(prompt_feat, torch.Tensor) or prompt_feat.dim() != 3 or prompt_feat.size(0) != batch \
                or prompt_feat.size(2) != config.output_size:
            shape = tuple(prompt_feat.shape) if isinstance(prompt_feat, torch.Tensor) else type(prompt_feat).__name__
            raise ValueError(f"prompt_feat must be a ({batch}, frames, {config.output_size}) mel tensor, got {shape}.")
        _check_lengths("prompt_feat_len", prompt_feat_len, batch, prompt_feat.size(1), 0)
        if not torch.equal(prompt_feat_len.cpu().long(), prompt_token_len.cpu().long() * config.token_mel_ratio):
            raise ValueError(f"prompt_feat_len must be {config.token_mel_ratio} × prompt_token_len (mel frames per "
                             f"code), got {prompt_feat_len.tolist()} for prompt_token_len {prompt_token_len.tolist()}.")
        if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != (batch, config.spk_embed_dim):
            shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise ValueError(f"embedding must be a ({batch}, {config.spk_embed_dim}) speaker x-vector, got {shape}.")
        if num_codes is None:
            num_codes = config.vocab_size
        if isinstance(num_codes, bool) or not isinstance(num_codes, int) or not 1 <= num_codes <= config.vocab_size:
            raise ValueError(f"num_codes must be an integer in [1, {config.vocab_size}], got {num_codes!r}.")
        _check_codes("token", token, token_len, num_codes)
        _check_codes("prompt_token", prompt_token, prompt_token_len, num_codes)
        frames = int((prompt_token_len + token_len).max()) * config.token_mel_ratio
        if frames > config.noise_max_frames:
            raise ValueError(f"prompt + codes need {frames} mel frames, more than the fixed noise holds "
                             f"(noise_max_frames={config.noise_max_frames}).")

    @torch.no_grad()
    def inference(
        self,
        token: torch.Tensor,
        token_len: torch.Tensor | None = None,
        prompt_token: torch.Tensor | None = None,
        prompt_token_len: torch.Tensor | None = None,
        prompt_feat: torch.Tensor | None = None,
        prompt_feat_len: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        finalize: bool = True,
        streaming: bool = False,
        num_codes: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode speech codes to mel, batched (rows padded on the right; padding values are ignored).

        Args:
            token: (B, T) speech codes to decode; token_len: (B,) codes per row (None = T).
            prompt_token: (B, Tp) codes of the voice prompt (None = none); prompt_token_len: (B,) (None = Tp).
            prompt_feat: (B, Tf, 80) log-mel of the voice prompt (None = none); prompt_feat_len: (B,) (None = Tf);
                it must equal ratio × prompt_token_len.
            embedding: (B, spk_embed_dim) CAM++ x-vector of the prompt speaker (zeros = none; None = zeros).
            finalize: False treats each row's last `pre_lookahead_len` codes as lookahead context only (streaming
                decode of an unfinished code stream): no mel is returned for them.
            streaming: apply the static chunk attention masks of the chunk-trained flow.
            num_codes: codes must lie in [0, num_codes) (16384 for the release's codebook; the flow's embedding has
                more rows, which decode to garbage). None = the embedding size.

        Returns:
            mel: (B, 80, T_out) float32 frames of the new codes only, zero past each row's length;
            mel_len: (B,) = ratio × (token_len − lookahead).
        """
        config = self.config
        device = self.input_embedding.weight.device
        dtype = self.input_embedding.weight.dtype
        if isinstance(token, torch.Tensor) and token.dim() == 2:
            # Omitted voice-prompt pieces = the release's defaults without a prompt: no codes, no mel, zero x-vector.
            batch, on = token.size(0), token.device
            if token_len is None:
                token_len = torch.full((batch,), token.size(1), dtype=torch.long, device=on)
            if prompt_token is None:
                prompt_token = torch.zeros(batch, 0, dtype=torch.long, device=on)
            if prompt_token_len is None and isinstance(prompt_token, torch.Tensor) and prompt_token.dim() == 2:
                prompt_token_len = torch.full((batch,), prompt_token.size(1), dtype=torch.long, device=on)
            if prompt_feat is None:
                prompt_feat = torch.zeros(batch, 0, config.output_size, device=on)
            if prompt_feat_len is None and isinstance(prompt_feat, torch.Tensor) and prompt_feat.dim() == 3:
                prompt_feat_len = torch.full((batch,), prompt_feat.size(1), dtype=torch.long, device=on)
            if embedding is None:
                embedding = torch.zeros(batch, config.spk_embed_dim, device=on)
        self._validate(token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding,
                       finalize, num_codes)

        batch = token.size(0)
        token, token_len = token.to(device).long(), token_len.to(device).long()
        prompt_token, prompt_len = prompt_token.to(device).long(), prompt_token_len.to(device).long()
        prompt_feat, prompt_feat_len = prompt_feat.to(device, dtype), prompt_feat_len.to(device).long()

        # Pack prompt + new codes left-aligned per row.
        total_len = prompt_len + token_len
        length = int(total_len.max())
        positions = torch.arange(length, device=device).unsqueeze(0)
        in_prompt = positions < prompt_len.unsqueeze(1)
        # A zero column keeps the gather valid when the prompt is empty (Tp = 0).
        prompt_part = F.pad(prompt_token, (0, 1)).gather(1, positions.clamp(max=prompt_token.size(1)).expand(batch, -1))
        token_part = token.gather(1, (positions - prompt_len.unsqueeze(1)).clamp(0, token.size(1) - 1))
        valid = _length_mask(total_len, length)
        codes = torch.where(in_prompt, prompt_part, token_part).masked_fill(~valid, 0)

        spks = self.spk_embed_affine_layer(F.normalize(embedding.to(device, dtype), dim=1))
        xs = self.input_embedding(codes) * valid.unsqueeze(-1).to(dtype)
        context = 0 if finalize else config.pre_lookahead_len
        h, mel_total = self.encoder(xs, total_len, context_len=context, streaming=streaming)
        mu = self.encoder_proj(h).transpose(1, 2)
        frames = mu.size(2)

        frame_mask = _length_mask(mel_total, frames)
        cond = torch.zeros_like(mu)
        prompt_frames = min(prompt_feat.size(1), frames)
        prompt_mask = _length_mask(prompt_feat_len, prompt_frames).unsqueeze(1).to(dtype)
        cond[:, :, :prompt_frames] = prompt_feat[:, :prompt_frames].transpose(1, 2) * prompt_mask
        mel = self.decoder(mu, frame_mask.unsqueeze(1).to(dtype), spks, cond, streaming=streaming,
                           prompt_frames=prompt_feat_len)

        # Keep each row's frames after its prompt.
        mel_len = mel_total - prompt_feat_len
        out_frames = int(mel_len.max())
        index = (prompt_feat_len.unsqueeze(1) + torch.arange(out_frames, device=device)).clamp(max=frames - 1)
        mel = mel.gather(2, index.unsqueeze(1).expand(-1, config.output_size, -1))
        mel = mel * _length_mask(mel_len, out_frames).unsqueeze(1).to(mel.dtype)
        return mel.float(), mel_len

    def compute_loss(
        self,
        token: torch.Tensor,
        token_len: torch.Tensor,
        feat: torch.Tensor,
        feat_len: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        prompt_ratio: float = 0.3,
        prompt_probability: float = 0.5,
        streaming: bool | None = None,
        streaming_probability: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training loss of the flow (the release's `CausalMaskedDiffWithXvec.forward`, CosyVoice2 recipe).

        Codes → embeddings → conformer encoder → `encoder_proj` = mu at mel rate; with probability
        `prompt_probability` a row gets a random prefix of its own target mel (up to `prompt_ratio` of it) as `cond`,
        as a voice prompt's mel is given at inference, and those frames leave the loss (CosyVoice2 kept them in; they
        are copied, not generated, at inference). The loss itself is [`MossSpeechCodecFlowCFM.compute_loss`].
        Unified streaming training as the release: each call picks the chunk-masked (streaming) or full-context mode,
        streaming with probability `streaming_probability` unless `streaming` fixes it, so one checkpoint serves both
        `decode` (full context) and the streaming decoder (chunk masks). Call `train()` first for dropout.

        Args:
            token: (B, T) speech codes (right-padded); token_len: (B,) codes per row.
            feat: (B, ≥ ratio·T, 80) target log-mel (`prompt_mel_spectrogram`), frames first like `prompt_feat`.
            feat_len: (B,) target frames per row; must equal ratio × token_len (default: that).
            embedding: (B, spk_embed_dim) speaker x-vectors (None = zeros, as checkpoints without speaker encoder).
            generator: source of every random choice (prompt lengths, mode, t, noise, guidance dropout).

        Returns:
            The scalar loss.
        """
        config = self.config
        weight = self.input_embedding.weight
        if not isinstance(token, torch.Tensor) or token.dim() != 2:
            raise ValueError(f"token must be a (batch, length) tensor of speech codes, got {type(token).__name__} "
                             f"{tuple(getattr(token, 'shape', ()))}.")
        if token.dtype.is_floating_point or token.dtype == torch.bool:
            raise TypeError(f"token must be an integer tensor, got dtype {token.dtype}.")
        batch, length = token.shape
        _check_lengths("token_len", token_len, batch, length, 1)
        _check_codes("token", token, token_len, config.vocab_size)
        frames = length * config.token_mel_ratio
        if not isinstance(feat, torch.Tensor) or feat.dim() != 3 or feat.size(0) != batch \
                or feat.size(1) < frames or feat.size(2) != config.output_size:
            shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
            raise ValueError(f"feat must be a ({batch}, >= {frames}, {config.output_size}) target mel tensor "
                             f"({config.token_mel_ratio} frames per code), got {shape}.")
        if feat_len is None:
            feat_len = token_len * config.token_mel_ratio
        _check_lengths("feat_len", feat_len, batch, feat.size(1), 0)
        if not torch.equal(feat_len.cpu().long(), token_len.cpu().long() * config.token_mel_ratio):
            raise ValueError(f"feat_len must be {config.token_mel_ratio} × token_len, got {feat_len.tolist()} for "
                             f"token_len {token_len.tolist()}: trim the mel (or the codes) to match.")
        if embedding is None:
            embedding = torch.zeros(batch, config.spk_embed_dim)
        if not isinstance(embedding, torch.Tensor) or tuple(embedding.shape) != (batch, config.spk_embed_dim):
            shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise ValueError(f"embedding must be a ({batch}, {config.spk_embed_dim}) speaker x-vector, got {shape}.")
        if not 0.0 <= prompt_ratio < 1.0 or not 0.0 <= prompt_probability <= 1.0 \
                or not 0.0 <= streaming_probability <= 1.0:
            raise ValueError(f"prompt_ratio must lie in [0, 1) and the probabilities in [0, 1], got {prompt_ratio}, "
                             f"{prompt_probability}, {streaming_probability}.")

        device, dtype = weight.device, weight.dtype
        token, token_len = token.to(device).long(), token_len.to(device).long()
        mel_len = token_len * config.token_mel_ratio
        if streaming is None:
            streaming = bool(_uniform((), generator, weight) < streaming_probability)
        valid = _length_mask(token_len, length)
        xs = self.input_embedding(token.masked_fill(~valid, 0)) * valid.unsqueeze(-1).to(dtype)
        h, _ = self.encoder(xs, token_len, streaming=streaming)
        mu = self.encoder_proj(h).transpose(1, 2)
        frame_mask = _length_mask(mel_len, frames).unsqueeze(1).to(dtype)
        x1 = feat[:, :frames].to(device, dtype).transpose(1, 2) * frame_mask

        # Random prompt prefix per row: n ~ U{0 .. ⌊prompt_ratio · frames⌋} when the row draws one.
        draws = _uniform((batch, 2), generator, weight).cpu()
        prompt_frames = torch.zeros(batch, dtype=torch.long)
        for i, row_frames in enumerate(mel_len.tolist()):
            if draws[i, 0] < prompt_probability:
                prompt_frames[i] = int(draws[i, 1] * (int(prompt_ratio * row_frames) + 1))
        in_prompt = _length_mask(prompt_frames.to(device), frames).unsqueeze(1).to(dtype)
        cond = x1 * in_prompt
        spks = self.spk_embed_affine_layer(F.normalize(embedding.to(device, dtype), dim=1))
        return self.decoder.compute_loss(x1, frame_mask, mu, spks, cond, loss_mask=frame_mask * (1 - in_prompt),
                                         streaming=streaming, generator=generator,
                                         prompt_frames=prompt_frames.to(device))

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Alias of [`inference`]."""
        return self.inference(*args, **kwargs)


__all__ = [
    "MossSpeechCodecFlow",
    "MossSpeechCodecFlowCFM",
    "MossSpeechCodecFlowEncoder",
    "MossSpeechCodecFlowEstimator",
]

"""Bounded-work streaming of the codec's decoder: an incremental chunk-causal flow and a seamless HiFT vocoder.

`MossSpeechFlowStream` decodes one utterance's codes to mel as they arrive. In its streaming mode the flow is
chunk-causal everywhere: the pre-lookahead convolution looks 3 codes ahead, the conformer layers (code rate and mel
rate) and the estimator's transformer blocks attend to every key before the end of the query's static chunk, and
all other convolutions are causal. A position whose chunk lies wholly inside what was decoded so far therefore
never changes again, at any layer and at any ODE step, so its keys/values (and the last inputs of every causal
convolution) are cached and each call only computes the codes/frames from the last complete chunk on. The result
equals `MossSpeechCodecFlow.inference(streaming=True)` re-run over everything received (same fixed noise), up to
float summation order.

Work per call is bounded except for attention itself, whose keys are all positions so far (the model attends to
every left chunk); memory grows with the utterance: per mel frame, 2 (keys, values) × 2 (guidance halves) ×
n_timesteps × transformer blocks × heads·head_dim floats (about 230 MB per second of audio at release size).

`MossSpeechVocoderStream` vocodes the mel pieces so that the concatenation equals a one-pass vocoding of the whole
mel: the harmonic source's phase is integrated across chunks, the excitation of frames already vocoded is reused,
and each piece is vocoded with left context and released only up to `right_context` frames before the end of the
mel received (overlap-save over the vocoder's receptive field).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_moss_speech_codec_flow import (
    MossSpeechCodecFlow,
    _RelPositionAttention,
    _sinusoidal_time_embedding,
)
from .modeling_moss_speech_codec_vocoder import MossSpeechCodecVocoder


class _KeyValueCache:
    """Keys and values (B, H, T, D) in growing buffers: the committed positions, then the current window's.

    The window's keys are written after the committed ones and attention reads a view of the buffer, so no call
    copies the history; buffers grow by half when full (amortised O(1) per position, at most 1.5x the memory).
    With a bounded attention context, `trim` drops committed positions no query will read again, except the first
    `prefix` ones (kept for good): buffer index `prefix` then holds absolute position `offset`.
    """

    def __init__(self, prefix: int = 0) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0  # committed positions (absolute)
        self.prefix = self.offset = prefix

    def index(self, position: int) -> int:
        """Buffer index of absolute `position` (one kept: in the prefix, or at or after `offset`)."""
        return position if position < self.prefix else self.prefix + position - self.offset

    def extended(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept committed keys/values followed by the window's `keys`/`values` (overwritten by the next call)."""
        here = self.index(self.length)
        needed = here + keys.size(2)
        if self.keys is None or needed > self.keys.size(2):
            old = 0 if self.keys is None else self.keys.size(2)
            shape = (*keys.shape[:2], max(needed, old + old // 2, 64), keys.size(3))
            grown_k, grown_v = keys.new_empty(shape), values.new_empty(shape)
            if self.keys is not None:
                grown_k[:, :, :here] = self.keys[:, :, :here]
                grown_v[:, :, :here] = self.values[:, :, :here]
            self.keys, self.values = grown_k, grown_v
        self.keys[:, :, here:needed] = keys
        self.values[:, :, here:needed] = values
        return self.keys[:, :, :needed], self.values[:, :, :needed]

    def commit(self, count: int) -> None:
        """The window's first `count` positions are final: keep them."""
        self.length += count

    def trim(self, before: int) -> None:
        """Forget committed positions in [prefix, before); moves the rest only once the dropped part is at least as
        long as it (amortised O(1) per position), so the buffer stays about twice the context."""
        before = min(before, self.length)
        dropped, kept = before - self.offset, self.length - before
        if self.keys is None or dropped <= 0 or dropped < max(kept, 64):
            return
        source = slice(self.index(before), self.index(self.length))
        self.keys[:, :, self.prefix : self.prefix + kept] = self.keys[:, :, source].clone()
        self.values[:, :, self.prefix : self.prefix + kept] = self.values[:, :, source].clone()
        self.offset = before

    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


def _hidden_window_keys(start: int, end: int, chunk: int, device: torch.device) -> torch.Tensor:
    """(end - start, end - start) bool: True where window query i (absolute start + i) may not see window key j.

    The window starts on a chunk boundary, so every key before it is visible to every window query: only the
    window's own keys need a mask, and its size does not grow with the utterance."""
    queries = torch.arange(start, end, device=device)
    chunk_end = (queries // chunk + 1) * chunk
    return torch.arange(start, end, device=device).unsqueeze(0) >= chunk_end.unsqueeze(1)


class _StreamState:
    """Per-call helper: the window [start, end) being computed and how many of its positions become committed."""

    def __init__(self, start: int, end: int, commit: int) -> None:
        self.start, self.end, self.commit = start, end, commit


def _causal_conv(conv: nn.Conv1d, x: torch.Tensor, tails: dict, key: object, state: _StreamState) -> torch.Tensor:
    """Left-padded conv of window frames `x` (B, C, n), continuing the committed input frames kept in `tails`."""
    context = conv.kernel_size[0] - 1
    tail = tails.get(key)
    if tail is None:
        tail = x.new_zeros(x.size(0), x.size(1), context)
    full = torch.cat([tail, x], dim=2)
    # The frames just before the new commit point: the left context of the next call's window.
    tails[key] = full[:, :, state.commit : state.commit + context]
    return F.conv1d(full, conv.weight, conv.bias)


class _PositionTable:
    """`linear_pos` of the sinusoidal embedding of relative distances, computed once per distance: it depends on
    the distance only, and projecting every distance at every call made each call's cost grow with the utterance
    as length × d_model² (the attention itself grows as length × d_model). Rows are stored by descending distance,
    so a call's range [low, high) is a view; the table grows by half when a call needs more."""

    def __init__(self, attn: _RelPositionAttention) -> None:
        self.attn = attn
        self.table: torch.Tensor | None = None  # (1, H, high - low, D), distances high-1 down to low
        self.low = self.high = 0

    def view(self, low: int, high: int, like: torch.Tensor) -> torch.Tensor:
        """(1, H, high - low, D): the projected embeddings of distances high-1 down to low."""
        if self.table is None or low < self.low or high > self.high:
            span = self.high - self.low
            self.low = min(low, self.low - span // 2) if self.table is not None else low
            self.high = max(high, self.high + span // 2) if self.table is not None else high
            attn = self.attn
            distance = torch.arange(self.high - 1, self.low - 1, -1, device=like.device,
                                    dtype=torch.float32).unsqueeze(1)
            d_model = attn.num_heads * attn.head_dim
            inv_freq = torch.exp(torch.arange(0, d_model, 2, device=like.device, dtype=torch.float32)
                                 * -(math.log(10000.0) / d_model))
            angles = distance * inv_freq
            pos_emb = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1).unsqueeze(0).to(like.dtype)
            self.table = attn._heads(attn.linear_pos(pos_emb)).transpose(1, 2)
        return self.table[:, :, self.high - high : self.high - low]


def _rel_attention(attn: _RelPositionAttention, x: torch.Tensor, cache: _KeyValueCache, state: _StreamState,
                   chunk: int, positions: _PositionTable) -> torch.Tensor:
    """`_RelPositionAttention` for window queries against cached + window keys (static chunks of `chunk`)."""
    batch, length, _ = x.shape
    start, end = state.start, state.end
    q = attn._heads(attn.linear_q(x))  # (B, n, H, D)
    k = attn._heads(attn.linear_k(x)).transpose(1, 2)
    v = attn._heads(attn.linear_v(x)).transpose(1, 2)
    keys, values = cache.extended(k, v)
    # Relative distances i - j for queries in [start, end) and keys in [0, end): from end-1 down to start-end+1.
    p = positions.view(start - end + 1, end, x)
    scores = torch.matmul((q + attn.pos_bias_u).transpose(1, 2), keys.transpose(-2, -1))  # (B, H, n, end)
    position = torch.matmul((q + attn.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)).contiguous()
    # Score (i, j) reads distance i - j, at column (end - 1) - (i - j) = (length - 1 - i) + j: a strided view of the
    # (B, H, n, n + end - 1) product (row stride one less than its width), not an index tensor and a gather.
    width = position.size(-1)
    shifted = position.as_strided((batch, attn.num_heads, length, end),
                                  (position.stride(0), position.stride(1), width - 1, 1),
                                  position.storage_offset() + length - 1)
    scores = scores.add_(shifted).div_(math.sqrt(attn.head_dim))
    scores[..., start:].masked_fill_(_hidden_window_keys(start, end, chunk, x.device), -float("inf"))
    weights = torch.softmax(scores, dim=-1)
    out = torch.matmul(weights, values).transpose(1, 2).reshape(batch, length, -1)
    cache.commit(state.commit)
    return attn.linear_out(out)


class MossSpeechFlowStream:
    """Incremental streaming decode of one utterance by a `MossSpeechCodecFlow` (batch 1, eval mode).

    Call `step(codes, num_out, finalize)` with all codes received so far (without the voice prompt's): it returns the
    mel frames of codes [previous num_out, num_out), exactly those `flow.inference(codes, streaming=True,
    finalize=finalize)` gives for them when `codes` holds num_out codes plus `pre_lookahead_len` lookahead codes
    (finalize=False) or exactly num_out codes (finalize=True, the utterance's end).
    """

    def __init__(
        self,
        flow: MossSpeechCodecFlow,
        prompt_token: torch.Tensor | None = None,
        prompt_feat: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
        num_codes: int | None = None,
    ) -> None:
        config = flow.config
        self.flow, self.config = flow, config
        weight = flow.input_embedding.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.num_codes = config.vocab_size if num_codes is None else num_codes
        if prompt_token is None:
            prompt_token = torch.zeros(0, dtype=torch.long)
        if prompt_feat is None:
            prompt_feat = torch.zeros(0, config.output_size)
        if embedding is None:
            embedding = torch.zeros(config.spk_embed_dim)
        prompt_token = prompt_token.reshape(-1)
        if prompt_token.dtype.is_floating_point or prompt_token.dtype == torch.bool:
            raise TypeError(f"prompt_token must be integer speech codes, got dtype {prompt_token.dtype}.")
        if prompt_feat.dim() == 3:
            prompt_feat = prompt_feat[0]
        if prompt_feat.dim() != 2 or prompt_feat.size(1) != config.output_size \
                or prompt_feat.size(0) != prompt_token.numel() * config.token_mel_ratio:
            raise ValueError(f"prompt_feat must be ({config.token_mel_ratio} x {prompt_token.numel()}, "
                             f"{config.output_size}) log-mel frames, got {tuple(prompt_feat.shape)}.")
        embedding = embedding.reshape(-1)
        if embedding.numel() != config.spk_embed_dim:
            raise ValueError(f"embedding must hold {config.spk_embed_dim} values, got {embedding.numel()}.")
        self._check_codes("prompt_token", prompt_token)
        self.prompt_codes = prompt_token.to(self.device).long()
        self.prompt_frames = prompt_feat.size(0)
        self.prompt_feat = prompt_feat.to(self.device, self.dtype).T.unsqueeze(0)  # (1, 80, Tf)
        with torch.no_grad():
            self.spks = flow.spk_embed_affine_layer(F.normalize(embedding.to(self.device, self.dtype)[None], dim=1))
        self.ratio, self.lookahead = config.token_mel_ratio, config.pre_lookahead_len
        self.code_chunk = config.encoder_static_chunk_size
        self.frame_chunk = config.estimator_static_chunk_size
        # Bounded estimator context (estimator_left_chunks): frames before a chunk's start its queries still see.
        left_chunks = config.estimator_left_chunks
        self.left_frames = None if left_chunks is None else left_chunks * self.frame_chunk
        if self.code_chunk < 1 or self.frame_chunk < 1:
            raise ValueError("streaming needs encoder_static_chunk_size and estimator_static_chunk_size >= 1.")
        t_span = flow.decoder.time_steps(self.device).to(self.dtype)
        # (t, dt) of each Euler step, in the release's accumulation order (see MossSpeechCodecFlowCFM.forward).
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            self.steps.append((t, dt))
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        encoder = flow.encoder
        self.encoder_caches = [_KeyValueCache() for _ in encoder.encoders]
        self.up_caches = [_KeyValueCache() for _ in encoder.up_encoders]
        self.position_tables = {layer: _PositionTable(layer.self_attn)
                                for layer in [*encoder.encoders, *encoder.up_encoders]}
        self.encoder_tail: torch.Tensor | None = None  # encoded codes just before `code_done` (upsampling context)
        self.code_done = 0  # codes (prompt included) whose encoder states are committed
        # Encoder output (mu) of mel frames [mu_start, …): only frames from `frame_done` on are read again.
        self.mu = torch.zeros(1, config.output_size, 0, device=self.device, dtype=self.dtype)
        self.mu_start = 0
        self.frame_done = 0  # mel frames whose estimator states (all ODE steps) are committed
        self.step_tails: list[dict] = [{} for _ in self.steps]
        self.step_caches: list[dict] = [{} for _ in self.steps]
        self.out_done = 0  # codes (prompt excluded) whose mel was returned
        self.finished = False

    def _check_codes(self, name: str, codes: torch.Tensor) -> None:
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            bad = int(codes.min()) if int(codes.min()) < 0 else int(codes.max())
            raise ValueError(f"{name} must hold speech codes in [0, {self.num_codes}), got {bad}.")

    def cache_bytes(self) -> int:
        """Memory held by the key/value caches."""
        caches = self.encoder_caches + self.up_caches + [c for d in self.step_caches for c in d.values()]
        return sum(c.nbytes() for c in caches)

    # ------------------------------------------------------------------ encoder

    def _encode(self, codes: torch.Tensor, low: int, end: int) -> None:
        """Encode codes [code_done, end) (prompt included) from the valid codes [low, …) in `codes`, low =
        max(code_done - 2, 0); append their mu."""
        encoder = self.flow.encoder
        start = self.code_done
        # Embedded codes [low, end + lookahead): zero past the valid ones, as the full pass sees them.
        window = codes[: end + self.lookahead - low]
        x = encoder.embed.out(self.flow.input_embedding(window[None])) * encoder.embed.pos_enc.xscale
        x = F.pad(x, (0, 0, 0, end + self.lookahead - low - x.size(1)))
        lookahead = encoder.pre_lookahead_layer
        h = F.leaky_relu(lookahead.conv1(x.transpose(1, 2)))  # h[j] for j in [low, end)
        h = F.pad(h, (2 - (start - low), 0))  # conv2's zero padding left of code 0
        h = F.conv1d(h, lookahead.conv2.weight, lookahead.conv2.bias)
        x = h.transpose(1, 2) + x[:, start - low : end - low]

        code_commit = (end // self.code_chunk) * self.code_chunk - start
        state = _StreamState(start, end, max(code_commit, 0))
        for layer, cache in zip(encoder.encoders, self.encoder_caches):
            x = self._conformer(layer, x, cache, state, self.code_chunk, self.position_tables[layer])

        # Upsampling: causal conv over the codes repeated `ratio` times, with the two previous codes as context.
        ratio = self.ratio
        context = encoder.up_layer.conv.kernel_size[0] - 1
        tail = self.encoder_tail if self.encoder_tail is not None else x.new_zeros(1, 0, x.size(2))
        prior = torch.cat([tail, x], dim=1).transpose(1, 2)
        up = torch.repeat_interleave(prior, ratio, dim=2)
        up = F.pad(up, (max(context - tail.size(1) * ratio, 0), 0))[:, :, -(x.size(1) * ratio + context):]
        up = F.conv1d(up, encoder.up_layer.conv.weight, encoder.up_layer.conv.bias).transpose(1, 2)
        keep = max(context // ratio + (context % ratio > 0), 1)
        committed = torch.cat([tail, x[:, : state.commit]], dim=1)
        self.encoder_tail = committed[:, -keep:] if committed.size(1) else None

        up = encoder.up_embed.out(up) * encoder.up_embed.pos_enc.xscale
        frame_state = _StreamState(start * ratio, end * ratio, state.commit * ratio)
        for layer, cache in zip(encoder.up_encoders, self.up_caches):
            up = self._conformer(layer, up, cache, frame_state, self.code_chunk * ratio, self.position_tables[layer])
        mu = self.flow.encoder_proj(encoder.after_norm(up)).transpose(1, 2)
        # Drop the frames before the estimator's next window, so this concatenation stays window-sized.
        self.mu = torch.cat([self.mu[:, :, self.frame_done - self.mu_start : start * ratio - self.mu_start], mu], dim=2)
        self.mu_start = self.frame_done
        self.code_done = start + state.commit

    @staticmethod
    def _conformer(layer, x: torch.Tensor, cache: _KeyValueCache, state: _StreamState, chunk: int,
                   positions: _PositionTable) -> torch.Tensor:
        x = x + _rel_attention(layer.self_attn, layer.norm_mha(x), cache, state, chunk, positions)
        return x + layer.feed_forward(layer.norm_ff(x))

    # ------------------------------------------------------------------ estimator

    def _velocity(self, step: int, x: torch.Tensor, mu: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                  state: _StreamState) -> torch.Tensor:
        """Guided velocity of the window frames at one Euler step (both guidance halves in one batch)."""
        estimator = self.flow.decoder.estimator
        tails, caches = self.step_tails[step], self.step_caches[step]
        length = x.size(2)
        h = torch.cat([torch.cat([x, x]), torch.cat([mu, torch.zeros_like(mu)]),
                       torch.cat([self.spks, torch.zeros_like(self.spks)]).unsqueeze(-1).expand(-1, -1, length),
                       torch.cat([cond, torch.zeros_like(cond)])], dim=1)
        time = estimator.time_mlp(_sinusoidal_time_embedding(t.expand(2), 4 * self.config.output_size))

        def block(module, h: torch.Tensor) -> torch.Tensor:  # _CausalBlock1D (mask = 1 on every frame here)
            h = _causal_conv(module.block[0], h, tails, module, state)
            for layer in list(module.block)[1:]:
                h = layer(h)
            return h

        def resnet(module, h: torch.Tensor) -> torch.Tensor:
            out = block(module.block1, h) + module.mlp(time).unsqueeze(-1)
            return block(module.block2, out) + module.res_conv(h)

        def transformers(blocks, h: torch.Tensor) -> torch.Tensor:
            h = h.transpose(1, 2)
            for transformer in blocks:
                h = h + self._self_attention(transformer.attn1, transformer.norm1(h), caches, state)
                h = h + transformer.ff(transformer.norm3(h))
            return h.transpose(1, 2)

        skips = []
        for res, blocks, down in estimator.down_blocks:
            h = transformers(blocks, resnet(res, h))
            skips.append(h)
            h = _causal_conv(down, h, tails, down, state)
        for res, blocks in estimator.mid_blocks:
            h = transformers(blocks, resnet(res, h))
        for res, blocks, up in estimator.up_blocks:
            h = transformers(blocks, resnet(res, torch.cat([h, skips.pop()], dim=1)))
            h = _causal_conv(up, h, tails, up, state)
        velocity = estimator.final_proj(block(estimator.final_block, h))
        v_cond, v_uncond = velocity.split(1)
        rate = self.config.inference_cfg_rate
        return (1.0 + rate) * v_cond - rate * v_uncond

    def _self_attention(self, attn, x: torch.Tensor, caches: dict, state: _StreamState) -> torch.Tensor:
        batch, length, _ = x.shape
        chunk, left, prefix = self.frame_chunk, self.left_frames, self.prompt_frames

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)

        cache = caches.get(attn)
        if cache is None:
            cache = caches[attn] = _KeyValueCache(prefix)
        k, v = heads(attn.to_k(x)), heads(attn.to_v(x))
        keys, values = cache.extended(k, v)
        q = heads(attn.to_q(x))
        # One unmasked attention per static chunk of the window: its queries see exactly the keys before the chunk's
        # end (the offline mask's -1e10 bias gives the hidden keys weight 0), so no (window x all keys) bias is built
        # and read at every call and every ODE step, and the hidden keys are not computed at all. With a bounded
        # context (left frames), the keys before the chunk's window are left out too, except the prompt's.
        outs, position = [], state.start
        while position < state.end:
            chunk_start = (position // chunk) * chunk
            chunk_end = min(chunk_start + chunk, state.end)
            low = 0 if left is None else max(chunk_start - left, 0)
            end = cache.index(chunk_end)
            if low <= prefix:
                k_seen, v_seen = keys[:, :, :end], values[:, :, :end]
            elif not prefix:  # no prompt: the context is one slice of the buffer
                k_seen, v_seen = keys[:, :, cache.index(low) : end], values[:, :, cache.index(low) : end]
            else:
                k_seen = torch.cat([keys[:, :, :prefix], keys[:, :, cache.index(low) : end]], dim=2)
                v_seen = torch.cat([values[:, :, :prefix], values[:, :, cache.index(low) : end]], dim=2)
            outs.append(F.scaled_dot_product_attention(q[:, :, position - state.start : chunk_end - state.start],
                                                       k_seen, v_seen))
            position = chunk_end
        cache.commit(state.commit)
        if left is not None:  # the next call's first window starts at the new commit point
            cache.trim(state.start + state.commit - left)
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(batch, length, -1)
        return attn.to_out[1](attn.to_out[0](out))

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def step(self, codes: torch.Tensor | list[int], num_out: int, finalize: bool = False) -> torch.Tensor:
        """Mel (1, 80, ratio × (num_out − previous num_out)) of the codes up to `num_out`, float32.

        Args:
            codes: every code received so far (1-D, voice prompt excluded); at least num_out + pre_lookahead_len of
                them unless `finalize`, exactly num_out with `finalize`.
            num_out: codes whose mel is complete after this call (non-decreasing across calls).
            finalize: the utterance ends with these codes (the last ones get zero lookahead); no call may follow.
        """
        if self.finished:
            raise ValueError("this flow stream was finalized; start a new one for another utterance.")
        codes = torch.as_tensor(codes).reshape(-1)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be integer speech codes, got dtype {codes.dtype}.")
        if isinstance(num_out, bool) or not isinstance(num_out, int) or num_out < self.out_done:
            raise ValueError(f"num_out must be an integer >= {self.out_done} (codes already decoded), got {num_out!r}.")
        needed = num_out if finalize else num_out + self.lookahead
        if codes.numel() < needed or (finalize and codes.numel() != num_out):
            raise ValueError(f"codes must hold {'exactly' if finalize else 'at least'} {needed} codes for num_out="
                             f"{num_out} (finalize={finalize}), got {codes.numel()}.")
        self.finished = finalize
        prompt = self.prompt_codes.numel()
        # The encoder reads codes from two before its first uncommitted one on (the pre-lookahead convolution's left
        # context); the earlier ones were read and checked by earlier calls, and are not copied or scanned again.
        low = max(self.code_done - 2, 0)
        codes = codes[max(low - prompt, 0) : needed].to(self.device).long()
        self._check_codes("codes", codes)
        end = prompt + num_out
        frames = end * self.ratio
        if frames > self.config.noise_max_frames:
            raise ValueError(f"prompt + codes need {frames} mel frames, more than the fixed noise holds "
                             f"(noise_max_frames={self.config.noise_max_frames}).")
        first = (prompt + self.out_done) * self.ratio
        if num_out == self.out_done:
            return torch.zeros(1, self.config.output_size, 0, device=self.device)
        self._encode(torch.cat([self.prompt_codes[low:], codes]), low, end)

        start = self.frame_done
        committed = (min(self.code_done * self.ratio, frames) // self.frame_chunk) * self.frame_chunk
        state = _StreamState(start, frames, committed - start)
        mu = self.mu[:, :, start - self.mu_start : frames - self.mu_start]
        cond = torch.zeros_like(mu)
        if start < self.prompt_frames:
            cond[:, :, : self.prompt_frames - start] = self.prompt_feat[:, :, start : min(frames, self.prompt_frames)]
        x = self.flow.decoder.rand_noise[:, :, start:frames].to(mu) * self.config.inference_noise_scale
        for index, (t, dt) in enumerate(self.steps):
            x = x + dt * self._velocity(index, x, mu, cond, t, state)
        self.frame_done = committed
        self.out_done = num_out
        return x[:, :, first - start :].float()


# ----------------------------------------------------------------------------------------------------------------
# Vocoder
# ----------------------------------------------------------------------------------------------------------------

_RECEPTIVE_FIELDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def vocoder_receptive_field(vocoder: MossSpeechCodecVocoder) -> tuple[int, int]:
    """(left, right): mel frames before / after a frame that its waveform depends on (through the mel and through
    the excitation source), measured once per vocoder by perturbing one frame of each input."""
    if vocoder in _RECEPTIVE_FIELDS:
        return _RECEPTIVE_FIELDS[vocoder]
    hop, frames = vocoder.hop_length, 32
    param = vocoder.conv_pre.bias
    while True:
        middle = frames // 2
        generator = torch.Generator().manual_seed(0)
        mel = torch.randn(1, vocoder.config.in_channels, frames, generator=generator).to(param)
        source = (0.1 * torch.randn(1, 1, frames * hop, generator=generator)).to(param)
        base = vocoder._decode(mel, source, None)
        bumped_mel = mel.clone()
        bumped_mel[:, :, middle] += 1.0
        bumped_source = source.clone()
        bumped_source[:, :, middle * hop : (middle + 1) * hop] += 0.5
        changed = ((vocoder._decode(bumped_mel, source, None) - base).abs()
                   + (vocoder._decode(mel, bumped_source, None) - base).abs())[0] > 1e-6
        samples = changed.nonzero().squeeze(1)
        first, last = int(samples.min()) // hop, int(samples.max()) // hop
        if first > 0 and last < frames - 1:
            break
        frames *= 2
    # A frame's output depends on inputs up to (middle - first) frames ahead and (last - middle) behind; one frame
    # of margin covers weights that happen to be zero at the probe.
    field = (last - middle + 1, middle - first + 1)
    _RECEPTIVE_FIELDS[vocoder] = field
    return field


def _f0_receptive_field(vocoder: MossSpeechCodecVocoder) -> int:
    """Frames each side a frame's F0 depends on (the F0 predictor's convolutions)."""
    return sum((m.kernel_size[0] - 1) // 2 * m.dilation[0] for m in vocoder.f0_predictor.condnet
               if isinstance(m, nn.Conv1d))


class MossSpeechVocoderStream:
    """Seamless streaming HiFT: push mel frames, get the waveform of the frames whose samples are final.

    The concatenated output equals `vocoder._decode(whole mel, whole source)` (one pass) where the source is this
    stream's excitation: the offline harmonic source (F0 from the whole mel, phases integrated from the utterance's
    start) with noise drawn per segment. With the noise switched off it equals `vocoder(whole mel)`. Each call
    vocodes the new frames plus the receptive field on both sides; the last `latency_frames` frames received are
    released by the next push or by `flush`.
    """

    def __init__(self, vocoder: MossSpeechCodecVocoder, generator: torch.Generator | None = None,
                 context_frames: int | None = None) -> None:
        if not isinstance(vocoder, MossSpeechCodecVocoder):
            raise TypeError(f"vocoder must be a MossSpeechCodecVocoder (HiFT), got {type(vocoder).__name__}.")
        if context_frames is not None and (isinstance(context_frames, bool) or not isinstance(context_frames, int)
                                           or context_frames < 0):
            raise ValueError(f"context_frames must be None or a non-negative integer, got {context_frames!r}.")
        self.vocoder, self.generator = vocoder, generator
        left, right = vocoder_receptive_field(vocoder) if context_frames is None else (context_frames,) * 2
        self.left, self.right = left, right
        self.f0_field = _f0_receptive_field(vocoder)
        source = vocoder.m_source
        self.hop = vocoder.hop_length
        self.harmonics = torch.arange(1, source.num_harmonics + 1, dtype=torch.float32)
        param = vocoder.conv_pre.bias
        self.device, self.dtype = param.device, param.dtype
        self.mel = torch.zeros(1, vocoder.config.in_channels, 0, device=self.device, dtype=self.dtype)
        self.source = torch.zeros(1, 1, 0, device=self.device)
        self.base = 0  # absolute frame index of self.mel[..., 0] and of self.source's first frame
        self.received = 0  # mel frames pushed
        self.sourced = 0  # frames whose excitation is final
        self.released = 0  # frames whose waveform was returned
        self.phase_sum: torch.Tensor | None = None  # float64 (H,) cumulative cycles/sample up to frame sourced - 1
        # Set to a list to keep every excitation segment (analysis: re-vocode the stream's mel with its source).
        self.source_log: list[torch.Tensor] | None = None
        self.finished = False

    @property
    def latency_frames(self) -> int:
        """Frames received but not yet released after a push (right receptive field + F0 and phase lookahead)."""
        return self.right + self.f0_field + 1

    def _extend_source(self, end: int) -> None:
        """Excitation of frames [sourced, end): the offline source's arithmetic, continued from `phase_sum`."""
        start, source = self.sourced, self.vocoder.m_source
        # F0 of frames [start - 1, end + 1) needs mel [.. ± f0 field]; it is exact there (zero padding only at the
        # utterance's real edges).
        low = max(start - 1 - self.f0_field, 0)
        high = min(end + 1 + self.f0_field, self.received)
        f0 = self.vocoder.f0_predictor(self.mel[:, :, low - self.base : high - self.base]).float()[0]
        first = max(start - 1, 0)
        last = min(end + 1, self.received)  # one frame past `end` for the interpolation (none at the real end)
        f0 = f0[first - low : last - low]
        harmonics = self.harmonics.to(f0.device)
        rad = (f0[:, None] * harmonics / source.sampling_rate) % 1  # (frames, H)
        new = rad[start - first :].double()
        previous = self.phase_sum if self.phase_sum is not None else new.new_zeros(new.size(1))
        cumulative = previous + torch.cumsum(new, dim=0)
        phase_frames = cumulative if start == 0 else torch.cat([previous[None], cumulative])
        self.phase_sum = cumulative[end - start - 1]
        phase = (phase_frames.float() * 2 * math.pi)[None].transpose(1, 2)  # (1, H, frames)
        phase = F.interpolate(phase * self.hop, scale_factor=float(self.hop), mode="linear")
        offset = (start - first) * self.hop
        phase = phase[:, :, offset : offset + (end - start) * self.hop]
        f0_new = f0[start - first : end - first]
        voiced = (f0_new > source.voiced_threshold).float().repeat_interleave(self.hop)[None, None]
        noise_amp = voiced * source.noise_std + (1 - voiced) * source.sine_amp / 3
        samples = (end - start) * self.hop
        noise = source.draw_noise([samples], samples, self.generator, phase.device)
        sines = torch.sin(phase) * source.sine_amp * voiced + noise_amp * noise
        merged = torch.tanh(F.linear(sines.transpose(1, 2), source.l_linear.weight.float(),
                                     source.l_linear.bias.float())).transpose(1, 2)
        self.source = torch.cat([self.source, merged], dim=2)
        if self.source_log is not None:
            self.source_log.append(merged)
        self.sourced = end

    @torch.no_grad()
    def push(self, mel: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Add mel frames (1, in_channels, n); returns the waveform (samples,) that became final (maybe empty)."""
        if self.finished:
            raise ValueError("this vocoder stream was flushed; start a new one for another utterance.")
        if not isinstance(mel, torch.Tensor) or mel.dim() != 3 or mel.shape[:2] != self.mel.shape[:2]:
            shape = tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
            raise ValueError(f"mel must be (1, {self.mel.size(1)}, frames), got {shape}.")
        self.finished = final
        self.mel = torch.cat([self.mel, mel.to(self.device, self.dtype)], dim=2)
        self.received += mel.size(2)
        if final:
            source_end = self.received
        else:
            source_end = max(self.received - self.f0_field - 1, self.sourced)
        if source_end > self.sourced:
            self._extend_source(source_end)
        out_end = self.received if final else max(min(self.received - self.right, self.sourced - self.right),
                                                   self.released)
        if out_end == self.released:
            return torch.zeros(0, device=self.device)
        start = max(self.released - self.left, 0)
        end = self.sourced
        wav = self.vocoder._decode(self.mel[:, :, start - self.base : end - self.base],
                                   self.source[:, :, (start - self.base) * self.hop : (end - self.base) * self.hop]
                                   .to(self.dtype), None)[0]
        wav = wav[(self.released - start) * self.hop : (out_end - start) * self.hop]
        self.released = out_end
        # Keep what the next window and the next F0 window need.
        keep = max(min(self.released - self.left, self.sourced - 2 - self.f0_field), self.base)
        self.mel = self.mel[:, :, keep - self.base :]
        self.source = self.source[:, :, (keep - self.base) * self.hop :]
        self.base = keep
        return wav.float()

    def flush(self) -> torch.Tensor:
        """Release the rest (the mel's end is the utterance's end)."""
        return self.push(self.mel.new_zeros(1, self.mel.size(1), 0), final=True)

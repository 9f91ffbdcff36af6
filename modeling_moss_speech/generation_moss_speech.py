"""Generation for MOSS-Speech: the modality state machine, per-channel sampling and lazy tails.

Written from transformers' public pieces (logits warpers, `Cache`, stopping criteria, `BaseStreamer`) instead of
overriding `GenerationMixin`'s private sampling methods, whose signatures change between releases.

The release's rules, kept here:
- a row is sampled in text mode until the text channel emits `sosp_token_id`, then in audio mode until the
  audio channel emits `eosp_token_id`; the mode is read off the last appended row before every step;
- in audio mode the text channel is written as `modality_pad_token_id`;
- audio ids above `eosp_token_id` are never sampled, and `eosp_token_id` is forbidden before `min_new_tokens`;
- each channel has its own repetition penalty, temperature, top-k and top-p.

Deliberate differences from the release, each a fix:
- stopping is decided per batch row (the release looked at row 0 only);
- in text mode the audio channel is written as `audio_pad_token_id` (the release kept a sampled code that the
  embedding rule ignores): the generated grid then has the same form as the processor's grids, and the audio
  tail does not have to run on text steps (lazy tails, below);
- the repetition penalty ignores left padding, so a padded batch row behaves as the same prompt alone.

Lazy tails: while decoding, only the tail of the modality being sampled runs; the trunk outputs the other tail
missed are kept and run through it in one batched pass when its modality is needed again. `lazy_tails=False`
runs both tails every step (the release's behaviour); both give the same logits and tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput, logging

from .configuration_moss_speech import MODALITIES

logger = logging.get_logger(__name__)

CHANNEL_SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


class MossSpeechGenerationConfig(GenerationConfig):
    """`GenerationConfig` with per-channel sampling settings; defaults are the release's demo settings.

    Besides every standard field, it holds `text_<field>` and `audio_<field>` for `<field>` in
    `do_sample, temperature, top_k, top_p, repetition_penalty`; a per-channel value of `None` falls back to the
    shared field. `lazy_tails` (default `True`) runs only the tail of the active modality while decoding.
    Saved as `generation_config.json` like any generation config.

    Example:

    ```python
    >>> from modeling_moss_speech import MossSpeechGenerationConfig
    >>> config = MossSpeechGenerationConfig(audio_temperature=0.8)
    >>> config.channel_settings("audio")["temperature"], config.channel_settings("text")["temperature"]
    (0.8, 0.6)
    ```
    """

    release_defaults = {
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "max_new_tokens": 500,
        "min_new_tokens": 0,
        "eos_token_id": [151643, 151645],
        "pad_token_id": 151643,
    }

    def __init__(self, **kwargs) -> None:
        for key, value in self.release_defaults.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        for channel in MODALITIES:
            for field in CHANNEL_SAMPLING_FIELDS:
                setattr(self, f"{channel}_{field}", kwargs.pop(f"{channel}_{field}", None))
        self.lazy_tails = kwargs.pop("lazy_tails", True)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> MossSpeechGenerationConfig:
        """Release defaults, with the special ids the model config sets (tiny configs have their own)."""
        values = model_config if isinstance(model_config, dict) else model_config.to_dict()
        ids = {k: values[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if values.get(k) is not None}
        return cls(**ids)

    def channel_settings(self, channel: str) -> dict:
        """Resolved sampling settings of `channel` ("text" or "audio")."""
        if channel not in MODALITIES:
            raise ValueError(f"channel must be one of {MODALITIES}, got {channel!r}.")
        settings = {}
        for field in CHANNEL_SAMPLING_FIELDS:
            value = getattr(self, f"{channel}_{field}", None)
            settings[field] = getattr(self, field) if value is None else value
        return settings


@dataclass
class MossSpeechGenerateOutput(ModelOutput):
    """Result of [`MossSpeechForCausalLM.generate`] with `return_dict_in_generate=True`.

    Args:
        sequences: (B, T, 2) generated rows (prompt stripped). Rows after an element stopped hold
            `(pad_token_id, audio_pad_token_id)`.
        lengths: (B,) rows each element generated, its stop row included.
        modality_spans: Per element, `(modality, start, end)` runs of rows sampled in text or audio mode.
        text_logits: Per step, the raw (B, vocab_size) text logits, or `None` where the text tail did not run.
        audio_logits: Per step, the raw (B, audio_vocab_size) audio logits, or `None` where it did not run.
    """

    sequences: torch.LongTensor | None = None
    lengths: torch.LongTensor | None = None
    modality_spans: list[list[tuple[str, int, int]]] | None = None
    text_logits: tuple[torch.FloatTensor | None, ...] | None = None
    audio_logits: tuple[torch.FloatTensor | None, ...] | None = None


def initial_audio_mode(config, last_rows: torch.Tensor) -> torch.BoolTensor:
    """Mode (True = audio) at the first step, from the last prompt row of each element, as the release reads it."""
    is_audio = (last_rows[:, 0] == config.modality_pad_token_id) & (last_rows[:, 1] != config.audio_pad_token_id)
    return update_audio_mode(config, is_audio, last_rows)


def update_audio_mode(config, is_audio: torch.BoolTensor, rows: torch.Tensor) -> torch.BoolTensor:
    """Next mode after appending `rows` (B, 2): text→audio on start-of-speech, then audio→text on end-of-speech."""
    is_audio = is_audio | (rows[:, 0] == config.sosp_token_id)
    return is_audio & (rows[:, 1] != config.eosp_token_id)


def modality_spans(row_is_audio: torch.BoolTensor, lengths: torch.LongTensor) -> list[list[tuple[str, int, int]]]:
    """Runs of equal modality per element from a (B, T) audio-mode flag and the generated lengths."""
    spans = []
    for flags, length in zip(row_is_audio.tolist(), lengths.tolist()):
        runs: list[tuple[str, int, int]] = []
        for index, flag in enumerate(flags[:length]):
            modality = MODALITIES[int(flag)]
            if runs and runs[-1][0] == modality:
                runs[-1] = (modality, runs[-1][1], index + 1)
            else:
                runs.append((modality, index, index + 1))
        spans.append(runs)
    return spans


def _warpers(settings: dict) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if not settings["do_sample"]:
        return warpers
    if settings["temperature"] is not None and settings["temperature"] != 1.0:
        warpers.append(TemperatureLogitsWarper(settings["temperature"]))
    if settings["top_k"]:
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if settings["top_p"] is not None and settings["top_p"] < 1.0:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    return warpers


def _check_settings(channel: str, settings: dict) -> None:
    if settings["do_sample"]:
        temperature = settings["temperature"]
        if temperature is not None and not temperature > 0:
            raise ValueError(f"{channel} temperature must be > 0 when sampling, got {temperature}.")
        top_p = settings["top_p"]
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"{channel} top_p must be in (0, 1], got {top_p}.")
        top_k = settings["top_k"]
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"{channel} top_k must be an integer >= 0, got {top_k!r}.")
    penalty = settings["repetition_penalty"]
    if penalty is not None and not penalty > 0:
        raise ValueError(f"{channel} repetition_penalty must be > 0, got {penalty}.")


def seen_tokens(ids: torch.LongTensor, mask: torch.BoolTensor, vocab_size: int) -> torch.BoolTensor:
    """(B, vocab) flags of the ids present at unmasked positions of (B, L) `ids` (the repetition-penalty history)."""
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.long, device=ids.device)
    # Counting (not assigning) keeps a real id seen when masked positions are parked on the same index.
    counts.scatter_add_(1, ids.masked_fill(~mask, 0), mask.long())
    return counts > 0


def _penalize(scores: torch.Tensor, seen: torch.BoolTensor, penalty: float | None) -> torch.Tensor:
    """HF repetition penalty (negative scores ×p, others ÷p) on ids seen in the unpadded history."""
    if penalty is None or penalty == 1.0:
        return scores
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def _choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.LongTensor:
    if do_sample:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


class MossSpeechGenerationMixin(GenerationMixin):
    """Adds the two-channel `generate` to [`MossSpeechForCausalLM`]."""

    generation_config_class = MossSpeechGenerationConfig

    @property
    def generation_config(self) -> MossSpeechGenerationConfig | None:
        return self.__dict__.get("_moss_generation_config")

    @generation_config.setter
    def generation_config(self, value: GenerationConfig | None) -> None:
        # from_pretrained loads generation_config.json as a plain GenerationConfig: keep ours, with its fields.
        if value is not None and not isinstance(value, MossSpeechGenerationConfig):
            value = MossSpeechGenerationConfig.from_dict(value.to_dict())
        self.__dict__["_moss_generation_config"] = value

    def _resolve_generation_config(
        self, generation_config: GenerationConfig | None, kwargs: dict
    ) -> MossSpeechGenerationConfig:
        base = generation_config if generation_config is not None else self.generation_config
        if base is None:
            base = MossSpeechGenerationConfig()
        config = MossSpeechGenerationConfig.from_dict(base.to_dict())
        known = set(config.to_dict()) | {f"{c}_{f}" for c in MODALITIES for f in CHANNEL_SAMPLING_FIELDS}
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise ValueError(f"generate() got unknown arguments {unknown}; see MossSpeechGenerationConfig.")
        for key, value in kwargs.items():
            setattr(config, key, value)
        return config

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        text_logits_processor: LogitsProcessorList | None = None,
        audio_logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: BaseStreamer | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> torch.LongTensor | MossSpeechGenerateOutput:
        """Continue (B, L, 2) prompts; returns the new rows (B, T, 2), or a [`MossSpeechGenerateOutput`].

        Args:
            input_ids: Left-padded prompt grids (B, L, 2), as the processor builds them.
            attention_mask: (B, L), 0 on left padding. Defaults to all ones.
            generation_config: Overrides the model's; any of its fields may also be passed as keyword arguments
                (`max_new_tokens=...`, `audio_temperature=...`, `lazy_tails=False`, `return_dict_in_generate=True`,
                `output_logits=True`, `use_cache=False`).
            text_logits_processor / audio_logits_processor: Extra processors for one channel, called as
                `processor(channel_history (B, L), scores (B, V))` after the built-in masks and before sampling.
            stopping_criteria: Extra criteria, called with the text-channel history; each returns a (B,) stop flag.
            streamer: Receives every new (B, 2) row through `put`, then `end()`.
            generator: Random generator for sampling (reproducible sampling without touching the global RNG).
        """
        config = self.config
        gen = self._resolve_generation_config(generation_config, kwargs)
        self._check_generate_inputs(input_ids, attention_mask, gen)
        device = input_ids.device
        batch, prompt_len, _ = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, prompt_len, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device=device, dtype=torch.long)

        text_settings, audio_settings = gen.channel_settings("text"), gen.channel_settings("audio")
        warpers = {"text": _warpers(text_settings), "audio": _warpers(audio_settings)}
        extra = {"text": text_logits_processor or [], "audio": audio_logits_processor or []}
        eos_ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        eos_ids = torch.tensor([i for i in eos_ids if i is not None], dtype=torch.long, device=device)
        pad_id = gen.pad_token_id if gen.pad_token_id is not None else config.pad_token_id
        use_cache = gen.use_cache is not False
        lazy = bool(gen.lazy_tails) and use_cache
        min_new = gen.min_new_tokens or 0

        real = attention_mask.bool()
        seen = {
            modality: seen_tokens(input_ids[..., channel], real, size)
            for channel, (modality, size) in enumerate(zip(MODALITIES, (config.vocab_size, config.audio_vocab_size)))
        }

        is_audio = initial_audio_mode(config, input_ids[:, -1])
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        next_pos = attention_mask.sum(-1)
        grid = input_ids
        cache = DynamicCache() if use_cache else None
        pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in MODALITIES}
        new_rows = input_ids
        new_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        row_modes, logged = [], {"text": [], "audio": []}

        for step in range(1, gen.max_new_tokens + 1):
            active = {
                "text": bool((unfinished & ~is_audio).any()) or not lazy,
                "audio": bool((unfinished & is_audio).any()) or not lazy,
            }
            if use_cache:
                logits = self._cached_step(new_rows, new_pos, attention_mask, cache, pending, active)
            else:
                logits = self._uncached_step(grid, attention_mask, active)
            if gen.output_logits:
                for modality in MODALITIES:
                    logged[modality].append(logits.get(modality))

            text_tok = torch.full((batch,), config.modality_pad_token_id, dtype=torch.long, device=device)
            audio_tok = torch.full((batch,), config.audio_pad_token_id, dtype=torch.long, device=device)
            scores_for_stop = None
            if "text" in logits and bool((unfinished & ~is_audio).any()):
                scores = self._process("text", logits["text"], grid[..., 0], seen, text_settings, warpers, extra)
                text_tok = torch.where(is_audio, text_tok, _choose(scores, text_settings["do_sample"], generator))
                scores_for_stop = scores
            if "audio" in logits and bool((unfinished & is_audio).any()):
                scores = logits["audio"].float().clone()
                scores[:, config.eosp_token_id + 1 :] = float("-inf")
                if step <= min_new:
                    scores[:, config.eosp_token_id] = float("-inf")
                scores = self._process("audio", scores, grid[..., 1], seen, audio_settings, warpers, extra)
                audio_tok = torch.where(is_audio, _choose(scores, audio_settings["do_sample"], generator), audio_tok)
            text_tok = torch.where(unfinished, text_tok, torch.full_like(text_tok, pad_id))
            audio_tok = torch.where(unfinished, audio_tok, torch.full_like(audio_tok, config.audio_pad_token_id))
            row = torch.stack([text_tok, audio_tok], dim=-1)

            row_modes.append(is_audio)
            lengths += unfinished.long()
            for channel, modality in enumerate(MODALITIES):
                seen[modality][unfinished, row[unfinished, channel]] = True
            grid = torch.cat([grid, row[:, None, :]], dim=1)
            attention_mask = torch.cat([attention_mask, unfinished.long()[:, None]], dim=1)
            stop = ~is_audio & torch.isin(text_tok, eos_ids)
            if stopping_criteria:
                stop = stop | stopping_criteria(grid[..., 0], scores_for_stop).to(device)
            is_audio = update_audio_mode(config, is_audio, row)
            unfinished = unfinished & ~stop
            if streamer is not None:
                streamer.put(row)
            if not bool(unfinished.any()):
                break
            new_rows = row[:, None, :]
            new_pos = next_pos[:, None]
            next_pos = next_pos + 1

        if streamer is not None:
            streamer.end()
        sequences = grid[:, prompt_len:]
        if not gen.return_dict_in_generate:
            return sequences
        return MossSpeechGenerateOutput(
            sequences=sequences,
            lengths=lengths,
            modality_spans=modality_spans(torch.stack(row_modes, dim=1), lengths),
            text_logits=tuple(logged["text"]) if gen.output_logits else None,
            audio_logits=tuple(logged["audio"]) if gen.output_logits else None,
        )

    def _check_generate_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, gen: MossSpeechGenerationConfig
    ) -> None:
        self.config.check_grid(input_ids)
        if attention_mask is not None:
            is_tensor = isinstance(attention_mask, torch.Tensor)
            if not is_tensor or tuple(attention_mask.shape) != tuple(input_ids.shape[:2]):
                shape = tuple(attention_mask.shape) if is_tensor else attention_mask
                raise ValueError(
                    f"attention_mask must have shape (batch, length) = {tuple(input_ids.shape[:2])}, got {shape}."
                )
            if not bool(attention_mask[:, -1].bool().all()):
                raise ValueError("attention_mask: generate expects left padding, but a prompt ends with padding.")
        max_new = gen.max_new_tokens
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new!r}.")
        for channel in MODALITIES:
            _check_settings(channel, gen.channel_settings(channel))
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        for token in eos:
            if token is not None and not 0 <= token < self.config.vocab_size:
                raise ValueError(
                    f"eos_token_id {token} is outside the text vocabulary [0, {self.config.vocab_size}); set "
                    "generation_config.eos_token_id to the ids that end a turn."
                )
        if gen.num_beams not in (None, 1):
            raise ValueError(f"num_beams={gen.num_beams} is not supported (sampling or greedy only).")

    def _process(
        self,
        modality: str,
        logits: torch.Tensor,
        history: torch.Tensor,
        seen: dict[str, torch.BoolTensor],
        settings: dict,
        warpers: dict[str, LogitsProcessorList],
        extra: dict[str, list[Callable]],
    ) -> torch.Tensor:
        scores = _penalize(logits.float(), seen[modality], settings["repetition_penalty"])
        for processor in extra[modality]:
            scores = processor(history, scores)
        return warpers[modality](history, scores)

    def _cached_step(
        self,
        new_rows: torch.Tensor,
        new_pos: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
        pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        active: dict[str, bool],
    ) -> dict[str, torch.Tensor]:
        model = self.model
        embeds = model.embed_grid(new_rows)
        rotary = model.rotary_emb(embeds, new_pos)
        masks = model._mask_mapping(embeds, attention_mask, cache, new_pos, model.shared_block)
        shared = model.shared_block(embeds, masks, rotary, new_pos, cache, True)
        logits = {}
        for modality in MODALITIES:
            pending[modality].append((shared, new_pos))
            if not active[modality]:
                continue
            block, norm = model.tail(modality)
            if len(pending[modality]) == 1 and set(block.layer_types) <= masks.keys():
                # In step with the trunk: its mask and rotary embeddings are this tail's too.
                hidden = norm(block(shared, masks, rotary, new_pos, cache, True))
            else:
                hidden_in = torch.cat([h for h, _ in pending[modality]], dim=1)
                positions = torch.cat([p for _, p in pending[modality]], dim=1)
                hidden = model.run_tail(modality, hidden_in, attention_mask, positions, cache, True)
            pending[modality].clear()
            logits[modality] = self.head(modality)(hidden[:, -1, :])
        return logits

    def _uncached_step(
        self, grid: torch.Tensor, attention_mask: torch.Tensor, active: dict[str, bool]
    ) -> dict[str, torch.Tensor]:
        modalities = tuple(m for m in MODALITIES if active[m])
        out = self(input_ids=grid, attention_mask=attention_mask, use_cache=False, modalities=modalities,
                   logits_to_keep=1)
        return {m: getattr(out, f"{m}_logits")[:, -1, :] for m in modalities}


__all__ = [
    "MossSpeechGenerateOutput",
    "MossSpeechGenerationConfig",
    "MossSpeechGenerationMixin",
    "initial_audio_mode",
    "modality_spans",
    "seen_tokens",
    "update_audio_mode",
]

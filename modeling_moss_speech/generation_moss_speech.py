"""Generation for MOSS-Speech: the modality state machine, per-channel sampling and lazy tails.

Written from transformers' public pieces (logits warpers, `Cache`, stopping criteria, `BaseStreamer`) instead of
overriding `GenerationMixin`'s private sampling methods, whose signatures change between releases.

The release's rules, kept here:
- a row is sampled in text mode until the text channel emits `sosp_token_id`, then in audio mode until the
  audio channel emits `eosp_token_id`; the mode is read off the last appended row before every step;
- in audio mode the text channel is written as `modality_pad_token_id`;
- audio ids above `eosp_token_id` are never sampled, and `eosp_token_id` is forbidden before `min_new_tokens`;
- each channel has its own repetition penalty, temperature, top-k and top-p.

Standard generation features that apply to a two-channel grid go through transformers' public logits processors
(`NoBadWordsLogitsProcessor`, `NoRepeatNGramLogitsProcessor`) per channel; every other standard `GenerationConfig`
field (beam search, assisted decoding, constrained decoding, hidden-state outputs, ...) is refused with a
`ValueError` naming it, never silently ignored (`unsupported_generation_fields`).

Deliberate differences from the release, each a fix:
- stopping is decided per batch row (the release looked at row 0 only);
- in text mode the audio channel is written as `audio_pad_token_id` (the release kept a sampled code that the
  embedding rule ignores): the generated grid then has the same form as the processor's grids, and the audio
  tail does not have to run on text steps (lazy tails, below);
- the repetition penalty ignores left padding, so a padded batch row behaves as the same prompt alone.

Lazy tails: while decoding, only the tail of the modality being sampled runs; the trunk outputs the other tail
missed are kept and run through it in one batched pass when its modality is needed again. `lazy_tails=False`
runs both tails every step (the release's behaviour); both give the same logits and tokens.

Static cache and `torch.compile`: `cache_implementation="static"` decodes into a fixed-size cache (one slot per
runtime layer, see `MossSpeechPreTrainedModel.new_cache`) with a fixed-size padding mask, so a single-row decode
step (embed → trunk → active tails → heads) has the same shapes at every step and compiles into one graph without
breaks. The lazy-tail catch-up has a variable length (the rows a tail missed), so it is not compiled: when a tail
comes back, its missed rows run eagerly first, then the compiled single-row step runs trunk and tails together.
Catch-ups happen once per modality switch, a few times per turn, so compiling them (or padding them to fixed
buckets) would buy little and cost one graph per bucket.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.configuration_utils import CompileConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput, logging

from ._compat import compile_on_any_device
from .configuration_moss_speech import MODALITIES
from .grid_moss_speech import GridLayout

logger = logging.get_logger(__name__)

CHANNEL_SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
# Per-channel processor settings. Unlike the sampling fields, the shared standard field is the text channel's only:
# its ids and n-grams are the tokenizer's, and speech codes repeat n-grams (silence) by nature.
CHANNEL_PROCESSOR_FIELDS = ("bad_words_ids", "no_repeat_ngram_size")
CHANNEL_FIELDS = CHANNEL_SAMPLING_FIELDS + CHANNEL_PROCESSOR_FIELDS
# Standard GenerationConfig fields that generate() reads (num_beams only as 1). Every other standard field must be
# unset (None) or hold its no-op value from NEUTRAL_VALUES, else generate() refuses the call.
SUPPORTED_FIELDS = frozenset({
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "bad_words_ids", "no_repeat_ngram_size", "num_return_sequences", "use_cache", "cache_implementation",
    "max_cache_len", "compile_config", "disable_compile", "eos_token_id", "pad_token_id", "output_logits",
    "output_scores", "return_dict_in_generate", "transformers_version",
    # Only used by transformers when there is no prompt; generate() always takes one.
    "bos_token_id",
})
NEUTRAL_VALUES = {
    "num_beams": (1,), "num_beam_groups": (1,), "diversity_penalty": (0.0,), "length_penalty": (1.0,),
    "early_stopping": (False,), "min_length": (0,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,), "encoder_repetition_penalty": (1.0,), "encoder_no_repeat_ngram_size": (0,),
    "renormalize_logits": (False,), "remove_invalid_values": (False,), "output_attentions": (False,),
    "output_hidden_states": (False,), "guidance_scale": (1.0,), "token_healing": (False,), "low_memory": (False,),
    "is_assistant": (False,), "use_mtp": (False,), "suppress_tokens": ([],), "begin_suppress_tokens": ([],),
    # Knobs of assisted decoding at transformers' defaults: inert, since assisted decoding cannot be switched on.
    "num_assistant_tokens": (20,), "num_assistant_tokens_schedule": ("constant", "heuristic"),
    "assistant_confidence_threshold": (0.4,), "assistant_lookbehind": (10,), "target_lookbehind": (10,),
    "max_matching_ngram_size": (2,),
}
_ASSISTED = "assisted decoding (draft models, prompt lookup, early exit, multi-token prediction) is not supported"
UNSUPPORTED_REASONS = {
    "num_beams": "beam search is not supported (sampling or greedy only)",
    "num_beam_groups": "beam search is not supported", "diversity_penalty": "beam search is not supported",
    "length_penalty": "beam search is not supported", "early_stopping": "beam search is not supported",
    "constraints": "constrained beam search is not supported",
    "force_words_ids": "constrained beam search is not supported",
    "max_length": "use max_new_tokens (rows generated after the prompt)",
    "min_length": "use min_new_tokens",
    "output_attentions": "generate() does not return attentions; run the model's forward on the generated grid",
    "output_hidden_states": "generate() does not return hidden states; run the model's forward on the generated grid",
    "stop_strings": "pass stopping_criteria (called with the text channel's history)",
    "prompt_lookup_num_tokens": _ASSISTED, "assistant_early_exit": _ASSISTED, "use_mtp": _ASSISTED,
    "is_assistant": _ASSISTED, "speculation_type": _ASSISTED,
    "penalty_alpha": "contrastive search is not supported", "dola_layers": "DoLa decoding is not supported",
    "guidance_scale": "classifier-free guidance is not supported",
    "decoder_start_token_id": "MOSS-Speech is a decoder-only model",
}
# transformers' generate() arguments that are not config fields, with what to do instead.
UNSUPPORTED_ARGUMENTS = {
    "assistant_model": _ASSISTED, "assistant_tokenizer": _ASSISTED,
    "logits_processor": "pass per-channel text_logits_processor / audio_logits_processor",
    "prefix_allowed_tokens_fn": "pass per-channel text_logits_processor / audio_logits_processor",
    "negative_prompt_ids": "classifier-free guidance is not supported",
    "negative_prompt_attention_mask": "classifier-free guidance is not supported",
    "synced_gpus": "synchronised multi-GPU decoding is not supported",
    "tokenizer": "stop strings are not supported; pass stopping_criteria",
    "inputs_embeds": "generate() needs the (batch, length, 2) token grid input_ids",
    "past_key_values": "generate() builds its own cache (see cache_implementation)",
    "custom_generate": "MOSS-Speech has its own generate()",
}
CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
# Static caches are sized up to a multiple of this when compiling, so prompts of similar length share one graph.
STATIC_CACHE_BUCKET = 128


class MossSpeechGenerationConfig(GenerationConfig):
    """`GenerationConfig` with per-channel sampling settings; defaults are the release's demo settings.

    Besides every standard field, it holds `text_<field>` and `audio_<field>` for `<field>` in
    `do_sample, temperature, top_k, top_p, repetition_penalty`; a per-channel value of `None` falls back to the
    shared field. `text_`/`audio_` `bad_words_ids` and `no_repeat_ngram_size` exist too, but the shared
    `bad_words_ids` / `no_repeat_ngram_size` are the text channel's only (tokenizer ids and n-grams); the audio
    channel has only its own. Special ids (`eos_token_id`, `pad_token_id`) are never made up: they are the model
    config's (`from_model_config`, which is what a model without a `generation_config.json` uses) or the caller's.
    `lazy_tails` (default `True`) runs only the tail of the active modality while decoding.
    `cache_implementation` is `"dynamic"` (default) or `"static"`; `compile` (default `None`) compiles the
    single-row decode step with `torch.compile` (`compile_config`): `True` forces it (and a static cache),
    `False` forbids it, `None` compiles as transformers does, i.e. with a static cache on an accelerator, or on
    CPU when transformers' compile-on-every-device flag is set (`_compat.compile_on_any_device`). Saved as
    `generation_config.json` like any generation config.

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
    }

    def __init__(self, **kwargs) -> None:
        for key, value in self.release_defaults.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        for channel in MODALITIES:
            for field in CHANNEL_FIELDS:
                setattr(self, f"{channel}_{field}", kwargs.pop(f"{channel}_{field}", None))
        self.lazy_tails = kwargs.pop("lazy_tails", True)
        self.compile = kwargs.pop("compile", None)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> MossSpeechGenerationConfig:
        """Release sampling defaults with the special ids the model config sets, and no others."""
        values = model_config if isinstance(model_config, dict) else model_config.to_dict()
        ids = {k: values[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if values.get(k) is not None}
        return cls(**ids)

    def channel_settings(self, channel: str) -> dict:
        """Resolved sampling settings of `channel` ("text" or "audio")."""
        if channel not in MODALITIES:
            raise ValueError(f"channel must be one of {MODALITIES}, got {channel!r}.")
        settings = {}
        for field in CHANNEL_FIELDS:
            value = getattr(self, f"{channel}_{field}", None)
            shared = getattr(self, field) if field in CHANNEL_SAMPLING_FIELDS or channel == "text" else None
            settings[field] = shared if value is None else value
        return settings


@functools.cache
def _standard_fields() -> tuple[str, ...]:
    """The public fields of a fresh `GenerationConfig` of the installed transformers (built once)."""
    return tuple(field for field in vars(GenerationConfig()) if not field.startswith("_"))


def unsupported_generation_fields(config: GenerationConfig) -> dict[str, str]:
    """Standard `GenerationConfig` fields set to a value MOSS-Speech's generate() cannot honour → why.

    The standard fields are those of a fresh `GenerationConfig` of the installed transformers, so a field added by
    a later release is refused until it is supported here, rather than silently ignored.
    """
    problems = {}
    for field in _standard_fields():
        if field in SUPPORTED_FIELDS:
            continue
        value = getattr(config, field, None)
        if value is None or value in NEUTRAL_VALUES.get(field, ()):
            continue
        problems[field] = f"{field}={value!r}: {UNSUPPORTED_REASONS.get(field, 'not supported by MOSS-Speech')}"
    return problems


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
        text_scores: With `output_scores=True`, per step, the processed (B, vocab_size) text scores sampled from
            (after penalties, processors and warpers), or `None` where no element sampled text. An element's row is
            meaningful only on steps where it sampled text (see `modality_spans` and `lengths`).
        audio_scores: The same for the audio channel (ids above end-of-speech are `-inf`).

    With `num_return_sequences=n`, element `i * n + j` is the `j`-th sequence of prompt `i`.
    """

    sequences: torch.LongTensor | None = None
    lengths: torch.LongTensor | None = None
    modality_spans: list[list[tuple[str, int, int]]] | None = None
    text_logits: tuple[torch.FloatTensor | None, ...] | None = None
    audio_logits: tuple[torch.FloatTensor | None, ...] | None = None
    text_scores: tuple[torch.FloatTensor | None, ...] | None = None
    audio_scores: tuple[torch.FloatTensor | None, ...] | None = None


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


def _channel_processors(channel: str, settings: dict, vocab_size: int, eos_token_id: list[int]) -> list:
    """The public transformers processors for `channel`'s `bad_words_ids` / `no_repeat_ngram_size` (validated)."""
    processors: list[LogitsProcessor] = []
    size = settings["no_repeat_ngram_size"]
    if size is not None and size != 0:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{channel} no_repeat_ngram_size must be an integer >= 0, got {size!r}.")
        processors.append(NoRepeatNGramLogitsProcessor(size))
    bad_words = settings["bad_words_ids"]
    if bad_words is not None:
        try:
            # eos ids stay allowed as single bad words, as in transformers (a turn must be able to end).
            processor = NoBadWordsLogitsProcessor(bad_words, eos_token_id=eos_token_id or None)
        except ValueError as error:
            raise ValueError(f"{channel} bad_words_ids: {error}") from error
        outside = sorted({i for word in bad_words for i in word if i >= vocab_size})
        if outside:
            raise ValueError(f"{channel} bad_words_ids holds ids {outside} outside the {channel} vocabulary "
                             f"[0, {vocab_size}).")
        processors.append(processor)
    return processors


def channel_histories(grid: torch.LongTensor, mask: torch.Tensor, modality_pad_token_id: int) -> dict[str, list]:
    """Per channel, per element, the ids of that channel's own rows (the embedding rule: a row is speech iff its
    text id is the modality pad), padding left out: what the n-gram and bad-word processors look at."""
    speech = grid[..., 0] == modality_pad_token_id
    real = mask.bool()
    histories = {}
    for channel, (modality, own) in enumerate(zip(MODALITIES, (~speech, speech))):
        keep = (own & real).tolist()
        histories[modality] = [[i for i, k in zip(ids, flags) if k] for ids, flags in
                               zip(grid[..., channel].tolist(), keep)]
    return histories


def _apply_channel_processors(
    scores: torch.Tensor, processors: list, histories: list[list[int]] | None, rows: torch.BoolTensor
) -> torch.Tensor:
    """Run `processors` element by element on the `rows` being sampled, each on its own unpadded history."""
    if not processors:
        return scores
    scores = scores.clone()
    for index in rows.nonzero().flatten().tolist():
        history = torch.tensor([histories[index]], dtype=torch.long, device=scores.device)
        row = scores[index : index + 1]
        for processor in processors:
            row = processor(history, row)
        scores[index : index + 1] = row
    return scores


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
            base = MossSpeechGenerationConfig.from_model_config(self.config)
        config = MossSpeechGenerationConfig.from_dict(base.to_dict())
        refused = sorted(k for k in kwargs if k in UNSUPPORTED_ARGUMENTS)
        if refused:
            raise ValueError("generate() does not take " + "; ".join(f"{k} ({UNSUPPORTED_ARGUMENTS[k]})"
                                                                        for k in refused) + ".")
        known = set(config.to_dict()) | {f"{c}_{f}" for c in MODALITIES for f in CHANNEL_FIELDS}
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
                `output_logits=True`, `output_scores=True`, `num_return_sequences=4`, `bad_words_ids=[[...]]`,
                `no_repeat_ngram_size=3`, `audio_no_repeat_ngram_size=...`, `use_cache=False`,
                `cache_implementation="static"`, `compile=True`). Standard fields that do not apply to this model
                (beam search, assisted decoding, `output_hidden_states`, ...) raise a `ValueError` naming them.
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
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if gen.num_return_sequences not in (None, 1):
            # As transformers does: each prompt repeated in place, its sequences next to each other.
            input_ids = input_ids.repeat_interleave(gen.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(gen.num_return_sequences, dim=0)
        batch, prompt_len, _ = input_ids.shape

        text_settings, audio_settings = gen.channel_settings("text"), gen.channel_settings("audio")
        warpers = {"text": _warpers(text_settings), "audio": _warpers(audio_settings)}
        extra = {"text": text_logits_processor or [], "audio": audio_logits_processor or []}
        eos_list = [i for i in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
                    if i is not None]
        eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device)
        channel_processors = {
            "text": _channel_processors("text", text_settings, config.vocab_size, eos_list),
            "audio": _channel_processors("audio", audio_settings, config.audio_vocab_size, []),
        }
        uses_history = bool(channel_processors["text"] or channel_processors["audio"])
        histories = channel_histories(input_ids, attention_mask, config.modality_pad_token_id) if uses_history else {}
        pad_id = next((i for i in (gen.pad_token_id, config.pad_token_id, *eos_list) if i is not None), None)
        if pad_id is None:
            if stopping_criteria:
                raise ValueError(
                    "pad_token_id is unset (generation config and model config) and there is no eos_token_id: "
                    "set pad_token_id, the text id written after an element stops."
                )
            pad_id = config.modality_pad_token_id  # never written: without eos or criteria no element stops early
        use_cache = gen.use_cache is not False
        lazy = bool(gen.lazy_tails) and use_cache
        min_new = gen.min_new_tokens or 0
        compiled_step = self._decode_compile(gen, device)
        static = use_cache and (gen.cache_implementation == "static" or compiled_step is not None)

        real = attention_mask.bool()
        seen = {
            modality: seen_tokens(input_ids[..., channel], real, size)
            for channel, (modality, size) in enumerate(zip(MODALITIES, (config.vocab_size, config.audio_vocab_size)))
        }

        layout = GridLayout.from_config(config)
        is_audio = layout.initial_audio_mode(input_ids[:, -1])
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        next_pos = attention_mask.sum(-1)
        grid = input_ids
        cache, step_mask = None, attention_mask
        if static:
            needed = prompt_len + gen.max_new_tokens
            max_cache_len = gen.max_cache_len or (
                -(-needed // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET if compiled_step is not None else needed
            )
            cache = self.new_cache(batch, max_cache_len, static=True)
            # Fixed-size padding mask (column j = row j of every layer's cache): the same shape at every step.
            step_mask = attention_mask.new_zeros(batch, max_cache_len)
            step_mask[:, :prompt_len] = attention_mask
        elif use_cache:
            cache = DynamicCache()
        pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in MODALITIES}
        new_rows = input_ids
        new_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        row_modes, logged, scored = [], {"text": [], "audio": []}, {"text": [], "audio": []}

        for step in range(1, gen.max_new_tokens + 1):
            active = {
                "text": bool((unfinished & ~is_audio).any()) or not lazy,
                "audio": bool((unfinished & is_audio).any()) or not lazy,
            }
            if use_cache:
                logits = self._cached_step(new_rows, new_pos, step_mask, cache, pending, active, compiled_step)
            else:
                logits = self._uncached_step(grid, attention_mask, active)
            if gen.output_logits:
                for modality in MODALITIES:
                    logged[modality].append(logits.get(modality))

            text_tok = torch.full((batch,), config.modality_pad_token_id, dtype=torch.long, device=device)
            audio_tok = torch.full((batch,), config.audio_pad_token_id, dtype=torch.long, device=device)
            scores_for_stop = None
            step_scores = {"text": None, "audio": None}
            if "text" in logits and bool((unfinished & ~is_audio).any()):
                scores = _penalize(logits["text"].float(), seen["text"], text_settings["repetition_penalty"])
                scores = _apply_channel_processors(scores, channel_processors["text"], histories.get("text"),
                                                   unfinished & ~is_audio)
                scores = self._process("text", scores, grid[..., 0], extra, warpers)
                text_tok = torch.where(is_audio, text_tok, _choose(scores, text_settings["do_sample"], generator))
                scores_for_stop = step_scores["text"] = scores
            if "audio" in logits and bool((unfinished & is_audio).any()):
                scores = logits["audio"].float().clone()
                scores[:, config.eosp_token_id + 1 :] = float("-inf")
                if step <= min_new:
                    scores[:, config.eosp_token_id] = float("-inf")
                scores = _penalize(scores, seen["audio"], audio_settings["repetition_penalty"])
                scores = _apply_channel_processors(scores, channel_processors["audio"], histories.get("audio"),
                                                   unfinished & is_audio)
                scores = self._process("audio", scores, grid[..., 1], extra, warpers)
                audio_tok = torch.where(is_audio, _choose(scores, audio_settings["do_sample"], generator), audio_tok)
                step_scores["audio"] = scores
            if gen.output_scores:
                for modality in MODALITIES:
                    scored[modality].append(step_scores[modality])
            text_tok = torch.where(unfinished, text_tok, torch.full_like(text_tok, pad_id))
            audio_tok = torch.where(unfinished, audio_tok, torch.full_like(audio_tok, config.audio_pad_token_id))
            row = torch.stack([text_tok, audio_tok], dim=-1)

            row_modes.append(is_audio)
            lengths += unfinished.long()
            for channel, modality in enumerate(MODALITIES):
                seen[modality][unfinished, row[unfinished, channel]] = True
            if uses_history:
                speech_row = layout.is_speech_row(row)
                for index in unfinished.nonzero().flatten().tolist():
                    speech = bool(speech_row[index])
                    histories[MODALITIES[int(speech)]][index].append(int(row[index, int(speech)]))
            grid = torch.cat([grid, row[:, None, :]], dim=1)
            if static:
                step_mask[:, prompt_len + step - 1] = unfinished.long()
            else:
                attention_mask = torch.cat([attention_mask, unfinished.long()[:, None]], dim=1)
                step_mask = attention_mask
            stop = ~is_audio & torch.isin(text_tok, eos_ids)
            if stopping_criteria:
                stop = stop | stopping_criteria(grid[..., 0], scores_for_stop).to(device)
            is_audio = layout.update_audio_mode(is_audio, row)
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
            text_scores=tuple(scored["text"]) if gen.output_scores else None,
            audio_scores=tuple(scored["audio"]) if gen.output_scores else None,
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
        problems = unsupported_generation_fields(gen)
        if problems:
            raise ValueError(
                "generate() cannot honour " + "; ".join(problems.values()) + ". Leave these fields unset."
            )
        count = gen.num_return_sequences
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {count!r}.")
        if count not in (None, 1) and not any(gen.channel_settings(c)["do_sample"] for c in MODALITIES):
            raise ValueError(
                f"num_return_sequences={count} with greedy decoding in both channels would return {count} identical "
                "sequences: set do_sample=True (or text_do_sample / audio_do_sample)."
            )
        for flag in ("output_scores", "output_logits"):
            if getattr(gen, flag) and not gen.return_dict_in_generate:
                raise ValueError(f"{flag}=True needs return_dict_in_generate=True (the plain output is the grid).")
        if gen.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"cache_implementation={gen.cache_implementation!r} is not supported by MOSS-Speech generate; use "
                "'dynamic' (default) or 'static'."
            )
        if gen.compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None (automatic), got {gen.compile!r}.")
        if gen.compile is True and gen.cache_implementation == "dynamic":
            raise ValueError("compile=True needs a static cache, but cache_implementation='dynamic' was asked for.")
        if gen.use_cache is False and (gen.compile is True or gen.cache_implementation == "static"):
            raise ValueError(
                f"use_cache=False cannot be combined with compile={gen.compile} / "
                f"cache_implementation={gen.cache_implementation!r}."
            )
        needed = input_ids.shape[1] + max_new
        if gen.max_cache_len is not None and gen.max_cache_len < needed:
            raise ValueError(
                f"max_cache_len={gen.max_cache_len} is smaller than the prompt plus max_new_tokens ({needed} rows)."
            )

    def _process(
        self,
        modality: str,
        scores: torch.Tensor,
        history: torch.Tensor,
        extra: dict[str, list[Callable]],
        warpers: dict[str, LogitsProcessorList],
    ) -> torch.Tensor:
        """The caller's processors for `modality`, then its sampling warpers."""
        for processor in extra[modality]:
            scores = processor(history, scores)
        return warpers[modality](history, scores)

    def _cached_step(
        self,
        new_rows: torch.Tensor,
        new_pos: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache,
        pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        active: dict[str, bool],
        compiled_step: Callable | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the trunk on `new_rows` and the active tails (catching up on rows they missed); logits of the last row,
        on the rows' device."""
        model = self.model
        device = new_rows.device
        if compiled_step is not None and new_rows.shape[1] == 1:
            run = tuple(m for m in MODALITIES if active[m])
            for modality in run:
                self._catch_up(modality, attention_mask, cache, pending)
            shared, logits = compiled_step(new_rows, new_pos, attention_mask, cache, run)
            # Copies: graph outputs may live in buffers the next replay overwrites (CUDA graphs).
            shared = shared.clone()
            for modality in MODALITIES:
                if modality not in run:
                    pending[modality].append((shared, new_pos))
            return {m: value.to(device, copy=True) for m, value in zip(run, logits)}
        embeds = model.embed_grid(new_rows)
        rotary = model.rotary_emb(embeds, new_pos)
        masks = model._mask_mapping(embeds, attention_mask, cache, new_pos, model.shared_block)
        shared = model.shared_block(embeds, masks, rotary, new_pos, cache=cache, use_cache=True)
        logits = {}
        for modality in MODALITIES:
            pending[modality].append((shared, new_pos))
            if not active[modality]:
                continue
            block, norm = model.tail(modality)
            if len(pending[modality]) == 1 and all(kind in masks for kind in block.layer_types):
                # In step with the trunk: its mask and rotary embeddings are this tail's too.
                hidden = norm(block(shared, masks, rotary, new_pos, cache=cache, use_cache=True))
            else:
                hidden_in = torch.cat([h for h, _ in pending[modality]], dim=1)
                positions = torch.cat([p for _, p in pending[modality]], dim=1)
                hidden = model.run_tail(modality, hidden_in, attention_mask, positions, cache, True)
            pending[modality].clear()
            logits[modality] = self.head(modality)(hidden[:, -1, :]).to(device)
        return logits

    def _catch_up(
        self,
        modality: str,
        attention_mask: torch.Tensor,
        cache: Cache,
        pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    ) -> None:
        """Push the trunk outputs the `modality` tail missed through it (eagerly: their number varies)."""
        if not pending[modality]:
            return
        block, _ = self.model.tail(modality)
        hidden_in = torch.cat([h for h, _ in pending[modality]], dim=1)
        positions = torch.cat([p for _, p in pending[modality]], dim=1)
        self.model.run_block(block, hidden_in, attention_mask, positions, cache, True)
        pending[modality].clear()

    def decode_step(
        self,
        rows: torch.LongTensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        cache: Cache,
        modalities: tuple[str, ...],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One decode step for tails in step with the trunk: the function `generate` compiles.

        Args:
            rows: (B, 1, 2) new grid rows; position_ids: (B, 1) their positions.
            attention_mask: (B, max_cache_len) padding mask over every cache slot (static cache) or
                (B, cached + 1) (dynamic cache).
            cache: The cache (its `modalities` tails hold exactly as many rows as the trunk).
            modalities: The tails to run.

        Returns:
            The trunk output (B, 1, H) and, per modality, the logits (B, vocab) of the new row.
        """
        model = self.model
        embeds = model.embed_grid(rows)
        rotary = model.rotary_emb(embeds, position_ids)
        masks = model._mask_mapping(embeds, attention_mask, cache, position_ids, model.shared_block)
        shared = model.shared_block(embeds, masks, rotary, position_ids, cache=cache, use_cache=True)
        logits = []
        for modality in modalities:
            block, norm = model.tail(modality)
            # `all(... in ...)`, not a set comparison with dict keys: torch<2.13's dynamo cannot trace the latter
            if not all(kind in masks for kind in block.layer_types):
                masks = {**masks, **model._mask_mapping(shared, attention_mask, cache, position_ids, block)}
            hidden = norm(block(shared, masks, rotary, position_ids, cache=cache, use_cache=True))
            logits.append(self.head(modality)(hidden[:, -1, :]))
        return shared, tuple(logits)

    def _decode_compile(self, gen: MossSpeechGenerationConfig, device: torch.device) -> Callable | None:
        """The compiled `decode_step` when this generate call should use it (see `MossSpeechGenerationConfig`)."""
        if gen.compile is False or gen.disable_compile or gen.use_cache is False:
            return None
        devices = set(getattr(self, "hf_device_map", {}).values())
        offloaded = "disk" in devices or ("cpu" in devices and len(devices) > 1)
        if gen.compile is None:
            compile_config = gen.compile_config
            on_accelerator = device.type in ("cuda", "xpu") or compile_on_any_device(compile_config)
            if gen.cache_implementation != "static" or not on_accelerator or offloaded:
                return None
        elif offloaded:
            raise ValueError(
                "compile=True cannot be used with a model offloaded to cpu/disk (device_map values "
                f"{sorted(map(str, devices))}): accelerate's offload hooks move weights during the forward pass."
            )
        compile_config = gen.compile_config or CompileConfig(
            fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default"
        )
        key = repr(sorted(compile_config.to_dict().items()))
        compiled = self.__dict__.get("_moss_compiled_decode")
        if compiled is None or compiled[0] != key:
            compiled = (key, torch.compile(self.decode_step, **compile_config.to_dict()))
            self.__dict__["_moss_compiled_decode"] = compiled
        return compiled[1]

    def _uncached_step(
        self, grid: torch.Tensor, attention_mask: torch.Tensor, active: dict[str, bool]
    ) -> dict[str, torch.Tensor]:
        modalities = tuple(m for m in MODALITIES if active[m])
        out = self(input_ids=grid, attention_mask=attention_mask, use_cache=False, modalities=modalities,
                   logits_to_keep=1)
        return {m: getattr(out, f"{m}_logits")[:, -1, :].to(grid.device) for m in modalities}


__all__ = [
    "MossSpeechGenerateOutput",
    "MossSpeechGenerationConfig",
    "MossSpeechGenerationMixin",
    "modality_spans",
    "seen_tokens",
]

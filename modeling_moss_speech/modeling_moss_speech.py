"""MOSS-Speech language model: a Qwen3 decoder split by modality, with a two-channel token grid.

The module tree and parameter names are the release's, so its safetensors load without any key mapping:
`model.{embed_tokens,audio_embed,shared_block,text_block,audio_block,text_norm,audio_norm}` and
`{text,audio}_lm_head`. Every decoder layer is transformers' own `Qwen3DecoderLayer`.
"""

import copy
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3Attention,
    Qwen3DecoderLayer,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ._compat import allocate_cache_layer, cache_adds_layers
from .configuration_moss_speech import MODALITIES, MossSpeechConfig, is_tracing
from .generation_moss_speech import MossSpeechGenerationConfig, MossSpeechGenerationMixin
from .loading import checked_from_pretrained

logger = logging.get_logger(__name__)

# Hub arguments of `from_pretrained` that the config loader needs too (to validate a device_map before loading).
_CONFIG_LOADING_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
                          "proxies")


def runtime_cache_config(config: MossSpeechConfig) -> MossSpeechConfig:
    """A config with one layer per runtime attention layer (`config.num_runtime_layers`): trunk, text tail, audio tail.

    This is `config.get_text_config(decoder=True)`, the config transformers' cache classes size themselves from, so
    `DynamicCache(config=model.config)` and `StaticCache(config=model.config, max_cache_len=n)` already have a slot for
    every layer of the model; kept as a function for callers that name it.
    """
    return config.get_text_config(decoder=True)


# Keyword arguments a forward accepts besides its named ones: what transformers passes through models to the attention
# implementations (flash-attention varlen metadata, `is_causal`, the output-recording flags, ...).
_PASS_THROUGH_KWARGS = frozenset(TransformersKwargs.__annotations__) | frozenset(FlashAttentionKwargs.__annotations__)


def check_kwargs(kwargs: dict, allowed: frozenset[str], where: str) -> None:
    """Raise a `TypeError` naming every keyword argument of `kwargs` outside `allowed` (instead of ignoring it)."""
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}.")


def cache_length(cache: Cache | None, layer_idx: int) -> int:
    """Positions held by cache slot `layer_idx`, as a Python int (static layers report a 0-d tensor)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


def module_device(module: nn.Module) -> torch.device | None:
    """The device `module` computes on: its accelerate hook's execution device (set by `device_map` dispatch,
    also for offloaded weights), else the device of its first materialised parameter; `None` if unknown."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device)
        for param in sub.parameters(recurse=False):
            if param.device.type != "meta":
                return param.device
    return None


def check_device_map(model: nn.Module, device_map: dict) -> None:
    """Raise a `ValueError` naming the first `device_map` entry that is not a module/parameter of `model`, has an
    invalid device, or the modules no entry covers (transformers would silently put those on "cpu")."""
    names = {name for name, _ in model.named_modules()}
    names |= {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    for key, device in device_map.items():
        if not isinstance(key, str):
            raise TypeError(f"device_map keys must be module names (str), got {key!r} of type {type(key).__name__}.")
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            top = sorted({name.split(".")[0] for name in names if name})
            layers = [f"{name}.0-{len(module) - 1}" for name, module in model.named_modules()
                      if name.endswith(".layers") and isinstance(module, nn.ModuleList)]
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"device_map entry {key!r} is not a module of {type(model).__name__}.{hint} Top-level modules: "
                f"{top}" + (f"; decoder layers: {', '.join(layers)}." if layers else ".")
            )
        if isinstance(device, bool) or not (isinstance(device, (int, str, torch.device))):
            raise ValueError(
                f"device_map[{key!r}] = {device!r} is not a device (an int, 'cpu', 'cuda:0', 'disk', ...)."
            )
        if isinstance(device, int) and device < 0:
            raise ValueError(f"device_map[{key!r}] = {device} is not a device index (>= 0).")
        if isinstance(device, str) and device != "disk":
            try:
                torch.device(device)
            except RuntimeError as error:
                raise ValueError(
                    f"device_map[{key!r}] = {device!r} is not a device ('cpu', 'cuda:0', 'disk', an int, ...)."
                ) from error
    if "" in device_map:
        return
    params = [name for name, _ in model.named_parameters()]
    uncovered = {name for name in params if not any(name == k or name.startswith(k + ".") for k in device_map)}
    if uncovered:
        # Report whole modules: for each uncovered parameter, the shortest prefix whose parameters are all uncovered.
        modules: list[str] = []
        for name in params:
            if name not in uncovered:
                continue
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                prefix = ".".join(parts[:depth])
                if all(p in uncovered for p in params if p == prefix or p.startswith(prefix + ".")):
                    if prefix not in modules:
                        modules.append(prefix)
                    break
        raise ValueError(
            f"device_map gives no device for {modules} of {type(model).__name__}: add an entry for each (or a '' "
            "entry as the default)."
        )


_HIDDEN_STATES_DOC = """hidden_states: With `output_hidden_states`, the input of the first decoder layer (the
            embedded grid) and then the output of every decoder layer that ran, in execution order: the
            `num_shared_layers` trunk layers, then the text tail's `num_modality_layers` layers (if the text tail
            ran), then the audio tail's (if it ran). Each is (B, L, H), the residual stream before the tail's final
            norm (the normalised outputs are `{text,audio}_last_hidden_state`). With both tails, entry `1 + i` belongs
            to the layer owning cache slot `i`, so there are `1 + num_runtime_layers` entries; a forward that runs
            one tail (`modalities=("audio",)`) returns `1 + num_shared_layers + num_modality_layers`. Indices passed
            as `output_hidden_states=[...]` count in the both-tails order. A cached step records its new rows
            only. `generate` runs the tails lazily (only the tail of the current modality per step, the other one
            catching up later on the rows it missed) through `run_block`/`run_tail`, outside `forward`, so nothing
            is recorded there; run a forward over the generated grid to read its hidden states.
        attentions: With `output_attentions` (and an attention implementation that returns weights, e.g. "eager"):
            (B, heads, L, past + L) per decoder layer that ran, in the same order as `hidden_states` (without the
            leading embedding entry)."""


@dataclass
class MossSpeechModelOutputWithPast(ModelOutput):
    """Output of [`MossSpeechModel`].

    Args:
        text_last_hidden_state: Text tail output after `text_norm`, (B, L, H); `None` if the tail did not run.
        audio_last_hidden_state: Audio tail output after `audio_norm`, (B, L, H); `None` if the tail did not run.
        shared_last_hidden_state: Output of the shared trunk, (B, L, H).
        cache: The cache holding every trunk and tail layer.
        {hidden_states_doc}
    """

    text_last_hidden_state: torch.FloatTensor | None = None
    audio_last_hidden_state: torch.FloatTensor | None = None
    shared_last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MossSpeechCausalLMOutputWithPast(ModelOutput):
    """Output of [`MossSpeechForCausalLM`].

    Args:
        loss: `text_loss + audio_loss` when `labels` are given.
        text_loss: Next-token cross entropy of the text channel.
        audio_loss: Next-token cross entropy of the audio channel.
        text_logits: (B, L_keep, vocab_size), `None` if the text tail did not run.
        audio_logits: (B, L_keep, audio_vocab_size), `None` if the audio tail did not run.
        cache: The cache holding every trunk and tail layer.
        {hidden_states_doc}
    """

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    audio_loss: torch.FloatTensor | None = None
    text_logits: torch.FloatTensor | None = None
    audio_logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


for _output_class in (MossSpeechModelOutputWithPast, MossSpeechCausalLMOutputWithPast):
    _output_class.__doc__ = _output_class.__doc__.replace("{hidden_states_doc}", _HIDDEN_STATES_DOC)


class MossSpeechTransformerBlock(nn.Module):
    """A run of Qwen3 decoder layers that owns the cache slots `[layer_offset, layer_offset + num_layers)`.

    Each layer is built with its block-local index (so it reads `config.layer_types[i]` as the release did)
    and then given a model-wide `layer_idx`, so one `Cache` holds trunk and both tails without collisions.
    """

    def __init__(self, config: MossSpeechConfig, num_layers: int, layer_offset: int) -> None:
        super().__init__()
        self.layer_offset = layer_offset
        self.layer_types = list(config.layer_types[:num_layers])
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, i) for i in range(num_layers)])
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = layer_offset + i

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask_mapping: dict[str, torch.Tensor | None],
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.LongTensor,
        cache: Cache | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        for layer, layer_type in zip(self.layers, self.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=mask_mapping[layer_type],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        return hidden_states


class MossSpeechRotaryEmbedding(Qwen3RotaryEmbedding):
    """Qwen3 rotary embedding whose frequencies stay float32 when the model is cast (`model.to(torch.bfloat16)`).

    The release computes them in float32; rounding them to bf16 moves the rotation angle by up to ~0.5 rad at
    position 4096 and changes bf16 logits, while `from_pretrained(dtype=...)` already keeps them in float32.
    """

    def _apply(self, fn, recurse: bool = True):
        # torch's `.to()` / `.half()` / `.bfloat16()` all cast through `_apply` (pinned in test_upstream_contract).
        frequencies = {name: buffer.float() for name, buffer in self.named_buffers(recurse=False)}
        super()._apply(fn, recurse)
        for name, value in frequencies.items():
            moved = getattr(self, name)
            # A meta buffer has no values to restore (`to_empty()` after meta-device construction): keep the new
            # storage, in float32; `init_weights()` then computes the frequencies. Assigning a tensor to a buffer's
            # name replaces the buffer and keeps its persistence.
            setattr(self, name, moved.float() if value.is_meta else value.to(moved.device))
        return self


class MossSpeechPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the MOSS-Speech models."""

    config: MossSpeechConfig
    config_class = MossSpeechConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The forward has no data-dependent Python control flow once traced (the id-range check is skipped then).
    _can_compile_fullgraph = True
    # transformers' output recording (as Qwen3): one hidden state per decoder layer that runs, one attention map
    # per attention; negative `output_hidden_states` indices count over every runtime layer (both tails).
    _can_record_outputs = {
        "hidden_states": OutputRecorder(Qwen3DecoderLayer, index=0, num_hidden_layers_key="num_runtime_layers"),
        "attentions": OutputRecorder(Qwen3Attention, index=1),
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with a `device_map` dict checked against the module tree first.

        transformers places modules that no entry names on "cpu" without a word and only warns about entries that
        name nothing; here either is a `ValueError` naming the entry, raised before any weight is read.

        Loading is checked (see `loading.checked_from_pretrained`): a tensor missing from or unexpected in the
        checkpoint is a `CheckpointError` naming the keys unless `strict=False` is passed; a corrupt or truncated
        safetensors file is a `CheckpointError` naming the file; pickled weights (`pytorch_model.bin`, `.pt`) are
        never opened, and a checkpoint that has only those is refused with a pointer to the converter.
        """
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            config = kwargs.get("config")
            if not isinstance(config, PretrainedConfig):
                hub = {k: kwargs[k] for k in _CONFIG_LOADING_KWARGS if kwargs.get(k) is not None}
                config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **hub)
            with torch.device("meta"), init.no_init_weights():
                skeleton = cls(config)
            check_device_map(skeleton, device_map)
        return checked_from_pretrained(super().from_pretrained, cls, pretrained_model_name_or_path, model_args, kwargs,
                                       "language model")

    def runtime_cache_config(self) -> MossSpeechConfig:
        """A config whose `layer_types` cover every runtime layer; see [`runtime_cache_config`]."""
        return runtime_cache_config(self.config)

    def new_cache(
        self,
        batch_size: int | None = None,
        max_cache_len: int | None = None,
        static: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Cache:
        """A cache with one slot per runtime layer (trunk + text tail + audio tail).

        Args:
            batch_size: With `static=True`, allocate every layer now (each on the device its layer runs on, so a
                `device_map` split works); `None` allocates each layer on its first update.
            max_cache_len: Rows a static cache holds (prompt + new rows); required when `static`.
            static: A fixed-size `StaticCache` (for `torch.compile`) or a growing `DynamicCache`.
            dtype: Key/value dtype when allocating now; defaults to each layer's weight dtype.
        """
        cache_config = self.runtime_cache_config()
        if not static:
            return DynamicCache(config=cache_config)
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
            raise ValueError(
                f"new_cache: max_cache_len must be an integer >= 1 for a static cache, got {max_cache_len!r}."
            )
        cache = StaticCache(config=cache_config, max_cache_len=max_cache_len)
        if batch_size is not None:
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"new_cache: batch_size must be an integer >= 1, got {batch_size!r}.")
            base = self.base_model
            attentions = [layer.self_attn for block in (base.shared_block, base.text_block, base.audio_block)
                          for layer in block.layers]
            config = self.config
            for slot, attention in zip(cache.layers, attentions):
                device = module_device(attention) or torch.device("cpu")
                allocate_cache_layer(slot, batch_size, config.num_key_value_heads, config.head_dim,
                                     dtype=dtype or attention.k_proj.weight.dtype, device=device)
        return cache


class MossSpeechModel(MossSpeechPreTrainedModel):
    """The two-channel trunk + tails model (no heads).

    A grid row is embedded from the text table unless its text id is `modality_pad_token_id`, in which case its
    audio id is looked up in the audio table. The trunk output feeds the text tail and the audio tail.
    """

    # Loading a full checkpoint into the head-less model drops the heads without a warning.
    _keys_to_ignore_on_load_unexpected = [r"^(text|audio)_lm_head\."]

    def __init__(self, config: MossSpeechConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.audio_embed = nn.Embedding(config.audio_vocab_size, config.hidden_size)
        self.shared_block = MossSpeechTransformerBlock(config, config.num_shared_layers, 0)
        self.text_block = MossSpeechTransformerBlock(
            config, config.num_modality_layers, config.tail_layer_offset("text")
        )
        self.audio_block = MossSpeechTransformerBlock(
            config, config.num_modality_layers, config.tail_layer_offset("audio")
        )
        self.text_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.audio_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MossSpeechRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def tail(self, modality: str) -> tuple[MossSpeechTransformerBlock, Qwen3RMSNorm]:
        """The decoder block and final norm of the `modality` tail."""
        if modality == "text":
            return self.text_block, self.text_norm
        if modality == "audio":
            return self.audio_block, self.audio_norm
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")

    def embed_grid(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Embed a (B, L, 2) grid with the release's rule (audio table iff the text id is the modality pad)."""
        text_ids, audio_ids = input_ids[..., 0], input_ids[..., 1]
        text = self.embed_tokens(text_ids)
        # The two tables may sit on different devices under a device_map: combine on the text table's.
        audio = self.audio_embed(audio_ids).to(text.device)
        is_audio = (text_ids == self.config.modality_pad_token_id).unsqueeze(-1).to(text.device)
        return torch.where(is_audio, audio, text)

    def _mask_mapping(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.LongTensor,
        block: MossSpeechTransformerBlock,
    ) -> dict[str, torch.Tensor | None]:
        if isinstance(attention_mask, dict):
            return attention_mask
        # Size the mask against this block's own cache slot: a lazily run tail may hold fewer positions.
        kwargs = {
            "config": self.config,
            "inputs_embeds": hidden_states,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
            "layer_idx": block.layer_offset,
        }
        mapping: dict[str, torch.Tensor | None] = {}
        if "full_attention" in block.layer_types:
            mapping["full_attention"] = create_causal_mask(**kwargs)
        if "sliding_attention" in block.layer_types:
            mapping["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return mapping

    def run_block(
        self,
        block: MossSpeechTransformerBlock,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        use_cache: bool,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Run one block over `hidden_states`, whose positions directly follow what its cache slots hold.

        `attention_mask` is the 2-D padding mask covering the cached positions plus the new ones (or `None`).
        """
        if attention_mask is not None and not isinstance(attention_mask, dict) and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, : cache_length(cache, block.layer_offset) + hidden_states.shape[1]]
        # Hand-off between blocks on different devices (trunk → tail): inputs go where the block runs.
        device = module_device(block)
        if device is not None and hidden_states.device != device:
            hidden_states, position_ids = hidden_states.to(device), position_ids.to(device)
            if position_embeddings is not None:
                position_embeddings = tuple(t.to(device) for t in position_embeddings)
        mask_mapping = self._mask_mapping(hidden_states, attention_mask, cache, position_ids, block)
        if position_embeddings is None:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        return block(hidden_states, mask_mapping, position_embeddings, position_ids, cache=cache, use_cache=use_cache,
                     **kwargs)

    def run_tail(
        self,
        modality: str,
        shared_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        use_cache: bool,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Run the `modality` tail and its final norm on trunk outputs; returns normalised hidden states."""
        block, norm = self.tail(modality)
        hidden = self.run_block(
            block, shared_hidden_states, attention_mask, position_ids, cache, use_cache, position_embeddings, **kwargs
        )
        return norm(hidden)

    def default_position_ids(
        self, attention_mask: torch.Tensor | None, past_length: int, length: int, device: torch.device
    ) -> torch.LongTensor:
        """Positions that skip left padding (count of real rows before each row), as HF generation does."""
        if attention_mask is not None and attention_mask.ndim == 2:
            positions = attention_mask.long().cumsum(-1) - 1
            return positions.clamp(min=0)[:, past_length : past_length + length]
        return torch.arange(past_length, past_length + length, device=device).unsqueeze(0)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        modalities: Sequence[str] = MODALITIES,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MossSpeechModelOutputWithPast:
        """Embed the grid, run the trunk, then the requested tails.

        Args:
            input_ids: (B, L, 2) grid, column 0 text ids, column 1 audio ids. Exclusive with `inputs_embeds`.
            attention_mask: (B, past + L) padding mask, 1 for real rows (left padding expected in generation).
            position_ids: (B, L) or (1, L); by default derived from `attention_mask` so left padding does not shift
                positions.
            cache: A `Cache` for every trunk and tail layer (`past_key_values` is the deprecated name).
            inputs_embeds: (B, L, H) pre-computed embeddings.
            use_cache: Whether to create/update the cache (defaults to `config.use_cache`, off in training).
            modalities: Which tails to run; the heads of the others are skipped. Tails run text first, then audio,
                whatever the order given.
            kwargs: `output_hidden_states`, `output_attentions`, `return_dict` and the attention kwargs transformers
                passes through (`TransformersKwargs`); anything else is a `TypeError`. See
                [`MossSpeechModelOutputWithPast`] for what the recorded hidden states and attentions hold.
        """
        check_kwargs(kwargs, _PASS_THROUGH_KWARGS, f"{type(self).__name__}.forward")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids (B, L, 2) or inputs_embeds (B, L, hidden_size).")
        if isinstance(modalities, str):
            modalities = (modalities,)
        modalities = tuple(modalities)
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities!r}.")
        if input_ids is not None:
            self.config.check_grid(input_ids)
            inputs_embeds = self.embed_grid(input_ids)
        elif not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3 or (
            inputs_embeds.shape[-1] != self.config.hidden_size
        ):
            shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds)
            raise ValueError(f"inputs_embeds must have shape (batch, length, {self.config.hidden_size}), got {shape}.")
        elif inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds is empty: got shape {tuple(inputs_embeds.shape)}.")
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache must be a transformers Cache, got {type(cache).__name__}.")
        if (
            cache is not None
            and not cache_adds_layers(cache)
            and len(cache.layers) < self.config.num_runtime_layers
        ):
            raise ValueError(
                f"cache has {len(cache.layers)} layer slots but MOSS-Speech needs {self.config.num_runtime_layers} "
                "(trunk + text tail + audio tail): use model.new_cache(...), a cache built from model.config "
                "(DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=n)), "
                "DynamicCache() without a config, or None."
            )

        batch, length = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache_length(cache, 0)
        for modality in modalities:
            offset = self.config.tail_layer_offset(modality)
            if cache is not None and cache_length(cache, offset) != past:
                raise ValueError(
                    f"The {modality} tail's cache holds {cache_length(cache, offset)} positions but the trunk holds "
                    f"{past}: a cache left behind by lazy-tail decoding cannot be reused for a full forward pass."
                )
        if attention_mask is not None and attention_mask.ndim == 2:
            expected = (batch, past + length)
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask must have shape (batch, cached + new rows) = {expected}, "
                    f"got {tuple(attention_mask.shape)}."
                )
        elif attention_mask is not None and attention_mask.ndim != 4 and not isinstance(attention_mask, dict):
            raise ValueError(
                f"attention_mask must be 2-D (batch, rows), got shape {tuple(attention_mask.shape)}."
            )
        if position_ids is None:
            position_ids = self.default_position_ids(attention_mask, past, length, inputs_embeds.device)
        elif (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.ndim != 2
            or position_ids.shape[0] not in (1, batch)
            or position_ids.shape[1] != length
        ):
            shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids)
            raise ValueError(
                f"position_ids must have shape (batch, length) = {(batch, length)} or (1, {length}), got {shape}."
            )

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        shared = self.run_block(
            self.shared_block, inputs_embeds, attention_mask, position_ids, cache, use_cache, position_embeddings,
            **kwargs,
        )
        # A fixed tail order keeps the recorded hidden states and attentions in cache-slot order.
        tails = {
            modality: self.run_tail(
                modality, shared, attention_mask, position_ids, cache, use_cache, position_embeddings, **kwargs
            )
            for modality in MODALITIES
            if modality in modalities
        }
        return MossSpeechModelOutputWithPast(
            text_last_hidden_state=tails.get("text"),
            audio_last_hidden_state=tails.get("audio"),
            shared_last_hidden_state=shared,
            cache=cache if use_cache else None,
        )


class MossSpeechForCausalLM(MossSpeechPreTrainedModel, MossSpeechGenerationMixin):
    """MOSS-Speech with its text and audio heads; `generate` runs the release's modality state machine.

    Example:

    ```python
    >>> import torch
    >>> from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM
    >>> config = MossSpeechConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...     num_shared_layers=2, num_modality_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    ...     audio_vocab_size=80, sosp_token_id=290, modality_pad_token_id=291, pad_token_id=280,
    ...     eosp_token_id=64, audio_pad_token_id=10)
    >>> model = MossSpeechForCausalLM(config).eval()
    >>> grid = torch.tensor([[[5, 10], [6, 10], [290, 10]]])
    >>> out = model(grid)
    >>> out.text_logits.shape, out.audio_logits.shape
    (torch.Size([1, 3, 300]), torch.Size([1, 3, 80]))
    ```
    """

    _tied_weights_keys: dict[str, str] = {}
    generation_config_class = MossSpeechGenerationConfig
    _tp_plan = {"text_lm_head": "colwise_gather_output", "audio_lm_head": "colwise_gather_output"}

    def __init__(self, config: MossSpeechConfig) -> None:
        super().__init__(config)
        self.model = MossSpeechModel(config)
        self.text_lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.audio_lm_head = nn.Linear(config.hidden_size, config.audio_vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_text_model(cls, text_model, num_shared_layers: int, **kwargs) -> "MossSpeechForCausalLM":
        """Split a pretrained Qwen3 causal LM into MOSS-Speech; see `from_text_model` (this module)."""
        return from_text_model(text_model, num_shared_layers, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.text_lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.text_lm_head = value

    def head(self, modality: str) -> nn.Linear:
        """The LM head of `modality` ("text" or "audio")."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
        return self.text_lm_head if modality == "text" else self.audio_lm_head

    def check_targets(
        self, targets: torch.Tensor, rows: tuple[int, int], name: str, ignore_index: int = -100
    ) -> None:
        """Raise a `ValueError` unless `targets` is a (`*rows`, 2) integer tensor whose ids are `ignore_index` or
        inside their channel's vocabulary (the range check is skipped while tracing, as in `config.check_grid`)."""
        if not isinstance(targets, torch.Tensor) or targets.ndim != 3 or targets.shape[-1] != self.config.channels:
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"{name} must have shape (batch, length, 2) like input_ids, got {shape}.")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
            raise TypeError(f"{name} must hold integer token ids, got dtype {targets.dtype}.")
        if tuple(targets.shape[:2]) != tuple(rows):
            raise ValueError(
                f"{name} shape {tuple(targets.shape)} does not match the input rows (batch, length) = {tuple(rows)}."
            )
        if targets.device.type == "meta" or is_tracing():
            return
        sizes = torch.tensor([self.config.vocab_size, self.config.audio_vocab_size], device=targets.device)
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= sizes))
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            channel = index[-1]
            raise ValueError(
                f"{name}{list(index)} = {int(targets[index])} is outside the {MODALITIES[channel]} vocabulary "
                f"[0, {int(sizes[channel])}) and is not the ignore index {ignore_index}."
            )

    def channel_losses(
        self,
        logits: dict[str, torch.Tensor | None],
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Next-token loss of each channel through `self.loss_function` (transformers' `ForCausalLMLoss` contract).

        `labels` (B, L, 2) are shifted inside; `shift_labels` (B, L, 2), already aligned with the logits, replace
        them (sequence/context parallelism shifts before sharding). `num_items_in_batch` normalises both channels'
        summed losses (gradient accumulation); without it each channel is averaged over its own targets, and a channel
        with no target contributes 0 (with a graph) instead of NaN. Returns `(text_loss, audio_loss)`, `None` for a
        channel whose tail did not run.
        """
        losses: list[torch.Tensor | None] = []
        for channel, modality in enumerate(MODALITIES):
            channel_logits = logits[modality]
            if channel_logits is None:
                losses.append(None)
                continue
            if shift_labels is not None:
                targets, channel_labels = shift_labels[..., channel], None
                channel_shift = targets
            else:
                channel_labels, channel_shift = labels[..., channel], None
                targets = channel_labels[:, 1:]
            normaliser = num_items_in_batch
            if normaliser is None:
                # The mean over this channel's targets, as a divisor: 0 targets give 0 / 1 rather than NaN, with no
                # device-to-host sync.
                normaliser = (targets != ignore_index).sum().clamp(min=1).to(channel_logits.device)
            losses.append(
                self.loss_function(
                    logits=channel_logits,
                    labels=channel_labels,
                    vocab_size=channel_logits.shape[-1],
                    num_items_in_batch=normaliser,
                    ignore_index=ignore_index,
                    shift_labels=channel_shift,
                )
            )
        return losses[0], losses[1]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        modalities: Sequence[str] = MODALITIES,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.LongTensor | None = None,
        ignore_index: int = -100,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MossSpeechCausalLMOutputWithPast:
        """Two-channel forward; see [`MossSpeechModel.forward`] for the inputs and the other keyword arguments.

        Args:
            labels: (B, L, 2) targets aligned with `input_ids` (shifted inside), `ignore_index` where ignored. The
                loss is the text-channel plus the audio-channel cross entropy; both are reported separately too.
            logits_to_keep: Project only the last `logits_to_keep` rows (0 = all), or the given row indices.
            num_items_in_batch: Token count for sum-reduction under gradient accumulation (Trainer passes it).
            shift_labels: (B, L, 2) targets already aligned with the logits; they replace `labels` in the loss.
            ignore_index: Target id that contributes no loss (-100, as in transformers).

        With `return_dict=False` (argument or `config.return_dict`) the output is a tuple of its non-`None` fields.
        """
        check_kwargs(kwargs, _PASS_THROUGH_KWARGS, f"{type(self).__name__}.forward")
        if labels is not None or shift_labels is not None:
            inputs = input_ids if input_ids is not None else inputs_embeds
            for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
                if targets is not None and isinstance(inputs, torch.Tensor) and inputs.ndim >= 2:
                    self.check_targets(targets, inputs.shape[:2], name, ignore_index)
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                raise ValueError("labels need logits for every row: use logits_to_keep=0 when training.")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            modalities=modalities,
            return_dict=True,
            **kwargs,
        )
        logits = {}
        for modality in MODALITIES:
            hidden = getattr(outputs, f"{modality}_last_hidden_state")
            logits[modality] = (
                None if hidden is None else self.head(modality)(slice_logits_to_keep(hidden, logits_to_keep))
            )

        loss = text_loss = audio_loss = None
        if labels is not None or shift_labels is not None:
            text_loss, audio_loss = self.channel_losses(logits, labels, shift_labels, num_items_in_batch, ignore_index)
            present = [x for x in (text_loss, audio_loss) if x is not None]
            loss = present[0] if len(present) == 1 else present[0] + present[1].to(present[0].device)
        return MossSpeechCausalLMOutputWithPast(
            loss=loss,
            text_loss=text_loss,
            audio_loss=audio_loss,
            text_logits=logits["text"],
            audio_logits=logits["audio"],
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


_QWEN3_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "attention_bias",
    "attention_dropout", "use_sliding_window", "sliding_window", "max_window_layers", "pad_token_id",
    "bos_token_id", "eos_token_id",
)


def from_text_model(
    text_model: PreTrainedModel | str | os.PathLike,
    num_shared_layers: int,
    num_tail_layers: int | None = None,
    audio_vocab_size: int = 16512,
    **config_overrides,
) -> MossSpeechForCausalLM:
    """Split a pretrained Qwen3 causal LM into MOSS-Speech (the paper's initialisation).

    The first `num_shared_layers` decoder layers become the trunk, the rest the text tail, and a deep copy of the
    rest the audio tail (both tails start from the same text layers); embeddings, final norm and LM head go to the
    text side (the audio norm starts as a copy of the text norm); the audio embedding and audio head are new.
    On text-only input the result's text logits equal the text model's.

    Args:
        text_model: A `Qwen3ForCausalLM` (or a path to one).
        num_shared_layers: Layers in the shared trunk.
        num_tail_layers: Layers per tail; must equal the remaining layers (default).
        audio_vocab_size: Rows of the new speech embedding and audio head (codes + end-of-speech + spare ids).
        **config_overrides: Other `MossSpeechConfig` fields, e.g. the special ids (`sosp_token_id`,
            `modality_pad_token_id`, `eosp_token_id`, `audio_pad_token_id`) when the tokenizer is not Qwen3's.
    """
    if isinstance(text_model, (str, os.PathLike)):
        text_model = AutoModelForCausalLM.from_pretrained(text_model)
    source = text_model.config
    if getattr(source, "model_type", None) != "qwen3":
        raise ValueError(f"from_text_model expects a Qwen3 causal LM, got model_type {source.model_type!r}.")
    layers = text_model.model.layers
    n_layers = len(layers)
    if not 0 <= num_shared_layers < n_layers:
        raise ValueError(f"num_shared_layers must be in [0, {n_layers}) for a {n_layers}-layer model, "
                         f"got {num_shared_layers}.")
    tail = n_layers - num_shared_layers
    if num_tail_layers is not None and num_tail_layers != tail:
        raise ValueError(f"num_tail_layers must be the remaining {tail} layers ({n_layers} - {num_shared_layers}), "
                         f"got {num_tail_layers}.")
    values = {name: getattr(source, name) for name in _QWEN3_FIELDS if hasattr(source, name)}
    values["rope_parameters"] = dict(source.rope_parameters)
    values.update(num_hidden_layers=n_layers, num_shared_layers=num_shared_layers, num_modality_layers=tail,
                  audio_vocab_size=audio_vocab_size, tie_word_embeddings=False)
    values.update(config_overrides)
    config = MossSpeechConfig(**values)

    model = MossSpeechForCausalLM(config).to(text_model.dtype)
    source_layers = list(layers)
    with torch.no_grad():
        for target, src in zip(model.model.shared_block.layers, source_layers[:num_shared_layers]):
            target.load_state_dict(src.state_dict())
        for target, src in zip(model.model.text_block.layers, source_layers[num_shared_layers:]):
            target.load_state_dict(src.state_dict())
        for target, src in zip(model.model.audio_block.layers, source_layers[num_shared_layers:]):
            target.load_state_dict(copy.deepcopy(src.state_dict()))
        model.model.embed_tokens.weight.copy_(text_model.model.embed_tokens.weight)
        model.model.text_norm.weight.copy_(text_model.model.norm.weight)
        model.model.audio_norm.weight.copy_(text_model.model.norm.weight)
        model.text_lm_head.weight.copy_(text_model.get_output_embeddings().weight)
    return model


__all__ = [
    "MossSpeechCausalLMOutputWithPast",
    "MossSpeechForCausalLM",
    "MossSpeechModel",
    "MossSpeechModelOutputWithPast",
    "MossSpeechPreTrainedModel",
    "MossSpeechTransformerBlock",
    "from_text_model",
]

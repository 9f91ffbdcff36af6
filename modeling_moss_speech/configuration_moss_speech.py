"""Configuration of the MOSS-Speech language model (the two-channel, layer-split Qwen3)."""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config
from transformers.utils import logging

logger = logging.get_logger(__name__)

MODALITIES = ("text", "audio")

# The release's special ids. They are tokenizer ids of Qwen3's vocabulary (text) and ids next to the release codec's
# 16384 codes (audio), so they are filled in only for vocabularies at least the release's size; a smaller vocabulary
# gets ids derived from its own top rows instead (see `MossSpeechConfig`).
RELEASE_VOCAB_SIZE = 151680
RELEASE_AUDIO_VOCAB_SIZE = 16512
RELEASE_TEXT_IDS = {"pad_token_id": 151643, "eos_token_id": [151643, 151645], "sosp_token_id": 151646,
                    "modality_pad_token_id": 151667}
RELEASE_AUDIO_IDS = {"eosp_token_id": 16384, "audio_pad_token_id": 512}


@strict
class MossSpeechConfig(Qwen3Config):
    r"""Configuration for [`MossSpeechModel`] and [`MossSpeechForCausalLM`].

    It carries every Qwen3 field (so any Qwen3 configuration maps onto it) plus the modality split:
    the first `num_shared_layers` decoder layers form a trunk shared by both modalities, the remaining
    `num_modality_layers` exist twice, once as the text tail and once as the audio tail. Defaults are
    the values of the released MOSS-Speech (Qwen3-8B based) checkpoint.

    Special ids left unset (`None`) are filled in per vocabulary. A text vocabulary of at least the release's
    151680 rows (Qwen3's tokenizer) gets the release's ids: `pad_token_id=151643`, `eos_token_id=[151643, 151645]`,
    `sosp_token_id=151646`, `modality_pad_token_id=151667`; an audio vocabulary of at least 16512 rows gets
    `eosp_token_id=16384`, `audio_pad_token_id=512`. So the release's `config.json`, which does not store all of
    them, loads with the release's values. A smaller vocabulary gets no ids it does not have: `pad_token_id` and
    `eos_token_id` stay `None`, and the ids the model needs are its top free rows (text: `modality_pad_token_id`
    then `sosp_token_id`; audio: `audio_pad_token_id` then `eosp_token_id`, so the codes are the ids below
    end-of-speech, as in the release).

    Args:
        audio_vocab_size: Rows of the speech-token embedding and of the audio head.
        num_shared_layers: Decoder layers in the shared trunk.
        num_modality_layers: Decoder layers in each tail (`num_shared_layers + num_modality_layers`
            must equal `num_hidden_layers`, as in the release).
        pad_token_id / eos_token_id: Text padding and the ids that end a turn (see above when unset).
        sosp_token_id: Text-channel id that opens a speech segment ("start of speech").
        eosp_token_id: Audio-channel id that closes a speech segment ("end of speech").
        modality_pad_token_id: Text-channel placeholder on speech rows; a row whose text id equals it is
            embedded from the audio table.
        audio_pad_token_id: Audio-channel placeholder on text rows.
        channels: Number of token-grid channels (always 2: text, audio).

    Example:

    ```python
    >>> from modeling_moss_speech import MossSpeechConfig
    >>> config = MossSpeechConfig()  # the released 8B layout
    >>> config.num_shared_layers, config.num_modality_layers
    (32, 4)
    ```
    """

    model_type = "moss_speech"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    default_theta = 1_000_000.0

    base_model_tp_plan = {
        f"{block}.layers.*.{name}": plan
        for block in ("shared_block", "text_block", "audio_block")
        for name, plan in (
            ("self_attn.q_proj", "colwise"),
            ("self_attn.k_proj", "colwise"),
            ("self_attn.v_proj", "colwise"),
            ("self_attn.q_norm", "replicated_with_grad_allreduce"),
            ("self_attn.k_norm", "replicated_with_grad_allreduce"),
            ("self_attn.o_proj", "rowwise"),
            ("mlp.gate_proj", "colwise"),
            ("mlp.up_proj", "colwise"),
            ("mlp.down_proj", "rowwise"),
        )
    }
    base_model_pp_plan = None

    vocab_size: int = 151680
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    attention_dropout: float | int = 0.0
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    audio_vocab_size: int = 16512
    num_shared_layers: int = 32
    num_modality_layers: int = 4
    sosp_token_id: int | None = None
    eosp_token_id: int | None = None
    modality_pad_token_id: int | None = None
    audio_pad_token_id: int | None = None
    channels: int = 2

    def __post_init__(self, **kwargs):
        if self.use_sliding_window and self.max_window_layers is None:
            self.max_window_layers = self.num_hidden_layers
        if self.layer_types is None and not self.use_sliding_window:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)
        self._fill_special_ids()
        self._check_consistency()

    def _fill_special_ids(self) -> None:
        """Fill unset special ids: the release's for release-sized vocabularies, else the top free rows."""
        channels = (
            ("vocab_size", RELEASE_VOCAB_SIZE, RELEASE_TEXT_IDS, ("modality_pad_token_id", "sosp_token_id")),
            ("audio_vocab_size", RELEASE_AUDIO_VOCAB_SIZE, RELEASE_AUDIO_IDS, ("audio_pad_token_id", "eosp_token_id")),
        )
        for size_name, release_size, release_ids, derived in channels:
            size = getattr(self, size_name)
            if not isinstance(size, int) or isinstance(size, bool):
                continue  # _check_consistency names the bad size
            if size >= release_size:
                for name, value in release_ids.items():
                    if getattr(self, name) is None:
                        setattr(self, name, list(value) if isinstance(value, list) else value)
                continue
            # Never hand out an id the user already gave one of this vocabulary's special tokens.
            taken = set()
            for name in release_ids:
                value = getattr(self, name)
                taken |= set(value) if isinstance(value, list) else {value}
            candidate = size - 1
            for name in derived:
                if getattr(self, name) is not None:
                    continue
                while candidate in taken:
                    candidate -= 1
                if candidate < 0:
                    raise ValueError(
                        f"MossSpeechConfig.{size_name}={size} is too small to derive {name}: pass "
                        f"{' and '.join(derived)} explicitly."
                    )
                setattr(self, name, candidate)
                taken.add(candidate)

    def _check_consistency(self) -> None:
        """Raise a `ValueError` naming the first inconsistent field (the release only asserted the split)."""
        for name in ("num_shared_layers", "num_modality_layers", "num_hidden_layers", "hidden_size",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "audio_vocab_size"):
            value = getattr(self, name)
            minimum = 0 if name == "num_shared_layers" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"MossSpeechConfig.{name} must be an integer >= {minimum}, got {value!r}.")
        if self.num_shared_layers + self.num_modality_layers != self.num_hidden_layers:
            raise ValueError(
                "MossSpeechConfig: num_shared_layers + num_modality_layers must equal num_hidden_layers "
                f"(the trunk plus one tail), got {self.num_shared_layers} + {self.num_modality_layers} "
                f"!= {self.num_hidden_layers}."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"MossSpeechConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"MossSpeechConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.channels != 2:
            raise ValueError(f"MossSpeechConfig.channels must be 2 (text, audio), got {self.channels}.")
        text_ids = {"sosp_token_id": self.sosp_token_id, "modality_pad_token_id": self.modality_pad_token_id}
        if self.pad_token_id is not None:
            text_ids["pad_token_id"] = self.pad_token_id
        for name, value in text_ids.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"MossSpeechConfig.{name} must be an integer id, got {value!r}.")
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"MossSpeechConfig.{name}={value} is outside the text vocabulary [0, {self.vocab_size})."
                )
        for name in ("eosp_token_id", "audio_pad_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"MossSpeechConfig.{name} must be an integer id, got {value!r}.")
            if not 0 <= value < self.audio_vocab_size:
                raise ValueError(
                    f"MossSpeechConfig.{name}={value} is outside the audio vocabulary [0, {self.audio_vocab_size})."
                )
        if self.sosp_token_id == self.modality_pad_token_id:
            raise ValueError(
                f"MossSpeechConfig.sosp_token_id and modality_pad_token_id must differ, both are {self.sosp_token_id}."
            )
        if self.audio_pad_token_id == self.eosp_token_id:
            raise ValueError(
                "MossSpeechConfig.audio_pad_token_id and eosp_token_id must differ, both are "
                f"{self.eosp_token_id}."
            )

    def validate_token_ids(self) -> None:
        """Special ids belong to two vocabularies: check each against its own (transformers checks only text)."""
        self._check_consistency()

    def check_grid(self, input_ids: torch.Tensor, name: str = "input_ids") -> None:
        """Raise `TypeError`/`ValueError` unless `input_ids` is an integer (B, L, 2) grid inside both vocabularies.

        Type and shape are checked always; the id range needs the values (one device-to-host sync), so it is skipped
        while `torch.compile` or `torch.export` traces the call and for meta tensors. `generate` and the processor
        check their grids once up front, so a traced forward still sees validated ids.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of shape (batch, length, 2), got {type(input_ids).__name__}."
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}.")
        if input_ids.ndim != 3 or input_ids.shape[-1] != self.channels:
            raise ValueError(
                f"{name} must have shape (batch, length, {self.channels}) with column 0 the text channel and "
                f"column 1 the audio channel, got shape {tuple(input_ids.shape)}."
            )
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(
                f"{name} is empty: got shape {tuple(input_ids.shape)}, expected at least one sequence of one row."
            )
        if input_ids.device.type == "meta" or is_tracing():
            return
        sizes = torch.tensor([self.vocab_size, self.audio_vocab_size], device=input_ids.device)
        # One sync for both channels; the per-channel detail is only computed for the error message.
        if not bool(((input_ids < 0) | (input_ids >= sizes)).any()):
            return
        for channel, (label, size) in enumerate((("text", self.vocab_size), ("audio", self.audio_vocab_size))):
            ids = input_ids[..., channel]
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"{name}[..., {channel}] ({label} channel) holds id {bad}, outside the {label} vocabulary "
                    f"[0, {size})."
                )

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> MossSpeechConfig:
        """`self`, except for `decoder=True`: then a live view of `self` whose layer fields count every runtime layer.

        transformers sizes caches from `get_text_config(decoder=True)` (`DynamicCache(config=...)`,
        `StaticCache(config=..., max_cache_len=n)`, generation's cache set-up), reading `num_hidden_layers` and
        `layer_types`. Those fields count the trunk plus one tail, as the release's config.json does, while the
        model runs the trunk and both tails. The view reports `num_hidden_layers = num_runtime_layers` and the
        matching `layer_types` ([`runtime_layer_types`]), so such caches get one slot per runtime layer; every other
        field is `self`'s, read and written through (the view shares `self`'s attributes), and nothing of it is saved:
        `self` and its config.json keep the release's fields.
        """
        if decoder is not True or encoder is True:
            return super().get_text_config(decoder=decoder, encoder=encoder)
        view = object.__new__(_RuntimeLayersView)
        object.__setattr__(view, "__dict__", self.__dict__)  # same attributes, not a copy
        return view

    @property
    def num_runtime_layers(self) -> int:
        """Attention layers that exist at run time (trunk + text tail + audio tail), one cache slot each."""
        return self.num_shared_layers + 2 * self.num_modality_layers

    @property
    def num_audio_codes(self) -> int:
        """Speech-codec codes: audio ids below the end-of-speech id (ids above it are never generated)."""
        return self.eosp_token_id

    def tail_layer_offset(self, modality: str) -> int:
        """Index of the first cache slot of the `modality` tail ("text" or "audio")."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
        return self.num_shared_layers + (0 if modality == "text" else self.num_modality_layers)


def is_tracing() -> bool:
    """Whether `torch.compile` or `torch.export` (strict or not) is tracing the current call."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def runtime_layer_types(config: MossSpeechConfig) -> list[str]:
    """Attention type of every runtime layer / cache slot: trunk, then text tail, then audio tail (each tail reads
    the first `num_modality_layers` entries of `config.layer_types`, as its layers are built with block-local
    indices)."""
    layer_types = config.__dict__["layer_types"]  # the stored field, also when `config` is the runtime view
    tail = list(layer_types[: config.num_modality_layers])
    return list(layer_types[: config.num_shared_layers]) + tail + tail


class _RuntimeLayersView(MossSpeechConfig):
    """`MossSpeechConfig.get_text_config(decoder=True)`: the config's own attributes (shared, not copied), with
    `num_hidden_layers` and `layer_types` counting every runtime layer. Never constructed through `__init__`."""

    @property
    def num_hidden_layers(self) -> int:
        return self.num_runtime_layers

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        raise AttributeError(
            "num_hidden_layers of the runtime-layer view (get_text_config(decoder=True)) is derived: set "
            "num_shared_layers / num_modality_layers / num_hidden_layers on the model config itself."
        )

    @property
    def layer_types(self) -> list[str]:
        return runtime_layer_types(self)

    @layer_types.setter
    def layer_types(self, value: list[str]) -> None:
        raise AttributeError(
            "layer_types of the runtime-layer view (get_text_config(decoder=True)) is derived: set layer_types on "
            "the model config itself."
        )

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> MossSpeechConfig:
        return self


__all__ = ["MossSpeechConfig", "MODALITIES"]

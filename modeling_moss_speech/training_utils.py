"""Training helpers: build MOSS-Speech from a text LLM, freeze by training stage, label grids.

The paper's recipe ("frozen pre-training"): split a pretrained Qwen3 into a shared trunk and two tails initialised
from the same text layers (`from_text_model`), pre-train the speech side with the text backbone frozen
(`apply_training_stage(model, "stage1")`), then train everything jointly ("stage2"), then fine-tune ("sft").
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from .configuration_moss_speech import MossSpeechConfig
from .modeling_moss_speech import MossSpeechForCausalLM

logger = logging.get_logger(__name__)

# Module-name prefixes (inside MossSpeechForCausalLM) that each stage trains; everything else is frozen.
TRAINING_STAGES: dict[str, tuple[str, ...]] = {
    # Stage I: the text backbone (embedding, trunk, text tail, text norm and head) stays frozen.
    "stage1": ("model.audio_embed.", "model.audio_block.", "model.audio_norm.", "audio_lm_head."),
    # Stage II and SFT: everything is trained.
    "stage2": ("",),
    "sft": ("",),
    # Cheapest adaptation: only the audio tail, its norm and head.
    "audio_tail_only": ("model.audio_block.", "model.audio_norm.", "audio_lm_head."),
}

_QWEN3_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "attention_bias",
    "attention_dropout", "use_sliding_window", "sliding_window", "max_window_layers", "pad_token_id",
    "bos_token_id", "eos_token_id",
)


def apply_training_stage(model: nn.Module, stage: str, verbose: bool = True) -> int:
    """Set `requires_grad` for a named training stage; returns the number of trainable parameters.

    Stages: `stage1` (speech side only: audio embedding, audio tail, audio norm and head), `stage2` and `sft`
    (everything), `audio_tail_only`. Works on a `MossSpeechForCausalLM` or a PEFT wrapper of one (LoRA
    parameters stay as PEFT set them).
    """
    if stage not in TRAINING_STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {sorted(TRAINING_STAGES)}.")
    prefixes = TRAINING_STAGES[stage]
    trainable = total = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            trainable += param.numel() if param.requires_grad else 0
            total += param.numel()
            continue
        # PEFT wraps the model as base_model.model.<our names>: match on the path below that.
        plain = name.split("base_model.model.", 1)[-1].replace(".base_layer.", ".")
        plain = plain.replace("modules_to_save.default.", "").replace("original_module.", "")
        param.requires_grad_(any(plain.startswith(p) for p in prefixes))
        trainable += param.numel() if param.requires_grad else 0
        total += param.numel()
    if verbose:
        logger.warning(f"training stage {stage!r}: {trainable:,} of {total:,} parameters trainable "
                       f"({100 * trainable / max(total, 1):.2f} %)")
    return trainable


def grid_labels(
    input_ids: torch.LongTensor, config: MossSpeechConfig, attention_mask: torch.Tensor | None = None
) -> torch.LongTensor:
    """Next-token targets for a (B, L, 2) or (L, 2) grid, aligned with the inputs (the model shifts them).

    A channel is a target only where generation samples it: the text channel on text rows (text id is not the
    modality pad, start-of-speech rows included) and the audio channel on speech rows (codes and end-of-speech).
    The forced values (modality pad in audio mode, audio pad in text mode) and padding are -100.
    """
    if input_ids.shape[-1] != 2 or input_ids.ndim not in (2, 3):
        raise ValueError(f"input_ids must be (batch, length, 2) or (length, 2), got {tuple(input_ids.shape)}.")
    speech = input_ids[..., 0] == config.modality_pad_token_id
    labels = input_ids.clone()
    labels[..., 0] = labels[..., 0].masked_fill(speech, -100)
    labels[..., 1] = labels[..., 1].masked_fill(~speech, -100)
    if attention_mask is not None:
        labels = labels.masked_fill(~attention_mask.bool().unsqueeze(-1), -100)
    return labels


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


__all__ = ["TRAINING_STAGES", "apply_training_stage", "from_text_model", "grid_labels"]

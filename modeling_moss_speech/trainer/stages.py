"""Training stages: which parameters of MOSS-Speech train in each stage of the paper's recipe, and LoRA presets.

Stage I (`apply_training_stage(model, "stage1")`) trains the speech side with the text backbone frozen, stage II
("stage2") trains everything, "sft" fine-tunes everything on conversations; [`lora_config`] builds a PEFT config
for a named set of adapted layers. `check_fsdp_active` stops a launch whose FSDP request accelerate ignored.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers.utils import logging

if TYPE_CHECKING:  # PEFT is the [train] extra: imported where it is used
    from peft import LoraConfig

logger = logging.get_logger(__name__)

# The speech side: audio embedding, audio tail, its norm and head.
_SPEECH_SIDE = ("model.audio_embed.", "model.audio_block.", "model.audio_norm.", "audio_lm_head.")

# Module-name prefixes (inside MossSpeechForCausalLM) that each stage trains; everything else is frozen.
TRAINING_STAGES: dict[str, tuple[str, ...]] = {
    # Stage I: the text backbone (embedding, trunk, text tail, text norm and head) stays frozen.
    "stage1": _SPEECH_SIDE,
    # Stage II and SFT: everything is trained.
    "stage2": ("",),
    "sft": ("",),
    # Stage I's speech side plus the trunk's first layer: the layers above it and the text tail stay the text
    # model's, so a spoken question can reach the text knowledge only by being turned into what they read as text
    # (the first layer is the one place where several codes can merge into a word).
    "speech_front": (*_SPEECH_SIDE, "model.shared_block.layers.0."),
    # Cheapest adaptation: only the audio tail, its norm and head.
    "audio_tail_only": ("model.audio_block.", "model.audio_norm.", "audio_lm_head."),
}


def apply_training_stage(model: nn.Module, stage: str, verbose: bool = True) -> int:
    """Set `requires_grad` for a named training stage; returns the number of trainable parameters.

    Stages: `stage1` (speech side only: audio embedding, audio tail, audio norm and head), `stage2` and `sft`
    (everything), `speech_front` (stage1's and the trunk's first layer), `audio_tail_only`. Works on a
    `MossSpeechForCausalLM` or a PEFT wrapper of one (LoRA parameters stay as PEFT set them).
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


def check_fsdp_active(distributed_type: Any) -> None:
    """Raise a `ValueError` when the accelerate launch asked for FSDP but accelerate is not running it.

    `accelerate launch` with an FSDP config sets `ACCELERATE_USE_FSDP=true`; accelerate (1.15) honours it only on
    accelerator devices. On CPU it silently trains with DDP (`DistributedType.MULTI_CPU`), one full model per process:
    the memory the FSDP config was chosen for is not saved, so the scripts stop instead.

    Args:
        distributed_type: The running `accelerate.DistributedType` (`accelerator.distributed_type`).
    """
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")
    if requested and distributed_type != "FSDP":  # DistributedType is a str enum
        raise ValueError(f"the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true), but accelerate runs "
                         f"{distributed_type}: accelerate enables FSDP only on accelerator devices (GPU, XPU, ...); on "
                         "CPU it would train one full model per process. Use training/configs/ddp.yaml (or cpu.yaml) "
                         "on CPU.")


# ------------------------------------------------------------------------------------------------ LoRA presets

_PROJECTIONS = r"\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"

# Named LoRA setups: regexes over MossSpeechForCausalLM's module names (PEFT full-matches them) and the modules
# trained in full and saved with the adapter (the speech embedding and head are small and task-specific).
LORA_PRESETS: dict[str, dict[str, Any]] = {
    # The audio tail's attention and MLP projections only: adapts speech output, text behaviour untouched.
    "audio_tail": {"target_modules": rf".*audio_block{_PROJECTIONS}",
                   "modules_to_save": ["audio_lm_head", "audio_embed"]},
    # Both tails (text and audio), trunk frozen.
    "both_tails": {"target_modules": rf".*(text|audio)_block{_PROJECTIONS}",
                   "modules_to_save": ["audio_lm_head", "audio_embed"]},
    # Every decoder-layer projection: shared trunk and both tails.
    "all_linear": {"target_modules": rf".*(shared|text|audio)_block{_PROJECTIONS}",
                   "modules_to_save": ["audio_lm_head", "audio_embed"]},
}


def lora_config(preset: str, r: int = 16, alpha: int = 32, dropout: float = 0.0, **kwargs: Any) -> LoraConfig:
    """A `peft.LoraConfig` for a named preset of [`LORA_PRESETS`] (`audio_tail`, `both_tails`, `all_linear`).

    Args:
        preset: The preset's name.
        r: LoRA rank.
        alpha: LoRA alpha (scaling `alpha / r`).
        dropout: Dropout on the LoRA input.
        **kwargs: Other `LoraConfig` fields (e.g. `use_rslora=True`); they override the preset's.
    """
    from peft import LoraConfig

    if preset not in LORA_PRESETS:
        raise ValueError(f"unknown LoRA preset {preset!r}; choose one of {sorted(LORA_PRESETS)}.")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_config: r must be a positive int, got {r!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_config: dropout must be in [0, 1), got {dropout!r}.")
    values = dict(LORA_PRESETS[preset], r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM")
    values["modules_to_save"] = list(values["modules_to_save"])
    values.update(kwargs)
    return LoraConfig(**values)


__all__ = ["LORA_PRESETS", "TRAINING_STAGES", "apply_training_stage", "check_fsdp_active", "lora_config"]

"""Supervised fine-tuning with TRL: grid labels, the data collator and the trainer subclass.

The paper's recipe ("frozen pre-training"): split a pretrained Qwen3 into a shared trunk and two tails initialised
from the same text layers (`MossSpeechForCausalLM.from_text_model`), pre-train the speech side with the text
backbone frozen (`trainer.stages.apply_training_stage(model, "stage1")`), then train everything jointly ("stage2"),
then fine-tune ("sft") on conversations with [`MossSpeechDataCollator`] and [`MossSpeechSFTTrainer`], optionally
with a LoRA preset (`trainer.stages.lora_config`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import logging

from ..configuration_moss_speech import MossSpeechConfig
from ..processing_moss_speech import MossSpeechProcessor

if TYPE_CHECKING:  # TRL and PEFT are the [train] extra: imported where they are used
    from trl import SFTConfig

logger = logging.get_logger(__name__)


def grid_labels(
    input_ids: torch.LongTensor,
    config: MossSpeechConfig | MossSpeechProcessor,
    attention_mask: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Next-token targets for a (B, L, 2) or (L, 2) grid, aligned with the inputs (the model shifts them).

    A channel is a target only where generation samples it: the text channel on text rows (text id is not the
    modality pad, start-of-speech rows included) and the audio channel on speech rows (codes and end-of-speech).
    The forced values (modality pad in audio mode, audio pad in text mode) and padding are -100. `config` is the
    model config or the processor (only its `modality_pad_token_id` is read).
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


# ------------------------------------------------------------------------------------------------ SFT data


def _clean_content(content: Any) -> Any:
    """Drop the `None` fields an Arrow struct gives every message (a text turn gets `audio=None`, `codes=None`…)."""
    if isinstance(content, Mapping):
        cleaned = {key: _clean_content(value) for key, value in content.items() if value is not None}
        if "type" not in cleaned and isinstance(cleaned.get("text"), str) and len(cleaned) == 1:
            cleaned["type"] = "text"
        return cleaned
    if isinstance(content, (list, tuple)) and content and isinstance(content[0], Mapping):
        return [_clean_content(part) for part in content]
    return content


@dataclass
class MossSpeechDataCollator:
    """Builds training batches of MOSS-Speech from conversations: `input_ids` (B, L, 2), `attention_mask` (B, L) and
    `labels` (B, L, 2) with -100 everywhere except the assistant turns.

    Each example is a mapping with a `messages` column (a conversation whose content is text or audio in any form the
    processor accepts: a path, `{"audio": (waveform, rate)}`, a `datasets` Audio dict `{"array", "sampling_rate"}` at
    any rate (resampled to the codec's 16 kHz), or pre-encoded `{"codes": [...]}`; `None` fields of Arrow structs are
    ignored) and optionally `output_modality` ("text", "audio" or `None` = the last assistant turn's modality; it picks
    the default system prompt). All audio of a batch is encoded in one codec call.

    Layout: `MossSpeechProcessor.training_rows`, i.e. exactly the prompt that inference builds for the conversation up
    to its last assistant turn (the release's rules, default system turn placed after the history), followed by the
    answer. Labels: `grid_labels` (text channel on text rows, audio channel on speech rows) on the rows of every
    assistant turn: its content (a spoken answer's start-of-speech, codes and end-of-speech) and its closing
    `<|im_end|>`, so the model learns to stop; headers, user/system turns, the newline after `<|im_end|>` and
    padding are -100.

    Length: a conversation longer than `max_length` rows is, with `truncation="left"` (default), cut from the LEFT:
    its first rows (the oldest history) are dropped so the answer and its stop token are kept, and a warning is
    logged; with `truncation="error"` it raises `ValueError`. A conversation without an assistant turn, an empty
    audio or empty codes raise `ValueError`.

    Args:
        processor: The `MossSpeechProcessor` (with a codec when examples hold waveforms).
        max_length: Most rows per example (`None`: no limit).
        padding_side: "right" (default, for training) or "left".
        truncation: "left" or "error" (see above).
        pad_to_multiple_of: Round the padded length up to a multiple of this.
        messages_key: Name of the conversation column.
    """

    processor: MossSpeechProcessor
    max_length: int | None = None
    padding_side: str = "right"
    truncation: str = "left"
    pad_to_multiple_of: int | None = None
    messages_key: str = "messages"

    def __post_init__(self) -> None:
        if not isinstance(self.processor, MossSpeechProcessor):
            raise TypeError(f"MossSpeechDataCollator: processor must be a MossSpeechProcessor, got "
                            f"{type(self.processor).__name__}.")
        for name in ("max_length", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"MossSpeechDataCollator: {name} must be a positive int or None, got {value!r}.")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"MossSpeechDataCollator: padding_side must be 'right' or 'left', got "
                             f"{self.padding_side!r}.")
        if self.truncation not in ("left", "error"):
            raise ValueError(f"MossSpeechDataCollator: truncation must be 'left' or 'error', got {self.truncation!r}.")

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate a list of examples (dataset rows) into a padded training batch."""
        if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or len(examples) == 0:
            raise ValueError(f"MossSpeechDataCollator expects a non-empty list of examples, got "
                             f"{type(examples).__name__}.")
        conversations, modalities = [], []
        for index, example in enumerate(examples):
            if not isinstance(example, Mapping) or self.messages_key not in example:
                keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
                raise ValueError(f"examples[{index}] must be a mapping with a {self.messages_key!r} column (a "
                                 f"conversation), got {keys}.")
            messages = example[self.messages_key]
            if not isinstance(messages, Sequence) or isinstance(messages, (str, Mapping)):
                raise TypeError(f"examples[{index}][{self.messages_key!r}] must be a list of messages, got "
                                f"{type(messages).__name__}.")
            conversations.append([{**message, "content": _clean_content(message.get("content"))}
                                  if isinstance(message, Mapping) else message for message in messages])
            modalities.append(example.get("output_modality"))
        items = self.processor.training_rows(conversations, output_modality=modalities)

        truncated = []
        for index, item in enumerate(items):
            length = item["input_ids"].shape[0]
            if self.max_length is None or length <= self.max_length:
                continue
            if self.truncation == "error":
                raise ValueError(f"examples[{index}] is {length} rows long, more than max_length={self.max_length} "
                                 "(truncation='error'); raise max_length, shorten the conversation, or use "
                                 "truncation='left'.")
            item["input_ids"] = item["input_ids"][-self.max_length:]
            item["assistant_masks"] = item["assistant_masks"][-self.max_length:]
            truncated.append((index, length))
        if truncated:
            logger.warning(f"MossSpeechDataCollator: {len(truncated)} of {len(items)} conversations longer than "
                           f"max_length={self.max_length} rows were cut from the left (example, rows): {truncated}.")

        length = max(item["input_ids"].shape[0] for item in items)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.empty(len(items), length, 2, dtype=torch.long)
        input_ids[..., 0] = self.processor.text_pad_token_id
        input_ids[..., 1] = self.processor.audio_pad_token_id
        attention_mask = torch.zeros(len(items), length, dtype=torch.long)
        assistant = torch.zeros(len(items), length, dtype=torch.bool)
        for index, item in enumerate(items):
            rows = item["input_ids"].shape[0]
            span = slice(0, rows) if self.padding_side == "right" else slice(length - rows, length)
            input_ids[index, span] = item["input_ids"]
            attention_mask[index, span] = 1
            assistant[index, span] = item["assistant_masks"]
        labels = grid_labels(input_ids, self.processor, attention_mask).masked_fill(~assistant.unsqueeze(-1), -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ SFT trainer


def channel_target_counts(labels: torch.Tensor) -> torch.Tensor:
    """Targets per channel of a (B, L, 2) label grid after the model's shift: a (2,) LongTensor (text, audio)."""
    if not isinstance(labels, torch.Tensor) or labels.ndim != 3 or labels.shape[-1] != 2:
        raise ValueError(f"labels must be a (batch, length, 2) tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}.")
    return (labels[:, 1:] != -100).sum(dim=(0, 1))


def prepare_sft_config(args: SFTConfig | None = None, **kwargs: Any) -> SFTConfig:
    """An `SFTConfig` with the settings TRL needs for MOSS-Speech's (B, L, 2) conversation batches.

    Sets `dataset_kwargs["skip_prepare_dataset"] = True` (TRL must not tokenize the `messages` column),
    `remove_unused_columns=False` (the collator needs the raw columns), `assistant_only_loss=False` (the collator
    already masks everything but the assistant turns) and `ddp_find_unused_parameters=True` when unset (a frozen
    branch or a tail without targets in a step). Raises `ValueError` for settings that cannot apply to two-channel
    grids: `packing`, `padding_free`, `loss_type != "nll"`, `label_smoothing_factor > 0`.

    Args:
        args: A config to adjust in place and return; a new `SFTConfig(**kwargs)` when `None`.
        **kwargs: `SFTConfig` fields, only when `args` is `None`.
    """
    from trl import SFTConfig

    if args is None:
        args = SFTConfig(**kwargs)
    elif kwargs:
        raise ValueError(f"prepare_sft_config: pass either args or SFTConfig keywords, not both (got "
                         f"{sorted(kwargs)}).")
    if not isinstance(args, SFTConfig):
        raise TypeError(f"prepare_sft_config: args must be a trl.SFTConfig, got {type(args).__name__}.")
    unsupported = {
        "packing": args.packing, "padding_free": args.padding_free,
        "loss_type": args.loss_type if args.loss_type != "nll" else None,
        "label_smoothing_factor": args.label_smoothing_factor or None,
    }
    unsupported = {name: value for name, value in unsupported.items() if value}
    if unsupported:
        raise ValueError(f"SFTConfig settings not supported for MOSS-Speech grids: {unsupported}; the loss is the "
                         "model's own two-channel cross entropy on unpacked, padded batches.")
    dataset_kwargs = args.dataset_kwargs
    if isinstance(dataset_kwargs, str):
        dataset_kwargs = json.loads(dataset_kwargs)
    args.dataset_kwargs = {**(dataset_kwargs or {}), "skip_prepare_dataset": True}
    args.remove_unused_columns = False
    if args.assistant_only_loss:
        logger.info("assistant_only_loss: MossSpeechDataCollator already trains on assistant turns only; TRL's "
                    "template-based mask is turned off.")
        args.assistant_only_loss = False
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = True
    return args


try:  # TRL is the [train] extra; the rest of this module works without it
    from trl import SFTTrainer as _SFTTrainerBase

    _TRL_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without the extra
    _SFTTrainerBase = object
    _TRL_AVAILABLE = False


_NO_FORWARD = object()


def _base_model(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class MossSpeechSFTTrainer(_SFTTrainerBase):
    """TRL's `SFTTrainer` for MOSS-Speech: the loss is the model's own two-channel loss, logged per channel.

    - `compute_loss` calls the model with `labels` and returns its loss (text-channel plus audio-channel cross
      entropy); TRL's fused single-head LM path (`fused_lm_head=True`, `log_probs`) is not used, and the forward TRL
      patches onto the model is removed again.
    - `text_loss` and `audio_loss` are logged (and `eval_text_loss`, `eval_audio_loss`), averaged over the logging
      steps like `loss`, with `num_tokens`.
    - Gradient accumulation and multi-process training: each channel is normalised by ITS number of targets over the
      whole accumulated (and, with `average_tokens_across_devices`, all-process) batch, so the accumulated loss equals
      the model's loss on the full batch. A scalar `num_items_in_batch` passed by other callers goes to the model
      as is.
    - PEFT models (passed wrapped, or with `peft_config=`, e.g. `stages.lora_config`) work unchanged.
    - `args` goes through [`prepare_sft_config`]; `data_collator` defaults to a right-padded
      [`MossSpeechDataCollator`] with `args.max_length`; `processing_class` must be a `MossSpeechProcessor`.
    """

    def __init__(
        self,
        model: Any,
        args: SFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: MossSpeechProcessor | None = None,
        **kwargs: Any,
    ) -> None:
        if not _TRL_AVAILABLE:
            raise ImportError("MossSpeechSFTTrainer needs TRL: pip install 'moss-speech[train]'.")
        if not isinstance(processing_class, MossSpeechProcessor):
            raise TypeError(f"MossSpeechSFTTrainer: processing_class must be a MossSpeechProcessor, got "
                            f"{type(processing_class).__name__}.")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("MossSpeechSFTTrainer: compute_loss_func is not supported; the loss is the model's own "
                             "two-channel loss (subclass and override compute_loss to change it).")
        if args is None:
            args = prepare_sft_config(output_dir="moss-speech-sft")
        args = prepare_sft_config(args)
        if data_collator is None:
            data_collator = MossSpeechDataCollator(processing_class, max_length=args.max_length)
        # SFTTrainer patches a fused single-head forward onto the model instance; our loss needs the model's own
        # forward, so whatever instance `forward` the model had before (usually none) is put back afterwards.
        before = vars(_base_model(model)).get("forward", _NO_FORWARD) if isinstance(model, nn.Module) else _NO_FORWARD
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        base = _base_model(self.model)
        if vars(base).get("forward", _NO_FORWARD) is not before:
            if before is _NO_FORWARD:
                del base.forward
            else:
                base.forward = before
        # The model normalises by num_items_in_batch (compute_loss below), so Trainer must not divide by GA steps again.
        self.model_accepts_loss_kwargs = True
        # Per-channel losses and the token count, logged by `log` (kept here, not in the parent's metric store).
        self._channel_logs: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._trained_tokens = 0

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Trainer's micro-batches of one optimizer step; `num_items_in_batch` is the (2,) per-channel target count."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and all(isinstance(b, Mapping) and "labels" in b for b in batch_samples):
            counts = sum(channel_target_counts(b["labels"]) for b in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                counts = self.accelerator.gather(counts).view(-1, 2).sum(dim=0)
            num_items_in_batch = counts
        return batch_samples, num_items_in_batch

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's two-channel loss; records `text_loss` / `audio_loss` for the logs."""
        mode = "train" if self.model.training else "eval"
        labels = inputs.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise ValueError("MossSpeechSFTTrainer needs (B, L, 2) `labels` in each batch (MossSpeechDataCollator "
                             f"builds them), got {type(labels).__name__}.")
        inputs = {**inputs, "use_cache": False}
        per_channel = isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.shape == (2,)
        if num_items_in_batch is not None and not per_channel:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        local = channel_target_counts(labels).to(outputs.loss.device)
        if per_channel:
            # Each channel's mean over this micro-batch, re-weighted to a mean over the whole accumulated batch.
            weights = local / num_items_in_batch.to(local.device).clamp(min=1)
            loss = outputs.text_loss * weights[0] + outputs.audio_loss * weights[1]
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // max(self.get_tp_size(), 1))
        else:
            loss = outputs.loss

        # Per-channel means for the logs, weighted by targets across processes; a channel without targets is skipped.
        for channel, name in enumerate(("text_loss", "audio_loss")):
            value = getattr(outputs, name).detach().float()
            stats = torch.stack([value * local[channel], local[channel].to(value.dtype)])
            stats = self.accelerator.gather(stats.unsqueeze(0)).reshape(-1, 2).sum(dim=0)
            if stats[1] > 0:
                self._channel_logs[mode][name].append((stats[0] / stats[1]).item())
        if mode == "train" and "attention_mask" in inputs:
            tokens = self.accelerator.gather(inputs["attention_mask"].sum().unsqueeze(0)).sum().item()
            # Tensor-parallel ranks see the same batch: count its tokens once.
            self._trained_tokens += tokens // max(self.get_tp_size(), 1)
            self._channel_logs[mode]["num_tokens"] = [self._trained_tokens]
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean `text_loss` / `audio_loss` (`eval_`-prefixed in evaluation) and `num_tokens` to `logs`."""
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{key}": sum(values) / len(values)
                     for key, values in self._channel_logs[mode].items() if values})
        self._channel_logs[mode].clear()
        super().log(logs, start_time)

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, Any, Any]:
        """Evaluation: the two-channel loss, and with `prediction_loss_only=False` the (text, audio) logits."""
        from accelerate.utils import send_to_device

        # The collator's batches hold integer tensors only, so moving them to the device is all the preparation
        # they need.
        inputs = send_to_device(inputs, self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), (outputs.text_logits, outputs.audio_logits), inputs.get("labels")


__all__ = [
    "MossSpeechDataCollator",
    "MossSpeechSFTTrainer",
    "channel_target_counts",
    "grid_labels",
    "prepare_sft_config",
]

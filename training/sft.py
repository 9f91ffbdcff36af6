"""Supervised fine-tuning of MOSS-Speech on conversations with TRL.

    python training/sft.py --model_name_or_path path/to/MOSS-Speech --codec_name_or_path path/to/MOSS-Speech-Codec \\
        --dataset_name path/to/dataset --output_dir moss-speech-sft [--use_peft --lora_preset audio_tail --merge_lora]
    accelerate launch training/sft.py --config training/configs/sft.yaml

The dataset (a `datasets.load_from_disk` directory, or anything `datasets.load_dataset` reads) has a `messages`
column of conversations; content is text, audio (path, `{"array", "sampling_rate"}` at any rate, …) or
pre-encoded `{"codes": [...]}`, and an optional `output_modality` column. Labels cover the assistant turns only
(`MossSpeechDataCollator`); the loss is the model's own text + audio loss (`MossSpeechSFTTrainer`). Every `SFTConfig`
flag works (`--learning_rate`, `--max_steps`, `--gradient_accumulation_steps`, `--max_length`, …); the settings TRL
needs for non-text data are set here (`prepare_sft_config`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk
from transformers.utils import logging
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from modeling_moss_speech import MossSpeechForCausalLM, MossSpeechProcessor
from modeling_moss_speech.threads import THREADS_HELP, set_threads
from modeling_moss_speech.trainer.sft import MossSpeechDataCollator, MossSpeechSFTTrainer, prepare_sft_config
from modeling_moss_speech.trainer.stages import (
    LORA_PRESETS,
    TRAINING_STAGES,
    apply_training_stage,
    check_fsdp_active,
    lora_config,
)

logger = logging.get_logger(__name__)


@dataclass
class MossSpeechSFTArguments(ScriptArguments):
    """Script arguments on top of TRL's (`--dataset_name`, `--dataset_config`, `--dataset_train_split`, …)."""

    processor_name_or_path: str | None = field(
        default=None, metadata={"help": "Processor directory or repo id; the model's by default."})
    codec_name_or_path: str | None = field(
        default=None, metadata={"help": "Speech codec directory or repo id (encodes audio turns); the processor's own "
                                        "codec by default."})
    stage: str = field(
        default="sft", metadata={"help": "Parameters to train without PEFT (apply_training_stage).",
                                 "choices": sorted(TRAINING_STAGES)})
    lora_preset: str = field(
        default="audio_tail", metadata={"help": "LoRA preset with --use_peft.", "choices": sorted(LORA_PRESETS)})
    merge_lora: bool = field(
        default=False, metadata={"help": "With --use_peft: merge the adapter and save a plain checkpoint."})
    padding_side: str = field(default="right", metadata={"help": "Batch padding side.", "choices": ["right", "left"]})
    truncation: str = field(
        default="left", metadata={"help": "Conversations over --max_length rows: drop their first rows ('left', with "
                                          "a warning) or fail ('error').", "choices": ["left", "error"]})
    threads: int | None = field(default=None, metadata={"help": THREADS_HELP})


def load_split(name: str, config: str | None, split: str, streaming: bool = False) -> Dataset | IterableDataset:
    """One split of a dataset saved with `save_to_disk` (a `Dataset` is used whole), or read by `load_dataset`."""
    saved = ("dataset_dict.json", "dataset_info.json", "state.json")
    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in saved):
        data = load_from_disk(name)
    else:
        data = load_dataset(name, name=config, streaming=streaming)
    if isinstance(data, (DatasetDict, IterableDatasetDict)):
        if split not in data:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(data)}.")
        data = data[split]
    if "messages" not in (data.column_names or ["messages"]):
        raise ValueError(f"dataset {name!r} (split {split!r}) needs a 'messages' column of conversations, it has "
                         f"{data.column_names}.")
    return data


def main(
    script_args: MossSpeechSFTArguments, training_args: SFTConfig, model_args: ModelConfig
) -> MossSpeechSFTTrainer:
    """Load model, processor and data, fine-tune, save to `training_args.output_dir`; returns the trainer."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path (a MOSS-Speech checkpoint) is required.")
    if not script_args.dataset_name:
        raise ValueError("--dataset_name (a dataset with a 'messages' column) is required.")
    set_threads(script_args.threads)
    training_args = prepare_sft_config(training_args)

    model = MossSpeechForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=model_args.dtype or "float32",
        attn_implementation=model_args.attn_implementation,
    )
    overrides = {"codec_path": script_args.codec_name_or_path} if script_args.codec_name_or_path else {}
    processor = MossSpeechProcessor.from_pretrained(
        script_args.processor_name_or_path or model_args.model_name_or_path, **overrides)

    peft_config = None
    if model_args.use_peft:
        peft_config = lora_config(script_args.lora_preset, r=model_args.lora_r, alpha=model_args.lora_alpha,
                                  dropout=model_args.lora_dropout, use_rslora=model_args.use_rslora)
        if script_args.stage != "sft":
            logger.warning(f"--stage {script_args.stage} is ignored with --use_peft: the LoRA preset "
                           f"{script_args.lora_preset!r} decides what is trained.")
    else:
        apply_training_stage(model, script_args.stage)

    train_dataset = load_split(script_args.dataset_name, script_args.dataset_config,
                               script_args.dataset_train_split, script_args.dataset_streaming)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_split(script_args.dataset_name, script_args.dataset_config,
                                  script_args.dataset_test_split, script_args.dataset_streaming)
    collator = MossSpeechDataCollator(processor, max_length=training_args.max_length,
                                      padding_side=script_args.padding_side, truncation=script_args.truncation)
    trainer = MossSpeechSFTTrainer(
        model, args=training_args, data_collator=collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=processor, peft_config=peft_config,
    )
    check_fsdp_active(trainer.accelerator.distributed_type)
    trainer.train()

    if model_args.use_peft and script_args.merge_lora:
        merged = trainer.model.merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(training_args.output_dir)
            processor.save_pretrained(training_args.output_dir)
    else:
        trainer.save_model(training_args.output_dir)  # the adapter alone with --use_peft (and the processor)
    return trainer


def make_parser() -> TrlParser:
    """The command-line parser: our script arguments, TRL's `SFTConfig` and `ModelConfig` (`--config file.yaml`)."""
    return TrlParser((MossSpeechSFTArguments, SFTConfig, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())

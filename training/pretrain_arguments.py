"""The flags of `training/pretrain.py`: one dataclass, read from `--config recipe.yaml` plus `--snake_case` overrides.

Every key of a recipe in `training/configs/` is a field of `PretrainArguments`; `python training/pretrain.py --help`
lists them with their help text. On the command line a list flag takes several values (`--datasets data/a data/b`)
and a mapping is given as YAML or JSON text (`--config_overrides '{sosp_token_id: 151665}'`); either replaces the
recipe's value.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from modeling_moss_speech.apps.script_utils import ScriptArgumentParser, threads_field
from modeling_moss_speech.trainer.stages import TRAINING_STAGES

logger = logging.getLogger("moss_speech.pretrain")

MIXED_PRECISION = (None, "no", "bf16", "fp16")
DATASET_KINDS = ("auto", "speech", "text")

_DATASETS_HELP = (
    "`datasets.load_from_disk` directories; each entry a path or a mapping {path: ..., kind: auto|speech|text} (on "
    "the command line as YAML text). Every example has `input_ids`: a (L, 2) grid given as a list of [text, audio] "
    "pairs (speech-only, interleaved speech/text, or text-only). kind auto classifies each example: text-only = no "
    "row whose text id is modality_pad_token_id; speech/text skip that scan.")


@dataclass
class PretrainArguments:
    """A pre-training recipe: model, data, optimisation, evaluation, checkpoints and logging."""

    # model
    model: str | None = field(default=None, metadata={
        "help": "MOSS-Speech checkpoint directory (or Hub id) to train; exclusive with init_from_text_model."})
    init_from_text_model: str | None = field(default=None, metadata={
        "help": "A Qwen3 causal-LM directory split into MOSS-Speech with from_text_model (trunk = first "
                "num_shared_layers layers, both tails = the rest, new audio embedding/head)."})
    num_shared_layers: int | None = field(default=None, metadata={
        "help": "Trunk size for init_from_text_model (required with it)."})
    audio_vocab_size: int = field(default=16512, metadata={
        "help": "Rows of the new speech embedding/head for init_from_text_model."})
    config_overrides: dict | str | None = field(default_factory=dict, metadata={
        "help": "Mapping of extra MossSpeechConfig fields for init_from_text_model: the special ids (sosp_token_id, "
                "eosp_token_id, modality_pad_token_id, audio_pad_token_id, pad_token_id) when the tokenizer is not "
                "Qwen3's."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "sdpa (when unset), eager, flash_attention_2, ..."})
    stage: str = field(default="stage1", metadata={
        "help": "Training stage for apply_training_stage: stage1 (speech side only) or stage2 (all); the other "
                "named stages of trainer.stages.TRAINING_STAGES are accepted too."})
    # data
    datasets: list[str] = field(default_factory=list, metadata={"help": _DATASETS_HELP + " Required."})
    eval_datasets: list[str] = field(default_factory=list, metadata={
        "help": "Same form as datasets; evaluated in order (no mixing) every eval_every steps."})
    text_mix_ratio: float | None = field(default=None, metadata={
        "help": "Unset: every example once per epoch. A number r in [0, 1]: each epoch holds every sequence with "
                "speech once plus round(n_speech * r / (1 - r)) text-only sequences (drawn from a seeded stream "
                "over the text-only pool), so r is the fraction of text-only sequences drawn (r = 1: text only). "
                "Stage II mixes text in; in stage I text-only sequences train nothing (use 0)."})
    max_length: int = field(default=2048, metadata={
        "help": "Rows per training row (>= 2). Longer examples are cut into max_length pieces, each trained as its "
                "own sequence (positions restart, its first row has no target)."})
    pack: bool = field(default=True, metadata={
        "help": "true: concatenate sequences into rows of max_length (positions restart at 0 for each sequence; no "
                "attention crosses a sequence boundary). false: one sequence per row, right-padded with an "
                "attention mask."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    # optimisation
    per_device_batch_size: int = field(default=8, metadata={"help": "Rows per micro-batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "AdamW over the trainable parameters only (weight decay on matrices, not on norms)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the matrices."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    warmup_steps: int = field(default=0, metadata={
        "help": "Linear warmup, then cosine decay to 0 at max_steps (get_cosine_schedule_with_warmup)."})
    max_steps: int = field(default=1000, metadata={
        "help": "Optimizer steps to train (the data stream repeats in new seeded epochs as needed)."})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no | bf16 | fp16; unset: the accelerate config's choice. Weights stay float32."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute decoder layers in the backward pass (non-reentrant)."})
    ddp_find_unused_parameters: bool = field(default=True, metadata={
        "help": "DDP's find_unused_parameters (true: the safe choice with frozen branches; this loop's graph reaches "
                "every trainable parameter, so false saves a graph traversal)."})
    seed: int = field(default=42, metadata={
        "help": "Seeds model initialisation and the data order (epoch e uses seed + e)."})
    threads: int | None = threads_field()
    # evaluation, checkpoints, logging
    eval_every: int = field(default=0, metadata={
        "help": "Steps between evaluations (0: only at the end when eval_datasets are given)."})
    eval_batch_size: int | None = field(default=None, metadata={
        "help": "Rows per eval batch per process (default: per_device_batch_size)."})
    save_every: int = field(default=0, metadata={
        "help": "Steps between accelerator.save_state checkpoints in output_dir/checkpoint-<step> (0: none)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    output_dir: str = field(default="outputs/pretrain", metadata={
        "help": "Checkpoints, metrics.jsonl, the resolved recipe and the final model (save_pretrained, "
                "safetensors)."})
    resume_from: str | None = field(default=None, metadata={
        "help": "A checkpoint directory, or 'latest' (newest checkpoint-* in output_dir): restores model, "
                "optimizer, scheduler, RNG, step and the data position (skipped batches are not loaded); training "
                "continues exactly as if it had not stopped."})
    log_every: int = field(default=10, metadata={
        "help": "Steps between log lines (mean loss per channel over the window, lr, grad norm)."})
    log_with: list[str] | None = field(default=None, metadata={
        "help": "Accelerate trackers (tensorboard, wandb, all, several); unset: stdout only."})
    tracker_project: str = field(default="moss-speech-pretrain", metadata={
        "help": "Project name passed to the trackers."})
    progress_bar: bool = field(default=True, metadata={"help": "tqdm bar on the main process."})
    align_dataset: str | None = field(default=None, metadata={
        "help": "Pairs for the trunk-state alignment loss (processing/prepare_nano.py's pretrain/align: an S->T and a "
                "T->T chat grid of the same fact that end in the same rows); read only when align_weight > 0."})
    align_weight: float = field(default=0.0, metadata={
        "help": "Weight of the alignment loss added to each micro-batch's loss (0: off). It pulls the hidden states "
                "of the shared final rows after a spoken question toward those after the same question as text, at "
                "every trunk layer and the text tail (text side without gradient)."})
    align_batch_size: int = field(default=8, metadata={"help": "Pairs per micro-batch for the alignment loss."})
    align_teacher: str | None = field(default=None, metadata={
        "help": "A MOSS-Speech checkpoint whose states of the text grids are the targets (frozen, loaded once); "
                "unset: the model being trained (without gradient through the text side). Pairs with per-row "
                "`weights` (prepare_nano.py's pretrain/frames) are compared row for row at those weights."})
    align_temperature: float = field(default=0.0, metadata={
        "help": "0: the alignment loss is 1 - cosine similarity; > 0: contrastive (InfoNCE over the micro-batch's "
                "pairs at this temperature: a spoken question must be nearer its own text than other facts' texts)."})

    def __post_init__(self) -> None:
        """Check every value; raise a ValueError that names the key, its value and what was expected."""
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        if isinstance(self.config_overrides, str):
            self.config_overrides = _parse_mapping("config_overrides", self.config_overrides)
        if self.config_overrides is None:
            self.config_overrides = {}
        if not isinstance(self.config_overrides, dict):
            raise ValueError(f"recipe key 'config_overrides' must be a mapping, got {self.config_overrides!r}.")
        if self.stage not in TRAINING_STAGES:
            raise ValueError(f"recipe key 'stage' must be one of {sorted(TRAINING_STAGES)}, got {self.stage!r}.")
        if (self.model is None) == (self.init_from_text_model is None):
            raise ValueError("the recipe needs exactly one of 'model' (a MOSS-Speech checkpoint) and "
                             f"'init_from_text_model' (a Qwen3 checkpoint), got model={self.model!r}, "
                             f"init_from_text_model={self.init_from_text_model!r}.")
        if self.init_from_text_model is not None and self.num_shared_layers is None:
            raise ValueError("recipe key 'num_shared_layers' is required with 'init_from_text_model'.")
        self.datasets = _dataset_entries("datasets", self.datasets)
        self.eval_datasets = _dataset_entries("eval_datasets", self.eval_datasets)
        if not self.datasets:
            raise ValueError("recipe key 'datasets' must list at least one dataset directory.")
        if self.max_length < 2:
            raise ValueError(f"recipe key 'max_length' must be >= 2 (a row needs a next row to predict), "
                             f"got {self.max_length}.")
        if self.text_mix_ratio is not None and not 0.0 <= self.text_mix_ratio <= 1.0:
            raise ValueError(f"recipe key 'text_mix_ratio' must be in [0, 1] or null, got {self.text_mix_ratio}.")
        for key in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"recipe key {key!r} must be >= 1, got {getattr(self, key)}.")
        for key in ("warmup_steps", "eval_every", "save_every", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"recipe key {key!r} must be >= 0, got {getattr(self, key)}.")
        for key in ("eval_batch_size", "threads", "save_total_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"recipe key {key!r} must be >= 1 or null, got {getattr(self, key)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"recipe key 'learning_rate' must be > 0, got {self.learning_rate}.")
        if self.max_grad_norm < 0:
            raise ValueError(f"recipe key 'max_grad_norm' must be >= 0, got {self.max_grad_norm}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"recipe key 'mixed_precision' must be one of no, bf16, fp16 or null, "
                             f"got {self.mixed_precision!r}.")
        if self.align_weight < 0 or self.align_temperature < 0 or self.align_batch_size < 1:
            raise ValueError(f"recipe keys 'align_weight' and 'align_temperature' must be >= 0 and "
                             f"'align_batch_size' >= 1, got {self.align_weight}, {self.align_temperature}, "
                             f"{self.align_batch_size}.")
        if self.align_weight > 0 and not self.align_dataset:
            raise ValueError("recipe key 'align_weight' > 0 needs 'align_dataset' (processing/prepare_nano.py's "
                             "pretrain/align pairs).")
        if self.align_dataset is not None and not os.path.isdir(self.align_dataset):
            raise ValueError(f"recipe key 'align_dataset': {self.align_dataset!r} is not a directory written by "
                             "datasets' save_to_disk.")
        if self.align_teacher is not None and not self.align_weight > 0:
            raise ValueError("recipe key 'align_teacher' needs 'align_weight' > 0 (the teacher serves only the "
                             "alignment loss).")
        if self.align_teacher is not None and not os.path.isfile(os.path.join(self.align_teacher, "config.json")):
            raise ValueError(f"recipe key 'align_teacher': {self.align_teacher!r} is not a checkpoint directory "
                             "(no config.json).")
        if self.stage == "stage1" and self.text_mix_ratio:
            logger.warning("stage1 freezes the text backbone: text-only sequences (text_mix_ratio=%s) train nothing.",
                           self.text_mix_ratio)


def _parse_mapping(key: str, text: str) -> dict:
    """A mapping given on the command line as YAML (or JSON) text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"recipe key {key!r} must be a mapping (YAML or JSON text), got {text!r} ({error}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"recipe key {key!r} must be a mapping (YAML or JSON text), got {text!r}.")
    return value


def _dataset_entries(key: str, entries: Any) -> list[dict[str, str]]:
    """`datasets` entries as `{"path", "kind"}` mappings, checking that every path exists."""
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise ValueError(f"recipe key {key!r} must be a list of dataset paths, got {entries!r}.")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str) and entry.lstrip().startswith("{"):  # a mapping given on the command line
            entry = _parse_mapping(f"{key}[{i}]", entry)
        if isinstance(entry, (str, os.PathLike)):
            entry = {"path": str(entry)}
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{key}[{i}] must be a path or a mapping with a 'path', got {entry!r}.")
        unknown = set(entry) - {"path", "kind"}
        if unknown:
            raise ValueError(f"{key}[{i}] has unknown keys {sorted(unknown)}; expected 'path' and 'kind'.")
        kind = entry.get("kind", "auto")
        if kind not in DATASET_KINDS:
            raise ValueError(f"{key}[{i}].kind must be one of {DATASET_KINDS}, got {kind!r}.")
        path = str(entry["path"])
        if not os.path.isdir(path):
            raise ValueError(f"{key}[{i}]: dataset path {path!r} does not exist (expected a directory written by "
                             "datasets' save_to_disk).")
        out.append({"path": path, "kind": kind})
    return out


def make_parser() -> ScriptArgumentParser:
    """The command-line parser of `training/pretrain.py` (`--config recipe.yaml` and `PretrainArguments`' flags)."""
    return ScriptArgumentParser(PretrainArguments, description="MOSS-Speech pre-training with Accelerate (stage I: "
                                "frozen text backbone; stage II: joint, with text mixed in).")

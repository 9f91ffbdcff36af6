"""MOSS-Speech pre-training with Accelerate (stage I: frozen text backbone; stage II: joint, with text mixed in).

Launch (one process, or any accelerate config in `training/configs/`):

    accelerate launch [--config_file training/configs/ddp.yaml] training/pretrain.py \\
        --config training/configs/stage1.yaml [--key value ...]

`--key value` overrides one recipe key (the value is read as YAML: `--max_steps 10`, `--pack false`,
`--datasets '[data/a, data/b]'`, `--config_overrides.sosp_token_id 151665`). `main(argv)` runs it in-process.

Recipe keys (YAML mapping; every key is optional except a model and `datasets`):

Model
    model                  MOSS-Speech checkpoint directory (or Hub id) to train; exclusive with
                           `init_from_text_model`.
    init_from_text_model   A Qwen3 causal-LM directory split into MOSS-Speech with `from_text_model`
                           (trunk = first `num_shared_layers` layers, both tails = the rest, new audio embedding/head).
    num_shared_layers      Trunk size for `init_from_text_model` (required with it).
    audio_vocab_size       Rows of the new speech embedding/head for `init_from_text_model` (default 16512).
    config_overrides       Mapping of extra `MossSpeechConfig` fields for `init_from_text_model`: the special ids
                           (`sosp_token_id`, `eosp_token_id`, `modality_pad_token_id`, `audio_pad_token_id`,
                           `pad_token_id`) when the tokenizer is not Qwen3's.
    attn_implementation    "sdpa" (default), "eager", "flash_attention_2", ...
    stage                  Training stage for `apply_training_stage`: stage1 (speech side only) or stage2 (all);
                           the other named stages of `trainer.stages.TRAINING_STAGES` are accepted too.
Data
    datasets               List of `datasets.load_from_disk` directories, each entry a path or a mapping
                           `{path: ..., kind: auto|speech|text}`. Every example has `input_ids`: a (L, 2) grid given as
                           a list of [text, audio] pairs (speech-only, interleaved speech/text, or text-only).
                           `kind: auto` (default) classifies each example: text-only = no speech row (no row whose
                           text id is `modality_pad_token_id`); `speech`/`text` skip that scan.
    eval_datasets          Same form; evaluated in order (no mixing) every `eval_every` steps.
    text_mix_ratio         null: every example once per epoch. A number r in [0, 1]: each epoch holds every
                           sequence with speech once plus round(n_speech * r / (1 - r)) text-only sequences (drawn
                           from a seeded stream over the text-only pool), so r is the fraction of text-only
                           *sequences* drawn (r = 1: text only). Stage II mixes text in; in stage I text-only
                           sequences train nothing (use 0).
    max_length             Rows per training row (>= 2). Longer examples are cut into max_length pieces, each
                           trained as its own sequence (positions restart, its first row has no target).
    pack                   true: concatenate sequences into rows of max_length (positions restart at 0 for each
                           sequence; no attention crosses a sequence boundary). false: one sequence per row,
                           right-padded with an attention mask.
    num_workers            DataLoader worker processes (default 0).
Optimisation
    per_device_batch_size  Rows per micro-batch per process.
    gradient_accumulation_steps  Micro-batches per optimizer step.
    learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm (0 = no clipping)
                           AdamW over the trainable parameters only (weight decay on matrices, not on norms).
    warmup_steps           Linear warmup, then cosine decay to 0 at `max_steps` (get_cosine_schedule_with_warmup).
    max_steps              Optimizer steps to train (the data stream repeats in new seeded epochs as needed).
    mixed_precision        no | bf16 | fp16; null = the accelerate config's choice. Weights stay float32.
    gradient_checkpointing Recompute decoder layers in the backward pass (non-reentrant).
    ddp_find_unused_parameters  DDP's find_unused_parameters (default true, the safe choice with frozen branches;
                           this loop's graph reaches every trainable parameter, so false saves a graph traversal).
    seed                   Seeds model initialisation and the data order (epoch e uses seed + e).
    threads                torch CPU threads of each process (`--threads N`; default: $OMP_NUM_THREADS if set,
                           else half the usable CPUs; see `modeling_moss_speech.threads`).
Evaluation, checkpoints, logging
    eval_every             Steps between evaluations (0 = only at the end when eval_datasets are given).
    eval_batch_size        Rows per eval batch per process (default: per_device_batch_size).
    save_every             Steps between `accelerator.save_state` checkpoints in output_dir/checkpoint-<step>
                           (0 = none); `save_total_limit` keeps only the newest N.
    output_dir             Checkpoints, metrics.jsonl, the resolved recipe and the final model (save_pretrained,
                           safetensors).
    resume_from            A checkpoint directory, or "latest" (newest checkpoint-* in output_dir): restores model,
                           optimizer, scheduler, RNG, step and the data position (skipped batches are not loaded);
                           training continues exactly as if it had not stopped.
    log_every              Steps between log lines (mean loss per channel over the window, lr, grad norm).
    log_with               Accelerate trackers ("tensorboard", "wandb", "all", a list); null = stdout only.
    tracker_project        Project name passed to the trackers.
    progress_bar           tqdm bar on the main process.

Loss: per micro-batch, the text-channel plus the audio-channel mean cross entropy (labels from
`trainer.sft.grid_labels`), averaged over the accumulated micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM
from modeling_moss_speech.modeling_moss_speech import from_text_model
from modeling_moss_speech.threads import set_threads
from modeling_moss_speech.trainer.sft import grid_labels
from modeling_moss_speech.trainer.stages import TRAINING_STAGES, apply_training_stage, check_fsdp_active

logger = logging.getLogger("moss_speech.pretrain")

MIXED_PRECISION = (None, "no", "bf16", "fp16")
DATASET_KINDS = ("auto", "speech", "text")


# --------------------------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    """A pre-training recipe; see the module docstring for every key."""

    # model
    model: str | None = None
    init_from_text_model: str | None = None
    num_shared_layers: int | None = None
    audio_vocab_size: int = 16512
    config_overrides: dict = field(default_factory=dict)
    attn_implementation: str | None = None
    stage: str = "stage1"
    # data
    datasets: list = field(default_factory=list)
    eval_datasets: list = field(default_factory=list)
    text_mix_ratio: float | None = None
    max_length: int = 2048
    pack: bool = True
    num_workers: int = 0
    # optimisation
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    max_steps: int = 1000
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    ddp_find_unused_parameters: bool = True
    seed: int = 42
    threads: int | None = None
    # evaluation, checkpoints, logging
    eval_every: int = 0
    eval_batch_size: int | None = None
    save_every: int = 0
    save_total_limit: int | None = None
    output_dir: str = "outputs/pretrain"
    resume_from: str | None = None
    log_every: int = 10
    log_with: str | list | None = None
    tracker_project: str = "moss-speech-pretrain"
    progress_bar: bool = True


_INT_FIELDS = {"num_shared_layers", "audio_vocab_size", "max_length", "num_workers", "per_device_batch_size",
               "gradient_accumulation_steps", "warmup_steps", "max_steps", "seed", "threads", "eval_every",
               "eval_batch_size", "save_every", "save_total_limit", "log_every"}
_FLOAT_FIELDS = {"text_mix_ratio", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                 "max_grad_norm"}
_BOOL_FIELDS = {"pack", "gradient_checkpointing", "ddp_find_unused_parameters", "progress_bar"}
_STR_FIELDS = {"model", "init_from_text_model", "attn_implementation", "stage", "mixed_precision", "output_dir",
               "resume_from", "tracker_project"}


def _coerce(key: str, value: Any) -> Any:
    """Convert one recipe value to its field's type; raise a ValueError naming the key otherwise."""
    if value is None:
        return None
    if key in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"recipe key {key!r} must be true or false, got {value!r}.")
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"recipe key {key!r} must be an integer, got {value!r}.")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"recipe key {key!r} must be an integer, got {value!r}.") from None
    if key in _FLOAT_FIELDS:
        if isinstance(value, bool):
            raise ValueError(f"recipe key {key!r} must be a number, got {value!r}.")
        try:
            return float(value)  # YAML reads "1e-4" as a string
        except (TypeError, ValueError):
            raise ValueError(f"recipe key {key!r} must be a number, got {value!r}.") from None
    if key in _STR_FIELDS:
        if key == "mixed_precision" and value is False:  # YAML reads a bare `no` as false
            return "no"
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"recipe key {key!r} must be a string, got {value!r}.")
        return str(value)
    if key == "config_overrides" and not isinstance(value, dict):
        raise ValueError(f"recipe key 'config_overrides' must be a mapping, got {value!r}.")
    if key in ("datasets", "eval_datasets") and isinstance(value, (str, dict)):
        return [value]
    return value


def _normalise_dataset_entries(key: str, entries: Any) -> list[dict[str, str]]:
    """`datasets` entries as `{"path", "kind"}` mappings, checking that every path exists."""
    if not isinstance(entries, list):
        raise ValueError(f"recipe key {key!r} must be a list of dataset paths, got {entries!r}.")
    out = []
    for i, entry in enumerate(entries):
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


def validate_config(cfg: PretrainConfig) -> PretrainConfig:
    """Check every recipe value; raise a ValueError that names the key, its value and what was expected."""
    if cfg.stage not in TRAINING_STAGES:
        raise ValueError(f"recipe key 'stage' must be one of {sorted(TRAINING_STAGES)}, got {cfg.stage!r}.")
    if (cfg.model is None) == (cfg.init_from_text_model is None):
        raise ValueError("the recipe needs exactly one of 'model' (a MOSS-Speech checkpoint) and "
                         f"'init_from_text_model' (a Qwen3 checkpoint), got model={cfg.model!r}, "
                         f"init_from_text_model={cfg.init_from_text_model!r}.")
    if cfg.init_from_text_model is not None and cfg.num_shared_layers is None:
        raise ValueError("recipe key 'num_shared_layers' is required with 'init_from_text_model'.")
    if not cfg.datasets:
        raise ValueError("recipe key 'datasets' must list at least one dataset directory.")
    cfg.datasets = _normalise_dataset_entries("datasets", cfg.datasets)
    cfg.eval_datasets = _normalise_dataset_entries("eval_datasets", cfg.eval_datasets or [])
    if cfg.max_length < 2:
        raise ValueError(f"recipe key 'max_length' must be >= 2 (a row needs a next row to predict), "
                         f"got {cfg.max_length}.")
    if cfg.text_mix_ratio is not None and not 0.0 <= cfg.text_mix_ratio <= 1.0:
        raise ValueError(f"recipe key 'text_mix_ratio' must be in [0, 1] or null, got {cfg.text_mix_ratio}.")
    for key in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps", "log_every"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"recipe key {key!r} must be >= 1, got {getattr(cfg, key)}.")
    for key in ("warmup_steps", "eval_every", "save_every", "num_workers"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"recipe key {key!r} must be >= 0, got {getattr(cfg, key)}.")
    if cfg.eval_batch_size is not None and cfg.eval_batch_size < 1:
        raise ValueError(f"recipe key 'eval_batch_size' must be >= 1, got {cfg.eval_batch_size}.")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"recipe key 'threads' must be >= 1 or null, got {cfg.threads}.")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ValueError(f"recipe key 'save_total_limit' must be >= 1 or null, got {cfg.save_total_limit}.")
    if cfg.learning_rate <= 0:
        raise ValueError(f"recipe key 'learning_rate' must be > 0, got {cfg.learning_rate}.")
    if cfg.max_grad_norm < 0:
        raise ValueError(f"recipe key 'max_grad_norm' must be >= 0, got {cfg.max_grad_norm}.")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"recipe key 'mixed_precision' must be one of no, bf16, fp16 or null, "
                         f"got {cfg.mixed_precision!r}.")
    if cfg.stage == "stage1" and cfg.text_mix_ratio:
        logger.warning("stage1 freezes the text backbone: text-only sequences (text_mix_ratio=%s) train nothing.",
                       cfg.text_mix_ratio)
    return cfg


def _parse_overrides(tokens: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """Split `--config path --key value --key=value --flag` into the recipe path and the overrides."""
    config_path, overrides = None, {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"unexpected argument {token!r}; expected --key value pairs.")
        key, value = token[2:], None
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 1
        else:
            value = "true"
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            config_path = value
            continue
        overrides[key] = yaml.safe_load(value)
    return config_path, overrides


def load_config(argv: Sequence[str] | None = None) -> PretrainConfig:
    """Read `--config recipe.yaml` and apply `--key value` overrides; returns a validated config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    config_path, overrides = _parse_overrides(argv)
    values: dict[str, Any] = {}
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ValueError(f"--config {config_path!r} is not a file.")
        with open(config_path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"--config {config_path!r} must hold a YAML mapping of recipe keys.")
    for key, value in overrides.items():
        if "." in key:  # --config_overrides.sosp_token_id 5
            outer, inner = key.split(".", 1)
            nested = dict(values.get(outer) or {})
            nested[inner] = value
            values[outer] = nested
        else:
            values[key] = value
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown recipe keys {unknown}; valid keys: {sorted(names)}.")
    return validate_config(PretrainConfig(**{k: _coerce(k, v) for k, v in values.items()}))


# --------------------------------------------------------------------------------------------------------------------
# Data: sources, seeded epoch plans, packed rows
# --------------------------------------------------------------------------------------------------------------------


class GridSource:
    """The examples of several on-disk datasets: per example its dataset, index, length and text-only flag."""

    def __init__(self, entries: list[dict[str, str]], modality_pad_token_id: int) -> None:
        import datasets

        self.datasets = []
        ds_ids, rows, lengths, text_only = [], [], [], []
        for d, entry in enumerate(entries):
            ds = datasets.load_from_disk(entry["path"])
            if isinstance(ds, datasets.DatasetDict):
                raise ValueError(f"dataset {entry['path']!r} is a DatasetDict ({list(ds)}); point to one split's "
                                 "directory.")
            if "input_ids" not in ds.column_names:
                raise ValueError(f"dataset {entry['path']!r} has no 'input_ids' column (columns: {ds.column_names}).")
            length, is_text = _scan_grids(ds, modality_pad_token_id, entry["kind"], entry["path"])
            self.datasets.append(ds.with_format("numpy", columns=["input_ids"]))
            ds_ids.append(np.full(len(ds), d, dtype=np.int64))
            rows.append(np.arange(len(ds), dtype=np.int64))
            lengths.append(length)
            text_only.append(is_text)
        self.ds_id = np.concatenate(ds_ids)
        self.row = np.concatenate(rows)
        self.length = np.concatenate(lengths)
        self.text_only = np.concatenate(text_only)

    def __len__(self) -> int:
        return len(self.row)

    def grid(self, example: int) -> np.ndarray:
        """The (L, 2) grid of one example (global example index)."""
        ds = self.datasets[int(self.ds_id[example])]
        return np.asarray(ds[int(self.row[example])]["input_ids"], dtype=np.int64).reshape(-1, 2)


def _scan_grids(ds, modality_pad_token_id: int, kind: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Lengths (rows) and text-only flags of every example, read column-wise from Arrow without decoding rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # The Arrow view of the selected rows: a zero-copy slice of the table, or the rows an indices mapping
    # (`select`, `shuffle`) picks, in its order.
    column = ds.with_format("arrow", columns=["input_ids"])[:]["input_ids"]
    lengths, flags = [], []
    nested = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    inner_type = column.type.value_type if nested else None
    if nested and (pa.types.is_list(inner_type) or pa.types.is_large_list(inner_type)
                   or pa.types.is_fixed_size_list(inner_type)):
        for chunk in column.chunks:
            chunk_lengths = pc.list_value_length(chunk).fill_null(0).to_numpy(zero_copy_only=False)
            lengths.append(chunk_lengths.astype(np.int64))
            if kind != "auto":
                continue
            pairs = chunk.flatten()
            pair_lengths = pc.list_value_length(pairs).to_numpy(zero_copy_only=False)
            if len(pair_lengths) and (pair_lengths != 2).any():
                raise ValueError(f"dataset {path!r}: every input_ids row must be a [text, audio] pair.")
            text_ids = pairs.flatten().to_numpy(zero_copy_only=False)[0::2]
            cumulative = np.concatenate([[0], np.cumsum(text_ids == modality_pad_token_id)])
            ends = np.cumsum(chunk_lengths)
            speech_rows = cumulative[ends] - cumulative[ends - chunk_lengths]
            flags.append(speech_rows == 0)
    else:  # other storage (e.g. Array2D): decode example by example
        for example in ds.with_format("numpy", columns=["input_ids"]):
            grid = np.asarray(example["input_ids"]).reshape(-1, 2)
            lengths.append(np.array([len(grid)], dtype=np.int64))
            flags.append(np.array([not (grid[:, 0] == modality_pad_token_id).any()]))
    length = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    if kind == "auto":
        text_only = np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
    else:
        text_only = np.full(len(length), kind == "text")
    return length, text_only.astype(bool)


@dataclass
class EpochPlan:
    """Training rows of one epoch: pieces (example, start, length) grouped into rows by `row_ptr` (CSR)."""

    example: np.ndarray
    start: np.ndarray
    length: np.ndarray
    text_only: np.ndarray
    row_ptr: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


def _text_stream(pool: np.ndarray, begin: int, count: int, seed: int) -> np.ndarray:
    """Items `begin .. begin+count` of an endless stream of seeded permutations of `pool` (same for every epoch)."""
    if count == 0:
        return pool[:0]
    out, n = [], len(pool)
    for k in range(begin // n, (begin + count - 1) // n + 1):
        perm = pool[np.random.default_rng([seed, 1, k]).permutation(n)]
        lo, hi = max(begin - k * n, 0), min(begin + count - k * n, n)
        out.append(perm[lo:hi])
    return np.concatenate(out)


def plan_epoch(
    source: GridSource,
    epoch: int,
    seed: int,
    max_length: int,
    pack: bool,
    text_mix_ratio: float | None = None,
    shuffle: bool = True,
) -> EpochPlan:
    """The seeded order, text mix and packing of one epoch (a pure function of its arguments).

    Examples are drawn as described for `text_mix_ratio`, cut into pieces of at most `max_length` rows (pieces of
    fewer than 2 rows have no target and are dropped), and grouped into rows: one piece per row, or (`pack`) as many
    consecutive pieces as fit in `max_length`.
    """
    rng = np.random.default_rng([seed, 0, epoch])
    usable = np.flatnonzero(source.length >= 2)
    if text_mix_ratio is None:
        order = rng.permutation(usable) if shuffle else usable
    else:
        speech = usable[~source.text_only[usable]]
        text = usable[source.text_only[usable]]
        if text_mix_ratio > 0 and len(text) == 0:
            raise ValueError(f"text_mix_ratio={text_mix_ratio} needs text-only sequences, but the datasets hold none "
                             "(a text-only example has no row whose text id is the modality pad).")
        if text_mix_ratio < 1 and len(speech) == 0:
            raise ValueError(f"text_mix_ratio={text_mix_ratio} needs sequences with speech, but the datasets hold "
                             "only text-only sequences.")
        if text_mix_ratio == 1:
            n_text, speech = len(text), speech[:0]
        else:
            n_text = int(round(len(speech) * text_mix_ratio / (1 - text_mix_ratio)))
        drawn = _text_stream(text, epoch * n_text, n_text, seed)
        order = np.concatenate([rng.permutation(speech), drawn])
        order = order[rng.permutation(len(order))] if shuffle else order
    if len(order) == 0:
        raise ValueError("the datasets hold no sequence of at least 2 rows to train on.")

    lengths = source.length[order]
    n_pieces = -(-lengths // max_length)
    example = np.repeat(order, n_pieces)
    first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    start = (np.arange(len(example)) - first) * max_length
    length = np.minimum(np.repeat(lengths, n_pieces) - start, max_length)
    keep = length >= 2
    example, start, length = example[keep], start[keep], length[keep]

    if not pack:
        row_ptr = np.arange(len(example) + 1)
    else:
        ptr, used = [0], 0
        for i, n in enumerate(length.tolist()):
            if used + n > max_length:
                ptr.append(i)
                used = 0
            used += n
        ptr.append(len(length))
        row_ptr = np.asarray(ptr, dtype=np.int64)
    return EpochPlan(example, start, length, source.text_only[example], row_ptr)


class PackedRows(TorchDataset):
    """Map-style dataset over the rows of an `EpochPlan`: each item is one training row (not yet padded).

    Item: `input_ids` (n, 2), `labels` (n, 2) (`grid_labels`, first row of each sequence masked), `position_ids`
    (n,) restarting at 0 for each sequence, `num_sequences`, `num_text_only`.
    """

    def __init__(self, source: GridSource, plan: EpochPlan, config: MossSpeechConfig, extra_rows: int = 0) -> None:
        self.source, self.plan, self.config = source, plan, config
        self.extra_rows = extra_rows  # empty rows (all padding, no target) that even out sharded evaluation

    def __len__(self) -> int:
        return self.plan.num_rows + self.extra_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index >= self.plan.num_rows:
            empty = torch.zeros(0, 2, dtype=torch.long)
            return {"input_ids": empty, "labels": empty.clone(), "position_ids": torch.zeros(0, dtype=torch.long),
                    "num_sequences": 0, "num_text_only": 0}
        lo, hi = int(self.plan.row_ptr[index]), int(self.plan.row_ptr[index + 1])
        grids, labels, positions = [], [], []
        for p in range(lo, hi):
            start, length = int(self.plan.start[p]), int(self.plan.length[p])
            grid = torch.from_numpy(self.source.grid(int(self.plan.example[p]))[start : start + length].copy())
            label = grid_labels(grid, self.config)
            label[0] = -100  # a sequence's first row is never a target (not of the previous sequence either)
            grids.append(grid)
            labels.append(label)
            positions.append(torch.arange(length))
        return {
            "input_ids": torch.cat(grids),
            "labels": torch.cat(labels),
            "position_ids": torch.cat(positions),
            "num_sequences": hi - lo,
            "num_text_only": int(self.plan.text_only[lo:hi].sum()),
        }


class RowCollator:
    """Pads rows to the longest in the batch with (pad, audio pad) and -100 labels.

    Packed batches get `position_ids` (the padding tail counts as one more sequence starting at 0, so nothing
    attends across it) and no `attention_mask`: transformers' masking then finds the sequence boundaries from the
    position resets. Unpacked batches get a (B, L) `attention_mask` and default positions.
    """

    def __init__(self, config: MossSpeechConfig, pack: bool) -> None:
        pad = config.pad_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        self.pad = (0 if pad is None else int(pad), int(config.audio_pad_token_id))
        self.pack = pack

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(max(len(r["input_ids"]) for r in rows), 2)
        batch = len(rows)
        input_ids = torch.tensor(self.pad, dtype=torch.long).expand(batch, length, 2).clone()
        labels = torch.full((batch, length, 2), -100, dtype=torch.long)
        position_ids = torch.zeros(batch, length, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = row["input_ids"]
            labels[i, :n] = row["labels"]
            position_ids[i, :n] = row["position_ids"]
            position_ids[i, n:] = torch.arange(length - n)
            attention_mask[i, : max(n, 1)] = 1  # an empty (eval filler) row keeps one key: no fully masked row
        out = {
            "input_ids": input_ids,
            "labels": labels,
            "num_sequences": torch.tensor([r["num_sequences"] for r in rows]),
            "num_text_only": torch.tensor([r["num_text_only"] for r in rows]),
        }
        if self.pack:
            out["position_ids"] = position_ids
        else:
            out["attention_mask"] = attention_mask
        return out


def forward_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The training/eval forward of one collated batch (no cache, so packed sequences stay separate)."""
    kwargs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            kwargs[key] = batch[key]
    return model(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


class TrainingProgress:
    """Step and data position, saved with `accelerator.save_state` (registered for checkpointing).

    `data` holds the settings that decide which rows each process reads; a resume with other values would continue
    from the wrong place in the data, so `check_resume` rejects it.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.data = dict(data)
        self.saved_data: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "data": json.dumps(self.data, sort_keys=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.saved_data = json.loads(state["data"]) if "data" in state else None

    def check_resume(self, path: str) -> None:
        """Raise if the checkpoint was written with other data settings than this run's."""
        if self.saved_data is None:
            return
        changed = {k: (self.saved_data.get(k), v) for k, v in self.data.items() if self.saved_data.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume exactly from {path!r}: the data settings changed ({details}); resume "
                             "with the checkpoint's values (the data position depends on them).")


def build_model(cfg: PretrainConfig) -> MossSpeechForCausalLM:
    """Load the MOSS-Speech checkpoint, or split the Qwen3 text model, in float32."""
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.model is not None:
        model = MossSpeechForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, **kwargs)
    else:
        from transformers import AutoModelForCausalLM

        text_model = AutoModelForCausalLM.from_pretrained(cfg.init_from_text_model, dtype=torch.float32, **kwargs)
        model = from_text_model(text_model, cfg.num_shared_layers, audio_vocab_size=cfg.audio_vocab_size,
                                **cfg.config_overrides)
        del text_model
    return model.float()


def _checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(r"checkpoint-(\d+)", name)
            if match:
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def save_checkpoint(accelerator, output_dir: str, step: int, save_total_limit: int | None) -> str:
    """`accelerator.save_state` into output_dir/checkpoint-<step>; prune old ones beyond `save_total_limit`."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and save_total_limit is not None:
        for _, old in _checkpoint_dirs(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", path)
    return path


@torch.no_grad()
def evaluate(model, accelerator, loader: DataLoader) -> dict[str, float]:
    """Token-weighted mean loss per channel over the eval rows of every process."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # text sum, audio sum, text n, audio n
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = forward_batch(model, batch)
        n_text = (batch["labels"][:, 1:, 0] != -100).sum()
        n_audio = (batch["labels"][:, 1:, 1] != -100).sum()
        sums += torch.stack([out.text_loss.double() * n_text, out.audio_loss.double() * n_audio,
                             n_text.double(), n_audio.double()])
    sums = accelerator.reduce(sums, reduction="sum")
    model.train()
    text = (sums[0] / sums[2].clamp(min=1)).item()
    audio = (sums[1] / sums[3].clamp(min=1)).item()
    return {"eval_loss": text + audio, "eval_text_loss": text, "eval_audio_loss": audio,
            "eval_text_tokens": int(sums[2].item()), "eval_audio_tokens": int(sums[3].item())}


def _setup_logging(is_main: bool) -> None:
    if not any(getattr(h, "_moss_pretrain", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s pretrain: %(message)s", "%H:%M:%S"))
        handler._moss_pretrain = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run pre-training from a recipe; returns the logged history (also written to output_dir/metrics.jsonl)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    cfg = load_config(argv)
    set_threads(cfg.threads)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=cfg.log_with,
        project_dir=cfg.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)],
    )
    _setup_logging(accelerator.is_main_process)
    check_fsdp_active(accelerator.distributed_type)
    logger.info("accelerate: %d process(es), %s (backend %s), device %s, mixed precision %s",
                accelerator.num_processes, accelerator.distributed_type, accelerator.state.backend,
                accelerator.device, accelerator.mixed_precision)
    logger.info("recipe: %s", json.dumps(dataclasses.asdict(cfg), default=str))
    set_seed(cfg.seed)

    model = build_model(cfg)
    config = model.config
    trainable = apply_training_stage(model, cfg.stage, verbose=accelerator.is_main_process)
    if trainable == 0:
        raise ValueError(f"stage {cfg.stage!r} leaves no trainable parameter.")
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()

    source = GridSource(cfg.datasets, config.modality_pad_token_id)
    logger.info("training data: %d sequences (%d text-only) from %d dataset(s)", len(source),
                int(source.text_only.sum()), len(cfg.datasets))
    eval_loader = None
    if cfg.eval_datasets:
        eval_source = GridSource(cfg.eval_datasets, config.modality_pad_token_id)
        eval_plan = plan_epoch(eval_source, 0, cfg.seed, cfg.max_length, cfg.pack, None, shuffle=False)
        eval_bs = cfg.eval_batch_size or cfg.per_device_batch_size
        # every process gets the same number of batches (padded with empty rows), its own rows i::num_processes
        chunk = eval_bs * accelerator.num_processes
        padded = -(-eval_plan.num_rows // chunk) * chunk
        eval_rows = PackedRows(eval_source, eval_plan, config, extra_rows=padded - eval_plan.num_rows)
        shard = torch.utils.data.Subset(eval_rows, range(accelerator.process_index, padded, accelerator.num_processes))
        eval_loader = DataLoader(shard, batch_size=eval_bs, collate_fn=RowCollator(config, cfg.pack))

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
    )
    # the prepared scheduler steps once per process per optimizer step: scale its horizon to match
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps * accelerator.num_processes,
                                                cfg.max_steps * accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
            cfg.per_device_batch_size
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = TrainingProgress({
        "datasets": [d["path"] for d in cfg.datasets], "num_processes": accelerator.num_processes,
        "per_device_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "max_length": cfg.max_length,
        "pack": cfg.pack, "seed": cfg.seed, "text_mix_ratio": cfg.text_mix_ratio,
    })
    accelerator.register_for_checkpointing(progress)

    if cfg.resume_from:
        path = cfg.resume_from
        if path == "latest":
            found = _checkpoint_dirs(cfg.output_dir)
            if not found:
                raise ValueError(f"resume_from='latest' but {cfg.output_dir!r} holds no checkpoint-<step> directory.")
            path = found[-1][1]
        if not os.path.isdir(path):
            raise ValueError(f"recipe key 'resume_from' must be a checkpoint directory, got {path!r}.")
        accelerator.load_state(path)
        progress.check_resume(path)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, progress.step, progress.epoch,
                    progress.batches_in_epoch)

    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "pretrain_recipe.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(dataclasses.asdict(cfg), handle, sort_keys=False)
    if cfg.log_with:
        accelerator.init_trackers(cfg.tracker_project, config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    collator = RowCollator(config, cfg.pack)
    history: list[dict[str, Any]] = []
    eval_history: list[dict[str, Any]] = []
    window = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, text, audio (micro-batch sums)
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # sequences, text-only sequences
    window_steps, grad_norm = 0, None
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="pretrain", dynamic_ncols=True,
               disable=not (cfg.progress_bar and accelerator.is_local_main_process))

    def record(entry: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        accelerator.log(entry, step=entry["step"])

    def run_eval() -> None:
        result = {"step": progress.step, **evaluate(model, accelerator, eval_loader)}
        eval_history.append(result)
        record(result)
        logger.info("step %d eval: loss %.4f (text %.4f, audio %.4f)", progress.step, result["eval_loss"],
                    result["eval_text_loss"], result["eval_audio_loss"])

    while progress.step < cfg.max_steps:
        plan = plan_epoch(source, progress.epoch, cfg.seed, cfg.max_length, cfg.pack, cfg.text_mix_ratio)
        loader = DataLoader(PackedRows(source, plan, config), batch_size=cfg.per_device_batch_size, shuffle=False,
                            collate_fn=collator, num_workers=cfg.num_workers)
        loader = accelerator.prepare(loader)
        batches = accelerator.skip_first_batches(loader, progress.batches_in_epoch) if progress.batches_in_epoch \
            else loader
        finished = False
        for batch in batches:
            progress.batches_in_epoch += 1
            with accelerator.accumulate(model):
                out = forward_batch(model, batch)
                accelerator.backward(out.loss)
                window += torch.stack([out.loss.detach(), out.text_loss.detach(), out.audio_loss.detach()]).double()
                counts += torch.stack([batch["num_sequences"].sum(), batch["num_text_only"].sum()]).double()
                if accelerator.sync_gradients:
                    if cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            window_steps += 1
            bar.update(1)
            if progress.step % cfg.log_every == 0 or progress.step == cfg.max_steps:
                means = accelerator.reduce(window, reduction="mean") / (window_steps * cfg.gradient_accumulation_steps)
                totals = accelerator.reduce(counts.clone(), reduction="sum")
                entry = {"step": progress.step, "loss": means[0].item(), "text_loss": means[1].item(),
                         "audio_loss": means[2].item(), "lr": scheduler.get_last_lr()[0],
                         "grad_norm": None if grad_norm is None else float(grad_norm),
                         "sequences": int(totals[0].item()), "text_only_sequences": int(totals[1].item()),
                         "epoch": progress.epoch}
                history.append(entry)
                record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                logger.info("step %d: loss %.4f (text %.4f, audio %.4f) lr %.3g", progress.step, entry["loss"],
                            entry["text_loss"], entry["audio_loss"], entry["lr"])
                window.zero_()
                window_steps = 0
            if eval_loader is not None and cfg.eval_every and progress.step % cfg.eval_every == 0:
                run_eval()
            if cfg.save_every and progress.step % cfg.save_every == 0:
                save_checkpoint(accelerator, cfg.output_dir, progress.step, cfg.save_total_limit)
            if progress.step >= cfg.max_steps:
                finished = True
                break
        if not finished:  # the epoch's rows are used up: the next epoch has a new seeded order
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()

    if eval_loader is not None and not (eval_history and eval_history[-1]["step"] == progress.step):
        run_eval()
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        cfg.output_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
    )
    logger.info("saved the final model to %s", cfg.output_dir)
    accelerator.end_training()
    return {"history": history, "eval": eval_history, "step": progress.step, "output_dir": cfg.output_dir,
            "trainable_parameters": trainable, "num_processes": accelerator.num_processes}


if __name__ == "__main__":
    main()

"""The data of `training/pretrain.py`: grid datasets on disk, seeded epoch plans (text mix, cutting, packing), rows.

`GridSource` indexes the examples of several `save_to_disk` datasets (length and text-only flag of each, read from
Arrow without decoding rows); `plan_epoch` decides one epoch's order, text mix and packing as a pure function of its
arguments; `PackedRows` materialises the planned rows with their labels and positions; `RowCollator` pads a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from modeling_moss_speech import MossSpeechConfig
from modeling_moss_speech.trainer.sft import grid_labels


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


class AlignPairs:
    """Random micro-batches of the alignment loss' pairs: an S->T and a T->T chat grid of the same fact
    (`input_ids` of the spoken and the written question, right-padded) and either `suffix`, the number of final rows
    both share (system turn and assistant turn), or `weights`, one per row of two grids of equal length (the frame
    twins of prepare_nano.py's pretrain/frames; padding weighs 0). `group` tells pairs of the same fact apart for the
    contrastive form."""

    def __init__(self, path: str, batch_size: int, seed: int) -> None:
        import datasets

        data = datasets.load_from_disk(path)
        # two forms: `suffix` (the final rows both grids share) or `weights` (grids of equal length, row by row)
        self.form = "weights" if "weights" in data.column_names else "suffix"
        missing = {"speech_ids", "text_ids", self.form, "utt_id"} - set(data.column_names)
        if missing:
            raise ValueError(f"align_dataset {path!r} lacks the columns {sorted(missing)} (has {data.column_names}).")
        if self.form == "weights":
            for i, (speech, text, weights) in enumerate(zip(data["speech_ids"], data["text_ids"], data["weights"])):
                if not len(speech) == len(text) == len(weights):
                    raise ValueError(f"align_dataset {path!r}, pair {i}: the speech grid, the text grid and the "
                                     f"weights must have equal length, got {len(speech)}, {len(text)}, "
                                     f"{len(weights)}.")
        if batch_size > len(data):
            raise ValueError(f"align_batch_size {batch_size} exceeds the {len(data)} pairs of {path!r}.")
        self.data, self.batch_size, self.generator = data, batch_size, np.random.default_rng(seed)

    def sample(self) -> dict[str, torch.Tensor]:
        """One micro-batch of distinct pairs."""
        rows = self.data[self.generator.choice(len(self.data), self.batch_size, replace=False).tolist()]
        facts = [u.split("/")[0] for u in rows["utt_id"]]
        out = {"speech_ids": _right_padded(rows["speech_ids"]), "text_ids": _right_padded(rows["text_ids"]),
               "speech_lengths": torch.tensor([len(g) for g in rows["speech_ids"]]),
               "text_lengths": torch.tensor([len(g) for g in rows["text_ids"]]),
               "group": torch.tensor([facts.index(f) for f in facts])}
        if self.form == "weights":
            width = out["speech_ids"].shape[1]
            out["weights"] = torch.tensor([list(w) + [0.0] * (width - len(w)) for w in rows["weights"]])
        else:
            out["suffix"] = torch.tensor(rows["suffix"])
        return out


def _right_padded(grids: list) -> torch.Tensor:
    # causal attention: rows before the padding never see it, so no attention mask is needed
    longest = max(len(g) for g in grids)
    out = torch.zeros(len(grids), longest, 2, dtype=torch.long)
    for i, grid in enumerate(grids):
        out[i, : len(grid)] = torch.as_tensor(grid)
    return out

"""Turn a speech dataset into MOSS-Speech training data: codec tokens in the model's two-channel grid.

Run from a checkout with the package installed (`pip install -e .`); flags may also come from a YAML file
(`--config file.yaml`, keys as the flags):

    python processing/prepare_dataset.py --input <dataset> --codec <codec dir> --processor <processor dir> \\
        --mode speech|interleaved|text|sft --output <dir> [--batch_size 16 --num_shards N --push_to_hub repo]

`--input` is a directory written by `save_to_disk` (a `Dataset`, or a `DatasetDict` with `--split`), or anything
`datasets.load_dataset` opens (a local data directory, or a Hub name already in the local cache when offline).

Output formats (all columns are plain lists, so no codec and no audio decoding is needed at training time):

- `speech`, `interleaved`, `text` (pre-training): one column `input_ids`, a `(L, 2)` grid stored as a list of
  `[text_id, audio_id]` rows (int32), built by the processor's `grid_layout` (the release's layout):
    - text segment: `tokenizer(text, add_special_tokens=False)` (surrounding whitespace stripped), one row per token,
      `audio_pad` in the audio channel;
    - speech segment of `n` codes: `(sosp, audio_pad)`, `(modality_pad, code)` x n, `(modality_pad, eosp)`;
    - `speech`: the utterance's speech segment; `text`: the text segment only (no audio column needed);
    - `interleaved`: the transcript's text segment and the utterance's speech segment, in the order set by
      `--interleave`: `alternate` (default: rows with an even index are text then speech, odd ones speech then
      text, so both directions of the speech/text pairing are learned, as the paper interleaves the modalities
      both ways), `text-first` or `speech-first`;
    - `--add_eos` appends one `(text_pad, audio_pad)` row (`<|endoftext|>` for Qwen3) to every example.
- `sft`: a `messages` column with one conversation per row, `[user, assistant]`; each message is
  `{"role": str, "content": {"type": "text" | "audio", "text": str | None, "codes": list[int] | None}}`
  (the uniform struct Arrow needs; `MossSpeechProcessor` reads both kinds as they are), plus `output_modality`
  (`"audio"` or `"text"`, the answer's modality) and the passed-through `question_text` / `answer_text` (or null).
  Input columns (fixed names):
    - `question_audio` (required column): the spoken question; a null value falls back to `question_text`;
    - `question_text` (optional): transcript of the question, the user turn when `question_audio` is null;
    - `answer_text` (required unless every row has `answer_audio`): the answer, used when there is no answer audio;
    - `answer_audio` (optional): the spoken answer; when present (non-null) the assistant turn is speech.

Audio values may be a `datasets.Audio` column (read here with soundfile from its bytes or path, so `torchcodec`
is NOT needed: the column is cast to `Audio(decode=False)`), a struct `{"array": ..., "sampling_rate": ...}`
(mono `(samples,)`, or multi-channel `(channels, samples)`), or a decoded `torchcodec`
`AudioDecoder`, all read by the package's `load_audio`. Any sampling rate is resampled to the codec's 16 kHz; channels
are averaged. Every utterance gets
`ceil(seconds x 12.5)` codes. Null values in required fields, an empty audio or an unreadable file raise a
`ValueError` that names the row (`--skip_invalid` drops such rows with a warning instead).

Resuming: rows are split into `--num_shards` contiguous shards, each written with `save_to_disk` to
`<output>/shards/NNNNN` (atomically: written to a temporary folder, then renamed) next to a `manifest.json` of the
settings. A rerun with the same settings skips finished shards; different settings are refused. When every shard
is done, their concatenation is saved to `<output>` (`datasets.load_from_disk(<output>)`), and pushed with
`push_to_hub` when `--push_to_hub` is given. The shards stay (delete `<output>/shards` after checking the result).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from modeling_moss_speech._compat import dataset_fingerprint
from modeling_moss_speech.apps.script_utils import (
    InvalidRowError,
    ScriptArgumentParser,
    load_audio_value,
    threads_field,
)
from modeling_moss_speech.loading import read_json_file
from modeling_moss_speech.modeling_moss_speech_codec import MossSpeechCodecModel
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor
from modeling_moss_speech.threads import set_threads

logger = logging.get_logger("moss_speech.prepare_dataset")

MODES = ("speech", "interleaved", "text", "sft")
INTERLEAVE_ORDERS = ("alternate", "text-first", "speech-first")
SFT_COLUMNS = {"question_audio": "audio", "question_text": "text", "answer_text": "text", "answer_audio": "audio"}
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
DEFAULT_ROWS_PER_SHARD = 10_000

GRID_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.List(datasets.Value("int32"), length=2))})
_CONTENT = {"type": datasets.Value("string"), "text": datasets.Value("string"),
            "codes": datasets.List(datasets.Value("int32"))}
SFT_FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": _CONTENT}),
    "output_modality": datasets.Value("string"),
    "question_text": datasets.Value("string"),
    "answer_text": datasets.Value("string"),
})




# ------------------------------------------------------------------------------------------------ settings


@dataclass
class PrepareSettings:
    """What is prepared, and how; stored in the shards' manifest so a rerun resumes only with the same values."""

    mode: str
    audio_column: str = "audio"
    text_column: str = "text"
    interleave: str = "alternate"
    add_eos: bool = False
    batch_size: int = 16
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.interleave not in INTERLEAVE_ORDERS:
            raise ValueError(f"interleave must be one of {INTERLEAVE_ORDERS}, got {self.interleave!r}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}.")

    @property
    def needs_codec(self) -> bool:
        return self.mode != "text"

    def manifest_key(self) -> dict:
        """Settings that change the output (batch size and skipping policy do not)."""
        return {"mode": self.mode, "audio_column": self.audio_column, "text_column": self.text_column,
                "interleave": self.interleave, "add_eos": self.add_eos}


def required_columns(settings: PrepareSettings, column_names: Sequence[str]) -> list[str]:
    """Input columns the mode reads; raises `ValueError` naming a missing one and the columns that exist."""
    if settings.mode == "speech":
        needed = [settings.audio_column]
    elif settings.mode == "text":
        needed = [settings.text_column]
    elif settings.mode == "interleaved":
        needed = [settings.audio_column, settings.text_column]
    else:
        needed = ["question_audio"]
        if "answer_text" not in column_names and "answer_audio" not in column_names:
            needed.append("answer_text")
    for name in needed:
        if name not in column_names:
            raise ValueError(f"mode {settings.mode!r} needs the column {name!r}, but the dataset has "
                             f"{list(column_names)}" + (" (use --audio_column / --text_column)."
                                                        if settings.mode != "sft" else "."))
    if settings.mode == "sft":
        return [name for name in SFT_COLUMNS if name in column_names]
    return needed


def audio_columns(settings: PrepareSettings, columns: Sequence[str]) -> list[str]:
    """The columns holding audio among `columns`."""
    if settings.mode == "sft":
        return [c for c in columns if SFT_COLUMNS.get(c) == "audio"]
    return [settings.audio_column] if settings.mode in ("speech", "interleaved") else []


# ------------------------------------------------------------------------------------------------ examples


class ExampleBuilder:
    """Builds output examples from batches of input rows (one codec call per batch)."""

    def __init__(self, settings: PrepareSettings, processor: MossSpeechProcessor,
                 codec: MossSpeechCodecModel | None) -> None:
        self.settings, self.processor, self.codec = settings, processor, codec

    def tokenize(self, text: Any, where: str) -> list[int]:
        """Text ids of a transcript (`add_special_tokens=False`, whitespace stripped); errors name `where`."""
        if not isinstance(text, str):
            raise InvalidRowError(f"{where}: expected a string, got {type(text).__name__}"
                                  + (" (null)." if text is None else "."))
        ids = self.processor.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidRowError(f"{where}: the text {text!r} is empty (no tokens).")
        return list(ids)

    def encode(self, waveforms: list[torch.Tensor]) -> list[list[int]]:
        """Codes of 16 kHz mono waveforms, in one batched codec call."""
        if not waveforms:
            return []
        out = self.codec.encode(waveforms, sampling_rate=self.codec.config.sampling_rate,
                                batch_size=self.settings.batch_size)
        return [codes.tolist() for codes in out.codes]

    def build(self, rows: dict[str, list], first_index: int) -> list[dict]:
        """Examples for a batch of rows (`rows[column][i]` is row `first_index + i` of the input)."""
        count = len(next(iter(rows.values()))) if rows else 0
        plans, waveforms = [], []
        for offset in range(count):
            index = first_index + offset
            row = {name: values[offset] for name, values in rows.items()}
            mark = len(waveforms)
            try:
                plans.append((index, self._plan(row, index, waveforms)))
            except InvalidRowError as error:
                if not self.settings.skip_invalid:
                    raise
                del waveforms[mark:]  # audio of the dropped row's other columns is not encoded
                logger.warning(f"skipping {error}")
        codes = self.encode(waveforms)
        return [self._finish(plan, codes, index) for index, plan in plans]

    # A plan is the example with audio still to encode: ("audio", k) refers to the k-th waveform of the batch.
    def _audio(self, value: Any, where: str, waveforms: list[torch.Tensor]) -> tuple[str, int] | None:
        loaded = load_audio_value(value, where, target_rate=self.codec.config.sampling_rate)
        if loaded is None:
            return None
        waveforms.append(loaded[0])
        return ("audio", len(waveforms) - 1)

    def _plan(self, row: dict, index: int, waveforms: list[torch.Tensor]) -> dict:
        s = self.settings
        where = f"row {index}"
        if s.mode == "text":
            return {"text": self.tokenize(row[s.text_column], f"{where}, column {s.text_column!r}")}
        if s.mode in ("speech", "interleaved"):
            plan = {}
            if s.mode == "interleaved":
                plan["text"] = self.tokenize(row[s.text_column], f"{where}, column {s.text_column!r}")
            audio = self._audio(row[s.audio_column], f"{where}, column {s.audio_column!r}", waveforms)
            if audio is None:
                raise InvalidRowError(f"{where}, column {s.audio_column!r}: the audio is null.")
            plan["audio"] = audio
            return plan
        return self._plan_sft(row, where, waveforms)

    def _plan_sft(self, row: dict, where: str, waveforms: list[torch.Tensor]) -> dict:
        question = self._audio(row.get("question_audio"), f"{where}, column 'question_audio'", waveforms)
        if question is None:
            text = row.get("question_text")
            if text is None:
                raise InvalidRowError(f"{where}: 'question_audio' is null and there is no 'question_text'.")
            self.tokenize(text, f"{where}, column 'question_text'")
            question = ("text", text.strip())
        answer = self._audio(row.get("answer_audio"), f"{where}, column 'answer_audio'", waveforms)
        if answer is None:
            text = row.get("answer_text")
            if text is None:
                raise InvalidRowError(f"{where}: no 'answer_audio' and 'answer_text' is null.")
            self.tokenize(text, f"{where}, column 'answer_text'")
            answer = ("text", text.strip())
        return {"question": question, "answer": answer,
                "question_text": row.get("question_text"), "answer_text": row.get("answer_text")}

    def _finish(self, plan: dict, codes: list[list[int]], index: int) -> dict:
        s, p = self.settings, self.processor
        if s.mode == "sft":
            def content(part: tuple) -> dict:
                if part[0] == "audio":
                    return {"type": "audio", "text": None, "codes": codes[part[1]]}
                return {"type": "text", "text": part[1], "codes": None}

            messages = [{"role": "user", "content": content(plan["question"])},
                        {"role": "assistant", "content": content(plan["answer"])}]
            return {"messages": messages, "output_modality": "audio" if plan["answer"][0] == "audio" else "text",
                    "question_text": plan["question_text"], "answer_text": plan["answer_text"]}
        layout = p.grid_layout
        text = layout.text_rows(plan["text"]) if "text" in plan else []
        speech = layout.speech_rows(codes[plan["audio"][1]]) if "audio" in plan else []
        text_first = s.interleave == "text-first" or (s.interleave == "alternate" and index % 2 == 0)
        rows = text + speech if text_first else speech + text
        if s.add_eos:
            rows.append(layout.pad_row())
        return {"input_ids": rows}


# ------------------------------------------------------------------------------------------------ driver


def load_input_dataset(
    source: str, split: str = "train", config_name: str | None = None, cache_dir: str | None = None
) -> datasets.Dataset:
    """A `Dataset` from a `save_to_disk` directory (a `DatasetDict` gives `split`) or from `load_dataset`.

    `load_dataset` opens local data directories/files and Hub names (offline: only those already cached);
    `cache_dir` is its cache (the datasets default when `None`).
    """
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if looks_local and not path.exists():
        raise ValueError(f"--input {source!r} does not exist (a local path; Hub names look like 'owner/name').")
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
    else:
        try:
            loaded = datasets.load_dataset(source, config_name, split=split, cache_dir=cache_dir)
        except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFound…)
            raise ValueError(f"--input {source!r}: not a save_to_disk directory and datasets.load_dataset failed "
                             f"({type(error).__name__}: {error}).") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"--input {source!r} is a DatasetDict with splits {list(loaded)}; --split {split!r} is "
                             "not one of them.")
        loaded = loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise TypeError(f"--input {source!r} gave a {type(loaded).__name__}; a map-style Dataset is needed "
                        "(streaming datasets cannot be sharded for resuming).")
    return loaded


def _shard_bounds(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges, sizes differing by at most one (as `Dataset.shard(contiguous=True)`)."""
    base, extra = divmod(num_rows, num_shards)
    bounds, start = [], 0
    for index in range(num_shards):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _check_manifest(shards_dir: Path, manifest: dict, fingerprint: str | None) -> None:
    path = shards_dir / MANIFEST
    if path.is_file():
        previous = read_json_file(path, "shards manifest")
        old = {k: v for k, v in previous.items() if k != "input_fingerprint"}
        if old != manifest:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(f"{shards_dir} holds shards prepared with other settings ({', '.join(changed)}: "
                             f"{ {k: old.get(k) for k in changed} } now { {k: manifest.get(k) for k in changed} }); "
                             "use another --output, or delete that folder to start over.")
        if fingerprint is not None and previous.get("input_fingerprint") not in (None, fingerprint):
            logger.warning(f"the input dataset's fingerprint changed since {shards_dir} was started; finished shards "
                           "are reused (same rows, columns and settings).")
        return
    shards_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**manifest, "input_fingerprint": fingerprint}, indent=2))


def prepare_dataset(
    dataset: datasets.Dataset,
    output_dir: str | os.PathLike,
    processor: MossSpeechProcessor,
    codec: MossSpeechCodecModel | None = None,
    mode: str = "speech",
    audio_column: str = "audio",
    text_column: str = "text",
    interleave: str = "alternate",
    add_eos: bool = False,
    batch_size: int = 16,
    num_shards: int | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
) -> datasets.Dataset:
    """Encode `dataset` into MOSS-Speech training examples, shard by shard; returns the final dataset.

    Args:
        dataset: Input rows (columns per mode: see the module docstring).
        output_dir: Where shards (`shards/NNNNN`) and the final dataset (`save_to_disk`) are written.
        processor: Gives the tokenizer and the special ids of the grid.
        codec: Encodes audio (every mode but `text`); the processor's codec when `None`.
        mode: `speech`, `interleaved`, `text` or `sft`.
        audio_column, text_column: Input columns of the pre-training modes.
        interleave: Order of the two segments in `interleaved` mode: `alternate`, `text-first`, `speech-first`.
        add_eos: Append a `(text_pad, audio_pad)` row to every pre-training example.
        batch_size: Rows per codec call (and audio chunks per encoder forward).
        num_shards: Shards to split the rows into (resuming granularity); `ceil(rows / 10000)` when `None`.
        skip_invalid: Drop rows with unusable values (warning) instead of raising `ValueError`.
        progress: Show a tqdm progress bar over rows.
        push_to_hub: Repository id to push the final dataset to (`Dataset.push_to_hub`).
        private: Create the Hub repository as private.
    """
    settings = PrepareSettings(mode=mode, audio_column=audio_column, text_column=text_column, interleave=interleave,
                               add_eos=add_eos, batch_size=batch_size, skip_invalid=skip_invalid)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}.")
    if not isinstance(processor, MossSpeechProcessor):
        raise TypeError(f"processor must be a MossSpeechProcessor, got {type(processor).__name__}.")
    columns = required_columns(settings, dataset.column_names)
    if settings.needs_codec:
        codec = codec if codec is not None else processor.codec
        if codec is None:
            raise ValueError(f"mode {mode!r} encodes audio: pass --codec (a MossSpeechCodecModel directory), or use a "
                             "processor that has a codec.")
        if not isinstance(codec, MossSpeechCodecModel):
            raise TypeError(f"codec must be a MossSpeechCodecModel, got {type(codec).__name__}.")
        if codec.config.num_codes > processor.num_codes:
            raise ValueError(f"the codec has {codec.config.num_codes} codes but the processor (the LM) takes "
                             f"{processor.num_codes}: they do not belong together.")
        codec.eval()
    if num_shards is None:
        num_shards = max(1, math.ceil(len(dataset) / DEFAULT_ROWS_PER_SHARD))
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}.")
    if len(dataset) == 0:
        raise ValueError("the input dataset has no rows.")
    num_shards = min(num_shards, len(dataset))

    fingerprint = dataset_fingerprint(dataset)
    data = dataset.select_columns(columns)
    for name in audio_columns(settings, columns):
        if isinstance(data.features[name], datasets.Audio):
            data = data.cast_column(name, datasets.Audio(decode=False))  # read with soundfile: no torchcodec
    output_dir = Path(output_dir)
    shards_dir = output_dir / SHARDS_DIR
    _check_manifest(shards_dir, {**settings.manifest_key(), "num_rows": len(dataset), "num_shards": num_shards,
                                 "columns": columns}, fingerprint)

    builder = ExampleBuilder(settings, processor, codec)
    features = SFT_FEATURES if mode == "sft" else GRID_FEATURES
    bounds = _shard_bounds(len(data), num_shards)
    shard_dirs = [shards_dir / f"{index:05d}" for index in range(num_shards)]
    done = [(path / "state.json").is_file() for path in shard_dirs]
    if any(done):
        logger.warning(f"resuming: {sum(done)} of {num_shards} shards already in {shards_dir}.")
    audio_names = audio_columns(settings, columns)
    # Audio arrays as numpy (fast), every other column as Python objects.
    view = data.with_format("numpy", columns=audio_names, output_all_columns=True) if audio_names else data
    bars_were_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()  # datasets' own "Saving the dataset" bars too
    try:
        return _run_shards(data, builder, features, bounds, shard_dirs, done, view, output_dir, mode, progress,
                           push_to_hub, private)
    finally:
        if bars_were_enabled and not progress:
            datasets.enable_progress_bars()


def _run_shards(data: datasets.Dataset, builder: ExampleBuilder, features: datasets.Features,
                bounds: list[tuple[int, int]], shard_dirs: list[Path], done: list[bool], view: datasets.Dataset,
                output_dir: Path, mode: str, progress: bool, push_to_hub: str | None, private: bool
                ) -> datasets.Dataset:
    """Encode the unfinished shards, then save (and push) their concatenation."""
    batch_size = builder.settings.batch_size
    bar = tqdm(total=len(data), initial=sum(end - start for (start, end), d in zip(bounds, done) if d),
               unit="row", desc=f"prepare ({mode})", disable=not progress)
    with bar:
        for (start, end), path, finished in zip(bounds, shard_dirs, done):
            if finished:
                continue
            examples: list[dict] = []
            for first in range(start, end, batch_size):
                last = min(first + batch_size, end)
                examples.extend(builder.build(dict(view[first:last]), first))
                bar.update(last - first)
            _save_shard(examples, features, path)

    parts = [datasets.load_from_disk(str(path)) for path in shard_dirs]
    final = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    final.save_to_disk(str(output_dir))
    logger.info(f"wrote {len(final)} examples ({mode}) to {output_dir}")
    final = datasets.load_from_disk(str(output_dir))
    if push_to_hub:
        final.push_to_hub(push_to_hub, private=private)
    return final


def _save_shard(examples: list[dict], features: datasets.Features, path: Path) -> None:
    """Write one shard atomically: a temporary folder renamed into place once complete."""
    if examples:
        shard = datasets.Dataset.from_list(examples, features=features)
    else:
        shard = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shard.save_to_disk(str(tmp))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class PrepareDatasetArguments:
    """Flags of `processing/prepare_dataset.py` (the formats are in the module docstring)."""

    input: str | None = field(default=None, metadata={
        "help": "save_to_disk directory, data directory or Hub dataset name (required)."})
    split: str = field(default="train", metadata={"help": "Split of a DatasetDict / load_dataset."})
    config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name for load_dataset."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache of load_dataset (default: "
                                                                   "datasets')."})
    codec: str | None = field(default=None, metadata={
        "help": "MossSpeechCodecModel directory or repo id (default: the processor's codec); not needed for --mode "
                "text."})
    processor: str | None = field(default=None, metadata={"help": "MossSpeechProcessor directory or repo id "
                                                                  "(required)."})
    mode: str | None = field(default=None, metadata={"help": "Output format (required).", "choices": MODES})
    output: str | None = field(default=None, metadata={"help": "Output directory (shards/ and the final dataset; "
                                                               "required)."})
    audio_column: str = field(default="audio", metadata={"help": "Audio column of the speech modes."})
    text_column: str = field(default="text", metadata={"help": "Transcript column of the text and interleaved modes."})
    interleave: str = field(default="alternate", metadata={
        "help": "Segment order in interleaved mode (alternate: by row index).", "choices": INTERLEAVE_ORDERS})
    add_eos: bool = field(default=False, metadata={"help": "Append a (text pad, audio pad) row to each example."})
    batch_size: int = field(default=16, metadata={"help": "Utterances per codec call."})
    num_shards: int | None = field(default=None, metadata={"help": "Shards to write (default: one per 10,000 rows)."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop unusable rows with a warning."})
    device: str | None = field(default=None, metadata={"help": "Codec device (default: cuda when available, else "
                                                                "cpu)."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Push the final dataset to this Hub repo.",
                                                            "metavar": "REPO"})
    private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    quiet: bool = field(default=False, metadata={"help": "No progress bar."})
    threads: int | None = threads_field()

    def __post_init__(self) -> None:
        for name in ("input", "processor", "mode", "output"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required.")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}.")


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `PrepareDatasetArguments`)."""
    return ScriptArgumentParser(
        PrepareDatasetArguments, prog="prepare_dataset.py",
        description="Encode a speech dataset with the MOSS-Speech codec into pre-training grids or SFT conversations "
                    "(resumable; see the module docstring for the formats).")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success (errors raise with a message naming the problem)."""
    (args,) = make_parser().parse_args_and_config(argv)
    set_threads(args.threads)
    dataset = load_input_dataset(args.input, args.split, args.config_name, args.cache_dir)
    processor = MossSpeechProcessor.from_pretrained(args.processor)
    codec = None
    if args.mode != "text":
        if args.codec is not None:
            codec = MossSpeechCodecModel.from_pretrained(args.codec)
        else:
            codec = processor.codec
        if codec is not None:
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            codec = codec.to(device).eval()
    final = prepare_dataset(
        dataset, args.output, processor, codec, mode=args.mode, audio_column=args.audio_column,
        text_column=args.text_column, interleave=args.interleave, add_eos=args.add_eos, batch_size=args.batch_size,
        num_shards=args.num_shards, skip_invalid=args.skip_invalid, progress=not args.quiet,
        push_to_hub=args.push_to_hub, private=args.private,
    )
    print(f"{len(final)} examples written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

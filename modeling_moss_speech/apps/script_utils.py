"""What the scripts under `training/` and `processing/` share: their argument parser and the nano data helpers.

Every script reads its flags from dataclasses through `ScriptArgumentParser` (transformers' `HfArgumentParser`
plus `--config FILE.yaml`): the YAML file's keys set the defaults and `--snake_case` flags override them, as TRL's
`TrlParser` does for `training/sft.py`. The nano helpers (the nano tokenizer's special ids, its processor, the
corpus readers, the codec fingerprint, dataset audio values) are read by scripts of both folders, so they live
here rather than in one script that the other folder would have to put on `sys.path`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from argparse import ArgumentTypeError
from collections.abc import Sequence
from dataclasses import field
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..feature_extraction_moss_speech import load_audio
from ..threads import THREADS_HELP

# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------

CONFIG_FLAG = "--config"
NONE_VALUE = "none"


class ScriptArgumentParser(HfArgumentParser):
    """`HfArgumentParser` over a script's dataclasses, with `--config FILE.yaml` (a mapping of field names).

    The file's values become the defaults; flags on the command line override them (a list or mapping flag replaces
    the file's value). Scalar values of the file are checked against their field's type here, so a wrong one is a
    `ValueError` naming the file and the key, as an unknown key is.
    """

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        super().__init__(dataclass_types, **kwargs)
        names = [f for dtype in self.dataclass_types for f in dtype.__dataclass_fields__]
        if "config" in names:
            raise ValueError(f"{CONFIG_FLAG} is the config file's flag; no dataclass field may be named 'config'.")
        # for --help only: parse_args_and_config takes the flag out before argparse sees the rest
        self.add_argument(CONFIG_FLAG, metavar="FILE.yaml", default=None,
                          help="YAML mapping of argument names to values (the defaults); flags override it.")

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse `args` (default: `sys.argv[1:]`) after applying `--config FILE.yaml`; returns the dataclasses."""
        args = list(sys.argv[1:] if args is None else args)
        config_path = None
        for index, token in enumerate(args):
            if token == CONFIG_FLAG:
                if index + 1 >= len(args):
                    self.error(f"argument {CONFIG_FLAG}: expected one argument")
                config_path = args[index + 1]
                del args[index : index + 2]
                break
            if token.startswith(CONFIG_FLAG + "="):
                config_path = token.split("=", 1)[1]
                del args[index]
                break
        if config_path is not None:
            self.set_defaults(**self.read_config(config_path))
        outputs = self.parse_args_into_dataclasses(args, look_for_args_file=False)
        return outputs[: len(self.dataclass_types)]  # the rest: the namespace holding only --config

    def read_config(self, path: str | os.PathLike) -> dict[str, Any]:
        """The YAML mapping of `path`, every key a known field and every scalar of its field's type."""
        if not os.path.isfile(path):
            raise ValueError(f"{CONFIG_FLAG} {str(path)!r} is not a file.")
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{CONFIG_FLAG} {str(path)!r} must hold a YAML mapping of argument names to values, got "
                             f"{type(values).__name__}.")
        actions = {}
        for action in self._actions:  # the first one of a dest: a bool field's `--no_<name>` comes after it
            if action.option_strings and action.dest not in ("config", "help"):
                actions.setdefault(action.dest, action)
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise ValueError(f"unknown keys {unknown} in {str(path)!r}; valid keys: {sorted(actions)}.")
        return {key: _config_value(actions[key].type, key, value, path) for key, value in values.items()}


def _config_value(kind: Any, key: str, value: Any, path: str | os.PathLike) -> Any:
    """`value` of `key` as its field's scalar type (`kind`: the argparse type HfArgumentParser gave the flag)."""
    if value is None:
        return None
    where = f"key {key!r} of {str(path)!r}"
    if kind is string_to_bool:
        if isinstance(value, bool):
            return value
        try:
            return string_to_bool(str(value)) if isinstance(value, str) else _not_a_bool(where, value)
        except ArgumentTypeError:
            return _not_a_bool(where, value)
    if kind in (int, float):
        what = "an integer" if kind is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where} must be {what}, got {value!r}.")
        try:
            converted = kind(value)  # YAML reads "1e-4" as a string
        except ValueError:
            raise ValueError(f"{where} must be {what}, got {value!r}.") from None
        if kind is int and isinstance(value, float) and converted != value:
            raise ValueError(f"{where} must be {what}, got {value!r}.")
        return converted
    return value


def _not_a_bool(where: str, value: Any) -> bool:
    raise ValueError(f"{where} must be true or false, got {value!r}.")


def threads_field() -> Any:
    """The `threads` field of every script's arguments: torch CPU threads, see `modeling_moss_speech.threads`."""
    return field(default=None, metadata={"help": THREADS_HELP, "metavar": "N"})


def none_means_empty(values: list[str]) -> list[str]:
    """A list flag's value, with the single value `none` (how the command line gives an empty list) as `[]`."""
    return [] if [str(v).lower() for v in values] == [NONE_VALUE] else list(values)


# --------------------------------------------------------------------------------------------------------------------
# Dataset audio values
# --------------------------------------------------------------------------------------------------------------------


class InvalidRowError(ValueError):
    """A row of a dataset cannot be turned into an example (its message names the row and the column)."""


def load_audio_value(value: Any, where: str, target_rate: int | None = None) -> tuple[torch.Tensor, int] | None:
    """A dataset audio value as (mono float32 waveform at `target_rate` or its own rate, rate); `None` for null.

    Read by the package's one reader, `load_audio` (`{"array", "sampling_rate"}` dicts, `datasets.Audio(decode=False)`
    values `{"bytes", "path"}` read with soundfile, torchcodec `AudioDecoder`s; channels averaged). Raises
    `InvalidRowError` (naming `where`) for anything unusable.
    """
    if value is None:
        return None
    try:
        return load_audio(value, target_rate=target_rate, where=where)
    except (OSError, TypeError, ValueError) as error:
        raise InvalidRowError(str(error)) from error


# --------------------------------------------------------------------------------------------------------------------
# MOSS-Speech-Nano: tokenizer ids, processor, corpus, codec fingerprint
# --------------------------------------------------------------------------------------------------------------------

NANO_PAD_TOKEN = "<|endoftext|>"
NANO_IM_START = "<|im_start|>"
NANO_IM_END = "<|im_end|>"
NANO_SOSP_TOKEN = "<|object_ref_start|>"
NANO_MODALITY_PAD_TOKEN = "<|object_ref_end|>"
# The order is the ids: processing/build_nano_tokenizer.py gives these tokens ids 0..4.
NANO_SPECIAL_TOKENS = (NANO_PAD_TOKEN, NANO_IM_START, NANO_IM_END, NANO_SOSP_TOKEN, NANO_MODALITY_PAD_TOKEN)
# The nano codec's audio vocabulary (codes 0..511, then end of speech and the audio pad; 520 rows in the model).
NANO_NUM_CODES = 512
NANO_EOSP_TOKEN_ID = 512
NANO_AUDIO_PAD_TOKEN_ID = 513
NANO_AUDIO_VOCAB_SIZE = 520
# Columns of every audio split of the nano corpus (processing/synthesize_espeak.py writes more).
NANO_ROW_COLUMNS = ("utt_id", "fact_id", "category", "kind", "text", "question", "answer", "voice", "canonical")
# processing/prepare_nano.py's record of the codec and corpus its cached codes come from (in <output>/codes/).
NANO_CODES_MANIFEST = "nano_codes.json"


def nano_special_ids(tokenizer: Any) -> dict[str, int]:
    """The MOSS-Speech special ids for a nano tokenizer (text ids) and the nano codec (audio ids)."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("pad_token_id", NANO_PAD_TOKEN), ("im_start_token_id", NANO_IM_START), ("im_end_token_id", NANO_IM_END),
        ("sosp_token_id", NANO_SOSP_TOKEN), ("modality_pad_token_id", NANO_MODALITY_PAD_TOKEN))}
    unk = tokenizer.unk_token_id
    missing = [name for name, value in ids.items() if value is None or (unk is not None and value == unk)]
    if missing:
        raise ValueError(f"the tokenizer lacks the nano special tokens for {missing}; build it with "
                         "processing/build_nano_tokenizer.py.")
    return {**ids, "eosp_token_id": NANO_EOSP_TOKEN_ID, "audio_pad_token_id": NANO_AUDIO_PAD_TOKEN_ID,
            "num_codes": NANO_NUM_CODES, "audio_vocab_size": NANO_AUDIO_VOCAB_SIZE}


def nano_processor(tokenizer: Any, codec: Any = None, **kwargs: Any) -> Any:
    """A `MossSpeechProcessor` over a nano tokenizer with the nano special ids (`kwargs` as its `__init__`)."""
    from ..processing_moss_speech import MossSpeechProcessor

    ids = nano_special_ids(tokenizer)
    return MossSpeechProcessor(
        tokenizer=tokenizer, codec=codec, sosp_token_id=ids["sosp_token_id"], eosp_token_id=ids["eosp_token_id"],
        modality_pad_token_id=ids["modality_pad_token_id"], audio_pad_token_id=ids["audio_pad_token_id"],
        text_pad_token_id=ids["pad_token_id"], num_codes=ids["num_codes"], **kwargs,
    )


def read_nano_facts(corpus: str | os.PathLike) -> list[dict]:
    """The `facts` split of a nano corpus (`save_to_disk` DatasetDict) as a list of dicts."""
    import datasets

    if not os.path.isdir(corpus):
        raise ValueError(f"--corpus {str(corpus)!r} is not a directory (expected the DatasetDict written by "
                         "processing/synthesize_espeak.py).")
    data = datasets.load_from_disk(str(corpus))
    if not isinstance(data, datasets.DatasetDict) or "facts" not in data:
        raise ValueError(f"--corpus {str(corpus)!r} must be a DatasetDict with a 'facts' split, got "
                         f"{list(data) if isinstance(data, datasets.DatasetDict) else type(data).__name__}.")
    facts = data["facts"]
    needed = {"fact_id", "question", "answer"}
    if not needed <= set(facts.column_names):
        raise ValueError(f"the corpus' facts split needs columns {sorted(needed)}, has {facts.column_names}.")
    return facts.to_list()


def load_nano_corpus(path: str | os.PathLike) -> Any:
    """The nano corpus with every audio column cast to `Audio(decode=False)` (read with soundfile, no torchcodec)."""
    import datasets

    if not os.path.isdir(path):
        raise ValueError(f"--corpus {str(path)!r} is not a directory (expected the DatasetDict written by "
                         "processing/synthesize_espeak.py).")
    corpus = datasets.load_from_disk(str(path))
    if not isinstance(corpus, datasets.DatasetDict):
        raise ValueError(f"--corpus {str(path)!r} holds a {type(corpus).__name__}, expected a DatasetDict.")
    missing = [s for s in ("facts", "train", "validation") if s not in corpus]
    if missing:
        raise ValueError(f"--corpus {str(path)!r} lacks the splits {missing} (has {list(corpus)}).")
    for name, split in corpus.items():
        if name == "facts":
            needed = {"fact_id", "category", "question", "answer", "fact_split"}
        else:
            needed = {*NANO_ROW_COLUMNS, "audio"}
        if not needed <= set(split.column_names):
            raise ValueError(f"corpus split {name!r} needs the columns {sorted(needed)}, has {split.column_names}.")
    return datasets.DatasetDict({name: split.cast_column("audio", datasets.Audio(decode=False))
                                 if "audio" in split.column_names else split for name, split in corpus.items()})


def codec_fingerprint(codec_dir: str | os.PathLike) -> str:
    """sha256 of what decides a codec's codes: its `encoder.*` weights except the CTC head (names, values).

    The speech decoder is trained after the data is encoded and keeps the encoder unchanged, so the tokenizer-only
    codec and the final codec share a fingerprint.
    """
    from safetensors import safe_open

    config_file = os.path.join(codec_dir, "config.json")
    weights = sorted(n for n in os.listdir(codec_dir) if n.endswith(".safetensors")) if os.path.isdir(codec_dir) else []
    if not os.path.isfile(config_file) or not weights:
        raise ValueError(f"--codec {str(codec_dir)!r} holds no config.json or safetensors weights.")
    digest = hashlib.sha256()
    for name in weights:
        with safe_open(os.path.join(codec_dir, name), framework="pt") as handle:
            # The CTC head reads codes but does not make them (it can be retrained on decoded speech later).
            for key in sorted(k for k in handle.keys()
                              if k.startswith("encoder.") and not k.startswith("encoder.ctc_head.")):
                digest.update(key.encode())
                digest.update(handle.get_tensor(key).contiguous().numpy().tobytes())
    return digest.hexdigest()


def nano_codes_made_by(data_dir: str | os.PathLike, codec_dir: str | os.PathLike) -> bool | None:
    """Whether the cached codes of a `processing/prepare_nano.py` output were made by `codec_dir`'s encoder (their
    manifest's codec fingerprint is `codec_fingerprint(codec_dir)`); None when `data_dir/codes` has no manifest."""
    manifest = os.path.join(data_dir, "codes", NANO_CODES_MANIFEST)
    if not os.path.isfile(manifest):
        return None
    with open(manifest) as handle:
        return json.load(handle)["codec"] == codec_fingerprint(codec_dir)

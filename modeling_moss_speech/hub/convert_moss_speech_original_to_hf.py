"""Convert the MOSS-Speech release (language model and codec directories as published) into this package's layout.

Release layout read here:

- language model: `config.json` (the release's `MossSpeechConfig` fields), safetensors shards (+ index), the Qwen3
  tokenizer files, optionally `generation_config.json`;
- codec: `config.json` (a Whisper-VQ config: only the encoder fields are read), `model.safetensors` (`encoder.*`),
  `flow/flow.pt`, `flow/hift.pt` (pickled state dicts), `flow/campplus.onnx` (the CAM++ speaker encoder),
  optionally `preprocessor_config.json` (a Whisper feature extractor).

Written: our config classes, sharded safetensors (`model-0000i-of-0000n.safetensors` + index), a
`MossSpeechProcessor` (tokenizer with a tokenizer_config that transformers 4.57 loads too, feature extractor, chat
template, special ids, codec reference), `generation_config.json` with the release's sampling defaults, and the codec
as `codec/` inside the model directory (or its own directory).

Strict by construction: the target model is built on the meta device, every target tensor must be filled by exactly
one source tensor of the same shape and every source tensor must be used, otherwise a `ConversionError` lists the
missing, unused, duplicated and mis-shaped keys. Tensors are streamed one output shard at a time from memory-mapped
sources, so peak memory is about one shard, never two copies of the weights. The language model's parameter names
already equal the release's, so its conversion is config + tokenizer + re-sharding.

Pickles: the release's `flow.pt` / `hift.pt` are read with `torch.load(weights_only=True)` only (tensors, containers
and plain numbers); anything that needs full unpickling is refused. A language-model directory holding only pickled
weights (`pytorch_model.bin`) is refused: safetensors only.

CLI: `moss-speech convert --model RELEASE_LM --codec RELEASE_CODEC -o OUT` (see `moss-speech convert --help`), or
`python -m modeling_moss_speech.hub.convert_moss_speech_original_to_hf ...` with the same options.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging

from ..configuration_moss_speech import MossSpeechConfig
from ..configuration_moss_speech_codec import MossSpeechCodecConfig, MossSpeechCodecEncoderConfig
from ..feature_extraction_moss_speech import MossSpeechFeatureExtractor
from ..generation_moss_speech import MossSpeechGenerationConfig
from ..loading import read_json_file
from ..modeling_moss_speech import MossSpeechForCausalLM
from ..modeling_moss_speech_codec import MossSpeechCodecModel
from ..modeling_moss_speech_codec_vocoder import convert_legacy_weight_norm_keys
from ..processing_moss_speech import CODEC_SUBFOLDER, MossSpeechProcessor
from .remote_code import export_remote_code

logger = logging.get_logger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_SIZE = "5GB"
# The transformers 4.x release the original remote code was written for (4.57.0.dev0); tokenizer files written here
# load with 4.57.x and with the pinned 5.x.
TOKENIZER_4X_TARGET = "4.57"
# Config keys of the release that must not be carried over: remote-code pointers to the release's own code files,
# loader bookkeeping, and the legacy dtype name (mapped to `dtype`).
_DROPPED_CONFIG_KEYS = ("auto_map", "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype")
# Whisper-VQ config fields → MossSpeechCodecEncoderConfig fields (same names; the others are Whisper decoder/training
# fields the speech tokenizer does not use).
_ENCODER_FIELDS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                   "max_source_positions", "activation_function", "pooling_kernel_size", "pooling_type",
                   "pooling_position", "quantize_vocab_size", "quantize_position", "quantize_encoder_only",
                   "encoder_causal_attention", "encoder_causal_convolution")
# WhisperFeatureExtractor fields → MossSpeechFeatureExtractor fields.
_FEATURE_FIELDS = ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "padding_value")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_LISTED = 50
# A probe of what a tokenizer must reproduce after a save/reload with the exported tokenizer_config.
_TOKENIZER_PROBE = ("Hello world! What is 2+3? Ça va, naïve café.\n\n  indented\ttab  end ",
                    "你好，世界。今天天气怎么样？", "emoji 🙂 and numbers 1234567 3.14159")


class ConversionError(ValueError):
    """The release directory cannot be converted as is (the message says what is missing, extra or refused)."""


# --------------------------------------------------------------------------------------------- tensor sources


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a release file, loaded only when its output shard is written.

    Args:
        name: The key inside its source file.
        origin: The source file, relative to the release directory (used in messages).
        shape: Its shape, read from the file header (safetensors) or the memory-mapped tensor (pickles).
        dtype: Its stored dtype.
        load: Returns the tensor (a memory-mapped view or a fresh read of this one tensor).
    """

    name: str
    origin: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    def describe(self) -> str:
        """`origin:name`, as error messages list source tensors."""
        return f"{self.origin}:{self.name}"


@dataclass
class ConversionReport:
    """What a conversion wrote and what it deliberately left out.

    Args:
        output_dir: The written directory.
        tensors: Tensors written (all components).
        bytes: Bytes of tensor data written.
        files: Weight files written, relative to `output_dir`.
        skipped_metadata: Non-tensor entries of pickled state dicts (training counters such as `epoch`, `step`).
        ignored_keys: Source tensors left out because they matched an `ignore_keys` pattern.
        extra_config_fields: Release config fields our config class does not define (kept as attributes).
        tokenizer_class: The `tokenizer_class` written to tokenizer_config.json (None for a codec-only conversion).
        not_converted: Release files deliberately not converted (e.g. the streaming flow checkpoints).
    """

    output_dir: str
    tensors: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    skipped_metadata: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    extra_config_fields: list[str] = field(default_factory=list)
    tokenizer_class: str | None = None
    not_converted: list[str] = field(default_factory=list)

    def merge(self, other: ConversionReport, prefix: str) -> None:
        """Add a sub-conversion's report (e.g. the codec written to `codec/`), its files under `prefix`."""
        self.tensors += other.tensors
        self.bytes += other.bytes
        self.files += [f"{prefix}/{name}" for name in other.files]
        self.skipped_metadata += [f"{prefix}: {name}" for name in other.skipped_metadata]
        self.ignored_keys += [f"{prefix}: {name}" for name in other.ignored_keys]
        self.extra_config_fields += [f"{prefix}: {name}" for name in other.extra_config_fields]
        self.not_converted += [f"{prefix}: {name}" for name in other.not_converted]


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return f"[{shown}{f', ... ({len(items) - _MAX_LISTED} more)' if len(items) > _MAX_LISTED else ''}]"


def _compile(patterns: Iterable[str]) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ConversionError(f"ignore_keys: {pattern!r} is not a valid regular expression ({error}).") from error
    return compiled


def safetensors_sources(directory: Path, files: Sequence[str] | None = None) -> dict[str, SourceTensor]:
    """Tensors of the safetensors files of `directory` (those of its index, or all `*.safetensors`), headers only.

    Raises `ConversionError` when a key appears in two files, or a file named by the index is missing.
    """
    if files is None:
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = read_json_file(index, "safetensors index", error=ConversionError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} is not a safetensors index (no weight_map).")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
    sources: dict[str, SourceTensor] = {}
    duplicates: list[str] = []
    for name in files:
        path = directory / name
        if not path.is_file():
            raise ConversionError(f"{directory}: the safetensors index names {name!r}, which does not exist.")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise ConversionError(f"{name}:{key} has dtype {view.get_dtype()}, which torch cannot hold.")
                if key in sources:
                    duplicates.append(f"{key} (in {sources[key].origin} and {name})")
                    continue
                sources[key] = SourceTensor(key, name, tuple(view.get_shape()), dtype,
                                            _safetensors_loader(path, key))
    if duplicates:
        raise ConversionError(f"{directory}: tensors stored in more than one file (each must be used exactly once): "
                              f"{_listing(duplicates)}")
    return sources


def _safetensors_loader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)

    return load


def load_pickled_state_dict(path: Path, origin: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a pickled state dict, read with `torch.load(weights_only=True)` (memory-mapped when possible).

    Returns `(tensors, skipped)`: `skipped` names plain-number/string entries (training counters such as `epoch`).
    Raises `ConversionError` when the file needs full unpickling (arbitrary objects), is not a flat mapping of names
    to tensors, or is not a torch file at all.
    """
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{origin}: refusing to load it: it needs full unpickling (it holds objects other than tensors, containers "
            "and numbers), which can run arbitrary code. Only torch.load(weights_only=True) is used here; re-save it "
            f"as a plain state dict (torch.save(module.state_dict(), path)). Loader: {' '.join(str(error).split())}"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"{origin}: not a readable torch checkpoint ({' '.join(str(error).split())})") from error
    if not isinstance(state, Mapping):
        raise ConversionError(f"{origin}: expected a state dict (a mapping of names to tensors), got "
                              f"{type(state).__name__}.")
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    nested: list[str] = []
    for key, value in state.items():
        if not isinstance(key, str):
            nested.append(repr(key))
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        elif value is None or isinstance(value, (bool, int, float, str)):
            skipped.append(f"{origin}:{key}")
        else:
            nested.append(f"{key} ({type(value).__name__})")
    if nested:
        raise ConversionError(f"{origin}: expected a flat state dict of tensors (plus plain training counters), found "
                              f"other entries {_listing(nested)}; re-save it as torch.save(module.state_dict(), path).")
    return tensors, skipped


def _tensor_sources(tensors: Mapping[str, torch.Tensor], origin: str) -> dict[str, SourceTensor]:
    return {key: SourceTensor(key, origin, tuple(value.shape), value.dtype, (lambda v=value: v))
            for key, value in tensors.items()}


def refuse_pickled_weights(directory: Path, what: str) -> None:
    """Raise `ConversionError` if `directory` holds pickled weights and no safetensors (never opens the pickles)."""
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_WEIGHT_SUFFIXES))
    has_safetensors = any(directory.glob("*.safetensors"))
    if not has_safetensors:
        if pickles:
            raise ConversionError(
                f"{directory}: the {what} weights are pickled ({', '.join(pickles)}); pickles can run arbitrary code "
                "when loaded and are refused. Convert them to safetensors first (the release ships safetensors).")
        raise ConversionError(f"{directory}: no *.safetensors weight files found for the {what}.")
    if pickles:
        logger.warning(f"{directory}: ignoring pickled files {pickles}; the safetensors files are converted.")


# --------------------------------------------------------------------------------------------- strict matching


def match_sources(
    sources: Mapping[str, SourceTensor],
    targets: Mapping[str, torch.Tensor],
    what: str,
    rename: Callable[[str], str] | None = None,
    ignore_keys: Sequence[str] = (),
    ignored: list[str] | None = None,
) -> dict[str, SourceTensor]:
    """Assign each target tensor its source: every target filled once, every source used once, shapes equal.

    Args:
        sources: Source tensors by (source) key.
        targets: The target state dict (meta tensors are fine: only names and shapes are read).
        what: Named in the error message (e.g. "the language model").
        rename: Maps a source key to its target key (identity when None).
        ignore_keys: Regular expressions (`re.search`) of source keys to leave out on purpose.
        ignored: Receives the `origin:key` of every source left out by `ignore_keys`.
    Raises:
        ConversionError: listing missing targets, unused sources, sources mapped to the same target and shape
            mismatches, all at once.
    """
    patterns = _compile(ignore_keys)
    plan: dict[str, SourceTensor] = {}
    unused, duplicated, mis_shaped = [], [], []
    for key, source in sources.items():
        if any(p.search(key) for p in patterns):
            if ignored is not None:
                ignored.append(source.describe())
            continue
        target = rename(key) if rename is not None else key
        if target not in targets:
            unused.append(source.describe())
        elif target in plan:
            duplicated.append(f"{target} (from {plan[target].describe()} and {source.describe()})")
        else:
            plan[target] = source
            expected = tuple(targets[target].shape)
            if source.shape != expected:
                mis_shaped.append(f"{target}: {source.describe()} has shape {list(source.shape)}, "
                                  f"expected {list(expected)}")
    missing = [key for key in targets if key not in plan]
    if missing or unused or duplicated or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing (no source tensor for these target keys): {_listing(missing)}")
        if unused:
            parts.append(f"unused source tensors (no target key; pass ignore_keys to drop them on purpose): "
                         f"{_listing(sorted(unused))}")
        if duplicated:
            parts.append(f"target keys filled twice: {_listing(duplicated)}")
        if mis_shaped:
            parts.append(f"shape mismatches: {_listing(mis_shaped)}")
        raise ConversionError(f"Cannot convert {what}: " + "; ".join(parts) + ".")
    return plan


# --------------------------------------------------------------------------------------------- streamed writing

# Size units of `max_shard_size`, case-insensitive: decimal (KB, MB, GB) and binary (KiB, MiB, GiB), all in bytes.
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an int or a string of digits and an optional unit: `"5GB"`, `"500MiB"`, `"1000"`.

    Units are case-insensitive and always bytes (`"5gb"` is `"5GB"`). Raises `ConversionError` otherwise.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", size) if isinstance(size, str) else None
    unit = match.group(2).lower() if match else None
    if unit not in _SIZE_UNITS:
        raise ConversionError(f"max_shard_size must be bytes or digits with a unit (KB, MB, GB, KiB, MiB, GiB), e.g. "
                              f"'5GB', got {size!r}.")
    return int(match.group(1)) * _SIZE_UNITS[unit]



def write_sharded_safetensors(
    plan: Mapping[str, SourceTensor],
    output_dir: Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    order: Sequence[str] | None = None,
) -> tuple[list[str], int]:
    """Write `plan` (target key → source) as transformers-style shards, one shard in memory at a time.

    Returns `(files, bytes)`. One shard is `model.safetensors`; several are `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. Floating-point tensors are cast to `dtype` when given.
    """
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise ConversionError(f"max_shard_size must be positive, got {max_shard_size!r}.")
    keys = list(order) if order is not None else list(plan)

    def out_dtype(source: SourceTensor) -> torch.dtype:
        return dtype if dtype is not None and source.dtype.is_floating_point else source.dtype

    def nbytes(source: SourceTensor) -> int:
        count = 1
        for size in source.shape:
            count *= size
        return count * torch.empty((), dtype=out_dtype(source)).element_size()

    shards: list[list[str]] = [[]]
    current = 0
    for key in keys:
        size = nbytes(plan[key])
        if shards[-1] and current + size > limit:
            shards.append([])
            current = 0
        shards[-1].append(key)
        current += size
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_shards(output_dir)
    total = 0
    weight_map: dict[str, str] = {}
    bar = logging.tqdm(list(zip(names, shards)), desc=f"writing {output_dir.name}", unit="shard",
                       disable=len(names) == 1)
    for name, shard in bar:
        tensors = {}
        for key in shard:
            tensor = plan[key].load()
            if tuple(tensor.shape) != plan[key].shape:  # a file changed under us, or a lying header
                raise ConversionError(f"{plan[key].describe()}: loaded shape {list(tensor.shape)} differs from the "
                                      f"header's {list(plan[key].shape)}.")
            tensors[key] = tensor.to(out_dtype(plan[key])).contiguous()
            total += nbytes(plan[key])
            weight_map[key] = name
        save_file(tensors, str(output_dir / name), metadata={"format": "pt"})
        del tensors
    if len(names) > 1:
        parameters = 0
        for key in keys:
            count = 1
            for size in plan[key].shape:
                count *= size
            parameters += count
        index = {"metadata": {"total_parameters": parameters, "total_size": total}, "weight_map": weight_map}
        (output_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + ([SAFETENSORS_INDEX] if len(names) > 1 else []), total


# --------------------------------------------------------------------------------------------- configs


def lm_config_from_release(
    values: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> tuple[MossSpeechConfig, list[str]]:
    """Our `MossSpeechConfig` from the release's config.json fields; also returns the fields it does not define.

    Remote-code pointers (`auto_map`) and loader bookkeeping are dropped; `torch_dtype` becomes `dtype`; the legacy
    `rope_theta` / `rope_scaling` are taken over by the config class. `overrides` wins over the file (e.g. for
    `audio_pad_token_id`, whose presence in the release's file is unconfirmed: the class default is the release's).
    """
    values = dict(values)
    model_type = values.get("model_type")
    if model_type != MossSpeechConfig.model_type:
        raise ConversionError(f"config.json has model_type {model_type!r}, expected {MossSpeechConfig.model_type!r} "
                              "(a MOSS-Speech language-model directory).")
    dtype = values.get("torch_dtype", values.get("dtype"))
    for key in _DROPPED_CONFIG_KEYS:
        values.pop(key, None)
    values.update(overrides or {})
    known = set(MossSpeechConfig.__dataclass_fields__) | set(MossSpeechConfig().to_dict()) | {"rope_theta",
                                                                                            "rope_scaling"}
    extra = sorted(set(values) - known)
    try:
        config = MossSpeechConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"config.json does not describe a valid MossSpeechConfig: {error}") from error
    config.architectures = [MossSpeechForCausalLM.__name__]
    if dtype is not None:
        config.dtype = dtype
    return config, extra


def codec_config_from_release(
    values: Mapping[str, Any], base: MossSpeechCodecConfig | Mapping[str, Any] | None = None
) -> MossSpeechCodecConfig:
    """Our `MossSpeechCodecConfig`: the encoder from the release's Whisper-VQ config.json, the rest from `base`.

    The flow / vocoder / speaker sizes are not in the release's config.json (they live in a hyperpyyaml file with
    custom tags); `base` supplies them (default: the release's values, our class defaults).
    """
    if base is None:
        base = MossSpeechCodecConfig()
    elif isinstance(base, Mapping):
        base = MossSpeechCodecConfig(**base)
    elif not isinstance(base, MossSpeechCodecConfig):
        raise TypeError(f"codec base config must be a MossSpeechCodecConfig, a dict or None, got "
                        f"{type(base).__name__}.")
    encoder = base.encoder_config.to_dict()
    taken = {name: values[name] for name in _ENCODER_FIELDS if values.get(name) is not None}
    if "quantize_vocab_size" not in taken or "d_model" not in taken:
        raise ConversionError("codec config.json lacks d_model / quantize_vocab_size: not a Whisper-VQ speech "
                              "tokenizer config.")
    if values.get("quantize_causal_encoder") and not values.get("encoder_causal_attention", True):
        raise ConversionError("codec config.json: quantize_causal_encoder without encoder_causal_attention (causal "
                              "only up to the quantizer) is not supported; only fully causal encoders are.")
    encoder.update(taken)
    try:
        return MossSpeechCodecConfig(
            encoder_config=MossSpeechCodecEncoderConfig.from_dict(encoder),
            flow_config=base.flow_config, vocoder_config=base.vocoder_config, speaker_config=base.speaker_config,
            sampling_rate=base.sampling_rate,
        )
    except (TypeError, ValueError) as error:
        raise ConversionError(f"codec config.json does not describe a supported speech tokenizer: {error}") from error


def feature_extractor_from_release(directory: Path, config: MossSpeechCodecConfig) -> MossSpeechFeatureExtractor:
    """The feature extractor of a codec: the release's `preprocessor_config.json` values, checked against the codec.

    The codec computes its features with fixed Whisper settings (hop 160, n_fft 400, 30 s chunks); a release file
    asking for others cannot be honoured and is refused.
    """
    expected = MossSpeechFeatureExtractor(feature_size=config.encoder_config.num_mel_bins,
                                          sampling_rate=config.sampling_rate)
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return expected
    values = read_json_file(path, "feature extractor", error=ConversionError)
    differing = [f"{name}={values[name]!r} (codec uses {getattr(expected, name)!r})" for name in _FEATURE_FIELDS
                 if name in values and values[name] != getattr(expected, name)]
    if differing:
        raise ConversionError(f"{path}: feature settings differ from what the codec computes: {', '.join(differing)}.")
    return expected


# --------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    added = sorted(tokenizer.get_added_vocab().items(), key=lambda item: item[1])
    texts = list(_TOKENIZER_PROBE) + ["".join(token for token, _ in added)]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return {
        "size": len(tokenizer), "added": added, "ids": ids,
        "decoded": [tokenizer.decode(row, skip_special_tokens=True) for row in ids],
        "special": {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")},
    }


def write_portable_tokenizer_config(
    directory: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, candidates: Sequence[str] | None = None
) -> str:
    """Rewrite `directory/tokenizer_config.json` so it loads on transformers 4.57 and on the pinned 5.x.

    transformers 5 writes `tokenizer_class: "TokenizersBackend"`, unknown to 4.x. The first of `candidates`
    (default `Qwen2TokenizerFast`, then `PreTrainedTokenizerFast`) whose reload on the installed transformers gives the
    same vocabulary, added tokens, ids, decoding and special tokens as `tokenizer` is written (both classes read
    `tokenizer.json` in 4.57; `Qwen2TokenizerFast` suits the release's Qwen3 tokenizer, `PreTrainedTokenizerFast` any
    other). Special tokens are written explicitly, since 4.x class defaults would otherwise fill them in.
    Returns the class written.
    """
    directory = Path(directory)
    path = directory / "tokenizer_config.json"
    if not (directory / "tokenizer.json").is_file():
        raise ConversionError(f"{directory}: no tokenizer.json; only fast (tokenizers-backed) tokenizers can be "
                              "exported for transformers 4.x and 5.x alike.")
    values = read_json_file(path, "tokenizer config", error=ConversionError)
    values.pop("backend", None)  # 5.x-only key
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = getattr(tokenizer, name)
        values[name] = None if token is None else str(token)
    reference = _tokenizer_fingerprint(tokenizer)
    tried = []
    for candidate in candidates or ("Qwen2TokenizerFast", "PreTrainedTokenizerFast"):
        values["tokenizer_class"] = candidate
        path.write_text(json.dumps(values, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
        try:
            reloaded = AutoTokenizer.from_pretrained(str(directory))
        except Exception as error:  # a candidate class may reject this tokenizer's files outright
            tried.append(f"{candidate} ({type(error).__name__}: {error})")
            continue
        if _tokenizer_fingerprint(reloaded) == reference:
            return candidate
        tried.append(f"{candidate} (reloads with other ids or tokens)")
    raise ConversionError(f"{directory}: no 4.x-compatible tokenizer_class reproduces the tokenizer: {tried}.")


def load_release_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The release's tokenizer from its own files (never remote code)."""
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ConversionError(f"{directory}: no tokenizer files (tokenizer.json / tokenizer_config.json); pass "
                              "tokenizer_dir= where they are.")
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as error:
        raise ConversionError(f"{directory}: cannot load the tokenizer ({type(error).__name__}: {error}).") from error


def set_processor_codec_reference(directory: str | os.PathLike, codec_path: str | None,
                                  codec_subfolder: str | None) -> None:
    """Point a saved processor at its codec: a path / repo id, or a subfolder of the processor's own directory."""
    path = Path(directory) / "processor_config.json"
    values = read_json_file(path, "processor config", error=ConversionError)
    values["codec_path"], values["codec_subfolder"] = codec_path, codec_subfolder
    if path.is_symlink():  # never write through a link into another directory
        path.unlink()
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- conversions


def convert_codec(
    codec_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_config: MossSpeechCodecConfig | Mapping[str, Any] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ignore_keys: Sequence[str] = (),
) -> ConversionReport:
    """Convert a release codec directory into a `MossSpeechCodecModel` directory (float32 as stored).

    Args:
        codec_dir: The release's codec directory (config.json, model.safetensors, flow/flow.pt, flow/hift.pt,
            flow/campplus.onnx).
        output_dir: Where to write config.json, preprocessor_config.json and the safetensors shards.
        base_config: Sizes of the flow / vocoder / speaker encoder (the release's when None); the encoder comes from
            the release's config.json.
        max_shard_size: Largest output shard ("5GB", "500MB" or bytes).
        ignore_keys: Regular expressions of source keys to leave out on purpose (e.g. `^decoder\\.` should the
            release's model.safetensors also hold a Whisper decoder).
    """
    source_dir, out = Path(codec_dir), Path(output_dir)
    if not source_dir.is_dir():
        raise ConversionError(f"codec_dir must be an existing directory, got {str(source_dir)!r}.")
    report = ConversionReport(str(out))
    release_config = read_json_file(source_dir / "config.json", "codec config", error=ConversionError)
    config = codec_config_from_release(release_config, base_config)
    feature_extractor = feature_extractor_from_release(source_dir, config)
    refuse_pickled_weights(source_dir, "codec encoder")
    needed = [source_dir / "flow" / name for name in ("flow.pt", "hift.pt", "campplus.onnx")]
    absent = [str(p.relative_to(source_dir)) for p in needed if not p.is_file()]
    if absent:
        raise ConversionError(f"{source_dir}: missing codec files {absent} (release layout: config.json, "
                              "model.safetensors, flow/flow.pt, flow/hift.pt, flow/campplus.onnx).")

    with torch.device("meta"):
        model = MossSpeechCodecModel(config)
    targets = model.state_dict()
    sources: dict[str, SourceTensor] = {}
    # Encoder: keys already carry the `encoder.` prefix in the release's model.safetensors.
    sources.update(safetensors_sources(source_dir))
    pickled = (("flow", "flow.pt", None), ("hift", "hift.pt", convert_legacy_weight_norm_keys))
    for component, filename, rename in pickled:
        tensors, skipped = load_pickled_state_dict(source_dir / "flow" / filename, f"flow/{filename}")
        report.skipped_metadata += skipped
        if rename is not None:
            renamed = rename(tensors)
            if len(renamed) != len(tensors):
                raise ConversionError(f"flow/{filename}: holds a weight-norm parameter in both the legacy and the "
                                      "parametrization form.")
            tensors = renamed
        for key, source in _tensor_sources(tensors, f"flow/{filename}").items():
            prefixed = f"{component}.{key}"
            if prefixed in sources:
                raise ConversionError(f"{source.describe()} collides with {sources[prefixed].describe()}.")
            sources[prefixed] = source
    from .convert_campplus_onnx import campplus_state_dict_from_onnx

    speaker = campplus_state_dict_from_onnx(source_dir / "flow" / "campplus.onnx", config.speaker_config,
                                            prefix="speaker_encoder.")
    for key, source in _tensor_sources(speaker, "flow/campplus.onnx").items():
        if key in sources:
            raise ConversionError(f"{source.describe()} collides with {sources[key].describe()}.")
        sources[key] = source
    plan = match_sources(sources, targets, "the codec", ignore_keys=ignore_keys, ignored=report.ignored_keys)
    report.not_converted = sorted(str(p.relative_to(source_dir)) for p in (source_dir / "flow").glob("flow-chunk-*.pt"))

    out.mkdir(parents=True, exist_ok=True)
    config.architectures = [MossSpeechCodecModel.__name__]
    config.save_pretrained(str(out))
    feature_extractor.save_pretrained(str(out))
    report.files, report.bytes = write_sharded_safetensors(plan, out, max_shard_size, order=list(targets))
    report.tensors = len(plan)
    return report


def convert_checkpoint(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    codec_dir: str | os.PathLike | None = None,
    codec_path: str | None = None,
    codec_base_config: MossSpeechCodecConfig | Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ignore_keys: Sequence[str] = (),
) -> ConversionReport:
    """Convert the release's language-model directory (and optionally its codec) into this package's layout.

    Args:
        model_dir: The release's LM directory (config.json, safetensors shards, tokenizer files).
        output_dir: Written: config.json, generation_config.json, model*.safetensors (+ index), the processor files
            (processor_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja) and, with `codec_dir`,
            the converted codec in `codec/` (the processor points at it).
        codec_dir: The release's codec directory, converted into `output_dir/codec`.
        codec_path: Instead of `codec_dir`: a converted codec directory or Hub repo id for the processor to load.
        codec_base_config: Flow / vocoder / speaker sizes of the codec (release values when None).
        tokenizer_dir: Where the tokenizer files are, when not in `model_dir`.
        config_overrides: Config fields to set over the release's config.json.
        dtype: Cast floating-point weights (e.g. "float32" for CPU work); the release's bfloat16 is kept when None.
        max_shard_size: Largest output shard ("5GB", "500MB" or bytes).
        ignore_keys: Regular expressions of source keys to leave out on purpose.
    Raises:
        ConversionError: with every missing / unused / mis-shaped key, or what else is refused or absent.
    """
    source_dir, out = Path(model_dir), Path(output_dir)
    if not source_dir.is_dir():
        raise ConversionError(f"model_dir must be an existing directory, got {str(source_dir)!r}.")
    if codec_dir is not None and codec_path is not None:
        raise ConversionError("pass codec_dir (convert the release's codec into codec/) or codec_path (reference a "
                              "converted codec), not both.")
    if out.resolve() == source_dir.resolve():
        raise ConversionError("output_dir must differ from model_dir.")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConversionError(f"dtype must be a torch dtype name such as 'bfloat16' or 'float32', got {dtype!r}.")
        dtype = getattr(torch, dtype)

    report = ConversionReport(str(out))
    config, report.extra_config_fields = lm_config_from_release(
        read_json_file(source_dir / "config.json", "language-model config", error=ConversionError), config_overrides)
    if report.extra_config_fields:
        logger.warning(f"config.json fields unknown to MossSpeechConfig, kept as attributes: "
                       f"{report.extra_config_fields}")
    refuse_pickled_weights(source_dir, "language model")
    tokenizer = load_release_tokenizer(Path(tokenizer_dir) if tokenizer_dir is not None else source_dir)
    if len(tokenizer) > config.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but the model's text vocabulary only "
                              f"{config.vocab_size} rows.")
    with torch.device("meta"):
        model = MossSpeechForCausalLM(config)
    targets = model.state_dict()
    plan = match_sources(safetensors_sources(source_dir), targets, "the language model", ignore_keys=ignore_keys,
                         ignored=report.ignored_keys)
    if dtype is not None:
        config.dtype = dtype
    elif getattr(config, "dtype", None) is None:
        stored = {source.dtype for source in plan.values() if source.dtype.is_floating_point}
        config.dtype = stored.pop() if len(stored) == 1 else None

    codec_report = None
    feature_extractor = MossSpeechFeatureExtractor()
    if codec_dir is not None:
        codec_report = convert_codec(codec_dir, out / CODEC_SUBFOLDER, base_config=codec_base_config,
                                     max_shard_size=max_shard_size, ignore_keys=ignore_keys)
        codec_config = MossSpeechCodecConfig.from_pretrained(str(out / CODEC_SUBFOLDER))
        feature_extractor = MossSpeechFeatureExtractor(feature_size=codec_config.encoder_config.num_mel_bins,
                                                       sampling_rate=codec_config.sampling_rate)
        if codec_config.num_codes != config.num_audio_codes:
            raise ConversionError(f"the codec has {codec_config.num_codes} codes but the model's end-of-speech id is "
                                  f"{config.eosp_token_id} (codes are the audio ids below it).")

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    generation_config = MossSpeechGenerationConfig.from_model_config(config)
    release_generation = source_dir / "generation_config.json"
    if release_generation.is_file():
        for key, value in read_json_file(release_generation, "generation config", error=ConversionError).items():
            if key not in ("transformers_version", "_from_model_config"):
                setattr(generation_config, key, value)
    generation_config.save_pretrained(str(out))
    processor = MossSpeechProcessor.from_model_config(config, tokenizer, feature_extractor=feature_extractor,
                                                      codec_path=codec_path)
    processor.save_pretrained(str(out))
    report.tokenizer_class = write_portable_tokenizer_config(out, tokenizer)
    if codec_report is not None:
        set_processor_codec_reference(out, None, CODEC_SUBFOLDER)
    files, report.bytes = write_sharded_safetensors(plan, out, max_shard_size, dtype=dtype, order=list(targets))
    report.files = files
    report.tensors = len(plan)
    if codec_report is not None:
        report.merge(codec_report, CODEC_SUBFOLDER)
    return report


def _remove_stale_shards(directory: Path) -> None:
    """Delete safetensors shards and index from an earlier run, so no stale shard survives a re-conversion."""
    for path in directory.glob("model*.safetensors"):
        path.unlink()
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        index.unlink()


def format_conversion_report(report: ConversionReport) -> str:
    """Human-readable summary of a `ConversionReport`."""
    lines = [f"wrote {report.tensors} tensors ({report.bytes / 2**20:.1f} MiB) in {len(report.files)} file(s) to "
             f"{report.output_dir}"]
    if report.tokenizer_class:
        lines.append(f"tokenizer_config.json: tokenizer_class {report.tokenizer_class} (loads on transformers "
                     f"{TOKENIZER_4X_TARGET}.x and 5.x)")
    for title, items in (("skipped non-tensor entries", report.skipped_metadata),
                         ("left out on request (ignore_keys)", report.ignored_keys),
                         ("config fields unknown to MossSpeechConfig (kept)", report.extra_config_fields),
                         ("release files not converted", report.not_converted)):
        if items:
            lines.append(f"{title}: {', '.join(items)}")
    return "\n".join(lines)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `moss-speech convert` (shared with `python -m ...convert_moss_speech_original_to_hf`)."""
    parser.add_argument("--model", metavar="DIR", help="the release's language-model directory (config.json, "
                                                       "safetensors shards, tokenizer files)")
    parser.add_argument("--codec", metavar="DIR", help="the release's codec directory (config.json, model.safetensors, "
                                                       "flow/flow.pt, flow/hift.pt, flow/campplus.onnx); with --model "
                                                       "it is written to OUT/codec and the processor points at it")
    parser.add_argument("-o", "--output", metavar="DIR", required=True, help="output directory (created)")
    parser.add_argument("--codec-path", metavar="PATH_OR_REPO",
                        help="with --model and no --codec: a converted codec directory or Hub repo id for the "
                             "processor to load")
    parser.add_argument("--codec-config", metavar="JSON", help="a MossSpeechCodecConfig JSON giving the flow, vocoder "
                                                               "and speaker sizes (default: the release's)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="cast the language model's weights (default: keep the stored dtype, bfloat16)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                        help=f"largest output shard, e.g. 5GB or 500MB (default: {DEFAULT_MAX_SHARD_SIZE})")
    parser.add_argument("--ignore-key", action="append", default=[], metavar="REGEX",
                        help="leave out source tensors whose key matches REGEX (repeatable); every other source "
                             "tensor must be used")
    parser.add_argument("--remote-code", action="store_true",
                        help="also write the code files and auto_map, so the output loads with "
                             "trust_remote_code=True where this package is not installed")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty output directory")


def run_conversion(args: argparse.Namespace) -> ConversionReport:
    """Run a conversion from parsed `add_convert_arguments` options; returns its report."""
    if args.model is None and args.codec is None:
        raise ConversionError("give --model (language model, optionally with --codec) or --codec alone.")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--output: {str(out)!r} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise ConversionError(f"--output: {str(out)!r} is not empty; pass --overwrite to write into it.")
        _remove_stale_shards(out)
        if (out / CODEC_SUBFOLDER).is_dir() and args.model is not None:
            shutil.rmtree(out / CODEC_SUBFOLDER)
    base = None
    if args.codec_config is not None:
        base = MossSpeechCodecConfig.from_json_file(args.codec_config)
    if args.model is None:
        if args.codec_path is not None:
            raise ConversionError("--codec-path only applies with --model.")
        report = convert_codec(args.codec, out, base_config=base, max_shard_size=args.max_shard_size,
                               ignore_keys=args.ignore_key)
    else:
        report = convert_checkpoint(args.model, out, codec_dir=args.codec, codec_path=args.codec_path,
                                     codec_base_config=base, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                     ignore_keys=args.ignore_key)
    if args.remote_code:
        export_remote_code(out)
        if args.model is not None and args.codec is not None:
            export_remote_code(out / CODEC_SUBFOLDER)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (`python -m modeling_moss_speech.hub.convert_moss_speech_original_to_hf`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_convert_arguments(parser)
    args = parser.parse_args(argv)
    print(format_conversion_report(run_conversion(args)))


if __name__ == "__main__":
    main()


__all__ = [
    "ConversionError",
    "ConversionReport",
    "SourceTensor",
    "TOKENIZER_4X_TARGET",
    "codec_config_from_release",
    "convert_checkpoint",
    "convert_codec",
    "format_conversion_report",
    "lm_config_from_release",
    "load_pickled_state_dict",
    "match_sources",
    "parse_size",
    "set_processor_codec_reference",
    "write_portable_tokenizer_config",
    "write_sharded_safetensors",
]

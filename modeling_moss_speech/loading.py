"""Checked loading for the MOSS-Speech language model and codec: strict keys, readable safetensors, no pickles.

`PreTrainedModel.from_pretrained` logs a missing or unexpected tensor and carries on (a missing one is freshly
initialised), lets a corrupt safetensors file surface as a bare `SafetensorError` that names no file, and falls back
to unpickling `pytorch_model.bin` when a checkpoint has no safetensors. `checked_from_pretrained` wraps it for both
models: only safetensors are read (`use_safetensors=True` is always passed, so transformers never opens a pickle,
not even with `weights_only=True`), local weight files are checked before any weight is read, and a key mismatch is
a `CheckpointError` naming the keys unless the caller passes `strict=False`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONVERTER_HINT = (
    "convert it to safetensors with `moss-speech convert` "
    "(modeling_moss_speech/hub/convert_moss_speech_original_to_hf.py)"
)
# Keys listed in a mismatch error before the rest are only counted.
SHOWN_KEYS = 10


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: pickled, corrupt or truncated, or not matching the model."""


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (its type name if it has no message): how apps show an error inline."""
    return " ".join(str(error).split()) or type(error).__name__


def read_json_file(
    path: str | os.PathLike,
    what: str | None = None,
    *,
    expect: type | tuple[type, ...] = dict,
    error: type[Exception] = ValueError,
    missing_ok: bool = False,
) -> Any:
    """The JSON value stored in `path` (a config, index or manifest file), checked to be an `expect`.

    The one reader of the package's JSON files. Raises `error` (default `ValueError`; callers pass their own error
    class) naming the file when it is missing (`None` instead with `missing_ok`), unreadable, not JSON, or holds
    another type than `expect` (a JSON object by default). `what` names the file's role in the messages.
    """
    path = Path(path)
    role = f" ({what})" if what else ""
    if not path.is_file():
        if missing_ok:
            return None
        raise error(f"{path.parent}: no {path.name}{role}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as cause:
        raise error(f"{path}{role} is not valid JSON ({one_line(cause)}).") from cause
    if not isinstance(data, expect):
        kinds = " or ".join(_JSON_KINDS.get(kind, kind.__name__) for kind in (expect if isinstance(expect, tuple)
                                                                               else (expect,)))
        raise error(f"{path}{role} must hold a JSON {kinds}, got {_JSON_KINDS.get(type(data), type(data).__name__)}.")
    return data


_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _with_variant(name: str, variant: str | None) -> str:
    """The variant's file name, as transformers builds it (the variant goes before the last suffix)."""
    if not variant:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` naming `path` unless its header parses and its data covers the file exactly.

    Only the header is read (safetensors memory-maps the data), so checking every shard of a large checkpoint is
    cheap; a truncated or overwritten file fails here, before transformers allocates the model.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({error}): it is corrupt or truncated; save or download it "
            "again."
        ) from error


def local_weight_files(directory: Path, variant: str | None = None) -> list[Path] | None:
    """The safetensors files a checkpoint directory loads from (single file or index shards); `None` if it has none.

    Raises `CheckpointError` naming the index when it cannot be read or names a shard that is not there.
    """
    single = directory / _with_variant(SAFE_WEIGHTS_NAME, variant)
    if single.is_file():
        return [single]
    index = directory / _with_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
    if not index.is_file():
        return None
    try:
        weight_map = read_json_file(index, "safetensors index")["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index} is not a readable safetensors index ({error!r}).") from error
    absent = [name for name in shards if not (directory / name).is_file()]
    if absent:
        raise CheckpointError(f"{index} names shards that are not in {directory}: {absent}.")
    return [directory / name for name in shards]


def pickled_weight_files(directory: Path) -> list[str]:
    """Names of the files in `directory` that hold (or index) pickled weights; none of them is opened."""
    return sorted(
        p.name for p in directory.iterdir()
        if p.is_file() and (p.name.endswith(PICKLE_SUFFIXES) or p.name.endswith(".bin.index.json"))
    )


def refuse_pickles(where: str, pickles: Sequence[str], what: str) -> None:
    """Raise the one-line refusal for a checkpoint whose weights are only pickles."""
    raise CheckpointError(
        f"{where}: the {what} weights are pickled ({', '.join(pickles)}) and pickles are never loaded (they can run "
        f"code); {CONVERTER_HINT}."
    )


def check_local_checkpoint(
    pretrained_model_name_or_path: str | os.PathLike | None, subfolder: str, variant: str | None, what: str
) -> None:
    """Check a local checkpoint's weight files before loading; Hub ids and in-memory state dicts pass through.

    Raises `CheckpointError` for a directory holding pickled weights and no safetensors, for a path to a pickle,
    and for a safetensors file or index that cannot be read (naming the file).
    """
    if pretrained_model_name_or_path is None:
        return
    path = Path(pretrained_model_name_or_path) / (subfolder or "")
    if path.is_file():
        if path.name.endswith(PICKLE_SUFFIXES):
            refuse_pickles(str(path), [path.name], what)
        return
    if not path.is_dir():
        return
    files = local_weight_files(path, variant)
    if files is None:
        pickles = pickled_weight_files(path)
        if pickles:
            refuse_pickles(str(path), pickles, what)
        return  # no weights at all: transformers' own error says so
    for file in files:
        check_safetensors_file(file)


def _cached_weight_files(repo_id: str, subfolder: str, variant: str | None, cache_kwargs: dict) -> list[str]:
    """The safetensors files of a Hub checkpoint that are in the local cache (to name the one that failed)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> str | None:
        found = try_to_load_from_cache(repo_id, f"{subfolder}/{name}" if subfolder else name, **cache_kwargs)
        return found if isinstance(found, str) else None

    single = cached(_with_variant(SAFE_WEIGHTS_NAME, variant))
    if single is not None:
        return [single]
    index = cached(_with_variant(SAFE_WEIGHTS_INDEX_NAME, variant))
    if index is None:
        return []
    try:
        shards = sorted(set(read_json_file(index, "safetensors index")["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return [index]
    return [path for path in map(cached, shards) if path is not None]


def _format_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def checked_from_pretrained(
    load: Callable[..., Any],
    model_class: type,
    pretrained_model_name_or_path: str | os.PathLike | None,
    model_args: Sequence[Any],
    kwargs: dict[str, Any],
    what: str,
) -> Any:
    """Call `load` (transformers' `from_pretrained`) with safetensors only, checked files and strict keys.

    Args:
        load: The `from_pretrained` to wrap (`super().from_pretrained` of the model class).
        model_class: The class being loaded (named in errors).
        pretrained_model_name_or_path, model_args, kwargs: As given to `from_pretrained`. `kwargs` may hold
            `strict` (default `True`): with `strict=False` a missing or unexpected tensor is only logged by
            transformers, as for any model (missing weights are then freshly initialised).
        what: "language model" or "codec", for messages.

    Returns:
        The model, or `(model, loading_info)` when `output_loading_info=True` was passed.

    Raises:
        CheckpointError: pickled weights only, a corrupt or truncated safetensors file (named), or, when strict,
            tensors missing from or unexpected in the checkpoint (named).
        ValueError: `use_safetensors=False`. TypeError: a `strict` that is not a bool.
    """
    strict = kwargs.pop("strict", True)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {strict!r}.")
    if kwargs.get("use_safetensors") is False:
        raise ValueError(
            f"use_safetensors=False: MOSS-Speech {what} checkpoints load from safetensors only and pickled weights "
            f"are never opened; {CONVERTER_HINT}."
        )
    kwargs["use_safetensors"] = True
    subfolder, variant = kwargs.get("subfolder") or "", kwargs.get("variant")
    check_local_checkpoint(pretrained_model_name_or_path, subfolder, variant, what)
    wants_info = kwargs.pop("output_loading_info", False)
    try:
        model, info = load(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
    except SafetensorError as error:
        # Only a Hub checkpoint gets here (local files were checked): find the cached file that fails.
        cache_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision") if kwargs.get(k) is not None}
        for file in _cached_weight_files(str(pretrained_model_name_or_path), subfolder, variant, cache_kwargs):
            check_safetensors_file(file)
        raise CheckpointError(
            f"{pretrained_model_name_or_path}: a safetensors file of the {what} is corrupt or truncated ({error})."
        ) from error
    except OSError as error:
        # transformers' message for a Hub repository without safetensors asks not to set use_safetensors=True,
        # which is not the caller's doing here: say what is wrong instead.
        if "cannot be loaded with `safetensors`" not in str(error):
            raise
        raise CheckpointError(
            f"{pretrained_model_name_or_path}: the {what} has no safetensors weights (pickled weights are never "
            f"loaded); {CONVERTER_HINT}."
        ) from error
    if strict:
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if missing or unexpected:
            found = [f"missing {_format_keys(missing)}"] if missing else []
            found += [f"unexpected {_format_keys(unexpected)}"] if unexpected else []
            raise CheckpointError(
                f"{pretrained_model_name_or_path}: the {what} checkpoint does not match {model_class.__name__} "
                f"({'; '.join(found)}). Pass strict=False to load it anyway (missing tensors are then freshly "
                "initialised, unexpected ones dropped)."
            )
    return (model, info) if wants_info else model


__all__ = [
    "CheckpointError",
    "check_local_checkpoint",
    "check_safetensors_file",
    "checked_from_pretrained",
    "local_weight_files",
    "one_line",
    "pickled_weight_files",
    "read_json_file",
]

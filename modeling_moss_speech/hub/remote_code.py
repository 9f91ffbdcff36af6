"""Remote code: make a saved MOSS-Speech directory loadable with `trust_remote_code=True` without this package.

`export_remote_code(directory)` makes a saved directory loadable with `trust_remote_code=True` where
this package is not installed: it copies the defining modules (and every module they import relatively) next to the
weights and writes `auto_map` entries:

| file | auto_map |
|---|---|
| config.json of an LM | AutoConfig → MossSpeechConfig; AutoModelForCausalLM, AutoModel → MossSpeechForCausalLM |
| config.json of a codec | AutoConfig → MossSpeechCodecConfig, AutoModel → MossSpeechCodecModel |
| preprocessor_config.json of a codec | AutoFeatureExtractor → MossSpeechFeatureExtractor |
| processor_config.json | AutoProcessor → MossSpeechProcessor (its feature extractor: AutoFeatureExtractor) |

All entries of a directory are taken from one module (modeling_moss_speech.MossSpeechConfig, not
configuration_moss_speech.MossSpeechConfig), so that each class exists once when loaded (see `LM_AUTO_MAP`).

`AutoModel` gives the generation-capable `MossSpeechForCausalLM`, as the release's remote code did, so code written
for the release (`AutoModel.from_pretrained(..., trust_remote_code=True).generate(...)`) keeps working; with this
package installed (no `trust_remote_code`), `AutoModel` gives the head-less `MossSpeechModel` as usual.
`save_pretrained_with_remote_code(obj, directory)` does the same for an object in memory through transformers' own
`register_for_auto_class` mechanism (classes registered only for that call).

Exported modules import only torch, torchaudio, numpy, soundfile, safetensors, transformers (and huggingface_hub,
which transformers requires) and the standard library; this is checked on every export. They are the flat modules
of `modeling_moss_speech/` (configuration, modeling, generation, processing, feature extraction, codec and the
loading helpers they use): the applications live in subpackages (`trainer/`, `hub/`, `apps/`) that no model module
imports, so the closure under relative imports is exactly the model and nothing has to be stubbed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers.dynamic_module_utils import get_imports, get_relative_imports

from .._compat import registered_auto_class, restore_auto_class
from ..configuration_moss_speech import MossSpeechConfig
from ..configuration_moss_speech_codec import MossSpeechCodecConfig
from ..feature_extraction_moss_speech import MossSpeechFeatureExtractor
from ..loading import read_json_file
from ..modeling_moss_speech import MossSpeechForCausalLM
from ..modeling_moss_speech_codec import MossSpeechCodecModel
from ..processing_moss_speech import CODEC_SUBFOLDER, MossSpeechProcessor

# The package root: the shipped model modules are its flat `.py` files.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Top-level imports exported code may use: what a user with transformers, torch, torchaudio and soundfile has.
# huggingface_hub (the configs' dataclass validation) and safetensors are dependencies of transformers itself.
REMOTE_CODE_IMPORTS = frozenset({"torch", "torchaudio", "transformers", "huggingface_hub", "safetensors", "numpy",
                                 "soundfile"})


class RemoteCodeError(RuntimeError):
    """The exported code would not load without the package (a disallowed import or a missing module)."""


# ------------------------------------------------------------------------------------------------- remote code


def _entry(cls: type, module: str | None = None) -> str:
    """The `auto_map` value for `cls`: `module_file_stem.ClassName`."""
    return f"{module or cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


# Every auto class of a directory names ONE module, the one that imports all the others (the model's, the
# processor's): each class is then taken from that module's namespace. Two transformers behaviours make this
# necessary: a local directory gets one package per entry module (`transformers_modules/<dir>/<hash of that module
# and its imports>`), and a module first imported relatively is executed again when named by an auto_map entry.
# Either way the same class would exist twice, and isinstance checks between a config and its model (the codec
# checks its sub-configs) or between a processor and its feature extractor would fail.
_LM_MODULE = MossSpeechForCausalLM.__module__.rsplit(".", 1)[-1]
_CODEC_MODULE = MossSpeechCodecModel.__module__.rsplit(".", 1)[-1]
_PROCESSOR_MODULE = MossSpeechProcessor.__module__.rsplit(".", 1)[-1]
LM_AUTO_MAP = {"AutoConfig": _entry(MossSpeechConfig, _LM_MODULE), "AutoModel": _entry(MossSpeechForCausalLM),
               "AutoModelForCausalLM": _entry(MossSpeechForCausalLM)}
CODEC_AUTO_MAP = {"AutoConfig": _entry(MossSpeechCodecConfig, _CODEC_MODULE), "AutoModel": _entry(MossSpeechCodecModel)}
FEATURE_EXTRACTOR_AUTO_MAP = {"AutoFeatureExtractor": _entry(MossSpeechFeatureExtractor, _CODEC_MODULE)}
PROCESSOR_AUTO_MAP = {"AutoProcessor": _entry(MossSpeechProcessor)}
PROCESSOR_FEATURE_EXTRACTOR_AUTO_MAP = {
    "AutoFeatureExtractor": _entry(MossSpeechFeatureExtractor, _PROCESSOR_MODULE), **PROCESSOR_AUTO_MAP,
}
_MISSING = object()
_REGISTRATIONS = ((MossSpeechConfig, "AutoConfig"), (MossSpeechForCausalLM, "AutoModelForCausalLM"),
                  (MossSpeechCodecConfig, "AutoConfig"), (MossSpeechCodecModel, "AutoModel"),
                  (MossSpeechProcessor, "AutoProcessor"), (MossSpeechFeatureExtractor, "AutoFeatureExtractor"))


def _write_text(path: Path, text: str) -> None:
    """Write `text`, replacing a symlink by a file instead of writing through it."""
    if path.is_symlink():
        path.unlink()
    path.write_text(text)


def _write_json(path: Path, values: Mapping[str, Any]) -> None:
    _write_text(path, json.dumps(values, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def _set_auto_map(values: dict[str, Any], entries: Mapping[str, str]) -> None:
    auto_map = dict(values.get("auto_map") or {})
    auto_map.update(entries)
    values["auto_map"] = auto_map


def remote_code_modules(entry_modules: Sequence[str]) -> dict[str, Path]:
    """Module name → source file for the closure of `entry_modules` under relative imports.

    Raises `RemoteCodeError` when a module of the closure is not a flat module of the package (a subpackage such as
    `apps` or a missing file), since transformers' loader copies only files next to the weights.
    """
    found: dict[str, Path] = {}
    todo = list(entry_modules)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = PACKAGE_DIR / f"{name}.py"
        if not path.is_file():
            raise RemoteCodeError(f"module {name!r} is imported relatively but {path} is not a flat module of the "
                                  "package; remote code ships only those.")
        found[name] = path
        todo.extend(get_relative_imports(str(path)))
    return found


def check_remote_code(directory: str | os.PathLike) -> list[str]:
    """Check that every `.py` file of `directory` imports only allowed packages and modules that are present.

    Uses transformers' own import scanner (the one `trust_remote_code` loading runs). Returns the files checked;
    raises `RemoteCodeError` listing every problem.
    """
    directory = Path(directory)
    allowed = REMOTE_CODE_IMPORTS | set(sys.stdlib_module_names)
    problems, files = [], sorted(p.name for p in directory.glob("*.py"))
    for name in files:
        path = directory / name
        for module in get_imports(str(path)):
            if module not in allowed:
                problems.append(f"{name} imports {module!r}")
        for module in get_relative_imports(str(path)):
            if not (directory / f"{module}.py").is_file():
                problems.append(f"{name} imports .{module}, which is not in {directory}")
    if problems:
        raise RemoteCodeError(f"the remote code in {directory} would not load without moss-speech: "
                              + "; ".join(problems))
    return files


def export_remote_code(directory: str | os.PathLike) -> list[str]:
    """Add code files and `auto_map` to a saved model, codec and/or processor directory (see the module docstring).

    Works on a directory as saved (no weights are loaded). Returns the code files written. Raises `ValueError` when
    the directory holds no MOSS-Speech model, codec or processor, `RemoteCodeError` when the code would not load.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"directory must be an existing directory, got {str(directory)!r}.")
    entry_modules: list[str] = []
    edits: list[tuple[Path, dict[str, Any]]] = []
    config_path = directory / "config.json"
    if config_path.is_file():
        values = read_json_file(config_path)
        model_type = values.get("model_type")
        if model_type == MossSpeechConfig.model_type:
            _set_auto_map(values, LM_AUTO_MAP)
        elif model_type == MossSpeechCodecConfig.model_type:
            _set_auto_map(values, CODEC_AUTO_MAP)
        else:
            raise ValueError(f"{config_path}: model_type {model_type!r} is not a MOSS-Speech model or codec.")
        edits.append((config_path, values))
        entry_modules += [entry.split(".")[0] for entry in values["auto_map"].values()]
    processor_path = directory / "processor_config.json"
    if processor_path.is_file():
        values = read_json_file(processor_path)
        _set_auto_map(values, PROCESSOR_AUTO_MAP)
        if isinstance(values.get("feature_extractor"), dict):
            _set_auto_map(values["feature_extractor"], PROCESSOR_FEATURE_EXTRACTOR_AUTO_MAP)
        edits.append((processor_path, values))
        entry_modules.append(PROCESSOR_AUTO_MAP["AutoProcessor"].split(".")[0])
    feature_path = directory / "preprocessor_config.json"
    if feature_path.is_file():
        values = read_json_file(feature_path)
        if values.get("feature_extractor_type") == MossSpeechFeatureExtractor.__name__:
            _set_auto_map(values, FEATURE_EXTRACTOR_AUTO_MAP)
            edits.append((feature_path, values))
            entry_modules.append(FEATURE_EXTRACTOR_AUTO_MAP["AutoFeatureExtractor"].split(".")[0])
    if not edits:
        raise ValueError(f"{directory} holds no MOSS-Speech config.json, processor_config.json or "
                         "preprocessor_config.json to export.")
    written = []
    for module, source in sorted(remote_code_modules(entry_modules).items()):
        target = directory / f"{module}.py"
        _write_text(target, source.read_text())
        written.append(target.name)
    check_remote_code(directory)
    for path, values in edits:
        _write_json(path, values)
    return written


@contextlib.contextmanager
def remote_code_auto_classes() -> Iterator[None]:
    """Register the package's classes with `register_for_auto_class` for the duration of the block.

    Inside it, `save_pretrained` of a config, model, codec, processor or feature extractor copies the defining code
    and writes `auto_map` (transformers' mechanism). Registration is undone afterwards, so ordinary saves stay free of
    code files. Prefer `save_pretrained_with_remote_code`, which also completes what the mechanism cannot express
    (a second auto class per model, the import check).
    """
    previous = {cls: registered_auto_class(cls) for cls, _ in _REGISTRATIONS}
    try:
        for cls, auto_class in _REGISTRATIONS:
            cls.register_for_auto_class(auto_class)
        yield
    finally:
        for cls, value in previous.items():
            restore_auto_class(cls, value)


def _auto_map_holders(obj: Any) -> list[Any]:
    """Objects (or dicts) on which `save_pretrained` under `register_for_auto_class` may record an `auto_map`."""
    holders: list[Any] = [obj]
    if getattr(obj, "config", None) is not None:
        holders.append(obj.config)
    if isinstance(obj, MossSpeechProcessor):
        holders += [obj.feature_extractor, obj.tokenizer, obj.tokenizer.init_kwargs]
        codec = obj._codec_slot.model
        if codec is not None:
            holders += [codec, codec.config]
    return holders


def save_pretrained_with_remote_code(obj: Any, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
    """`obj.save_pretrained(save_directory, **kwargs)` with remote code: code files plus `auto_map`.

    `obj` is a `MossSpeechConfig`, `MossSpeechForCausalLM`, `MossSpeechCodecConfig`, `MossSpeechCodecModel`,
    `MossSpeechProcessor` or `MossSpeechFeatureExtractor`. Returns the code files of the directory.
    """
    if not isinstance(obj, tuple(cls for cls, _ in _REGISTRATIONS)):
        raise TypeError(f"obj must be a MOSS-Speech config, model, codec, processor or feature extractor, got "
                        f"{type(obj).__name__}.")
    # transformers records auto_map on the in-memory configs it saves; keep the caller's objects as they were.
    holders = _auto_map_holders(obj)
    before = [(holder, holder.get("auto_map", _MISSING) if isinstance(holder, dict)
               else holder.__dict__.get("auto_map", _MISSING)) for holder in holders]
    try:
        with remote_code_auto_classes():
            obj.save_pretrained(str(save_directory), **kwargs)
    finally:
        for holder, value in before:
            store = holder if isinstance(holder, dict) else holder.__dict__
            if value is _MISSING:
                store.pop("auto_map", None)
            else:
                store["auto_map"] = value
    written = export_remote_code(save_directory)
    codec = Path(save_directory) / CODEC_SUBFOLDER
    if isinstance(obj, MossSpeechProcessor) and (codec / "config.json").is_file():
        written += [f"{CODEC_SUBFOLDER}/{name}" for name in export_remote_code(codec)]
    return written


__all__ = [
    "RemoteCodeError",
    "check_remote_code",
    "export_remote_code",
    "remote_code_auto_classes",
    "remote_code_modules",
    "save_pretrained_with_remote_code",
]

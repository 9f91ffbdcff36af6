"""What the `moss-speech` commands share: argument types and options, input checks that fail with one line
(`CLIError`), loading the codec and voice, output settings. Names with a leading underscore are internal to
the `cli` package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import soundfile as sf
import torch
from transformers.utils import logging as hf_logging

from ... import pretrained
from ...configuration_moss_speech import MossSpeechConfig
from ...configuration_moss_speech_codec import MossSpeechCodecConfig
from ...feature_extraction_moss_speech import load_audio
from ...hub.checkpoint_info import read_config
from ...loading import one_line
from ...modeling_moss_speech_codec import MossSpeechCodecModel, MossSpeechVoicePrompt
from ...processing_moss_speech import CODEC_SUBFOLDER
from ...threads import add_threads_argument

PROG = "moss-speech"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LM_MODEL_TYPE = MossSpeechConfig.model_type
CODEC_MODEL_TYPE = MossSpeechCodecConfig.model_type
PROCESSOR_FILE = "processor_config.json"


class CLIError(Exception):
    """A problem with the user's input: printed as one `moss-speech: error: ...` line, exit code 2."""


# ------------------------------------------------------------------------------------------------ arguments


class _ArgumentParser(argparse.ArgumentParser):
    """`ArgumentParser` whose usage errors become a `CLIError` (one line, exit code 2) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        """Raise the usage error as a `CLIError` (argparse would print usage and exit)."""
        command = self.prog[len(PROG):].strip()
        where = f"{command}: " if command else ""
        raise CLIError(f"{where}{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps descriptions to 100 columns, keeps epilogs (examples) as written; wider option column."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Wrap one-paragraph descriptions; keep multi-line text (examples) as written."""
        if "\n" in text:  # epilogs: examples, one per line
            return super()._fill_text(text, width, indent)
        return textwrap.fill(text, min(width, 100), initial_indent=indent, subsequent_indent=indent)

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 34)
        super().__init__(prog, **kwargs)


def _number(cast: type, low: float, high: float | None = None, open_low: bool = False) -> Callable[[str], Any]:
    """argparse type: `cast(text)` in [low, high] (`open_low`: (low, high]); a one-line usage error otherwise."""
    kind = "an integer" if cast is int else "a number"
    span = f"in ({low}, {high}]" if high is not None else f"> {low}" if open_low else f">= {low}"

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not np.isfinite(value) or value < low or (open_low and value == low) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {kind} {span}, got {text!r}")
        return value

    return parse


_positive_int, _non_negative_int = _number(int, 1), _number(int, 0)
_positive_float, _probability = _number(float, 0, open_low=True), _number(float, 0, 1, open_low=True)


def _global_options(top_level: bool) -> argparse.ArgumentParser:
    """`--debug`, `--quiet` and `--threads`, accepted before or after the sub-command."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("global options")
    # Sub-commands leave the flags unset unless given, so `moss-speech --debug chat ...` keeps the top-level value.
    default: Any = False if top_level else argparse.SUPPRESS
    group.add_argument("--debug", action="store_true", default=default,
                       help="on errors, print the full Python traceback (otherwise: one line, exit code 2)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress output (progress bars, per-chunk lines) and only error-level library logs")
    add_threads_argument(group, default=None if top_level else argparse.SUPPRESS)
    return parser


def _add_device_options(parser: argparse.ArgumentParser, lm: bool) -> None:
    """`--device` (and, for commands that load the LM, `--dtype`)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", metavar="DEVICE",
                       help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    if lm:
        group.add_argument("--dtype", choices=tuple(DTYPES), metavar="{" + ",".join(DTYPES) + "}",
                           help="dtype of the language model's weights (default: float32 on CPU, bfloat16 on GPU); "
                                "the codec always runs in float32")


def _examples(*lines: str) -> str:
    """An epilog listing example command lines."""
    return "examples:\n" + "\n".join(f"  {PROG} {line}" for line in lines)


# A sub-command factory: command(name, summary, description, *examples) -> the sub-parser.
CommandFactory = Callable[..., argparse.ArgumentParser]
CODEC_HELP = "speech-codec checkpoint directory (config.json with model_type moss_speech_codec)"
NANO_CODEC = "the shipped MOSS-Speech-Nano checkpoint's codec/ folder"
VOICE_HELP = ("voice to speak in: an audio file (turned into a prompt by the codec) or a voice prompt saved as "
              ".safetensors with MossSpeechVoicePrompt.save (default: the codec's prompt-less voice)")


# ---------------------------------------------------------------------------------------------- input checks


def _read_config(directory: Path) -> dict | None:
    """config.json of `directory` as a dict, or `None` if there is none."""
    try:
        return read_config(directory)
    except ValueError as error:
        raise CLIError(str(error)) from error


def _check_path(value: str, option: str, directory: bool = False) -> Path:
    """An existing file (or directory), or a CLIError naming the option."""
    path, kind = Path(value), "directory" if directory else "file"
    if not path.exists():
        raise CLIError(f"{option}: {kind} {value!r} does not exist")
    if path.is_dir() != directory:
        raise CLIError(f"{option}: {value!r} is not a {kind}")
    return path


def _check_dir(value: str, option: str) -> Path:
    """An existing directory, or a CLIError naming the option."""
    return _check_path(value, option, directory=True)


def _check_checkpoint(value: str, option: str, model_type: str) -> Path:
    """A directory whose config.json has `model_type`."""
    path = _check_dir(value, option)
    config = _read_config(path)
    if config is None:
        raise CLIError(f"{option}: {value!r} has no config.json (expected a {model_type} checkpoint directory)")
    if config.get("model_type") != model_type:
        raise CLIError(f"{option}: {value!r} holds a {config.get('model_type')!r} checkpoint, expected {model_type!r}")
    return path


def _checkpoint_or_nano(value: str | None, option: str, model_type: str, subfolder: str = "") -> Path:
    """The checkpoint directory given with `option`, or the shipped MOSS-Speech-Nano's (its `subfolder`) when none
    is."""
    if value is None:
        try:
            value = str(pretrained.nano_path() / subfolder)
        except FileNotFoundError as error:
            raise CLIError(f"{option} not given, and {error}") from error
    return _check_checkpoint(value, option, model_type)


def _model_dir(value: str | None) -> Path:
    """The `--model` checkpoint directory, or the shipped MOSS-Speech-Nano checkpoint when it is not given."""
    return _checkpoint_or_nano(value, "--model", LM_MODEL_TYPE)


def _codec_dir(value: str | None) -> Path:
    """The `--codec` checkpoint directory, or the shipped MOSS-Speech-Nano codec when it is not given."""
    return _checkpoint_or_nano(value, "--codec", CODEC_MODEL_TYPE, CODEC_SUBFOLDER)


def _voice_path(value: str | None, model_dir: Path) -> str | None:
    """`--voice` as a path: a file as given, or the NAME of a voice in the model directory's voices/ folder."""
    if value is None or Path(value).exists():
        return value
    voices = pretrained.shipped_voices(model_dir)
    if value in voices:
        return str(voices[value])
    if "/" not in value and os.sep not in value and "." not in value:  # a name, not a path
        raise CLIError(f"--voice: {value!r} is neither a file nor a voice of {str(model_dir)!r} (its voices: "
                       f"{', '.join(voices) or 'none'})")
    return value


def _check_output_file(value: str, option: str, audio: bool) -> Path:
    """A file that can be written: its directory exists; for audio, soundfile knows its extension."""
    path = Path(value)
    if path.is_dir():
        raise CLIError(f"{option}: {value!r} is a directory, expected a file name")
    if not path.parent.is_dir():
        raise CLIError(f"{option}: directory {str(path.parent)!r} does not exist")
    if audio and path.suffix[1:].upper() not in sf.available_formats():
        raise CLIError(f"{option}: cannot tell the audio format of {value!r} from its extension; use .wav or .flac")
    return path


def _read_audio(path: Path, option: str) -> tuple[torch.Tensor, int]:
    """An audio file as a mono float32 waveform at its own rate (`load_audio`), or a CLIError naming the option."""
    try:
        return load_audio(path, where=path.name)
    except (OSError, TypeError, ValueError) as error:
        raise CLIError(f"{option}: cannot read {str(path)!r} as audio ({one_line(error)})") from error


def _resolve_device(value: str | None) -> torch.device:
    """The `--device` value as a torch device (default: cuda if available, else cpu), checked to exist."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as error:
        raise CLIError(f"--device: {value!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CLIError(f"--device {value}: no such CUDA device ({torch.cuda.device_count()} available)")
    return device


def _resolve_dtype(value: str | None, device: torch.device) -> torch.dtype:
    """The LM dtype of `--dtype` (default: float32 on CPU, bfloat16 elsewhere)."""
    if value is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[value]  # argparse's `choices` rejected unknown names


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """Seed the global RNGs (vocoder noise without a generator) and return a generator for sampling."""
    if seed is None:
        return None
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------------- loading


def _load_codec(directory: Path, device: torch.device) -> MossSpeechCodecModel:
    """The codec of `directory` on `device`, in float32, in eval mode."""
    codec = MossSpeechCodecModel.from_pretrained(str(directory), dtype=torch.float32)
    return codec.to(device=device, dtype=torch.float32).eval()


def _check_voice(value: str | None) -> MossSpeechVoicePrompt | tuple[torch.Tensor, int] | None:
    """A saved voice prompt (loaded now) or the samples of a voice audio file (turned into a prompt later)."""
    if value is None:
        return None
    path = _check_path(value, "--voice")
    if path.suffix == ".safetensors":
        try:
            return MossSpeechVoicePrompt.load(str(path))
        except Exception as error:
            raise CLIError(f"--voice: {value!r} is not a MOSS-Speech voice prompt file ({one_line(error)})") from error
    return _read_audio(path, "--voice")


def _voice_prompt(voice: MossSpeechVoicePrompt | tuple[torch.Tensor, int] | None,
                  codec: MossSpeechCodecModel) -> MossSpeechVoicePrompt | None:
    """The prompt of `_check_voice`'s result: as is, or computed by the codec from the audio samples."""
    if voice is None:
        return voice
    if isinstance(voice, MossSpeechVoicePrompt):
        try:
            codec.check_voice_prompt(voice, "--voice")
        except ValueError as error:
            raise CLIError(str(error)) from error
        return voice
    wave, rate = voice
    return codec.voice_prompt(wave, sampling_rate=rate)


@contextlib.contextmanager
def _output_settings(quiet: bool) -> Iterator[None]:
    """With `quiet`, silence transformers' progress bars and non-error logs; restore both afterwards."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()


def _note(message: str) -> None:
    """One line on stderr, prefixed with the program name."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)

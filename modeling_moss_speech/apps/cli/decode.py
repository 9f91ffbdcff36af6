"""`moss-speech decode`: speech codes to 24 kHz speech."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from ...loading import one_line, read_json_file
from .common import (
    CODEC_HELP,
    NANO_CODEC,
    VOICE_HELP,
    CLIError,
    CommandFactory,
    _add_device_options,
    _check_output_file,
    _check_path,
    _check_voice,
    _codec_dir,
    _generator,
    _load_codec,
    _note,
    _positive_int,
    _resolve_device,
    _voice_prompt,
)


def add_parser(command: CommandFactory) -> None:
    """Add `decode` to the sub-commands (`command` makes a sub-parser with the global options)."""
    decode = command(
        "decode", "turn speech codes (.npy or .json) into 24 kHz speech",
        "Decode speech codes written by 'moss-speech encode' (or any .npy of integer codes, or a .json list of "
        "codes or object of name -> codes) into 24 kHz speech, 1920 samples per code.",
        "decode codes.npy -o out.wav             (the shipped MOSS-Speech-Nano codec)",
        "decode codes.npy --codec MOSS-Speech-Codec -o out.wav",
        "decode codes.json --codec MOSS-Speech-Codec --voice speaker.wav -o speech/")
    decode.add_argument("codes", metavar="CODES", help="codes.npy or codes.json")
    decode.add_argument("--codec", metavar="DIR", help=f"{CODEC_HELP} (default: {NANO_CODEC})")
    decode.add_argument("--voice", metavar="PATH", help=VOICE_HELP)
    decode.add_argument("-o", "--output", metavar="PATH", required=True,
                        help="audio file for one utterance; for several (a .json object with several entries) a "
                             "directory, created if needed, receiving NAME.wav per entry")
    decode.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                        help="utterances decoded together (default: 8)")
    decode.add_argument("--seed", type=int, metavar="N", help="random seed of the vocoder's noise")
    _add_device_options(decode, lm=False)
    decode.set_defaults(func=run)


def _as_codes(value: Any, where: str) -> np.ndarray:
    """A 1-D int64 array of codes, or a CLIError naming `where`."""
    array = np.asarray(value)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or array.size == 0:
        raise CLIError(f"{where}: expected a non-empty 1-D list of codes, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise CLIError(f"{where}: codes must be integers, got {array.dtype}")
    return array.astype(np.int64)


def _read_codes(path: Path) -> list[tuple[str, np.ndarray]]:
    """(name, codes) entries of a .npy (one utterance) or .json (a list of codes, or an object name → codes)."""
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as error:
            raise CLIError(f"decode: cannot read {str(path)!r} as a .npy array ({error})") from error
        return [(path.stem, _as_codes(array, f"decode: {str(path)!r}"))]
    if path.suffix == ".json":
        try:
            data = read_json_file(path, "codes", expect=(list, dict))
        except ValueError as error:
            raise CLIError(f"decode: {one_line(error)}") from error
        if isinstance(data, list):
            return [(path.stem, _as_codes(data, f"decode: {str(path)!r}"))]
        if isinstance(data, dict) and data:
            return [(str(name), _as_codes(value, f"decode: {str(path)!r} entry {name!r}"))
                    for name, value in data.items()]
        raise CLIError(f"decode: {str(path)!r} must hold a list of codes or an object mapping names to codes")
    raise CLIError(f"decode: {str(path)!r} must be a .npy or .json file of codes")


def run(args: argparse.Namespace) -> int:
    """`moss-speech decode`: codes → 24 kHz speech, one file per utterance."""
    start = time.perf_counter()
    entries = _read_codes(_check_path(args.codes, "decode"))
    output = Path(args.output)
    if len(entries) == 1:
        targets = [_check_output_file(args.output, "--output", audio=True)]
    else:
        if output.exists() and not output.is_dir():
            raise CLIError(f"--output: {len(entries)} utterances need a directory, but {args.output!r} is a file")
        if not output.exists() and output.suffix[1:].upper() in sf.available_formats():
            raise CLIError(f"--output: {args.codes!r} holds {len(entries)} utterances, which need a directory (one "
                           f"NAME.wav each), but {args.output!r} names an audio file")
        if not output.parent.is_dir():
            raise CLIError(f"--output: directory {str(output.parent)!r} does not exist")
        targets = [output / f"{Path(name).stem}.wav" for name, _ in entries]
        if len(set(targets)) != len(targets):
            raise CLIError("decode: two entries have the same file name stem; rename them in the .json")
    voice = _check_voice(args.voice)
    device = _resolve_device(args.device)
    codec = _load_codec(_codec_dir(args.codec), device)
    for name, codes in entries:
        if int(codes.min()) < 0 or int(codes.max()) >= codec.config.num_codes:
            bad = int(codes.min()) if int(codes.min()) < 0 else int(codes.max())
            raise CLIError(f"decode: entry {name!r} holds code {bad}, outside the codebook "
                           f"[0, {codec.config.num_codes})")
    voice_prompt = _voice_prompt(voice, codec)
    generator = _generator(args.seed, device)
    if len(entries) > 1:
        output.mkdir(exist_ok=True)

    seconds = 0.0
    batches = range(0, len(entries), args.batch_size)
    bar = tqdm(batches, desc="decoding", unit="batch", file=sys.stderr, disable=args.quiet or len(batches) == 1)
    for first in bar:
        chunk = entries[first:first + args.batch_size]
        speech = codec.decode([torch.from_numpy(codes) for _, codes in chunk], voice_prompt=voice_prompt,
                              generator=generator)
        for row, target in enumerate(targets[first:first + args.batch_size]):
            wave = speech.waveforms[row, : int(speech.lengths[row])].float().cpu().numpy()
            sf.write(str(target), wave, speech.sampling_rate, subtype="PCM_16")
            seconds += wave.size / speech.sampling_rate
    bar.close()
    where = targets[0] if len(targets) == 1 else f"{len(targets)} files in {output}"
    _note(f"decoded {sum(c.size for _, c in entries)} codes -> {seconds:.2f} s of speech, {where} "
          f"({time.perf_counter() - start:.2f} s)")
    return 0

"""`moss-speech encode`: audio files to speech codes."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ...loading import one_line
from .common import (
    CODEC_HELP,
    NANO_CODEC,
    CLIError,
    CommandFactory,
    _add_device_options,
    _check_output_file,
    _check_path,
    _codec_dir,
    _load_codec,
    _note,
    _read_audio,
    _resolve_device,
)


def add_parser(command: CommandFactory) -> None:
    """Add `encode` to the sub-commands (`command` makes a sub-parser with the global options)."""
    encode = command(
        "encode", "turn audio files into speech codes (.npy for one file, .json for several)",
        "Encode audio files (any rate, mono or multi-channel) into the codec's 12.5 Hz speech codes.",
        "encode question.wav -o codes.npy        (the shipped MOSS-Speech-Nano codec)",
        "encode question.wav --codec MOSS-Speech-Codec -o codes.npy",
        "encode data/*.wav --codec MOSS-Speech-Codec -o codes.json")
    encode.add_argument("inputs", nargs="+", metavar="AUDIO", help="audio file(s) to encode (wav/flac/ogg)")
    encode.add_argument("--codec", metavar="DIR", help=f"{CODEC_HELP} (default: {NANO_CODEC})")
    encode.add_argument("-o", "--output", metavar="PATH", required=True,
                        help="codes.npy (one input: a 1-D int64 array) or codes.json (an object mapping each input "
                             "path, as given, to its list of codes)")
    _add_device_options(encode, lm=False)
    encode.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`moss-speech encode`: audio files → codes (.npy for one file, .json for any number)."""
    start = time.perf_counter()
    inputs = [_check_path(value, "encode") for value in args.inputs]
    if len(set(args.inputs)) != len(args.inputs):
        raise CLIError("encode: the same input file is given twice")
    output = _check_output_file(args.output, "--output", audio=False)
    if output.suffix not in (".npy", ".json"):
        raise CLIError(f"--output: {args.output!r} must end with .npy (one input) or .json (any number of inputs)")
    if output.suffix == ".npy" and len(inputs) > 1:
        raise CLIError(f"--output: a .npy file holds the codes of one input, got {len(inputs)} inputs; use .json")
    for path in inputs:  # catch unreadable files before loading the codec (header only)
        try:
            sf.info(str(path))
        except Exception as error:
            raise CLIError(f"encode: cannot read {str(path)!r} as audio ({one_line(error)})") from error
    codec = _load_codec(_codec_dir(args.codec), _resolve_device(args.device))

    codes: dict[str, list[int]] = {}
    seconds = 0.0
    bar = tqdm(zip(args.inputs, inputs), total=len(inputs), desc="encoding", unit="file", file=sys.stderr,
               disable=args.quiet or len(inputs) == 1)
    for name, path in bar:
        wave, rate = _read_audio(path, "encode")
        seconds += wave.shape[-1] / rate
        codes[name] = codec.encode(wave, sampling_rate=rate).codes[0].tolist()
    bar.close()

    if output.suffix == ".npy":
        np.save(output, np.asarray(codes[args.inputs[0]], dtype=np.int64))
    else:
        output.write_text(json.dumps(codes))
    total = sum(len(c) for c in codes.values())
    _note(f"encoded {len(inputs)} file(s), {seconds:.2f} s of audio -> {total} codes in {output} "
          f"({time.perf_counter() - start:.2f} s)")
    return 0

"""`moss-speech convert`: the original release to this package's layout."""

from __future__ import annotations

import argparse
import time

from ...hub.convert_moss_speech_original_to_hf import add_convert_arguments, format_conversion_report, run_conversion
from .common import (
    CommandFactory,
    _check_dir,
    _note,
)


def add_parser(command: CommandFactory) -> None:
    """Add `convert` to the sub-commands (`command` makes a sub-parser with the global options)."""
    convert = command(
        "convert", "convert the original MOSS-Speech release (model and/or codec directories) into this layout",
        "Convert the release as published: the language-model directory (config.json, safetensors shards, tokenizer "
        "files) and/or the codec directory (config.json, model.safetensors, flow/flow.pt, flow/hift.pt, "
        "flow/campplus.onnx). Writes our config classes, sharded safetensors, the processor (tokenizer loadable by "
        "transformers 4.57 and 5.x, feature extractor, chat template, special ids) and generation_config.json; the "
        "codec goes to OUT/codec. Strict: every source tensor is used exactly once and every target tensor filled, "
        "otherwise the keys are listed. Pickled codec files are read with torch.load(weights_only=True) only; a "
        "pickled language model is refused. The codec part needs the [convert] extra (onnx).",
        "convert --model MOSS-Speech --codec MOSS-Speech-Codec -o moss-speech-hf",
        "convert --codec MOSS-Speech-Codec -o moss-speech-codec-hf",
        "convert --model MOSS-Speech --codec-path your-name/MOSS-Speech-Codec -o out --remote-code")
    add_convert_arguments(convert)
    convert.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`moss-speech convert`: the release's directories → this package's layout; a summary on stdout."""
    for value, option in ((args.model, "--model"), (args.codec, "--codec")):
        if value is not None:
            _check_dir(value, option)
    start = time.perf_counter()
    report = run_conversion(args)
    print(format_conversion_report(report))
    _note(f"converted in {time.perf_counter() - start:.1f} s")
    return 0

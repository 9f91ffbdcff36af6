"""`moss-speech info`: what a checkpoint directory holds, without loading weights."""

from __future__ import annotations

import argparse
import json

from ...hub.checkpoint_info import describe_checkpoint, format_report
from .common import (
    CLIError,
    CommandFactory,
    _check_dir,
)


def add_parser(command: CommandFactory) -> None:
    """Add `info` to the sub-commands (`command` makes a sub-parser with the global options)."""
    info = command(
        "info", "show what a checkpoint directory holds (model, codec, processor), without loading weights",
        "Describe a directory: for a language model its configuration (sizes, layer split, vocabularies, special "
        "ids), its parameters per branch (text/audio embedding, trunk, text/audio tail with its norm, text/audio "
        "head) counted on the meta device from config.json, and its safetensors files (read from their headers); "
        "for a codec its parameters per component (encoder, flow, hift, speaker_encoder); for a processor its "
        "tokenizer, special ids, feature extractor and codec reference. No weights are loaded.",
        "info MOSS-Speech", "info MOSS-Speech-Codec --json")
    info.add_argument("directory", metavar="DIR", help="checkpoint or processor directory")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`moss-speech info`: describe a model / codec / processor directory (several if it holds several)."""
    directory = _check_dir(args.directory, "info")
    try:
        report = describe_checkpoint(directory)
    except ValueError as error:
        raise CLIError(f"info: {error}") from error
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0

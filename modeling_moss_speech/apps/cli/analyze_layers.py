"""`moss-speech analyze-layers`: layer-wise speech/text similarity of a checkpoint."""

from __future__ import annotations

import argparse

from ..analysis import add_analyze_layers_arguments, run_analyze_layers
from .common import (
    CommandFactory,
)


def add_parser(command: CommandFactory) -> None:
    """Add `analyze-layers` to the sub-commands (`command` makes a sub-parser with the global options)."""
    analyze = command(
        "analyze-layers", "layer-wise speech/text similarity of a checkpoint (the paper's Fig. 2)",
        "Feed paired speech and transcripts through the model, compare speech frames and text tokens layer by layer "
        "(cosine similarity aligned with DTW), print one score per layer and a suggested num_shared_layers, and "
        "optionally write the scores (JSON) and a plot (PNG, needs the [analysis] extra).",
        "analyze-layers --audio q.wav --transcript 'What colour is a banana?'   (the shipped MOSS-Speech-Nano)",
        "analyze-layers --model MOSS-Speech --processor MOSS-Speech --audio q.wav --transcript 'What is two plus "
        "three?' --output-png layers.png")
    add_analyze_layers_arguments(analyze)
    analyze.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`moss-speech analyze-layers`: per-layer speech/text similarity (prints a JSON summary)."""
    run_analyze_layers(args)
    return 0

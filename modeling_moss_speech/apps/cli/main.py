"""The `moss-speech` console script: talk to a checkpoint, turn speech into codes and back, inspect checkpoints.

```
moss-speech chat --model DIR --wav question.wav --out answer.wav     # spoken question → text (stdout) + speech
moss-speech chat --model DIR --text "Hello" --output-modality text   # text question → text answer
moss-speech encode a.wav b.wav [--codec CODEC] -o codes.json          # speech → 12.5 Hz codes
moss-speech decode codes.json [--codec CODEC] --voice me.wav -o out/  # codes → 24 kHz speech
moss-speech info DIR [--json]                                         # what a checkpoint directory holds
moss-speech eval --corpus data/nano/corpus --split test -o results.json  # spoken-QA accuracy of a checkpoint
moss-speech convert --model RELEASE --codec RELEASE_CODEC -o OUT      # the original release → this layout
moss-speech push OUT org/MOSS-Speech                                  # upload with remote code and a model card
moss-speech demo [--model DIR] [--port 7860]                          # talk to a checkpoint in the browser
```

Errors are reported as one line on stderr (`moss-speech: error: ...`) with exit code 2; `--debug` adds the
traceback. Progress (tqdm bars, streamed-chunk lines, transformers' loading bars) goes to stderr; `--quiet`
silences it. Answers go to stdout, one-line summaries to stderr. `--threads N` sets torch's CPU threads (default:
`$OMP_NUM_THREADS` if set, else half the usable CPUs; see `threads.py`). Without `--model` / `--codec`, every
command that loads a checkpoint uses the shipped MOSS-Speech-Nano one (`pretrained.nano_path()`).

Each command is a module of this package with `add_parser` (its options) and `run` (the command); `common` holds
what they share (argument types, input checks, codec and voice loading).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from ... import __version__
from ...loading import one_line
from ...threads import set_threads
from . import analyze_layers, chat, convert, decode, demo, encode, evaluate, info, push
from .common import (
    PROG,
    CLIError,
    _ArgumentParser,
    _examples,
    _global_options,
    _HelpFormatter,
    _note,
    _output_settings,
)


def build_parser() -> argparse.ArgumentParser:
    """The `moss-speech` argument parser and its sub-commands (chat, encode, decode, info, convert, push)."""
    parser = _ArgumentParser(
        prog=PROG, formatter_class=_HelpFormatter, parents=[_global_options(True)],
        description="MOSS-Speech, the true speech-to-speech LLM: chat with a checkpoint, turn speech into codec "
                    "codes and back, inspect checkpoint directories.",
        epilog=_examples("chat --model MOSS-Speech --codec MOSS-Speech-Codec --wav question.wav --out answer.wav",
                         "chat --model MOSS-Speech --text 'Tell me a joke.' --output-modality text",
                         "encode a.wav b.wav --codec MOSS-Speech-Codec -o codes.json",
                         "decode codes.json --codec MOSS-Speech-Codec --voice speaker.wav -o speech/",
                         "info MOSS-Speech",
                         "convert --model MOSS-Speech --codec MOSS-Speech-Codec -o moss-speech-hf",
                         "push moss-speech-hf your-name/MOSS-Speech",
                         "demo --model MOSS-Speech --codec MOSS-Speech-Codec")
        + "\n\nRun 'moss-speech COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the package version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_ArgumentParser)

    def command(name: str, summary: str, description: str, *examples: str) -> argparse.ArgumentParser:
        """Add a sub-command with the global options and an examples epilog."""
        return commands.add_parser(name, parents=[_global_options(False)], formatter_class=_HelpFormatter,
                                   help=summary, description=description, epilog=_examples(*examples))

    # The order of the sub-commands in --help.
    for module in (chat, encode, decode, info, convert, push, analyze_layers, demo, evaluate):
        module.add_parser(command)
    return parser


# ------------------------------------------------------------------------------------------------------ main


def _describe(error: BaseException) -> str:
    """One line for an error: the message of expected errors, type and message otherwise."""
    if isinstance(error, (CLIError, ValueError, TypeError, OSError, RuntimeError)) and str(error).strip():
        return one_line(error)
    return f"{type(error).__name__}: {one_line(error)} (run with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `moss-speech` with `argv` (default: `sys.argv[1:]`); returns the exit code (0 ok, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # known before parsing, so usage errors can show a traceback too
    handler: Callable[[argparse.Namespace], int]
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help, --version
            return exit_.code if isinstance(exit_.code, int) else 0
        debug, handler = args.debug, args.func
        threads = set_threads(args.threads)
        try:
            with _output_settings(args.quiet):
                return handler(args)
        finally:  # main() may run inside a larger program (tests, notebooks): leave its thread count as it was
            set_threads(threads)
    except KeyboardInterrupt:
        _note("interrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (`moss-speech info DIR | head`): stop quietly
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_describe(error)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

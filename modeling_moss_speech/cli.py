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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from . import __version__, pretrained
from .analysis import add_analyze_layers_arguments, run_analyze_layers
from .chat_moss_speech import MossSpeechChat
from .checkpoint_info import describe_checkpoint, format_report, read_config
from .configuration_moss_speech import MossSpeechConfig
from .configuration_moss_speech_codec import MossSpeechCodecConfig
from .convert_moss_speech_original_to_hf import add_convert_arguments, format_conversion_report, run_conversion
from .evaluation import TASKS as EVAL_TASKS
from .evaluation import format_table, run_evaluation
from .hub import CARD_TEMPLATES, publish, stage_upload
from .loading import one_line, read_json_file
from .modeling_moss_speech import MossSpeechForCausalLM
from .modeling_moss_speech_codec import MossSpeechCodecModel, MossSpeechVoicePrompt
from .processing_moss_speech import CODEC_SUBFOLDER, MossSpeechProcessor
from .threads import add_threads_argument, set_threads

PROG = "moss-speech"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LM_MODEL_TYPE = MossSpeechConfig.model_type
CODEC_MODEL_TYPE = MossSpeechCodecConfig.model_type
PROCESSOR_FILE = "processor_config.json"
# Parameter branches of MossSpeechForCausalLM, by state-dict prefix (the release's names).


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

    codec_help = "speech-codec checkpoint directory (config.json with model_type moss_speech_codec)"
    nano_codec = "the shipped MOSS-Speech-Nano checkpoint's codec/ folder"
    voice_help = ("voice to speak in: an audio file (turned into a prompt by the codec) or a voice prompt saved as "
                  ".safetensors with MossSpeechVoicePrompt.save (default: the codec's prompt-less voice)")

    chat = command(
        "chat", "answer one spoken or written question (text on stdout, speech to a wav file)",
        "Answer one question with a MOSS-Speech checkpoint. The answer's text is printed on stdout; speech, if the "
        "model produced any, is written to --out (24 kHz, 16-bit); a one-line summary (rows generated, seconds of "
        "audio, time) goes to stderr.",
        "chat --wav question.wav --out answer.wav       (the shipped MOSS-Speech-Nano checkpoint)",
        "chat --model MOSS-Speech --codec MOSS-Speech-Codec --wav question.wav",
        "chat --model MOSS-Speech --text 'What is the capital of France?' --stream --voice me.safetensors",
        "chat --model MOSS-Speech --text 'Hi!' --output-modality text --greedy")
    group = chat.add_argument_group("question (exactly one of --wav / --text)")
    asked = group.add_mutually_exclusive_group(required=True)
    asked.add_argument("--wav", metavar="PATH", help="the question as an audio file (wav/flac/ogg, any rate, mono "
                                                     "or stereo), encoded with the codec")
    asked.add_argument("--text", metavar="TEXT", help="the question as text")
    group.add_argument("--system", metavar="TEXT", help="system prompt, sent as the first turn (default: the "
                                                        "processor's fallback prompt for the output modality)")
    group = chat.add_argument_group("checkpoints")
    group.add_argument("--model", metavar="DIR",
                       help="language-model checkpoint directory (config.json with model_type moss_speech, "
                            "safetensors), loaded with AutoModelForCausalLM (default: the shipped MOSS-Speech-Nano "
                            "checkpoint)")
    group.add_argument("--processor", metavar="DIR", help="processor directory (processor_config.json, tokenizer) "
                                                          "(default: the --model directory)")
    group.add_argument("--codec", metavar="DIR", help=f"{codec_help}, overriding the codec the processor names; "
                                                      "needed for --wav, audio answers, --voice and --stream "
                                                      "(default: the processor's codec, else the model directory's "
                                                      "codec/ folder)")
    group.add_argument("--voice", metavar="NAME|PATH",
                       help=f"{voice_help}; or the NAME of a voice shipped in the model directory's voices/ folder")
    group = chat.add_argument_group("output")
    group.add_argument("--output-modality", choices=("audio", "text"), default="audio",
                       help="answer in speech (the prompt ends with start-of-speech) or in text (default: audio)")
    group.add_argument("--out", metavar="PATH", default="answer.wav",
                       help="where to write the spoken answer, format from the extension (default: answer.wav); "
                            "nothing is written when the model produces no speech")
    group.add_argument("--stream", action="store_true",
                       help="decode speech while it is generated, appending each chunk to --out as it is ready, "
                            "with one progress line per chunk on stderr")
    group.add_argument("--chunk-size", type=_positive_int, default=25, metavar="N",
                       help="with --stream: speech codes per decoded chunk (12.5 codes = 1 s) (default: 25)")
    group = chat.add_argument_group(
        "generation (defaults: the checkpoint's generation_config.json, i.e. the release's demo settings)")
    for flag, kind, metavar, text in (
        ("--max-new-tokens", _positive_int, "N", "most rows (text tokens or speech codes) to generate"),
        ("--min-new-tokens", _non_negative_int, "N", "end-of-speech is forbidden before this many rows"),
        ("--temperature", _positive_float, "T", "sampling temperature of both channels"),
        ("--top-p", _probability, "P", "nucleus sampling: sample within this probability mass, in (0, 1]"),
        ("--top-k", _non_negative_int, "K", "sample among the K most likely ids (0: no limit)"),
        ("--repetition-penalty", _positive_float, "R", "penalty on ids already in the conversation (1.0: none)"),
    ):
        group.add_argument(flag, type=kind, metavar=metavar, help=text)
    group.add_argument("--greedy", action="store_true", help="take the most likely id at every step (no sampling; "
                                                             "temperatures, top-p and top-k are then ignored)")
    for channel in ("audio", "text"):
        group.add_argument(f"--{channel}-temperature", type=_positive_float, metavar="T",
                           help=f"temperature of the {channel} channel only (overrides --temperature)")
    group.add_argument("--seed", type=int, metavar="N",
                       help="random seed of sampling and of the vocoder's noise (reproducible answers; the same "
                            "seed gives the same answer with and without --stream)")
    _add_device_options(chat, lm=True)
    chat.set_defaults(func=_cmd_chat)

    encode = command(
        "encode", "turn audio files into speech codes (.npy for one file, .json for several)",
        "Encode audio files (any rate, mono or multi-channel) into the codec's 12.5 Hz speech codes.",
        "encode question.wav -o codes.npy        (the shipped MOSS-Speech-Nano codec)",
        "encode question.wav --codec MOSS-Speech-Codec -o codes.npy",
        "encode data/*.wav --codec MOSS-Speech-Codec -o codes.json")
    encode.add_argument("inputs", nargs="+", metavar="AUDIO", help="audio file(s) to encode (wav/flac/ogg)")
    encode.add_argument("--codec", metavar="DIR", help=f"{codec_help} (default: {nano_codec})")
    encode.add_argument("-o", "--output", metavar="PATH", required=True,
                        help="codes.npy (one input: a 1-D int64 array) or codes.json (an object mapping each input "
                             "path, as given, to its list of codes)")
    _add_device_options(encode, lm=False)
    encode.set_defaults(func=_cmd_encode)

    decode = command(
        "decode", "turn speech codes (.npy or .json) into 24 kHz speech",
        "Decode speech codes written by 'moss-speech encode' (or any .npy of integer codes, or a .json list of "
        "codes or object of name -> codes) into 24 kHz speech, 1920 samples per code.",
        "decode codes.npy -o out.wav             (the shipped MOSS-Speech-Nano codec)",
        "decode codes.npy --codec MOSS-Speech-Codec -o out.wav",
        "decode codes.json --codec MOSS-Speech-Codec --voice speaker.wav -o speech/")
    decode.add_argument("codes", metavar="CODES", help="codes.npy or codes.json")
    decode.add_argument("--codec", metavar="DIR", help=f"{codec_help} (default: {nano_codec})")
    decode.add_argument("--voice", metavar="PATH", help=voice_help)
    decode.add_argument("-o", "--output", metavar="PATH", required=True,
                        help="audio file for one utterance; for several (a .json object with several entries) a "
                             "directory, created if needed, receiving NAME.wav per entry")
    decode.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                        help="utterances decoded together (default: 8)")
    decode.add_argument("--seed", type=int, metavar="N", help="random seed of the vocoder's noise")
    _add_device_options(decode, lm=False)
    decode.set_defaults(func=_cmd_decode)

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
    info.set_defaults(func=_cmd_info)

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
    convert.set_defaults(func=_cmd_convert)

    push = command(
        "push", "upload a model or codec directory to the Hugging Face Hub with remote code and a model card",
        "Upload DIR to the Hub repository REPO_ID in one commit: weights, processor, the codec (--codec: as the "
        "codec/ folder of the same repository; --codec-repo: a codec published on its own, referenced by the "
        "processor), code files with auto_map (so that trust_remote_code=True works without this package) and a "
        "README.md model card from model_cards/ with Hub metadata. The token is the logged-in user's or $HF_TOKEN.",
        "push moss-speech-hf your-name/MOSS-Speech",
        "push moss-speech-codec-hf your-name/MOSS-Speech-Codec --card codec",
        "push nano-out your-name/MOSS-Speech-Nano --card nano --codec nano-codec --private",
        "push moss-speech-hf your-name/MOSS-Speech --dry-run staged/")
    push.add_argument("directory", metavar="DIR", help="converted or saved model directory (or a codec directory)")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository 'namespace/name', created if needed")
    where = push.add_mutually_exclusive_group()
    where.add_argument("--codec", metavar="DIR", help="codec directory uploaded as the repository's codec/ folder")
    where.add_argument("--codec-repo", metavar="REPO_ID",
                       help="repository of a codec published on its own, for the processor to load")
    push.add_argument("--card", choices=sorted(CARD_TEMPLATES),
                      help="model card template (default: codec for a codec directory, moss-speech otherwise)")
    push.add_argument("--base-model", metavar="REPO_ID", help="base_model metadata (default for the moss-speech "
                                                              "card: Qwen/Qwen3-8B)")
    push.add_argument("--dataset", action="append", default=[], metavar="REPO_ID",
                      help="a Hub dataset the model was trained on (datasets metadata; repeatable)")
    push.add_argument("--tag", action="append", default=[], metavar="TAG", help="an extra tag (repeatable)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to (default: main)")
    push.add_argument("--commit-message", metavar="TEXT", default="Upload MOSS-Speech checkpoint with moss-speech",
                      help="message of the upload commit")
    push.add_argument("--no-remote-code", action="store_true",
                      help="do not add code files and auto_map (then only users of this package can load it)")
    push.add_argument("--dry-run", metavar="DIR",
                      help="write what would be uploaded (weights as links) to the new directory DIR, print the file "
                           "list and upload nothing")
    push.set_defaults(func=_cmd_push)

    analyze = command(
        "analyze-layers", "layer-wise speech/text similarity of a checkpoint (the paper's Fig. 2)",
        "Feed paired speech and transcripts through the model, compare speech frames and text tokens layer by layer "
        "(cosine similarity aligned with DTW), print one score per layer and a suggested num_shared_layers, and "
        "optionally write the scores (JSON) and a plot (PNG, needs the [analysis] extra).",
        "analyze-layers --audio q.wav --transcript 'What colour is a banana?'   (the shipped MOSS-Speech-Nano)",
        "analyze-layers --model MOSS-Speech --processor MOSS-Speech --audio q.wav --transcript 'What is two plus "
        "three?' --output-png layers.png")
    add_analyze_layers_arguments(analyze)
    analyze.set_defaults(func=_cmd_analyze_layers)

    demo = command(
        "demo", "talk to a checkpoint in the browser: a local web page with streamed spoken answers (Gradio)",
        "Serve a web page to talk to a checkpoint: ask with the microphone, an audio file or text, get spoken answers "
        "(played while they are generated) or written ones, in a shipped or uploaded voice, with sampling settings, "
        "a multi-turn chat and a Stop button. Binds to this machine only unless --host says otherwise, and makes no "
        "public link unless --share. Needs the [demo] extra (pip install 'moss-speech[demo]'), and ffmpeg to "
        "stream speech to the browser.",
        "demo                                 (the shipped MOSS-Speech-Nano checkpoint on http://127.0.0.1:7860)",
        "demo --model MOSS-Speech --codec MOSS-Speech-Codec --device cuda --port 8000",
        "demo --host 0.0.0.0 --share")
    group = demo.add_argument_group("checkpoints")
    group.add_argument("--model", metavar="DIR",
                       help="language-model checkpoint directory with its processor (default: the shipped "
                            "MOSS-Speech-Nano checkpoint); the voice prompts of its voices/ folder are offered")
    group.add_argument("--codec", metavar="DIR", help=f"{codec_help}, overriding the codec the processor names")
    group = demo.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    group.add_argument("--port", type=_number(int, 1, 65535), default=7860, metavar="N",
                       help="port to listen on (default: 7860)")
    group.add_argument("--share", action="store_true",
                       help="also open a temporary public link through Gradio's share service (off by default)")
    _add_device_options(demo, lm=True)
    demo.set_defaults(func=_cmd_demo)

    evaluate = command(
        "eval", "spoken-QA accuracy (S->T, S->S, T->S, T->T), text retention and codec round trip on a corpus split",
        "Evaluate a checkpoint on a split of a spoken-QA corpus (processing/synthesize_espeak.py): exact match of "
        "the normalised answer (lowercase, letters only) for speech and text questions answered in text and in "
        "speech, text retention (T->T accuracy divided by that of a text-only baseline model) and the codec round "
        "trip (the question audio before and after encode -> decode). Spoken answers are decoded by the codec and "
        "scored first by an independent recogniser (PocketSphinx with a grammar of the corpus' answers; the round "
        "trip: of its questions; needs pip install 'moss-speech[eval]'), then, as secondary columns, by the codec's "
        "own CTC head if it has one. Greedy decoding, batched. Prints a table on stdout and writes every number, "
        "some example answers and timings as JSON to --output.",
        "eval --corpus data/nano/corpus --split test -o results.json",
        "eval --model outputs/nano/sft --corpus data/nano/corpus --baseline-text-model outputs/nano/text "
        "-o results.json",
        "eval --corpus data/nano/corpus --split validation --tasks s2t t2t --max-examples 50")
    group = evaluate.add_argument_group("checkpoints")
    group.add_argument("--model", metavar="DIR", help="MOSS-Speech checkpoint directory with its processor "
                                                      "(default: the shipped MOSS-Speech-Nano checkpoint)")
    group.add_argument("--codec", metavar="DIR", help=f"{codec_help}; its CTC head, if any, gives the secondary "
                                                      "columns (default: the processor's codec, else the model "
                                                      "directory's codec/ folder)")
    group.add_argument("--baseline-text-model", metavar="DIR",
                       help="text-only causal LM (e.g. the Qwen3 model before the speech split) with the same "
                            "tokenizer: its T->T accuracy is the denominator of text retention")
    group.add_argument("--voice", metavar="NAME|PATH",
                       help="voice the codec speaks generated and round-tripped codes in: a voice NAME of the model "
                            "directory's voices/ folder, a .safetensors prompt or an audio file (default: none)")
    group = evaluate.add_argument_group("data")
    group.add_argument("--corpus", metavar="DIR", required=True,
                       help="corpus directory (a DatasetDict saved with save_to_disk)")
    group.add_argument("--split", metavar="NAME", default="test", help="split to evaluate (default: test)")
    group.add_argument("--tasks", nargs="+", choices=EVAL_TASKS, default=list(EVAL_TASKS), metavar="TASK",
                       help=f"what to measure, among {', '.join(EVAL_TASKS)} (default: all)")
    group.add_argument("--max-examples", type=_positive_int, metavar="N",
                       help="evaluate the first N spoken questions and the first N facts only")
    group = evaluate.add_argument_group("decoding and output")
    group.add_argument("--batch-size", type=_positive_int, default=16, metavar="B",
                       help="questions per generate call and utterances per codec call (default: 16)")
    group.add_argument("--max-new-tokens", type=_positive_int, default=128, metavar="N",
                       help="most rows (text tokens or speech codes) per answer (default: 128)")
    group.add_argument("--repetition-penalty", type=_positive_float, default=1.0, metavar="R",
                       help="repetition penalty of both channels (default: 1.0, i.e. pure greedy decoding)")
    group.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the vocoder's noise (default: 0)")
    group.add_argument("--num-examples", type=_non_negative_int, default=5, metavar="N",
                       help="answers (and wrong answers) per task kept in the JSON (default: 5)")
    group.add_argument("-o", "--output", metavar="PATH", help="write the results as JSON here")
    _add_device_options(evaluate, lm=True)
    evaluate.set_defaults(func=_cmd_eval)
    return parser


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


def _model_dir(value: str | None) -> Path:
    """The `--model` checkpoint directory, or the shipped MOSS-Speech-Nano checkpoint when it is not given."""
    if value is None:
        try:
            value = str(pretrained.nano_path())
        except FileNotFoundError as error:
            raise CLIError(f"--model not given, and {error}") from error
    return _check_checkpoint(value, "--model", LM_MODEL_TYPE)


def _codec_dir(value: str | None) -> Path:
    """The `--codec` checkpoint directory, or the shipped MOSS-Speech-Nano codec when it is not given."""
    if value is None:
        try:
            value = str(pretrained.nano_path() / CODEC_SUBFOLDER)
        except FileNotFoundError as error:
            raise CLIError(f"--codec not given, and {error}") from error
    return _check_checkpoint(value, "--codec", CODEC_MODEL_TYPE)


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


def _read_audio(path: Path, option: str) -> tuple[np.ndarray, int]:
    """Samples of an audio file as float32, (samples,) for mono or (channels, samples), and its rate."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError (RuntimeError), TypeError, ValueError, ...
        raise CLIError(f"{option}: cannot read {str(path)!r} as audio ({one_line(error)})") from error
    if data.shape[0] == 0:
        raise CLIError(f"{option}: {str(path)!r} holds no audio samples")
    if not np.isfinite(data).all():
        raise CLIError(f"{option}: {str(path)!r} holds NaN or infinite samples")
    wave = data[:, 0] if data.shape[1] == 1 else data.T
    return np.ascontiguousarray(wave), int(rate)


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


def _check_voice(value: str | None) -> MossSpeechVoicePrompt | tuple[np.ndarray, int] | None:
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


def _voice_prompt(voice: MossSpeechVoicePrompt | tuple[np.ndarray, int] | None,
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


# ------------------------------------------------------------------------------------------------------ chat


class _RowCounter(StoppingCriteria):
    """Counts generate's steps (it consults stopping criteria once per generated row) and never stops anything."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None, **kwargs: Any) -> torch.BoolTensor:
        self.rows += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the sampling settings given on the command line; the rest come from generation_config.json."""
    names = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
             "audio_temperature", "text_temperature")
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.greedy:
        kwargs["do_sample"] = False
    return kwargs


def _cmd_chat(args: argparse.Namespace) -> int:
    """`moss-speech chat`: one turn; text on stdout, speech to --out, a summary on stderr."""
    start = time.perf_counter()
    # Check everything that can be checked before loading any weights.
    model_dir = _model_dir(args.model)
    processor_option = "--processor" if args.processor is not None else "--model"
    processor_dir = _check_dir(args.processor if args.processor is not None else str(model_dir), processor_option)
    if not (processor_dir / PROCESSOR_FILE).is_file():
        raise CLIError(f"{processor_option}: {str(processor_dir)!r} has no {PROCESSOR_FILE}; save a "
                       "MossSpeechProcessor there or pass --processor DIR")
    codec_dir = _check_checkpoint(args.codec, "--codec", CODEC_MODEL_TYPE) if args.codec is not None else None
    question = _read_audio(_check_path(args.wav, "--wav"), "--wav") if args.wav is not None else None
    voice = _check_voice(_voice_path(args.voice, model_dir))
    out = _check_output_file(args.out, "--out", audio=True)
    if args.text is not None and not args.text.strip():
        raise CLIError("--text: the question is empty")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    generator_kwargs = _generation_kwargs(args)

    overrides = {"codec_path": str(codec_dir)} if codec_dir is not None else {}
    processor = MossSpeechProcessor.from_pretrained(str(processor_dir), **overrides)
    has_codec = processor.codec_path is not None or processor.codec_subfolder is not None
    if not has_codec and (model_dir / CODEC_SUBFOLDER / "config.json").is_file():
        processor.codec_path, has_codec = str(model_dir / CODEC_SUBFOLDER), True  # a codec shipped beside the model
    needs = [reason for reason, needed in (("--wav", question is not None), ("--voice", voice is not None),
                                            ("--output-modality audio", args.output_modality == "audio"),
                                            ("--stream", args.stream)) if needed]
    if needs and not has_codec:
        raise CLIError(f"{needs[0]} needs a speech codec, but the processor in {str(processor_dir)!r} names none; "
                       "pass --codec DIR")
    codec = None
    if has_codec:
        codec = processor.codec.to(device=device, dtype=torch.float32).eval()

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if not isinstance(model, MossSpeechForCausalLM):
        raise CLIError(f"--model: {str(model_dir)!r} loads as {type(model).__name__}, not MossSpeechForCausalLM")
    model = model.to(device).eval()
    generator = _generator(args.seed, device)
    voice_prompt = _voice_prompt(voice, codec) if codec is not None else None

    conversation: list[dict[str, Any]] = []
    if args.system is not None:
        conversation.append({"role": "system", "content": args.system})
    content = args.text if question is None else {"type": "audio", "audio": question}
    conversation.append({"role": "user", "content": content})

    counter = _RowCounter()
    kwargs = {**generator_kwargs, "stopping_criteria": StoppingCriteriaList([counter])}
    loaded = time.perf_counter()
    chat = MossSpeechChat(model, processor, voice=voice_prompt)
    # Sampling and the vocoder's noise draw from separate seeded generators: --stream gives the same codes.
    sampling = {"generator": generator, "vocoder_generator": _generator(args.seed, device), **kwargs}
    if codec is None:  # text in, text out, no codec: codes (if any) are reported, not voiced
        response = chat.reply(conversation, output_modality=args.output_modality, decode_audio=False, **sampling)
    elif args.stream:
        rate = codec.config.output_sampling_rate
        streamed = {"chunks": 0, "samples": 0}

        def on_audio(row: int, chunk: torch.Tensor) -> None:
            streamed["chunks"] += 1
            streamed["samples"] += chunk.numel()
            if not args.quiet:
                _note(f"chunk {streamed['chunks']}: {chunk.numel() / rate:.2f} s of speech "
                      f"(total {streamed['samples'] / rate:.2f} s) after {time.perf_counter() - loaded:.2f} s")

        response = chat.reply(conversation, output_modality=args.output_modality, on_audio=on_audio,
                              stream_to=str(out), chunk_size=args.chunk_size, **sampling)
    else:
        response = chat.reply(conversation, output_modality=args.output_modality, **sampling)
    generated = time.perf_counter()

    audio, codes = response.audio, response.codes.numel()
    text = response.text
    if not text.strip() and codes > 0 and codec is not None and codec.can_transcribe:
        # A spoken answer has no text channel; a codec with a recogniser (MOSS-Speech-Nano's) reads its codes.
        text = codec.transcribe_codes([response.codes.cpu()])[0]
        _note("the answer is speech; the text below is what the codec's recogniser reads in its codes")
    print(text, flush=True)
    if audio is not None and audio.numel() > 0:
        if not args.stream:  # streamed speech is already in the file
            sf.write(str(out), audio.float().cpu().numpy(), response.sampling_rate, subtype="PCM_16")
        where = f"{audio.numel() / response.sampling_rate:.2f} s of audio -> {out}"
    else:
        if args.stream and out.exists():  # the streamer opened the file on the first row
            out.unlink()
        where = "no speech" if codes == 0 else "speech not decoded (no codec)"
    _note(f"{counter.rows} rows generated ({codes} speech codes), {where}; generation {generated - loaded:.2f} s, "
          f"total {time.perf_counter() - start:.2f} s")
    return 0


# ---------------------------------------------------------------------------------------------- encode/decode


def _cmd_encode(args: argparse.Namespace) -> int:
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


def _cmd_decode(args: argparse.Namespace) -> int:
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


# ------------------------------------------------------------------------------------------------------ info


def _cmd_info(args: argparse.Namespace) -> int:
    """`moss-speech info`: describe a model / codec / processor directory (several if it holds several)."""
    directory = _check_dir(args.directory, "info")
    try:
        report = describe_checkpoint(directory)
    except ValueError as error:
        raise CLIError(f"info: {error}") from error
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ------------------------------------------------------------------------------------------------ convert/push


def _cmd_convert(args: argparse.Namespace) -> int:
    """`moss-speech convert`: the release's directories → this package's layout; a summary on stdout."""
    for value, option in ((args.model, "--model"), (args.codec, "--codec")):
        if value is not None:
            _check_dir(value, option)
    start = time.perf_counter()
    report = run_conversion(args)
    print(format_conversion_report(report))
    _note(f"converted in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """`moss-speech eval`: spoken-QA accuracy of a checkpoint on a corpus split; a table on stdout, JSON to -o."""
    start = time.perf_counter()
    model_dir = _model_dir(args.model)
    if not (model_dir / PROCESSOR_FILE).is_file():
        raise CLIError(f"--model: {str(model_dir)!r} has no {PROCESSOR_FILE}; evaluation needs the checkpoint's "
                       "processor beside it")
    codec_dir = _check_checkpoint(args.codec, "--codec", CODEC_MODEL_TYPE) if args.codec is not None else None
    baseline_dir = None
    if args.baseline_text_model is not None:
        baseline_dir = _check_dir(args.baseline_text_model, "--baseline-text-model")
        config = _read_config(baseline_dir)
        if config is None or config.get("model_type") in (LM_MODEL_TYPE, CODEC_MODEL_TYPE):
            kind = "no config.json" if config is None else f"a {config.get('model_type')!r} checkpoint"
            raise CLIError(f"--baseline-text-model: {args.baseline_text_model!r} holds {kind}, expected a text-only "
                           "causal LM (e.g. qwen3)")
        if "t2t" not in args.tasks:
            raise CLIError("--baseline-text-model: text retention needs the t2t task (add it to --tasks)")
    corpus = _check_dir(args.corpus, "--corpus")
    voice = _voice_path(args.voice, model_dir)
    if voice is not None:
        _check_path(voice, "--voice")
    output = _check_output_file(args.output, "--output", audio=False) if args.output is not None else None
    device = _resolve_device(args.device)
    results = run_evaluation(
        model_dir, corpus, args.split, codec_dir=codec_dir, baseline_dir=baseline_dir, tasks=args.tasks,
        max_examples=args.max_examples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty, voice=voice, device=device,
        dtype=_resolve_dtype(args.dtype, device), seed=args.seed, num_examples=args.num_examples, output=output,
        progress=not args.quiet, log=None if args.quiet else _note)
    print(format_table(results), flush=True)
    where = f"; results in {output}" if output is not None else ""
    _note(f"evaluated in {time.perf_counter() - start:.1f} s{where}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """`moss-speech demo`: load a checkpoint and serve the web demo until interrupted."""
    from . import demo as web_demo  # Gradio is optional: imported only here

    try:
        web_demo.require_gradio()
    except ImportError as error:
        raise CLIError(str(error)) from error
    model_dir = _model_dir(args.model)
    if not (model_dir / PROCESSOR_FILE).is_file():
        raise CLIError(f"--model: {str(model_dir)!r} has no {PROCESSOR_FILE}; the demo needs the checkpoint's "
                       "processor beside it")
    codec_dir = _check_checkpoint(args.codec, "--codec", CODEC_MODEL_TYPE) if args.codec is not None else None
    device = _resolve_device(args.device)
    start = time.perf_counter()
    model, processor = web_demo.load_checkpoint(model_dir, codec_dir, device=device,
                                                dtype=_resolve_dtype(args.dtype, device))
    page = web_demo.build_demo(model, processor, voices=pretrained.shipped_voices(model_dir),
                               description=web_demo.model_description(model_dir))
    _note(f"loaded {model_dir} in {time.perf_counter() - start:.1f} s; serving the demo on "
          f"http://{args.host}:{args.port} (Ctrl+C to stop)")
    web_demo.launch_demo(page, host=args.host, port=args.port, share=args.share)
    return 0


def _cmd_analyze_layers(args: argparse.Namespace) -> int:
    """`moss-speech analyze-layers`: per-layer speech/text similarity (prints a JSON summary)."""
    run_analyze_layers(args)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """`moss-speech push`: stage and upload a directory (or, with --dry-run, only stage it)."""
    directory = _check_dir(args.directory, "push")
    config = _read_config(directory)
    if config is None or config.get("model_type") not in (LM_MODEL_TYPE, CODEC_MODEL_TYPE):
        raise CLIError(f"push: {args.directory!r} is not a MOSS-Speech model or codec directory (config.json with "
                       f"model_type {LM_MODEL_TYPE!r} or {CODEC_MODEL_TYPE!r})")
    if args.codec is not None:
        _check_checkpoint(args.codec, "--codec", CODEC_MODEL_TYPE)
    card = args.card or ("codec" if config["model_type"] == CODEC_MODEL_TYPE else "moss-speech")
    options = {"card": card, "codec_dir": args.codec, "codec_repo_id": args.codec_repo,
               "remote_code": not args.no_remote_code, "base_model": args.base_model,
               "datasets": args.dataset or None, "tags": args.tag or None}
    if args.dry_run is not None:
        stage = Path(args.dry_run)
        if stage.exists() and (not stage.is_dir() or any(stage.iterdir())):
            raise CLIError(f"--dry-run: {args.dry_run!r} must be a new or empty directory")
        files = stage_upload(directory, stage, args.repo_id, **options)
        print("\n".join(files))
        _note(f"dry run: {len(files)} files staged in {stage} for {args.repo_id}; nothing uploaded")
        return 0
    info = publish(directory, args.repo_id, private=args.private, commit_message=args.commit_message,
                   create_pr=args.create_pr, revision=args.revision, **options)
    print(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)
    _note(f"uploaded {directory} to {args.repo_id}")
    return 0


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

"""`moss-speech eval`: spoken-QA accuracy of a checkpoint on a corpus split."""

from __future__ import annotations

import argparse
import time

from ..evaluation import TASKS as EVAL_TASKS
from ..evaluation import format_table, run_evaluation
from .common import (
    CODEC_HELP,
    CODEC_MODEL_TYPE,
    LM_MODEL_TYPE,
    PROCESSOR_FILE,
    CLIError,
    CommandFactory,
    _add_device_options,
    _check_checkpoint,
    _check_dir,
    _check_output_file,
    _check_path,
    _model_dir,
    _non_negative_int,
    _note,
    _positive_float,
    _positive_int,
    _read_config,
    _resolve_device,
    _resolve_dtype,
    _voice_path,
)


def add_parser(command: CommandFactory) -> None:
    """Add `eval` to the sub-commands (`command` makes a sub-parser with the global options)."""
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
    group.add_argument("--codec", metavar="DIR", help=f"{CODEC_HELP}; its CTC head, if any, gives the secondary "
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
    evaluate.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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

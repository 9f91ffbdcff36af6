"""`moss-speech chat`: answer one spoken or written question (text on stdout, speech to a file)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import soundfile as sf
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from ...chat_moss_speech import MossSpeechChat
from ...modeling_moss_speech import MossSpeechForCausalLM
from ...processing_moss_speech import CODEC_SUBFOLDER, MossSpeechProcessor
from .common import (
    CODEC_HELP,
    CODEC_MODEL_TYPE,
    PROCESSOR_FILE,
    VOICE_HELP,
    CLIError,
    CommandFactory,
    _add_device_options,
    _check_checkpoint,
    _check_dir,
    _check_output_file,
    _check_path,
    _check_voice,
    _generator,
    _model_dir,
    _non_negative_int,
    _note,
    _positive_float,
    _positive_int,
    _probability,
    _read_audio,
    _resolve_device,
    _resolve_dtype,
    _voice_path,
    _voice_prompt,
)


def add_parser(command: CommandFactory) -> None:
    """Add `chat` to the sub-commands (`command` makes a sub-parser with the global options)."""
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
    group.add_argument("--codec", metavar="DIR", help=f"{CODEC_HELP}, overriding the codec the processor names; "
                                                      "needed for --wav, audio answers, --voice and --stream "
                                                      "(default: the processor's codec, else the model directory's "
                                                      "codec/ folder)")
    group.add_argument("--voice", metavar="NAME|PATH",
                       help=f"{VOICE_HELP}; or the NAME of a voice shipped in the model directory's voices/ folder")
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
    chat.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
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

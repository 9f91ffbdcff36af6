"""`moss-speech demo`: serve the Gradio demo for a checkpoint."""

from __future__ import annotations

import argparse
import time

from ... import pretrained
from .common import (
    CODEC_HELP,
    CODEC_MODEL_TYPE,
    PROCESSOR_FILE,
    CLIError,
    CommandFactory,
    _add_device_options,
    _check_checkpoint,
    _model_dir,
    _note,
    _number,
    _resolve_device,
    _resolve_dtype,
)


def add_parser(command: CommandFactory) -> None:
    """Add `demo` to the sub-commands (`command` makes a sub-parser with the global options)."""
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
    group.add_argument("--codec", metavar="DIR", help=f"{CODEC_HELP}, overriding the codec the processor names")
    group = demo.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                       help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    group.add_argument("--port", type=_number(int, 1, 65535), default=7860, metavar="N",
                       help="port to listen on (default: 7860)")
    group.add_argument("--share", action="store_true",
                       help="also open a temporary public link through Gradio's share service (off by default)")
    _add_device_options(demo, lm=True)
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`moss-speech demo`: load a checkpoint and serve the web demo until interrupted."""
    from .. import demo as web_demo  # Gradio is optional: imported only here

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

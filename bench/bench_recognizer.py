"""Accuracy and speed of the independent recogniser (PocketSphinx, closed answer grammar) on clean espeak-ng speech.

Speaks every answer of MOSS-Speech-Nano's world (`processing/synthesize_espeak.py`) alone with espeak-ng and scores
what `IndependentRecognizer` (grammar: all those answers) hears, with `evaluation.score_spoken_answers`. The
canonical voice (`en-us`, speed 160, pitch 50) is the assistant's voice, the one the codec decodes answers in; other
voices and speeds show how the score moves. Needs espeak-ng and `pip install 'moss-speech[eval]'`. Prints JSON:

    python bench/bench_recognizer.py                                  # canonical voice
    python bench/bench_recognizer.py --voice en-us+f4 --speed 140     # the test voice, slower
    python bench/bench_recognizer.py --codec nano                      # + the shipped nano codec's round trip
    python bench/bench_recognizer.py --questions --codec nano          # whole questions instead of answer words

With `--codec` (a codec directory, or `nano` for the shipped one) the same words also go through the codec
(encode → decode, prompt-less unless `--voice-prompt`) and the decoded speech is scored the same way: how much of
the clean score survives the codec.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # processing/ is a folder of scripts, not a package

import torch  # noqa: E402

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechVoicePrompt  # noqa: E402
from modeling_moss_speech.apps.evaluation import IndependentRecognizer, decode_speech, score_spoken_answers  # noqa: E402
from modeling_moss_speech.pretrained import nano_path  # noqa: E402
from modeling_moss_speech.threads import add_threads_argument, set_threads  # noqa: E402
from processing.synthesize_espeak import (  # noqa: E402
    CANONICAL_PITCH,
    CANONICAL_SPEED,
    CANONICAL_VOICE,
    SAMPLING_RATE,
    build_facts,
    synthesize,
)


def round_trip(codec_path: str, voice_prompt: str | None, items: list, recognizer, errors: int) -> dict:
    """Score the codec's encode → decode of every clean item with the same recogniser."""
    codec_dir = str(nano_path() / "codec") if codec_path == "nano" else codec_path
    codec = MossSpeechCodecModel.from_pretrained(codec_dir).eval()
    prompt = MossSpeechVoicePrompt.load(voice_prompt) if voice_prompt else None
    with torch.no_grad():
        codes = codec.encode([wave for wave, _, _ in items], sampling_rate=SAMPLING_RATE).codes
        waves, rate = decode_speech(codec, codes, batch_size=len(codes), voice_prompt=prompt)
    decoded = [(wave, rate, expected) for wave, (_, _, expected) in zip(waves, items)]
    scored = score_spoken_answers(decoded, recognizer, num_examples=errors)
    return {"codec": codec_dir, "voice_prompt": voice_prompt, "correct": scored["correct"], "total": scored["total"],
            "accuracy": round(scored["accuracy"], 4),
            "errors": [(e["reference"], e["prediction"]) for e in scored["errors"]]}


def main(argv: list[str] | None = None) -> dict:
    """Measure and print the JSON summary (also returned)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voice", default=CANONICAL_VOICE)
    parser.add_argument("--speed", type=int, default=CANONICAL_SPEED)
    parser.add_argument("--pitch", type=int, default=CANONICAL_PITCH)
    parser.add_argument("--errors", type=int, default=20, help="wrong answers listed in the JSON")
    parser.add_argument("--codec", default=None, help="also score the round trip through this codec ('nano': shipped)")
    parser.add_argument("--voice-prompt", default=None, help="a saved voice prompt (.safetensors) to decode with")
    parser.add_argument("--questions", action="store_true",
                        help="speak the world's 255 questions (grammar: the questions) instead of its answers")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    phrases = sorted({fact["question" if args.questions else "answer"] for fact in build_facts(0)})
    recognizer = IndependentRecognizer(phrases)
    items = [(synthesize(a, args.voice, args.speed, args.pitch), SAMPLING_RATE, a) for a in phrases]
    start = time.perf_counter()
    scored = score_spoken_answers(items, recognizer, num_examples=args.errors)
    seconds = time.perf_counter() - start
    summary = {"voice": args.voice, "speed": args.speed, "pitch": args.pitch,
               "spoken": "questions" if args.questions else "answers", "grammar_phrases": len(phrases),
               "correct": scored["correct"], "total": scored["total"], "accuracy": round(scored["accuracy"], 4),
               "seconds_per_utterance": round(seconds / len(items), 4),
               "errors": [(e["reference"], e["prediction"]) for e in scored["errors"]]}
    if args.codec is not None:
        summary["round_trip"] = round_trip(args.codec, args.voice_prompt, items, recognizer, args.errors)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

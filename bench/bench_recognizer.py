"""Accuracy and speed of the independent recogniser (PocketSphinx, closed answer grammar) on clean espeak-ng speech.

Speaks every answer of MOSS-Speech-Nano's world (`processing/synthesize_espeak.py`) alone with espeak-ng and scores
what `IndependentRecognizer` (grammar: all those answers) hears, with `evaluation.score_spoken_answers`. The
canonical voice (`en-us`, speed 160, pitch 50) is the assistant's voice, the one the codec decodes answers in; other
voices and speeds show how the score moves. Needs espeak-ng and `pip install 'moss-speech[eval]'`. Prints JSON:

    python bench/bench_recognizer.py                                  # canonical voice
    python bench/bench_recognizer.py --voice en-us+f4 --speed 140     # the test voice, slower
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # processing/ is a folder of scripts, not a package

from modeling_moss_speech.evaluation import IndependentRecognizer, score_spoken_answers  # noqa: E402
from processing.synthesize_espeak import (  # noqa: E402
    CANONICAL_PITCH,
    CANONICAL_SPEED,
    CANONICAL_VOICE,
    SAMPLING_RATE,
    build_facts,
    synthesize,
)


def main(argv: list[str] | None = None) -> dict:
    """Measure and print the JSON summary (also returned)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voice", default=CANONICAL_VOICE)
    parser.add_argument("--speed", type=int, default=CANONICAL_SPEED)
    parser.add_argument("--pitch", type=int, default=CANONICAL_PITCH)
    parser.add_argument("--errors", type=int, default=20, help="wrong answers listed in the JSON")
    args = parser.parse_args(argv)
    answers = sorted({fact["answer"] for fact in build_facts(0)})
    recognizer = IndependentRecognizer(answers)
    items = [(synthesize(a, args.voice, args.speed, args.pitch), SAMPLING_RATE, a) for a in answers]
    start = time.perf_counter()
    scored = score_spoken_answers(items, recognizer, num_examples=args.errors)
    seconds = time.perf_counter() - start
    summary = {"voice": args.voice, "speed": args.speed, "pitch": args.pitch, "grammar_phrases": len(answers),
               "correct": scored["correct"], "total": scored["total"], "accuracy": round(scored["accuracy"], 4),
               "seconds_per_utterance": round(seconds / len(items), 4),
               "errors": [(e["reference"], e["prediction"]) for e in scored["errors"]]}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

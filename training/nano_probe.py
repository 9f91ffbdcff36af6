"""Where do spoken questions stop being understood? Probes of a MOSS-Speech-Nano checkpoint, beyond `moss-speech eval`.

    python training/nano_probe.py --model modeling_moss_speech/pretrained/moss-speech-nano --data data/nano/robust \\
        -o probe.json

`--data` is an output of `processing/prepare_nano.py` (its `codes/` are read: the checkpoint's own codec must have
made them). Greedy S->T answers, for the facts of two evaluation splits (`test`: held-out facts, known only as text;
`test_seen`: facts trained as speech), the same question asked four ways:

- `text`: written (the T->T chat);
- `spoken`: the split's own recording (an unseen voice: what `moss-speech eval` scores as S->T);
- `word_codes`: spoken, but assembled from the train split's single-word recordings (`--voices` of them per word,
  each question once per recording) joined: every word known, no sentence heard;
- `last_word_spoken`: written, except its last word (what the question is about), which is that word's single-word
  recording as a speech segment inside the text.

and `transcript`: after the split's own recording alone (no chat), the text the model writes next, compared with what
was said (the `s2t` form of pre-training; a checkpoint after SFT answers instead of transcribing). A model that reads
speech as the words its text knowledge is keyed on answers `word_codes` and `last_word_spoken` about as well as
`text`; one that has only learned to recognise whole utterances answers `spoken` for trained facts and little else.
Prints (and writes with `-o`) JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers.utils import logging

from modeling_moss_speech import MossSpeechForCausalLM, MossSpeechProcessor
from modeling_moss_speech.apps.evaluation import greedy_kwargs
from modeling_moss_speech.apps.recognition import normalize_answer
from modeling_moss_speech.apps.script_utils import ScriptArgumentParser, nano_codes_made_by, threads_field
from modeling_moss_speech.threads import set_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "processing"))  # a folder of scripts, not a package
from prepare_nano import text_start, word_codes  # noqa: E402

FORMS = ("text", "spoken", "word_codes", "last_word_spoken")
logger = logging.get_logger(__name__)


def text_prompt(processor: MossSpeechProcessor, question: str) -> list[list[int]]:
    """The T->T inference prompt of `question` (user turn, then the assistant header), as grid rows."""
    return processor([{"role": "user", "content": question}], output_modality="text",
                     return_tensors="pt")["input_ids"][0].tolist()


def speech_prompt(processor: MossSpeechProcessor, codes: Sequence[int]) -> list[list[int]]:
    """The S->T inference prompt of a spoken question given as codes."""
    return processor([{"role": "user", "content": {"type": "audio", "codes": list(codes)}}], output_modality="text",
                     return_tensors="pt")["input_ids"][0].tolist()


def last_word_spoken_prompt(processor: MossSpeechProcessor, question: str, codes: Sequence[int]) -> list[list[int]]:
    """`text_prompt(question)` with the rows of its last word replaced by a speech segment of `codes`."""
    words = question.split()
    if len(words) < 2:
        raise ValueError(f"question {question!r}: needs at least two words (a written part and a spoken last word).")
    rows = text_prompt(processor, question)
    tokenize = processor.tokenizer
    full = tokenize(question, add_special_tokens=False)["input_ids"]
    head = tokenize(" ".join(words[:-1]), add_special_tokens=False)["input_ids"]
    if full[:len(head)] != head:
        raise ValueError(f"question {question!r}: its tokens do not start with those of its words before the last.")
    start = text_start(rows, full)
    if start is None:
        raise ValueError(f"question {question!r}: its tokens are not in its chat prompt.")
    speech = processor.grid_layout.speech_rows(codes)
    return rows[:start + len(head)] + speech + rows[start + len(full):]


@torch.inference_mode()
def answer(model: MossSpeechForCausalLM, processor: MossSpeechProcessor, rows: list[list[int]],
           max_new_tokens: int = 8) -> str:
    """The greedy text answer to one prompt, normalised as the evaluation scores it."""
    ids = torch.tensor([rows], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones(ids.shape[:2], dtype=torch.long, device=model.device),
                         return_dict_in_generate=True, **greedy_kwargs(max_new_tokens))
    (response,) = processor.batch_decode(out.sequences.cpu(), lengths=out.lengths.cpu(), decode_audio=False)
    return normalize_answer(response.text or "")


@torch.inference_mode()
def transcript(model: MossSpeechForCausalLM, processor: MossSpeechProcessor, codes: Sequence[int],
               max_words: int = 12) -> list[str]:
    """The words the model writes right after a bare speech segment (greedy, text channel), up to the end of text."""
    layout = processor.grid_layout
    rows = torch.tensor([layout.speech_rows(codes)], device=model.device)
    ids: list[int] = []
    for _ in range(max_words + 4):
        token = int(model(input_ids=rows).text_logits[0, -1].argmax())
        if token == layout.text_pad_token_id:
            break
        ids.append(token)
        rows = torch.cat([rows, torch.tensor([[[token, layout.audio_pad_token_id]]], device=model.device)], dim=1)
    return normalize_answer(processor.tokenizer.decode(ids, skip_special_tokens=True)).split()


def probe(model: MossSpeechForCausalLM, processor: MossSpeechProcessor, codes: datasets.DatasetDict,
          splits: Sequence[str] = ("test", "test_seen"), voices: int = 3, max_facts: int | None = None) -> dict:
    """Accuracy of every form of `FORMS` and the transcript scores, per split (module docstring)."""
    if voices < 1:
        raise ValueError(f"voices={voices}: expected at least 1.")
    missing = [s for s in ("train", *splits) if s not in codes]
    if missing:
        raise ValueError(f"the codes lack the splits {missing} (have {list(codes)}): pass prepare_nano.py's output.")
    spoken_words = word_codes(codes["train"])
    results: dict[str, Any] = {}
    for split in splits:
        rows = [r for r in codes[split] if r["kind"] == "question" and r["codes"]][:max_facts]
        right = dict.fromkeys(FORMS, 0)
        asked = dict.fromkeys(FORMS, 0)
        exact = words_right = words_said = 0
        for row in rows:
            question, expected = row["question"], normalize_answer(row["answer"])
            prompts = {"text": [text_prompt(processor, question)], "spoken": [speech_prompt(processor, row["codes"])]}
            words = question.split()
            if all(w in spoken_words for w in words):  # else not askable this way: a word never spoken alone
                joined = [[c for w in words for c in spoken_words[w][k % len(spoken_words[w])]] for k in range(voices)]
                prompts["word_codes"] = [speech_prompt(processor, c) for c in joined]
            if words[-1] in spoken_words:
                last = spoken_words[words[-1]]
                prompts["last_word_spoken"] = [last_word_spoken_prompt(processor, question, last[k % len(last)])
                                               for k in range(voices)]
            for form, grids in prompts.items():
                for grid in grids:
                    right[form] += answer(model, processor, grid) == expected
                    asked[form] += 1
            said = transcript(model, processor, row["codes"], max_words=len(words) + 2)
            exact += said[:len(words)] == words
            words_right += sum(a == b for a, b in zip(said, words))
            words_said += len(words)
        results[split] = {
            "questions": len(rows),
            **{form: {"correct": right[form], "total": asked[form],
                      "accuracy": right[form] / asked[form] if asked[form] else None} for form in FORMS},
            "transcript": {"exact": exact / len(rows) if rows else None,
                           "words_in_place": words_right / words_said if words_said else None},
        }
    return results


@dataclass
class NanoProbeArguments:
    """Flags of `training/nano_probe.py` (see the module docstring)."""

    model: str | None = field(default=None, metadata={"help": "Checkpoint with its processor files (required)."})
    data: str | None = field(default=None, metadata={
        "help": "prepare_nano.py's output directory; its codes/ are read (required)."})
    splits: list[str] = field(default_factory=lambda: ["test", "test_seen"], metadata={
        "help": "Splits of the codes to ask (held-out facts: test; trained facts: test_seen)."})
    voices: int = field(default=3, metadata={"help": "Single-word recordings (voices) per question and form."})
    max_facts: int | None = field(default=None, metadata={"help": "Ask only this many questions per split."})
    output: str | None = field(default=None, metadata={"aliases": ["-o"], "help": "Also write the JSON here."})
    threads: int | None = threads_field()

    def __post_init__(self) -> None:
        if self.model is None or self.data is None:
            raise ValueError("--model and --data are required.")


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line entry point: run the probes, print (and write) the JSON."""
    (args,) = ScriptArgumentParser(NanoProbeArguments, description=__doc__.split("\n\n")[0]).parse_args_and_config(
        argv)
    set_threads(args.threads)
    codes_dir = Path(args.data) / "codes"
    if not codes_dir.is_dir():
        raise ValueError(f"--data {args.data!r} has no codes/ (expected processing/prepare_nano.py's output).")
    # codes from another codec than the checkpoint's would be read as other sounds: wrong answers, no error
    codec_dir = Path(args.model) / "codec"
    made_by = nano_codes_made_by(args.data, codec_dir) if codec_dir.is_dir() else None
    if made_by is False:
        raise ValueError(f"the codes in {str(codes_dir)!r} were not made by {str(codec_dir)!r}'s encoder "
                         "(fingerprints differ): pass the prepare_nano.py output of this checkpoint's codec.")
    if made_by is None:
        logger.warning("nano_probe: %s has no codec/ (or the codes no manifest): not checked that the codes are "
                       "its codec's.", args.model)
    model = MossSpeechForCausalLM.from_pretrained(args.model).eval()
    processor = MossSpeechProcessor.from_pretrained(args.model)
    result = {"model": args.model, "data": args.data, "voices": args.voices,
              **probe(model, processor, datasets.load_from_disk(str(codes_dir)), args.splits, args.voices,
                      args.max_facts)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")

"""Prepare every MOSS-Speech-Nano training set from the nano corpus: codec codes once, then grids and conversations.

    python processing/prepare_nano.py --corpus data/nano/corpus --codec outputs/nano/codec_tokenizer \\
        --tokenizer outputs/nano/tokenizer --output data/nano

Step 1, codes (cached): every utterance of the corpus' audio splits (`train`, `validation`, `test`, `test_seen`) is
encoded once with the codec (`codec.encode(waveforms, 16000).codes`, batched by length) into `<output>/codes`, a
`DatasetDict` with the corpus' columns but `codes` (list of int) instead of `audio`. A rerun reuses it while the
codec's weights and the corpus are the same (`codes/nano_codes.json` holds their fingerprints; `--reencode` forces).
With `--speed_perturb 0.9 1.1` the train split also holds every train question encoded played 0.9 and 1.1 times as
fast (Kaldi-style speed perturbation: pitch and formants move with the rate), as rows of the voices `<voice>@0.9` and
`<voice>@1.1`: more voices for every speech set and conversation below, never the assistant's canonical answers.

Step 2, datasets (always rebuilt from the codes; only TRAIN-split utterances of TRAIN facts are ever speech,
held-out facts appear only as text; the `test` splits are never read here). Pre-training grids: an `input_ids`
column of `(L, 2)` grids as `[text_id, audio_id]` rows (the layout of `processing/prepare_dataset.py` and the
processor: a text segment is its tokens with the audio pad, a speech segment is `(sosp, audio_pad)`,
`(modality_pad, code)` per code, `(modality_pad, eosp)`), plus `form` and `utt_id` columns (not read by training):

- `pretrain/speech`: each train utterance (questions, answers, canonical answers, words) alone (`speech`);
- `pretrain/interleaved`: each train utterance as its text then its speech (`t2s`) and as its speech then its
  text (`s2t`): ASR- and TTS-like pairs;
- `pretrain/spoken_qa`: per train question utterance, its speech then the fact's canonical-voice answer speech
  (`qa_s2s`) and its speech then the answer text (`qa_s2t`); per train fact `--qa_t2s_repeats` copies of the
  question text then the canonical answer speech (`qa_t2s`);
- `pretrain/text` (stage II's text mix, text-only): every fact (train AND held-out) as the T->T chat the processor
  builds (`training_rows`: user question, default text system turn, assistant answer) (`chat_t2t`), and as the plain
  line question, answer, `<|endoftext|>` (`plain_t2t`) — the forms the text model was trained on;
- `pretrain/eval`: the `validation` split (held-out facts, dev voice) as `speech`, `t2s`, `s2t` and `qa_s2t`;
- `pretrain/text_eval`: the `chat_t2t` grids of the held-out facts.
- `pretrain/wordmix` (an alignment lever, not in the main recipe): word-level interleaved questions of train facts
  (a random half of the words spoken, from the train split's single-word utterances) followed by the answer text;
- `pretrain/align` (the other lever): per train question utterance of a train fact, its S->T and T->T chat grids
  (`speech_ids`, `text_ids`) and `suffix`, the number of final rows they share (pretrain.py's `align_dataset`).
- `pretrain/frames` (the frame-level lever): per train question utterance of a train fact (and reading sentence),
  its S->T grid and its text twin, row for row (each code row replaced by the word heard by then, found by CTC
  forced alignment on the codec's CTC head), with per-row `weights` (pretrain.py's `align_dataset` with
  `align_teacher`; `--frames_word_end_weight` for the rows that complete a word);
- `pretrain/twin_text` (that lever's teacher, text-only): every fact's T->T chat with each question word repeated
  1-9 times, 32 copies.

SFT conversations (`<output>/sft`, a `DatasetDict` with `train` and `validation`), in the column layout of
`processing/prepare_dataset.py --mode sft` (`messages` of `{"role", "content": {"type", "text", "codes"}}`,
`output_modality`, `question_text`, `answer_text`) plus `mode`, `fact_id`, `utt_id`:

- `train`: per train question utterance of a train fact `s2s` (question speech -> canonical answer speech) and
  `s2t` (-> answer text); per train fact `--sft_t2s_repeats` x `t2s` (question text -> canonical answer speech);
  per fact (all facts) `--sft_t2t_repeats` x `t2t`; shuffled (seeded);
- `validation`: `s2t` of the `validation` split's questions (held-out facts, dev voice).

`<output>/prepare_nano.json` summarises counts and grid rows per dataset.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import prepare_dataset
import torch
from transformers.utils import logging

from modeling_moss_speech._compat import dataset_fingerprint
from modeling_moss_speech.apps.script_utils import NANO_CODES_MANIFEST as CODES_MANIFEST
from modeling_moss_speech.apps.script_utils import NANO_ROW_COLUMNS as ROW_COLUMNS
from modeling_moss_speech.apps.script_utils import (
    ScriptArgumentParser,
    codec_fingerprint,
    load_audio_value,
    nano_processor,
    threads_field,
)
from modeling_moss_speech.apps.script_utils import load_nano_corpus as load_corpus
from modeling_moss_speech.apps.script_utils import nano_special_ids as special_ids
from modeling_moss_speech.feature_extraction_moss_speech import prepare_waveforms
from modeling_moss_speech.modeling_moss_speech_codec import MossSpeechCodecModel
from modeling_moss_speech.threads import set_threads

logger = logging.get_logger("moss_speech.prepare_nano")

AUDIO_SPLITS = ("train", "validation", "test", "test_seen")
CODEC_RATE = 16000

CODES_FEATURES = datasets.Features({
    **{c: datasets.Value("string") for c in ROW_COLUMNS if c != "canonical"},
    "canonical": datasets.Value("bool"),
    "codes": datasets.List(datasets.Value("int32")),
})
# prepare_dataset's schemas (what pretrain.py / sft.py read) plus the nano bookkeeping columns.
GRID_FEATURES = datasets.Features({
    **prepare_dataset.GRID_FEATURES,
    "form": datasets.Value("string"),
    "utt_id": datasets.Value("string"),
})
SFT_FEATURES = datasets.Features({
    **prepare_dataset.SFT_FEATURES,
    "mode": datasets.Value("string"),
    "fact_id": datasets.Value("string"),
    "utt_id": datasets.Value("string"),
})


# ------------------------------------------------------------------------------------------------ corpus


def check_speech_only_of_train_facts(corpus: datasets.DatasetDict) -> None:
    """Raise if a train-split utterance belongs to a held-out (or unknown) fact, or says a held-out fact's question
    (a word or reading row with no fact id included): held-out facts are text-only."""
    facts = corpus["facts"]
    split_of = dict(zip(facts["fact_id"], facts["fact_split"]))
    heldout_questions = {q for q, split in zip(facts["question"], facts["fact_split"]) if split != "train"}
    train = corpus["train"]
    for index, (fact_id, utt_id, text) in enumerate(zip(train["fact_id"], train["utt_id"], train["text"])):
        if fact_id and split_of.get(fact_id) != "train":
            raise ValueError(f"corpus train split row {index} ({utt_id!r}) is speech of fact {fact_id!r}, whose split "
                             f"is {split_of.get(fact_id)!r}: only train facts may appear as speech in training.")
        if text in heldout_questions:
            raise ValueError(f"corpus train split row {index} ({utt_id!r}) says {text!r}, the question of a held-out "
                             f"fact: held-out facts may appear as speech only in the evaluation splits.")


# ------------------------------------------------------------------------------------------------ codes


def corpus_fingerprint(corpus: datasets.DatasetDict) -> dict[str, str]:
    """The datasets fingerprint of every audio split (changes when the corpus is rebuilt)."""
    return {name: dataset_fingerprint(split) for name, split in corpus.items() if name in AUDIO_SPLITS}


@torch.inference_mode()
def encode_split(split: datasets.Dataset, codec: MossSpeechCodecModel, batch_size: int = 64, chunk: int = 1024,
                 name: str = "split", progress: bool = True, speed: float = 1.0) -> list[list[int]]:
    """Codes of every row's audio, in row order; rows are read `chunk` at a time and encoded sorted by length.
    `speed` != 1 encodes each waveform speed-perturbed first: read as if sampled at `speed` times the codec's rate
    and resampled back, so it plays `speed` times faster with every frequency (pitch and formants) scaled by it."""
    from tqdm.auto import tqdm

    out: list[list[int] | None] = [None] * len(split)
    bar = tqdm(total=len(split), desc=f"encode {name}", unit="utt", disable=not progress)
    for start in range(0, len(split), chunk):
        rows = split.select(range(start, min(start + chunk, len(split))))
        waveforms = []
        for offset, value in enumerate(rows["audio"]):
            waveform, rate = load_audio_value(value, f"{name} row {start + offset}")
            if rate != CODEC_RATE:
                (waveform,) = prepare_waveforms(waveform, rate, target_rate=CODEC_RATE)
            if speed != 1.0:
                (waveform,) = prepare_waveforms(waveform, round(CODEC_RATE * speed), target_rate=CODEC_RATE)
            waveforms.append(waveform)
        order = sorted(range(len(waveforms)), key=lambda i: waveforms[i].numel())
        for lo in range(0, len(order), batch_size):
            batch = order[lo : lo + batch_size]
            codes = codec.encode([waveforms[i] for i in batch], sampling_rate=CODEC_RATE, batch_size=batch_size).codes
            for i, item in zip(batch, codes):
                out[start + i] = [int(c) for c in item.tolist()]
            bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def encode_corpus(corpus: datasets.DatasetDict, codec_dir: str | os.PathLike, output: str | os.PathLike,
                  batch_size: int = 64, reencode: bool = False, num_codes: int | None = None,
                  progress: bool = True, speed_perturb: Sequence[float] = ()) -> datasets.DatasetDict:
    """The codes `DatasetDict` of every audio split (cached in `output`, see the module docstring); with
    `speed_perturb`, the train split also holds each of its questions encoded at each of those speeds."""
    speed_perturb = check_speed_perturb(speed_perturb)
    manifest = {"codec": codec_fingerprint(codec_dir), "corpus": corpus_fingerprint(corpus)}
    if speed_perturb:
        manifest["speed_perturb"] = list(speed_perturb)
    manifest_path = os.path.join(output, CODES_MANIFEST)
    if not reencode and os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            if json.load(handle) == manifest:
                print(f"prepare_nano: reusing the codes in {output}", flush=True)
                return datasets.load_from_disk(str(output))
    codec = MossSpeechCodecModel.from_pretrained(str(codec_dir)).eval()
    vocab = codec.config.encoder_config.quantize_vocab_size
    if num_codes is not None and vocab > num_codes:
        raise ValueError(f"the codec at {str(codec_dir)!r} has {vocab} codes, more than the {num_codes} the nano "
                         "model's audio vocabulary holds.")
    splits = {}
    for name in AUDIO_SPLITS:
        if name not in corpus:
            continue
        split = corpus[name]
        codes = encode_split(split, codec, batch_size=batch_size, name=name, progress=progress)
        columns = {c: split[c] for c in ROW_COLUMNS}
        if name == "train" and speed_perturb:
            questions = [i for i, kind in enumerate(split["kind"]) if kind == "question"]
            asked = split.select(questions)
            columns = {c: list(values) for c, values in columns.items()}
            for speed in speed_perturb:
                codes += encode_split(asked, codec, batch_size=batch_size, name=f"{name} at speed {speed:g}",
                                      progress=progress, speed=speed)
                # a voice of its own, never the assistant's: canonical answers stay the unperturbed recordings
                tag = f"@{speed:g}"
                for column in ROW_COLUMNS:
                    values = list(asked[column])
                    if column in ("utt_id", "voice"):
                        values = [value + tag for value in values]
                    elif column == "canonical":
                        values = [False] * len(values)
                    columns[column] += values
        splits[name] = datasets.Dataset.from_dict({**columns, "codes": codes}, features=CODES_FEATURES)
    result = datasets.DatasetDict(splits)
    tmp = f"{output}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.save_to_disk(tmp)
    with open(os.path.join(tmp, CODES_MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
    shutil.rmtree(output, ignore_errors=True)
    os.rename(tmp, output)
    return datasets.load_from_disk(str(output))


def check_speed_perturb(factors: Sequence[float]) -> tuple[float, ...]:
    """The speed-perturbation factors as a tuple of distinct floats in [0.5, 2] other than 1."""
    out = []
    for factor in factors:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise TypeError(f"speed_perturb factors must be numbers, got {factor!r}.")
        if not 0.5 <= factor <= 2.0 or factor == 1.0:
            raise ValueError(f"speed_perturb factors must lie in [0.5, 2] and differ from 1, got {factor}.")
        if float(factor) in out:
            raise ValueError(f"speed_perturb factor {factor} is given twice.")
        out.append(float(factor))
    return tuple(out)


# ------------------------------------------------------------------------------------------------ grids


class GridMaker:
    """Pre-training grids and SFT messages with the processor's special ids and tokenizer."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self._cache: dict[str, list[list[int]]] = {}

    def text(self, text: str) -> list[list[int]]:
        """Rows of a text segment (tokenized alone, surrounding whitespace stripped)."""
        text = text.strip()
        if not text:
            raise ValueError("a text segment is empty.")
        if text not in self._cache:
            ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._cache[text] = self.processor.grid_layout.text_rows(ids)
        return self._cache[text]

    def speech(self, codes: Sequence[int]) -> list[list[int]]:
        """Rows of a speech segment."""
        if len(codes) == 0:
            raise ValueError("a speech segment has no codes.")
        return self.processor.grid_layout.speech_rows(codes)

    def eos(self) -> list[list[int]]:
        """One `(<|endoftext|>, audio_pad)` row."""
        return [self.processor.grid_layout.pad_row()]

    def chat_t2t(self, question: str, answer: str) -> list[list[int]]:
        """The T->T training conversation exactly as the processor lays it out (`training_rows`)."""
        (item,) = self.processor.training_rows(
            [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]],
            output_modality="text")
        return item["input_ids"].tolist()


def _grid(rows: list[list[int]], form: str, utt_id: str) -> dict[str, Any]:
    return {"input_ids": rows, "form": form, "utt_id": utt_id}


def _dataset(examples: list[dict[str, Any]], features: datasets.Features) -> datasets.Dataset:
    if not examples:
        raise ValueError("a prepared dataset would be empty: the corpus lacks the rows it is made of.")
    return datasets.Dataset.from_dict({c: [e[c] for e in examples] for c in features}, features=features)


def canonical_answers(train: datasets.Dataset) -> dict[str, list[int]]:
    """fact_id -> codes of its canonical-voice answer (the assistant's voice) in the train split."""
    out: dict[str, list[int]] = {}
    for row in train:
        if row["kind"] == "answer" and row["canonical"] and row["fact_id"] and row["fact_id"] not in out:
            out[row["fact_id"]] = row["codes"]
    return out


def pretrain_datasets(codes: datasets.DatasetDict, facts: list[dict], maker: GridMaker,
                      qa_t2s_repeats: int = 3) -> dict[str, datasets.Dataset]:
    """The pre-training grid datasets (see the module docstring), by name."""
    train, validation = codes["train"], codes["validation"]
    canon = canonical_answers(train)
    by_id = {f["fact_id"]: f for f in facts}
    speech, interleaved, spoken_qa = [], [], []
    for row in train:
        rows = maker.speech(row["codes"])
        speech.append(_grid(rows, "speech", row["utt_id"]))
        interleaved.append(_grid(maker.text(row["text"]) + rows, "t2s", row["utt_id"]))
        interleaved.append(_grid(rows + maker.text(row["text"]), "s2t", row["utt_id"]))
        if row["kind"] == "question" and row["fact_id"] in canon:
            spoken_qa.append(_grid(rows + maker.speech(canon[row["fact_id"]]), "qa_s2s", row["utt_id"]))
            spoken_qa.append(_grid(rows + maker.text(row["answer"]), "qa_s2t", row["utt_id"]))
    for fact_id, answer_codes in sorted(canon.items()):
        grid = maker.text(by_id[fact_id]["question"]) + maker.speech(answer_codes)
        spoken_qa += [_grid(grid, "qa_t2s", fact_id)] * qa_t2s_repeats

    text = []
    for fact in facts:
        text.append(_grid(maker.chat_t2t(fact["question"], fact["answer"]), "chat_t2t", fact["fact_id"]))
        text.append(_grid(maker.text(fact["question"]) + maker.text(fact["answer"]) + maker.eos(), "plain_t2t",
                          fact["fact_id"]))
    evaluation = []
    for row in validation:
        rows = maker.speech(row["codes"])
        evaluation.append(_grid(rows, "speech", row["utt_id"]))
        evaluation.append(_grid(maker.text(row["text"]) + rows, "t2s", row["utt_id"]))
        evaluation.append(_grid(rows + maker.text(row["text"]), "s2t", row["utt_id"]))
        if row["kind"] == "question":
            evaluation.append(_grid(rows + maker.text(row["answer"]), "qa_s2t", row["utt_id"]))
    text_eval = [_grid(maker.chat_t2t(f["question"], f["answer"]), "chat_t2t", f["fact_id"])
                 for f in facts if f["fact_split"] == "heldout"]
    named = {"speech": speech, "interleaved": interleaved, "spoken_qa": spoken_qa, "text": text, "eval": evaluation,
             "text_eval": text_eval}
    return {name: _dataset(examples, GRID_FEATURES) for name, examples in named.items()}


ALIGN_FEATURES = datasets.Features({
    "speech_ids": datasets.List(datasets.List(datasets.Value("int32"))),
    "text_ids": datasets.List(datasets.List(datasets.Value("int32"))),
    "suffix": datasets.Value("int32"),
    "utt_id": datasets.Value("string"),
})


def word_codes(train: datasets.Dataset) -> dict[str, list[list[int]]]:
    """word -> codes of every train-split utterance of that word alone (any voice)."""
    out: dict[str, list[list[int]]] = {}
    for kind, text, codes in zip(train["kind"], train["text"], train["codes"]):
        if kind == "word" and codes:
            out.setdefault(text.strip().lower(), []).append(list(codes))
    return out


def wordmix_dataset(codes: datasets.DatasetDict, facts: list[dict], maker: GridMaker, repeats: int = 8,
                    seed: int = 0) -> datasets.Dataset:
    """Word-level interleaved questions of TRAIN facts, answered in text (the `wordmix` alignment lever).

    Each of `repeats` copies of a train fact's question speaks a random half of its words (each word that was spoken
    alone in the train split, with probability 0.5, at least one) and writes the others; consecutive spoken words
    form one speech segment (their single-word codes joined), consecutive written words one text segment; the
    answer text and `<|endoftext|>` follow, the plain-line form the text model learned facts in. So the model reads
    a word's speech in exactly the context where it has read its text. Held-out facts never appear.
    """
    spoken = word_codes(codes["train"])
    rng = random.Random(seed)
    examples = []
    for fact in facts:
        if fact["fact_split"] != "train":
            continue
        words = fact["question"].split()
        speakable = [i for i, w in enumerate(words) if w.lower() in spoken]
        if not speakable:
            continue
        for copy in range(repeats):
            chosen = {i for i in speakable if rng.random() < 0.5} or {rng.choice(speakable)}
            rows: list[list[int]] = []
            run: list[str] = []
            run_codes: list[int] = []
            for i, word in enumerate(words + [""]):
                if i in chosen:
                    if run:
                        rows += maker.text(" ".join(run))
                        run = []
                    run_codes += rng.choice(spoken[word.lower()])
                    continue
                if run_codes:
                    rows += maker.speech(run_codes)
                    run_codes = []
                if word:
                    run.append(word)
            if run:
                rows += maker.text(" ".join(run))
            rows += maker.text(fact["answer"]) + maker.eos()
            examples.append(_grid(rows, "wordmix_s2t", f"{fact['fact_id']}-{copy}"))
    return _dataset(examples, GRID_FEATURES)


def align_dataset(codes: datasets.DatasetDict, facts: list[dict], maker: GridMaker) -> datasets.Dataset:
    """Pairs for the trunk-state alignment lever: per train question utterance of a train fact, the S->T chat grid
    (its speech as the user turn) and the T->T chat grid of the same fact, as the processor lays them out for
    training; `suffix` is the number of final rows they share (the assistant turn: header, answer, `<|im_end|>`).
    Held-out facts never appear."""
    by_id = {f["fact_id"]: f for f in facts if f["fact_split"] == "train"}
    text_rows: dict[str, list[list[int]]] = {}
    examples = []
    for row in codes["train"]:
        fact = by_id.get(row["fact_id"])
        if row["kind"] != "question" or fact is None or not row["codes"]:
            continue
        if fact["fact_id"] not in text_rows:
            text_rows[fact["fact_id"]] = maker.chat_t2t(fact["question"], fact["answer"])
        (item,) = maker.processor.training_rows(
            [[{"role": "user", "content": {"type": "audio", "codes": list(row["codes"])}},
              {"role": "assistant", "content": fact["answer"]}]], output_modality="text")
        speech_rows, text = item["input_ids"].tolist(), text_rows[fact["fact_id"]]
        suffix = 0
        while suffix < min(len(speech_rows), len(text)) and speech_rows[-1 - suffix] == text[-1 - suffix]:
            suffix += 1
        examples.append({"speech_ids": speech_rows, "text_ids": text, "suffix": suffix, "utt_id": row["utt_id"]})
    if not examples:
        raise ValueError("the corpus has no train question utterance of a train fact to pair.")
    return datasets.Dataset.from_list(examples, features=ALIGN_FEATURES)


FRAMES_FEATURES = datasets.Features({
    "speech_ids": datasets.List(datasets.List(datasets.Value("int32"))),
    "text_ids": datasets.List(datasets.List(datasets.Value("int32"))),
    "weights": datasets.List(datasets.Value("float32")),
    "utt_id": datasets.Value("string"),
})


def word_ends(words_per_code: Sequence[int]) -> list[int]:
    """The codes at which a word is complete: the last code of each word (`words_per_code[k]`: the word code k says)."""
    n = len(words_per_code)
    return [k for k in range(n) if k == n - 1 or words_per_code[k + 1] != words_per_code[k]]


def _check_weight(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}.")


def frame_twin(grid: list[list[int]], start: int, words_per_code: Sequence[int], word_ids: Sequence[int],
               audio_pad_id: int) -> list[list[int]]:
    """The text twin of a grid whose speech segment (`sosp` row at `start`, one row per code, `eosp`) says the words
    `word_ids` (one token each): the same grid with every row of that segment replaced by a text row of the last word
    heard by then (a code row ending a word: that word; inside a word: the word before; `sosp`: the first word;
    `eosp`: the last). Row for row the same length, so the states of the two can be compared position by position,
    and what a causal model can know at each row is the same in both."""
    n = len(words_per_code)
    if start + n + 1 >= len(grid):
        raise ValueError(f"the grid has {len(grid)} rows: no room for a speech segment of {n} codes at row {start}.")
    if not word_ids or max(words_per_code, default=0) >= len(word_ids):
        raise ValueError(f"words_per_code names word {max(words_per_code)} of {len(word_ids)} words.")
    twin = [list(row) for row in grid]
    twin[start] = [word_ids[0], audio_pad_id]
    ends = set(word_ends(words_per_code))
    for k, word in enumerate(words_per_code):
        twin[start + 1 + k] = [word_ids[word if k in ends else max(word - 1, 0)], audio_pad_id]
    twin[start + n + 1] = [word_ids[-1], audio_pad_id]
    return twin


def frames_dataset(codes: datasets.DatasetDict, facts: list[dict], maker: GridMaker, codec: Any,
                   answer_weight: float = 10.0, word_end_weight: float = 1.0) -> datasets.Dataset:
    """Pairs for the frame-level alignment lever (pretrain.py's `align_dataset` with `align_teacher`): per train
    question utterance of a train fact (and per `reading` sentence of the train split, when the corpus has them), its
    S->T chat grid (the training grid; a reading sentence: the inference prompt, it has no answer) and `frame_twin`
    of it, the word each code says found by `codec.words_per_code`. `weights` per row: 0 for the rows before the
    first word is complete (a causal model cannot know it yet), 1 for the later rows of the question and every row
    after it, `word_end_weight` for the code row at which each later word is complete (the slot word of a question
    is the last: weighing these rows more makes the reading of each word count as much as the answer), and
    `answer_weight` for the row the answer's first token is predicted from. Held-out facts never appear."""
    _check_weight("answer_weight", answer_weight)
    _check_weight("word_end_weight", word_end_weight)
    layout = maker.processor.grid_layout
    tokenizer = maker.processor.tokenizer
    train_facts = {f["fact_id"]: f for f in facts if f["fact_split"] == "train"}
    examples, too_short = [], 0
    for row in codes["train"]:
        fact = train_facts.get(row["fact_id"])
        if not row["codes"] or not ((row["kind"] == "question" and fact) or row["kind"] == "reading"):
            continue
        text = " ".join(row["text"].lower().split())
        word_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(word_ids) != len(text.split()):
            raise ValueError(f"{row['utt_id']}: {text!r} is not one token per word ({word_ids}); the frame twin needs "
                             "a word-level tokenizer.")
        if len(row["codes"]) * codec.config.encoder_config.ctc_upsample < 2 * len(text):
            too_short += 1  # CTC needs a frame per character and a blank between repeats: not alignable
            continue
        user = {"role": "user", "content": {"type": "audio", "codes": list(row["codes"])}}
        if fact is not None:
            (item,) = maker.processor.training_rows([[user, {"role": "assistant", "content": fact["answer"]}]],
                                                    output_modality="text")
            grid = item["input_ids"].tolist()
            answer_row = len(grid) - len(maker.text(fact["answer"])) - 3  # answer, <|im_end|>, newline follow
        else:
            grid = maker.processor([user], output_modality="text", return_tensors="pt")["input_ids"][0].tolist()
            answer_row = len(grid) - 1
        start = next(i for i, r in enumerate(grid) if r[0] == layout.sosp_token_id)
        words = codec.words_per_code(row["codes"], text)
        first_heard, *later_ends = word_ends(words)
        weights = [0.0] * (start + 1 + first_heard) + [1.0] * (len(grid) - start - 1 - first_heard)
        for k in later_ends:
            weights[start + 1 + k] = word_end_weight
        weights[answer_row] = answer_weight
        examples.append({"speech_ids": grid, "text_ids": frame_twin(grid, start, words, word_ids,
                                                                    layout.audio_pad_token_id),
                         "weights": weights, "utt_id": row["utt_id"]})
    if too_short:
        logger.warning(f"frames: {too_short} utterance(s) with fewer than 2 CTC frames per character left out.")
    if not examples:
        raise ValueError("the corpus has no alignable train question utterance of a train fact to pair.")
    return datasets.Dataset.from_list(examples, features=FRAMES_FEATURES)


def text_start(grid: Sequence[Sequence[int]], ids: Sequence[int]) -> int | None:
    """The first row from which the grid's text column reads the token ids `ids`, or None where it never does."""
    column, ids = [row[0] for row in grid], list(ids)
    return next((i for i in range(len(column) - len(ids) + 1) if column[i:i + len(ids)] == ids), None)


def twin_text_dataset(facts: list[dict], maker: GridMaker, copies: int = 32, max_repeat: int = 9,
                      seed: int = 0) -> datasets.Dataset:
    """Text-only T->T chats of every fact (train and held-out: text) whose question words are each repeated 1 to
    `max_repeat` times (uniformly drawn), `copies` per fact: the teacher of the frame-level lever learns to answer the
    question as `frame_twin` writes it, at the rate speech has (a word spans about 2-9 codes)."""
    rng = random.Random(seed)
    tokenizer = maker.processor.tokenizer
    examples = []
    for fact in facts:
        grid = maker.chat_t2t(fact["question"], fact["answer"])
        question = tokenizer(fact["question"].strip(), add_special_tokens=False)["input_ids"]
        start = text_start(grid, question)
        if start is None:
            raise ValueError(f"{fact['fact_id']}: its question's tokens are not in its chat grid.")
        for copy in range(copies):
            rows = [row for row in grid[start:start + len(question)] for _ in range(rng.randint(1, max_repeat))]
            examples.append(_grid(grid[:start] + rows + grid[start + len(question):], "twin_t2t",
                                  f"{fact['fact_id']}-{copy}"))
    return _dataset(examples, GRID_FEATURES)


def _message(role: str, text: str | None = None, codes: list[int] | None = None) -> dict[str, Any]:
    if codes is not None:
        return {"role": role, "content": {"type": "audio", "text": None, "codes": list(codes)}}
    return {"role": role, "content": {"type": "text", "text": text, "codes": None}}


def _conversation(mode: str, question: str, answer: str, fact_id: str, utt_id: str,
                  question_codes: list[int] | None = None, answer_codes: list[int] | None = None) -> dict[str, Any]:
    user = _message("user", codes=question_codes) if mode[0] == "s" else _message("user", text=question)
    spoken = mode[-1] == "s"
    assistant = _message("assistant", codes=answer_codes) if spoken else _message("assistant", text=answer)
    return {"messages": [user, assistant], "output_modality": "audio" if spoken else "text", "question_text": question,
            "answer_text": answer, "mode": mode, "fact_id": fact_id, "utt_id": utt_id}


def sft_datasets(codes: datasets.DatasetDict, facts: list[dict], t2s_repeats: int = 4, t2t_repeats: int = 4,
                 seed: int = 0) -> datasets.DatasetDict:
    """The SFT conversations in the four modes (see the module docstring)."""
    train_split, validation = codes["train"], codes["validation"]
    canon = canonical_answers(train_split)
    by_id = {f["fact_id"]: f for f in facts}
    train = []
    for row in train_split:
        if row["kind"] != "question" or row["fact_id"] not in canon:
            continue
        fact = by_id[row["fact_id"]]
        train.append(_conversation("s2s", fact["question"], fact["answer"], fact["fact_id"], row["utt_id"],
                                   question_codes=row["codes"], answer_codes=canon[fact["fact_id"]]))
        train.append(_conversation("s2t", fact["question"], fact["answer"], fact["fact_id"], row["utt_id"],
                                   question_codes=row["codes"]))
    for fact in facts:
        if fact["fact_id"] in canon:
            train += [_conversation("t2s", fact["question"], fact["answer"], fact["fact_id"], "",
                                    answer_codes=canon[fact["fact_id"]])] * t2s_repeats
        train += [_conversation("t2t", fact["question"], fact["answer"], fact["fact_id"], "")] * t2t_repeats
    random.Random(seed).shuffle(train)
    valid = [_conversation("s2t", by_id[row["fact_id"]]["question"], by_id[row["fact_id"]]["answer"],
                           row["fact_id"], row["utt_id"], question_codes=row["codes"])
             for row in validation if row["kind"] == "question" and row["fact_id"] in by_id]
    return datasets.DatasetDict({"train": _dataset(train, SFT_FEATURES), "validation": _dataset(valid, SFT_FEATURES)})


def _summary(data: datasets.Dataset) -> dict[str, Any]:
    if "input_ids" in data.column_names:
        lengths = [len(g) for g in data["input_ids"]]
        return {"examples": len(data), "rows": sum(lengths), "max_rows": max(lengths),
                "forms": dict(sorted(Counter(data["form"]).items()))}
    return {"examples": len(data), "modes": dict(sorted(Counter(data["mode"]).items()))}


def _save(data: datasets.Dataset | datasets.DatasetDict, path: str) -> None:
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def prepare(corpus: str | os.PathLike, codec: str | os.PathLike, tokenizer: str | os.PathLike | Any,
            output: str | os.PathLike, batch_size: int = 64, reencode: bool = False, qa_t2s_repeats: int = 3,
            sft_t2s_repeats: int = 4, sft_t2t_repeats: int = 4, seed: int = 0,
            progress: bool = True, speed_perturb: Sequence[float] = (),
            frames_word_end_weight: float = 1.0) -> dict[str, Any]:
    """Run both steps (module docstring); returns the summary also written to `<output>/prepare_nano.json`."""
    from transformers import AutoTokenizer

    for name, value in (("qa_t2s_repeats", qa_t2s_repeats), ("sft_t2s_repeats", sft_t2s_repeats),
                        ("sft_t2t_repeats", sft_t2t_repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
    _check_weight("frames_word_end_weight", frames_word_end_weight)  # before the encoding, not after it
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    processor = nano_processor(tokenizer)
    start = time.monotonic()
    data = load_corpus(corpus)
    check_speech_only_of_train_facts(data)
    facts = data["facts"].to_list()
    os.makedirs(output, exist_ok=True)
    codes = encode_corpus(data, codec, os.path.join(output, "codes"), batch_size=batch_size, reencode=reencode,
                          num_codes=processor.num_codes, progress=progress, speed_perturb=speed_perturb)
    encoded = time.monotonic()

    maker = GridMaker(processor)
    summary: dict[str, Any] = {"special_ids": special_ids(tokenizer), "datasets": {}}
    for name, dataset in pretrain_datasets(codes, facts, maker, qa_t2s_repeats).items():
        path = os.path.join(output, "pretrain", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _save(dataset, path)
        summary["datasets"][f"pretrain/{name}"] = _summary(dataset)
    # the alignment levers' data (read only by recipes that ask for it: training/recipes/nano_levers.sh)
    levers = {"wordmix": wordmix_dataset(codes, facts, maker, seed=seed), "align": align_dataset(codes, facts, maker)}
    aligner = MossSpeechCodecModel.from_pretrained(str(codec)).eval()
    if aligner.can_transcribe:  # the frame-level lever finds each code's word with the codec's CTC head
        levers["frames"] = frames_dataset(codes, facts, maker, aligner, word_end_weight=frames_word_end_weight)
        levers["twin_text"] = twin_text_dataset(facts, maker, seed=seed)
    for name, dataset in levers.items():
        _save(dataset, os.path.join(output, "pretrain", name))
        summary["datasets"][f"pretrain/{name}"] = {"rows": len(dataset)}
    sft = sft_datasets(codes, facts, sft_t2s_repeats, sft_t2t_repeats, seed)
    _save(sft, os.path.join(output, "sft"))
    for split, dataset in sft.items():
        summary["datasets"][f"sft/{split}"] = _summary(dataset)
    summary["codes"] = {name: {"utterances": len(split), "codes": sum(len(c) for c in split["codes"])}
                        for name, split in codes.items()}
    summary["seconds"] = {"encode": round(encoded - start, 1), "total": round(time.monotonic() - start, 1)}
    with open(os.path.join(output, "prepare_nano.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


@dataclass
class PrepareNanoArguments:
    """Flags of `processing/prepare_nano.py` (see the module docstring)."""

    corpus: str = field(default="data/nano/corpus", metadata={"help": "The nano corpus (synthesize_espeak.py)."})
    codec: str | None = field(default=None, metadata={
        "help": "Codec directory (MossSpeechCodecModel.from_pretrained; required)."})
    tokenizer: str = field(default="outputs/nano/tokenizer", metadata={"help": "The nano tokenizer directory."})
    output: str = field(default="data/nano", metadata={"help": "Output directory (codes/, pretrain/, sft/)."})
    batch_size: int = field(default=64, metadata={"help": "Utterances per codec call."})
    reencode: bool = field(default=False, metadata={"help": "Encode again even if the cached codes match."})
    qa_t2s_repeats: int = field(default=3, metadata={
        "help": "Copies of each question-text -> answer-speech pre-training sequence."})
    sft_t2s_repeats: int = field(default=4, metadata={"help": "Copies of each T->S conversation."})
    sft_t2t_repeats: int = field(default=4, metadata={"help": "Copies of each T->T conversation."})
    seed: int = field(default=0, metadata={"help": "Seed of the SFT shuffle."})
    speed_perturb: list[float] = field(default_factory=list, metadata={
        "help": "Speed-perturbation factors, e.g. 0.9 1.1: each train question is also encoded played that many "
                "times faster (pitch and formants scaled alike), as train rows of a voice '<voice>@<factor>' that "
                "every speech set and SFT conversation then reads (none: off)."})
    frames_word_end_weight: float = field(default=1.0, metadata={
        "help": "Weight, in pretrain/frames, of the code row at which each word after the first is complete (the "
                "question's slot word is the last; the answer row weighs 10, the other rows 1)."})
    threads: int | None = threads_field()
    progress: bool = field(default=True, metadata={"help": "Progress bars (--no_progress: none)."})

    def __post_init__(self) -> None:
        if self.codec is None:
            raise ValueError("--codec is required.")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}.")
        check_speed_perturb(self.speed_perturb)
        _check_weight("--frames_word_end_weight", self.frames_word_end_weight)


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `PrepareNanoArguments`)."""
    return ScriptArgumentParser(PrepareNanoArguments, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (see the module docstring); prints and returns the summary."""
    (args,) = make_parser().parse_args_and_config(argv)
    set_threads(args.threads)
    summary = prepare(args.corpus, args.codec, args.tokenizer, args.output, batch_size=args.batch_size,
                      reencode=args.reencode, qa_t2s_repeats=args.qa_t2s_repeats,
                      sft_t2s_repeats=args.sft_t2s_repeats, sft_t2t_repeats=args.sft_t2t_repeats, seed=args.seed,
                      progress=args.progress, speed_perturb=args.speed_perturb,
                      frames_word_end_weight=args.frames_word_end_weight)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()

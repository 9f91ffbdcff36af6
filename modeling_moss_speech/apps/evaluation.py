"""Spoken question answering on a closed-world corpus: the four modes, text retention and the codec round trip.

```
moss-speech eval --model DIR --corpus data/nano/corpus --split test --baseline-text-model TEXT_DIR -o results.json
```

What is measured on a split of the corpus made by `processing/synthesize_espeak.py` (a `datasets.DatasetDict`
saved with `save_to_disk`):

- S→T, S→S: every spoken question of the split (rows with `kind == "question"`) is asked as speech; T→S, T→T:
  the text question of every fact of those rows is asked as text. A text answer is the text channel of the reply;
  a spoken answer is decoded by the codec to speech and heard by an independent recogniser
  ([`IndependentRecognizer`]: PocketSphinx, which shares nothing with the codec, constrained to a grammar of the
  corpus' answers). Accuracy = exact match of the normalised answer ([`normalize_answer`]: lowercase, letters only,
  single spaces). Secondary columns, when the codec has a CTC head: the decoded speech read by the codec's CTC
  recogniser (`codec.transcribe`) and the answer's codes read by it directly (`codec.transcribe_codes`).
- Text retention: T→T accuracy of the model divided by the T→T accuracy of a text-only baseline (a plain causal LM
  with the same tokenizer, e.g. the Qwen3 model the speech model was split from) prompted with the same chat form.
- Codec round trip: the split's question audio and its encode → decode round trip, each heard by the independent
  recogniser with a grammar of the corpus' questions (exact match of the whole utterance), and (secondary, with a
  CTC head) transcribed by the codec's CTC recogniser (exact match and character error rate).

[`score_spoken_answers`] scores any list of (waveform, sampling rate, expected answer) the same way, e.g. the codec
round trip of clean answer words. The recogniser needs PocketSphinx: `pip install 'moss-speech[eval]'`.

Decoding is greedy (no sampling, no repetition penalty unless asked), batched with left padding, so a run is
deterministic; the vocoder's noise is seeded. Results are a JSON-ready dict (schema in [`evaluate`]) and a plain
text table ([`format_table`]).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

from ..feature_extraction_moss_speech import load_audio, prepare_waveforms
from ..modeling_moss_speech import MossSpeechForCausalLM
from ..modeling_moss_speech_codec import MossSpeechCodecModel, MossSpeechVoicePrompt
from ..pretrained import shipped_voices
from ..processing_moss_speech import CODEC_SUBFOLDER, MossSpeechProcessor, MossSpeechResponse
from .recognition import IndependentRecognizer, SpeechRecognizer, normalize_answer, require_pocketsphinx

# /2: spoken answers and the codec round trip are scored by the independent recogniser first, the CTC head second.
SCHEMA = "moss-speech-eval/2"
# Question-answering modes: (input modality, output modality); "codec" is the round-trip measurement.
MODES = {"s2t": ("speech", "text"), "s2s": ("speech", "speech"), "t2s": ("text", "speech"), "t2t": ("text", "text")}
TASKS = (*MODES, "codec")
LABELS = {"s2t": "S->T", "s2s": "S->S", "t2s": "T->S", "t2t": "T->T", "codec": "codec round trip"}
REQUIRED_COLUMNS = ("utt_id", "fact_id", "kind", "text", "question", "answer", "audio")


# ------------------------------------------------------------------------------------------------- scoring


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions, each cost 1) between two sequences."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp in enumerate(hypothesis, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp))
        previous = current
    return previous[-1]


def _error_rate(references: Sequence[str], hypotheses: Sequence[str], split: Callable[[str], Sequence],
                name: str) -> float:
    """Total edit distance ÷ total reference length over the normalised strings, each cut into units by `split`.

    No reference units at all gives 0.0 when every hypothesis is empty too, 1.0 otherwise.
    """
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError(f"{name}: pass lists of strings, not one string.")
    if len(references) != len(hypotheses):
        raise ValueError(f"{name}: {len(references)} references but {len(hypotheses)} hypotheses.")
    refs = [split(normalize_answer(r)) for r in references]
    hyps = [split(normalize_answer(h)) for h in hypotheses]
    edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    units = sum(len(r) for r in refs)
    if units == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / units


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate: total edit distance ÷ total reference characters, of normalised strings.

    Normalisation is [`normalize_answer`] (lowercase, letters and single spaces only), the one every score of the
    package uses: case, punctuation (including the apostrophe), digits and extra whitespace never count. An empty
    reference set (no characters) gives 0.0 when every hypothesis is empty too, 1.0 otherwise.
    """
    return _error_rate(references, hypotheses, str, "character_error_rate")


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: total word edit distance ÷ total reference words, of normalised strings.

    Same normalisation and empty-reference rule as [`character_error_rate`].
    """
    return _error_rate(references, hypotheses, str.split, "word_error_rate")


def transcription_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Scores of transcripts against their references, all on [`normalize_answer`]-normalised strings.

    Returns `correct` / `total` / `accuracy` (exact match; `accuracy` is None without references), `cer`
    ([`character_error_rate`]) and `wer` ([`word_error_rate`]).
    """
    cer = character_error_rate(references, hypotheses)  # checks the arguments first
    correct = sum(normalize_answer(h) == normalize_answer(r) for r, h in zip(references, hypotheses))
    return {"correct": correct, "total": len(references), "accuracy": _accuracy(correct, len(references)),
            "cer": cer, "wer": word_error_rate(references, hypotheses)}


def _accuracy(correct: int, total: int) -> float | None:
    return correct / total if total else None


def score_answers(
    records: Sequence[dict[str, Any]], num_examples: int = 5
) -> dict[str, Any]:
    """Exact-match summary of answer records (`reference`, `prediction`, `category`, any other keys kept).

    Returns `correct`, `total`, `accuracy` (None when there are no records), `by_category` (same three per
    category) and the first `num_examples` records (`examples`) and wrong ones (`errors`), each with `correct`.
    """
    scored, by_category = [], {}
    for record in records:
        ok = normalize_answer(record["prediction"]) == normalize_answer(record["reference"])
        scored.append({**record, "correct": ok})
        counts = by_category.setdefault(record.get("category", ""), [0, 0])
        counts[0] += ok
        counts[1] += 1
    correct = sum(r["correct"] for r in scored)
    return {
        "correct": correct,
        "total": len(scored),
        "accuracy": _accuracy(correct, len(scored)),
        "by_category": {name: {"correct": c, "total": t, "accuracy": _accuracy(c, t)}
                        for name, (c, t) in sorted(by_category.items())},
        "examples": scored[:num_examples],
        "errors": [r for r in scored if not r["correct"]][:num_examples],
    }


def _check_recognizer(recognizer: Any, name: str) -> SpeechRecognizer:
    if not callable(getattr(recognizer, "recognize", None)):
        raise TypeError(f"{name} must have a recognize(waveform, sampling_rate) -> str method (e.g. an "
                        f"IndependentRecognizer), got {type(recognizer).__name__}.")
    return recognizer


def describe_recognizer(recognizer: SpeechRecognizer) -> str:
    """A one-line name of a recogniser for the results (`description` if it has one, else its repr)."""
    return str(getattr(recognizer, "description", None) or repr(recognizer))


def score_spoken_answers(
    items: Iterable[tuple[Any, int, str]],
    recognizer: SpeechRecognizer | None = None,
    vocabulary: Iterable[str] | None = None,
    num_examples: int = 5,
) -> dict[str, Any]:
    """Score speech by what the independent recogniser hears: exact match of the normalised text and answer.

    Args:
        items: `(waveform, sampling_rate, expected)` triples; a waveform is a float numpy array or torch tensor,
            mono or (channels, samples), at any rate (e.g. a codec's decoded round trip of clean answer words).
        recognizer: What hears them; default: an [`IndependentRecognizer`] of `vocabulary`.
        vocabulary: The phrases the default recogniser can hear; default: the distinct expected answers. The score
            depends on it (fewer alternatives are easier to tell apart): to compare runs, pass the same vocabulary,
            e.g. every answer of the world, or build one recogniser and pass it.
        num_examples: Records kept under `examples` and `errors`.

    Returns:
        [`score_answers`]'s dict (`correct`, `total`, `accuracy`, `by_category`, `examples`, `errors`; records hold
        `id` (the item's index), `reference`, `prediction`, `correct`) plus `predictions` (what was heard, in order)
        and `recognizer` (its description).
    """
    if recognizer is not None and vocabulary is not None:
        raise ValueError("pass either a recognizer or a vocabulary to build one from, not both.")
    triples = list(items)
    for index, item in enumerate(triples):
        if not isinstance(item, (tuple, list)) or len(item) != 3 or not isinstance(item[2], str):
            length = f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
            raise TypeError(f"items[{index}] must be a (waveform, sampling_rate, expected answer str) triple, got "
                            f"{type(item).__name__}{length}.")
    if recognizer is None:
        if vocabulary is None:
            vocabulary = [expected for _, _, expected in triples]
        recognizer = IndependentRecognizer(vocabulary)
    recognizer = _check_recognizer(recognizer, "recognizer")
    heard = [recognizer.recognize(wave, rate) for wave, rate, _ in triples]
    records = [{"id": index, "reference": expected, "prediction": text}
               for index, ((_, _, expected), text) in enumerate(zip(triples, heard))]
    return {**score_answers(records, num_examples), "predictions": heard,
            "recognizer": describe_recognizer(recognizer)}


# --------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SpokenQuestion:
    """One spoken question of the corpus: its row's fields and its audio (mono float32)."""

    utt_id: str
    fact_id: str
    category: str
    text: str
    question: str
    answer: str
    voice: str
    waveform: np.ndarray
    sampling_rate: int


@dataclass(frozen=True)
class Fact:
    """A fact asked in text: its question and the expected answer."""

    fact_id: str
    category: str
    question: str
    answer: str


@dataclass
class EvalSplit:
    """What one split contributes: its spoken questions (S→*, codec) and the facts they ask about (T→*).

    `answer_vocabulary` and `question_vocabulary` are the grammars of the independent recogniser (every answer and
    every question of the corpus' world); empty: the answers of `facts` and the texts of `questions`.
    """

    name: str
    questions: list[SpokenQuestion]
    facts: list[Fact]
    answer_vocabulary: tuple[str, ...] = ()
    question_vocabulary: tuple[str, ...] = ()


def _read_audio_value(value: Any, corpus: Path, where: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of an undecoded `datasets` Audio value (`{"bytes", "path"}`)."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an undecoded Audio value {{'bytes', 'path'}}, got {type(value).__name__}.")
    if value.get("bytes") is not None:
        source: Any = value["bytes"]
    elif value.get("path"):
        path = Path(value["path"])  # relative paths are relative to the corpus
        source = str(path if path.is_absolute() or path.is_file() else corpus / path)
    else:
        raise ValueError(f"{where}: the audio value holds neither bytes nor a path.")
    waveform, rate = load_audio(source, where=where)
    return waveform.numpy(), rate


def load_eval_split(corpus: str | os.PathLike, split: str = "test", max_examples: int | None = None) -> EvalSplit:
    """Spoken questions and facts of `split` of a corpus saved with `DatasetDict.save_to_disk`.

    Rows with `kind == "question"` are the spoken questions (in corpus order); the facts are their distinct
    `fact_id`s in order of first appearance, with the rows' `question` and `answer`. `max_examples` keeps the first
    N of each. The vocabularies of the independent recogniser are every answer and question of the corpus' `facts`
    split (the whole world; else of `split`), plus the split's spoken texts. Audio is read undecoded
    (`Audio(decode=False)`) with soundfile, so no torchcodec is needed.
    """
    try:
        from datasets import Audio, DatasetDict, load_from_disk
    except ImportError as error:  # an extra: [eval] / [train] / [dev]
        raise ImportError("evaluation reads the corpus with the `datasets` package: pip install "
                          "'moss-speech[eval]'") from error
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be an integer >= 1 or None, got {max_examples!r}.")
    root = Path(corpus)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {str(root)!r} does not exist.")
    data = load_from_disk(str(root))
    if not isinstance(data, DatasetDict):
        raise ValueError(f"corpus {str(root)!r} holds a single Dataset; expected a DatasetDict with splits "
                         "(facts, train, validation, test, ...) as processing/synthesize_espeak.py writes it.")
    if split not in data:
        raise ValueError(f"split {split!r} is not in corpus {str(root)!r}; its splits are {sorted(data)}.")
    rows = data[split]
    missing = [name for name in REQUIRED_COLUMNS if name not in rows.column_names]
    if missing:
        raise ValueError(f"split {split!r} of {str(root)!r} lacks the columns {missing} (has {rows.column_names}).")
    indices = [index for index, kind in enumerate(rows["kind"]) if kind == "question"]
    if not indices:
        raise ValueError(f"split {split!r} of {str(root)!r} has no spoken questions (rows with kind 'question').")
    # Undecoded: datasets decodes Audio only through torchcodec; soundfile reads the stored bytes instead.
    rows = rows.cast_column("audio", Audio(sampling_rate=getattr(rows.features["audio"], "sampling_rate", None),
                                           decode=False))
    has = set(rows.column_names)

    questions, facts, seen = [], [], set()
    for index in indices:
        row = rows[index]
        category = str(row["category"]) if "category" in has else ""
        fact_id = str(row["fact_id"])
        if fact_id not in seen and (max_examples is None or len(facts) < max_examples):
            seen.add(fact_id)
            facts.append(Fact(fact_id, category, str(row["question"]), str(row["answer"])))
        if max_examples is None or len(questions) < max_examples:
            wave, rate = _read_audio_value(row["audio"], root, f"{split}[{index}] ({row['utt_id']})")
            questions.append(SpokenQuestion(
                utt_id=str(row["utt_id"]), fact_id=fact_id, category=category, text=str(row["text"]),
                question=str(row["question"]), answer=str(row["answer"]),
                voice=str(row["voice"]) if "voice" in has else "", waveform=wave, sampling_rate=rate))
        if max_examples is not None and len(questions) >= max_examples and len(facts) >= max_examples:
            break
    world = data["facts"] if "facts" in data and {"question", "answer"} <= set(data["facts"].column_names) else rows
    answers = tuple(dict.fromkeys(str(a) for a in world["answer"] if str(a).strip()))
    sentences = tuple(dict.fromkeys([*(str(q) for q in world["question"] if str(q).strip()),
                                     *(q.text for q in questions)]))
    return EvalSplit(split, questions, facts, answers, sentences)


# ---------------------------------------------------------------------------------------------- running


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[start:start + size]) for start in range(0, len(order), size)]


def _bar(items: Sequence, desc: str, progress: bool) -> Iterable:
    return tqdm(items, desc=desc, unit="batch", file=sys.stderr, disable=not progress or len(items) <= 1, leave=False)


def greedy_kwargs(max_new_tokens: int, repetition_penalty: float = 1.0) -> dict[str, Any]:
    """`MossSpeechForCausalLM.generate` settings of a deterministic evaluation run.

    Per-channel fields are set too: a checkpoint's generation_config may set `audio_do_sample` etc., which would
    otherwise win over the shared `do_sample=False`.
    """
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for prefix in ("", "text_", "audio_"):
        kwargs[f"{prefix}do_sample"] = False
        kwargs[f"{prefix}repetition_penalty"] = repetition_penalty
    return kwargs


def generate_answers(
    model: MossSpeechForCausalLM,
    processor: MossSpeechProcessor,
    conversations: Sequence[list[dict[str, Any]]],
    output_modality: str,
    lengths: Sequence[int],
    batch_size: int,
    generation_kwargs: dict[str, Any],
    desc: str = "generating",
    progress: bool = False,
) -> list[MossSpeechResponse]:
    """Answer every conversation (codes only, no speech decoding), batched; results in the input order.

    Conversations are batched by prompt length (`lengths`), so batches hold little left padding.
    """
    order = sorted(range(len(conversations)), key=lambda i: (lengths[i], i))
    answers: list[MossSpeechResponse | None] = [None] * len(conversations)
    for batch in _bar(_batches(order, batch_size), desc, progress):
        inputs = processor([conversations[i] for i in batch], output_modality=output_modality, return_tensors="pt")
        out = model.generate(inputs["input_ids"].to(model.device),
                             attention_mask=inputs["attention_mask"].to(model.device),
                             return_dict_in_generate=True, **generation_kwargs)
        responses = processor.batch_decode(out.sequences.cpu(), lengths=out.lengths.cpu(), decode_audio=False)
        for index, response in zip(batch, responses):
            answers[index] = response
    return answers  # type: ignore[return-value]


def transcribe_waveforms(codec: MossSpeechCodecModel, waveforms: Sequence[torch.Tensor], sampling_rate: int,
                         batch_size: int, desc: str = "transcribing", progress: bool = False) -> list[str]:
    """CTC transcripts of waveforms at `sampling_rate` (resampled to the codec's input rate first), batched."""
    rate = codec.config.sampling_rate
    prepared = [w if sampling_rate == rate else torchaudio.functional.resample(w, sampling_rate, rate)
                for w in waveforms]
    texts: list[str] = []
    for batch in _bar(_batches(range(len(prepared)), batch_size), desc, progress):
        out = codec.transcribe([prepared[i] for i in batch], sampling_rate=rate)
        if not isinstance(out, (list, tuple)) or len(out) != len(batch) or not all(isinstance(t, str) for t in out):
            raise TypeError(f"codec.transcribe must return one str per waveform ({len(batch)}), got {out!r}.")
        texts.extend(out)
    return texts


def decode_speech(
    codec: MossSpeechCodecModel,
    codes: Sequence[torch.Tensor],
    batch_size: int,
    voice_prompt: MossSpeechVoicePrompt | None = None,
    generator: torch.Generator | None = None,
    desc: str = "decoding",
    progress: bool = False,
) -> tuple[list[torch.Tensor | None], int]:
    """Decode code sequences to speech, batched by length: (float32 CPU waveforms in input order, None where there
    are no codes; the codec's output sampling rate)."""
    waves: list[torch.Tensor | None] = [None] * len(codes)
    rate = int(getattr(codec.config, "output_sampling_rate", None) or codec.config.sampling_rate)
    spoken = [i for i, c in enumerate(codes) if c.numel() > 0]
    order = sorted(spoken, key=lambda i: (codes[i].numel(), i))
    for batch in _bar(_batches(order, batch_size), desc, progress):
        speech = codec.decode([codes[i] for i in batch], voice_prompt=voice_prompt, generator=generator)
        rate = int(speech.sampling_rate)
        for row, index in enumerate(batch):
            waves[index] = speech.waveforms[row, : int(speech.lengths[row])].float().cpu()
    return waves, rate


def speak_and_transcribe(
    codec: MossSpeechCodecModel,
    codes: Sequence[torch.Tensor],
    batch_size: int,
    voice_prompt: MossSpeechVoicePrompt | None = None,
    generator: torch.Generator | None = None,
    desc: str = "decoding",
    progress: bool = False,
) -> list[str]:
    """Decode code sequences to speech with the codec, then transcribe it with its CTC head; "" where no codes."""
    waves, rate = decode_speech(codec, codes, batch_size, voice_prompt, generator, desc, progress)
    return _ctc_transcripts(codec, waves, rate, batch_size)


def _ctc_transcripts(codec: MossSpeechCodecModel, waves: Sequence[torch.Tensor | None], rate: int,
                     batch_size: int) -> list[str]:
    """CTC transcripts of decoded waveforms (None: no speech, "")."""
    spoken = [i for i, w in enumerate(waves) if w is not None]
    texts = [""] * len(waves)
    for index, text in zip(spoken, transcribe_waveforms(codec, [waves[i] for i in spoken], rate, batch_size)):
        texts[index] = text
    return texts


def _hear(recognizer: SpeechRecognizer, waves: Sequence[torch.Tensor | None], rate: int) -> list[str]:
    """What the independent recogniser hears in each waveform (None: no speech, "")."""
    return ["" if w is None else recognizer.recognize(w, rate) for w in waves]


def baseline_answers(
    baseline: torch.nn.Module,
    processor: MossSpeechProcessor,
    questions: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    repetition_penalty: float = 1.0,
    desc: str = "baseline",
    progress: bool = False,
) -> list[str]:
    """Greedy text answers of a plain causal LM to text questions, prompted exactly as the speech model.

    The prompt is the text channel of the processor's text-output grid (a text-only prompt has no speech rows, so
    that channel is the whole prompt); the answer is decoded like the speech model's text channel.
    """
    vocab = getattr(baseline.config, "vocab_size", None)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos_token_ids),
                              pad_token_id=processor.text_pad_token_id, repetition_penalty=repetition_penalty)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    order = sorted(range(len(questions)), key=lambda i: (len(questions[i]), i))
    answers = [""] * len(questions)
    device = next(baseline.parameters()).device
    for batch in _bar(_batches(order, batch_size), desc, progress):
        inputs = processor([conversations[i] for i in batch], output_modality="text", return_tensors="pt")
        ids, mask = inputs["input_ids"][..., 0], inputs["attention_mask"]
        if vocab is not None and int(ids.max()) >= vocab:
            raise ValueError(f"the baseline's vocabulary ({vocab} ids) does not cover the processor's tokenizer (id "
                             f"{int(ids.max())} in a prompt): it must use the same tokenizer.")
        out = baseline.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        new = out[:, ids.shape[1]:].cpu()
        grid = torch.stack([new, torch.full_like(new, processor.audio_pad_token_id)], dim=-1)
        for index, response in zip(batch, processor.batch_decode(grid, decode_audio=False)):
            answers[index] = response.text
    return answers


def _check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = [tasks]
    chosen = tuple(dict.fromkeys(tasks))
    unknown = [t for t in chosen if t not in TASKS]
    if unknown or not chosen:
        raise ValueError(f"tasks must be a non-empty list among {TASKS}, got {list(chosen)!r}.")
    return tuple(t for t in TASKS if t in chosen)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def evaluate(
    model: MossSpeechForCausalLM,
    processor: MossSpeechProcessor,
    data: EvalSplit,
    tasks: Iterable[str] = TASKS,
    baseline_model: torch.nn.Module | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    repetition_penalty: float = 1.0,
    voice_prompt: MossSpeechVoicePrompt | None = None,
    seed: int = 0,
    num_examples: int = 5,
    progress: bool = False,
    answer_recognizer: SpeechRecognizer | None = None,
    question_recognizer: SpeechRecognizer | None = None,
) -> dict[str, Any]:
    """Run the evaluation of `data` and return its results as a JSON-ready dict.

    Args:
        model: The MOSS-Speech model (any device, eval mode is set).
        processor: Its processor; its codec (`processor.codec`) encodes questions and decodes spoken answers; its
            CTC recogniser (`transcribe`, if it has one) gives the secondary columns.
        data: The split ([`load_eval_split`]).
        tasks: Among "s2t", "s2s", "t2s", "t2t" (the modes) and "codec" (round trip); all by default.
        baseline_model: A text-only causal LM with the processor's tokenizer, for text retention (needs "t2t").
        batch_size: Conversations per `generate` call (and utterances per codec call).
        max_new_tokens: Most rows generated per answer.
        repetition_penalty: Of both channels (1.0: none, pure greedy decoding).
        voice_prompt: Voice the codec speaks generated and round-tripped codes in (None: its prompt-less default).
        seed: Seeds the vocoder's noise (and the global RNG), so spoken answers are reproducible.
        num_examples: Records kept per task under `examples` and `errors`.
        progress: tqdm bars on stderr.
        answer_recognizer: Hears spoken answers (S->S, T->S); default: an [`IndependentRecognizer`] of
            `data.answer_vocabulary` (else of the facts' answers).
        question_recognizer: Hears the question audio of the codec round trip; default: an
            [`IndependentRecognizer`] of `data.question_vocabulary` (else of the questions' texts).

    Returns:
        `{"schema", "settings", "counts": {"spoken_questions", "facts"}, "modes": {mode: result}, "text_retention",
        "codec_roundtrip", "timing"}`. A mode result is [`score_answers`]'s dict plus `label`, `input`, `output`
        and `seconds`; its records hold `id` (utt_id or fact_id), `category`, `question`, `reference`,
        `prediction` (the text answer, or what the independent recogniser heard in the spoken answer) and, for
        spoken answers, `ctc_transcript` (the decoded speech read by the CTC head), `codes_transcript` (the codes
        read by it), `text` (the text channel) and `num_codes`. A spoken-answer mode also has `scorer` (the
        independent recogniser, whose score is `correct`/`accuracy`) and, with a CTC head, the secondary `ctc` and
        `from_codes` (`{"correct", "total", "accuracy"}`). `text_retention` is `{"model_accuracy",
        "baseline_accuracy", "retention", "baseline": result}` or None; `codec_roundtrip` is `{"total", "scorer",
        "original": {"correct", "accuracy"}, "roundtrip": {...}, "accuracy_gap_points", "ctc": {"original":
        {"correct", "accuracy", "cer"}, "roundtrip": {...}, "accuracy_gap_points", "cer_gap_points"} or None,
        "examples", "seconds"}` or None.
    """
    tasks = _check_tasks(tasks)
    batch_size = _positive_int("batch_size", batch_size)
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}.")
    if baseline_model is not None and "t2t" not in tasks:
        raise ValueError("a baseline_model measures text retention, which needs the 't2t' task.")
    if baseline_model is not None and isinstance(baseline_model, MossSpeechForCausalLM):
        raise TypeError("baseline_model must be a text-only causal LM (e.g. Qwen3ForCausalLM), got a "
                        "MossSpeechForCausalLM.")
    uses_speech = any(t != "t2t" for t in tasks)
    codec = processor.codec if uses_speech else None
    if uses_speech and codec is None:
        raise ValueError(f"tasks {[t for t in tasks if t != 't2t']} need a speech codec, but the processor has none.")
    if any(MODES.get(t, ("",))[0] == "speech" or t == "codec" for t in tasks) and not data.questions:
        raise ValueError(f"split {data.name!r} has no spoken questions.")
    # The CTC columns are secondary: a codec without a CTC head (the release's) is scored by the recogniser alone.
    has_ctc = codec is not None and callable(getattr(codec, "transcribe", None)) \
        and getattr(codec, "can_transcribe", True) is not False
    if any(MODES.get(t, ("", ""))[1] == "speech" for t in tasks):
        answer_recognizer = _check_recognizer(answer_recognizer, "answer_recognizer") if answer_recognizer \
            is not None else IndependentRecognizer(data.answer_vocabulary or [f.answer for f in data.facts])
    if "codec" in tasks:
        question_recognizer = _check_recognizer(question_recognizer, "question_recognizer") if question_recognizer \
            is not None else IndependentRecognizer(data.question_vocabulary or [q.text for q in data.questions])

    start = time.perf_counter()
    model.eval()
    if codec is not None:
        codec.eval()
    torch.manual_seed(seed)
    generator = torch.Generator(device=codec.device).manual_seed(seed) if codec is not None else None
    generation = greedy_kwargs(max_new_tokens, repetition_penalty)
    timing: dict[str, float] = {}

    codes: list[torch.Tensor] = []
    waves: list[torch.Tensor] = []
    if any(t in ("s2t", "s2s", "codec") for t in tasks):
        begin = time.perf_counter()
        rate = codec.config.sampling_rate
        waves = [prepare_waveforms(q.waveform, q.sampling_rate, target_rate=rate)[0] for q in data.questions]
        codes = [c.cpu() for c in codec.encode(waves, sampling_rate=rate, batch_size=batch_size).codes]
        timing["encode_seconds"] = time.perf_counter() - begin

    modes: dict[str, Any] = {}
    for mode in (t for t in tasks if t in MODES):
        begin = time.perf_counter()
        source, target = MODES[mode]
        if source == "speech":
            items = [(q.utt_id, q.category, q.question, q.answer) for q in data.questions]
            conversations = [[{"role": "user", "content": {"type": "audio", "codes": c}}] for c in codes]
            lengths = [c.numel() for c in codes]
        else:
            items = [(f.fact_id, f.category, f.question, f.answer) for f in data.facts]
            conversations = [[{"role": "user", "content": f.question}] for f in data.facts]
            lengths = [len(f.question) for f in data.facts]
        responses = generate_answers(model, processor, conversations, "audio" if target == "speech" else "text",
                                     lengths, batch_size, generation, desc=LABELS[mode], progress=progress)
        records = []
        if target == "speech":
            decoded, rate = decode_speech(codec, [r.codes for r in responses], batch_size, voice_prompt, generator,
                                          desc=f"{LABELS[mode]} speech", progress=progress)
            heard = _hear(answer_recognizer, decoded, rate)
            ctc = _ctc_transcripts(codec, decoded, rate, batch_size) if has_ctc else [None] * len(responses)
            # The CTC head also reads the answer's codes directly: what the LLM said, apart from the vocoder.
            from_codes: list[str | None] = [""] * len(responses) if has_ctc else [None] * len(responses)
            if has_ctc:
                spoken = [i for i, r in enumerate(responses) if r.codes.numel()]
                for batch in _batches(spoken, batch_size):
                    for index, text in zip(batch, codec.transcribe_codes([responses[i].codes for i in batch])):
                        from_codes[index] = text
            for (key, category, question, answer), response, text, ctc_text, read in zip(
                    items, responses, heard, ctc, from_codes):
                records.append({"id": key, "category": category, "question": question, "reference": answer,
                                "prediction": text, "ctc_transcript": ctc_text, "codes_transcript": read,
                                "text": response.text, "num_codes": int(response.codes.numel())})
        else:
            for (key, category, question, answer), response in zip(items, responses):
                records.append({"id": key, "category": category, "question": question, "reference": answer,
                                "prediction": response.text})
        seconds = time.perf_counter() - begin
        modes[mode] = {"label": LABELS[mode], "input": source, "output": target}
        if target == "speech":
            modes[mode]["scorer"] = describe_recognizer(answer_recognizer)
        modes[mode].update({**score_answers(records, num_examples), "seconds": seconds})
        if target == "speech" and has_ctc:
            for name, field in (("ctc", "ctc_transcript"), ("from_codes", "codes_transcript")):
                correct = sum(normalize_answer(r[field]) == normalize_answer(r["reference"]) for r in records)
                modes[mode][name] = {"correct": correct, "total": len(records),
                                     "accuracy": _accuracy(correct, len(records))}
        timing[f"{mode}_seconds"] = seconds

    retention = None
    if baseline_model is not None:
        begin = time.perf_counter()
        baseline_model.eval()
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != processor.tokenizer.unk_token_id and im_end not in eos:
            eos.append(im_end)
        answers = baseline_answers(baseline_model, processor, [f.question for f in data.facts], batch_size,
                                   max_new_tokens, eos or [processor.text_pad_token_id], repetition_penalty,
                                   progress=progress)
        records = [{"id": f.fact_id, "category": f.category, "question": f.question, "reference": f.answer,
                    "prediction": answer} for f, answer in zip(data.facts, answers)]
        baseline = {"label": "T->T text-only baseline", "input": "text", "output": "text",
                    **score_answers(records, num_examples), "seconds": time.perf_counter() - begin}
        model_accuracy, baseline_accuracy = modes["t2t"]["accuracy"], baseline["accuracy"]
        retention = {"model_accuracy": model_accuracy, "baseline_accuracy": baseline_accuracy,
                     "retention": model_accuracy / baseline_accuracy if baseline_accuracy else None,
                     "baseline": baseline}
        timing["baseline_seconds"] = baseline["seconds"]

    roundtrip = None
    if "codec" in tasks:
        begin = time.perf_counter()
        references = [q.text for q in data.questions]
        decoded, rate = decode_speech(codec, codes, batch_size, voice_prompt, generator, desc="codec round trip",
                                      progress=progress)
        heard_before = [question_recognizer.recognize(q.waveform, q.sampling_rate) for q in data.questions]
        heard_after = _hear(question_recognizer, decoded, rate)

        def summary(hypotheses: list[str], cer: bool = False) -> dict[str, Any]:
            scores = transcription_scores(references, hypotheses)
            return {key: scores[key] for key in ("correct", "accuracy", "cer") if cer or key != "cer"}

        before, after = summary(heard_before), summary(heard_after)
        roundtrip = {"total": len(references), "scorer": describe_recognizer(question_recognizer),
                     "original": before, "roundtrip": after,
                     "accuracy_gap_points": 100 * (before["accuracy"] - after["accuracy"]), "ctc": None}
        ctc_before = ctc_after = [None] * len(references)
        if has_ctc:
            ctc_before = transcribe_waveforms(codec, waves, codec.config.sampling_rate, batch_size,
                                              desc="CTC original", progress=progress)
            ctc_after = _ctc_transcripts(codec, decoded, rate, batch_size)
            ctc_b, ctc_a = summary(ctc_before, cer=True), summary(ctc_after, cer=True)
            roundtrip["ctc"] = {"original": ctc_b, "roundtrip": ctc_a,
                                "accuracy_gap_points": 100 * (ctc_b["accuracy"] - ctc_a["accuracy"]),
                                "cer_gap_points": 100 * (ctc_a["cer"] - ctc_b["cer"])}
        roundtrip["examples"] = [{"id": q.utt_id, "reference": q.text, "original": o, "roundtrip": d,
                                  "ctc_original": co, "ctc_roundtrip": cd}
                                 for q, o, d, co, cd in list(zip(data.questions, heard_before, heard_after,
                                                                 ctc_before, ctc_after))[:num_examples]]
        roundtrip["seconds"] = time.perf_counter() - begin
        timing["codec_seconds"] = roundtrip["seconds"]

    timing["total_seconds"] = time.perf_counter() - start
    return {
        "schema": SCHEMA,
        "settings": {"split": data.name, "tasks": list(tasks), "decoding": "greedy", "batch_size": batch_size,
                     "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty, "seed": seed,
                     "voice_prompt": voice_prompt is not None,
                     "normalisation": "lowercase, letters only, single spaces",
                     "ctc_columns": has_ctc if uses_speech else None},
        "counts": {"spoken_questions": len(data.questions), "facts": len(data.facts)},
        "modes": modes,
        "text_retention": retention,
        "codec_roundtrip": roundtrip,
        "timing": timing,
    }


# ------------------------------------------------------------------------------------------------- output


def _percent(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def _count(part: dict[str, Any], total: int | None = None) -> str:
    return f"{_percent(part['accuracy'])} ({part['correct']}/{part['total'] if total is None else total})"


def format_table(results: dict[str, Any]) -> str:
    """The results of [`evaluate`] as a plain-text table (spoken answers: the independent recogniser's score, then
    the CTC head's)."""
    counts, settings = results["counts"], results["settings"]
    where = f" of {results['corpus']}" if results.get("corpus") else ""
    lines = [f"split {settings['split']!r}{where}: {counts['spoken_questions']} spoken questions, "
             f"{counts['facts']} facts; greedy decoding",
             f"{'task':<34}{'correct':>8}{'total':>8}{'accuracy':>11}"]
    rows = [results["modes"][mode] for mode in MODES if mode in results["modes"]]
    retention = results.get("text_retention")
    if retention is not None:
        rows.append(retention["baseline"])
    scorers = []
    for row in rows:
        lines.append(f"{row['label']:<34}{row['correct']:>8}{row['total']:>8}{_percent(row['accuracy']):>11}")
        if row.get("scorer") and row["scorer"] not in scorers:
            scorers.append(row["scorer"])
        for key, name in (("ctc", "  decoded speech read by the CTC"),
                          ("from_codes", "  answer codes read by the CTC")):
            part = row.get(key)
            if part is not None:
                lines.append(f"{name:<34}{part['correct']:>8}{part['total']:>8}{_percent(part['accuracy']):>11}")
    if retention is not None:
        lines.append(f"{'text retention (T->T / baseline)':<50}{_percent(retention['retention']):>11}")
    roundtrip = results.get("codec_roundtrip")
    if roundtrip is not None:
        lines.append(f"{'codec round trip: heard':<34}{'correct':>8}{'total':>8}{'exact':>11}")
        for key, name in (("original", "original audio"), ("roundtrip", "encode -> decode")):
            part = roundtrip[key]
            lines.append(f"{'  ' + name:<34}{part['correct']:>8}{roundtrip['total']:>8}"
                         f"{_percent(part['accuracy']):>11}")
        lines.append(f"{'  gap (original - round trip)':<50}{roundtrip['accuracy_gap_points']:>7.1f} pt")
        if roundtrip.get("scorer") and roundtrip["scorer"] not in scorers:
            scorers.append(roundtrip["scorer"])
        ctc = roundtrip.get("ctc")
        if ctc is not None:
            lines.append(f"{'codec: CTC transcript of':<34}{'correct':>8}{'total':>8}{'exact':>11}{'CER':>10}")
            for key, name in (("original", "original audio"), ("roundtrip", "encode -> decode")):
                part = ctc[key]
                lines.append(f"{'  ' + name:<34}{part['correct']:>8}{roundtrip['total']:>8}"
                             f"{_percent(part['accuracy']):>11}{_percent(part['cer']):>10}")
            lines.append(f"{'  gap (original - round trip)':<50}{ctc['accuracy_gap_points']:>7.1f} pt"
                         f"{ctc['cer_gap_points']:>7.1f} pt")
    for scorer in scorers:
        lines.append(f"speech heard by: {scorer}")
    lines.append(f"time: {results['timing']['total_seconds']:.1f} s")
    return "\n".join(lines)


def markdown_comparison(runs: dict[str, dict[str, Any]]) -> str:
    """A Markdown table comparing [`evaluate`] results side by side, one column per named run (e.g. the frozen
    recipe and its no-freezing ablation): accuracy per mode (spoken answers: the independent recogniser first, the
    codec's CTC head after), text retention and the codec round trip. Results of schema /1 (scored by the CTC head
    only) fill the CTC rows and leave the independent ones "n/a"."""
    if not runs:
        raise ValueError("runs is empty: pass at least one named result of evaluate().")
    names = list(runs)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, values: list[str]) -> None:
        if any(v != "n/a" for v in values):
            lines.append(f"| {label} | " + " | ".join(values) + " |")

    def mode_part(result: dict[str, Any], mode: str, part: str) -> str:
        got = result["modes"].get(mode)
        if got is None:
            return "n/a"
        independent = "scorer" in got  # schema /2; /1 scored spoken answers with the CTC head only
        if part == "main":
            got = got if independent or got.get("output") != "speech" else None
        elif part == "ctc":
            got = got.get("ctc") if independent else got
        else:
            got = got.get("from_codes")
        return "n/a" if got is None else _count(got)

    for mode in MODES:
        if not any(mode in r["modes"] for r in runs.values()):
            continue
        label = next(r["modes"][mode]["label"] for r in runs.values() if mode in r["modes"])
        if MODES[mode][1] == "speech":
            row(f"{label}: spoken answer heard by the independent recogniser",
                [mode_part(runs[n], mode, "main") for n in names])
            row(f"{label}: spoken answer read by the codec's CTC head",
                [mode_part(runs[n], mode, "ctc") for n in names])
            row(f"{label}: answer codes read by the CTC head (no vocoder)",
                [mode_part(runs[n], mode, "from_codes") for n in names])
        else:
            row(label, [mode_part(runs[n], mode, "main") for n in names])
    if any(r.get("text_retention") for r in runs.values()):
        values = []
        for n in names:
            retention = runs[n].get("text_retention")
            values.append("n/a" if not retention else
                          f"{_percent(retention['retention'])} (baseline {_percent(retention['baseline_accuracy'])})")
        lines.append("| text retention (T->T / text-only model) | " + " | ".join(values) + " |")
    independent, ctc = [], []
    for n in names:
        trip = runs[n].get("codec_roundtrip")
        new = bool(trip) and "scorer" in trip
        independent.append(f"{_percent(trip['original']['accuracy'])} -> {_percent(trip['roundtrip']['accuracy'])}"
                           if new else "n/a")
        part = (trip.get("ctc") if new else trip) if trip else None
        ctc.append("n/a" if not part else
                   f"{_percent(part['original']['accuracy'])} -> {_percent(part['roundtrip']['accuracy'])} "
                   f"(CER {_percent(part['original']['cer'])} -> {_percent(part['roundtrip']['cer'])})")
    row("codec round trip: heard by the independent recogniser, original -> encode/decode", independent)
    row("codec: CTC exact match, original -> encode/decode", ctc)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- loading


def resolve_voice(voice: str | os.PathLike | None, checkpoint: str | os.PathLike | None,
                  codec: MossSpeechCodecModel) -> MossSpeechVoicePrompt | None:
    """A voice prompt from a shipped voice name of `checkpoint`, a saved `.safetensors` prompt or an audio file."""
    if voice is None:
        return None
    voices = shipped_voices(checkpoint) if checkpoint is not None else {}
    if str(voice) in voices:
        return MossSpeechVoicePrompt.load(str(voices[str(voice)]))
    path = Path(voice)
    if not path.is_file():
        names = ", ".join(voices) or "none"
        raise FileNotFoundError(f"voice {str(voice)!r} is neither a file nor a voice of the checkpoint (voices: "
                                f"{names}).")
    if path.suffix == ".safetensors":
        return MossSpeechVoicePrompt.load(str(path))
    waveform, rate = load_audio(path, where=f"voice {str(voice)!r}")
    return codec.voice_prompt(waveform, sampling_rate=rate)


def load_model_and_processor(
    model_dir: str | os.PathLike,
    codec_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    need_codec: bool = True,
) -> tuple[MossSpeechForCausalLM, MossSpeechProcessor]:
    """The model and processor of a checkpoint directory; the codec is `codec_dir`, else the processor's, else the
    directory's `codec/` subfolder. With `need_codec`, the codec is loaded now, in float32 on the model's device."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = Path(model_dir)
    overrides: dict[str, Any] = {}
    if codec_dir is not None:
        overrides["codec_path"] = str(codec_dir)
    processor = MossSpeechProcessor.from_pretrained(str(model_dir), **overrides)
    if processor.codec_path is None and processor.codec_subfolder is None \
            and (model_dir / CODEC_SUBFOLDER / "config.json").is_file():
        processor.codec = MossSpeechCodecModel.from_pretrained(str(model_dir / CODEC_SUBFOLDER))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32)
    if not isinstance(model, MossSpeechForCausalLM):
        raise TypeError(f"{str(model_dir)!r} loads as {type(model).__name__}, not MossSpeechForCausalLM.")
    model = model.to(device).eval()
    if need_codec:
        codec = processor.codec  # loaded here (lazily otherwise), so that it runs on the model's device
        if codec is not None:
            processor.codec = codec.to(device=device, dtype=torch.float32).eval()
    return model, processor


def run_evaluation(
    model_dir: str | os.PathLike,
    corpus: str | os.PathLike,
    split: str = "test",
    codec_dir: str | os.PathLike | None = None,
    baseline_dir: str | os.PathLike | None = None,
    tasks: Iterable[str] = TASKS,
    max_examples: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    repetition_penalty: float = 1.0,
    voice: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    num_examples: int = 5,
    output: str | os.PathLike | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint (and a baseline), evaluate a corpus split, write the JSON to `output`; returns the results.

    `voice`: a voice name of the checkpoint's `voices/`, a `.safetensors` prompt or an audio file. `log` receives
    one-line progress notes (loading, tasks done).
    """
    start = time.perf_counter()
    tasks = _check_tasks(tasks)
    if baseline_dir is not None and "t2t" not in tasks:
        raise ValueError("--baseline-text-model measures text retention, which needs the t2t task.")
    if any(t in ("s2s", "t2s", "codec") for t in tasks):
        require_pocketsphinx()  # before minutes of loading, not after
    data = load_eval_split(corpus, split, max_examples)
    need_codec = any(t != "t2t" for t in tasks)
    model, processor = load_model_and_processor(model_dir, codec_dir, device, dtype, need_codec=need_codec)
    codec = processor.codec if need_codec else None
    voice_prompt = resolve_voice(voice, model_dir, codec) if voice is not None and codec is not None else None
    baseline = None
    if baseline_dir is not None:
        baseline = AutoModelForCausalLM.from_pretrained(str(baseline_dir), dtype=dtype or torch.float32)
        if isinstance(baseline, MossSpeechForCausalLM):
            raise TypeError(f"--baseline-text-model {str(baseline_dir)!r} is a MOSS-Speech model; expected a text-only "
                            "causal LM (e.g. the Qwen3 model the speech model was split from).")
        baseline = baseline.to(model.device).eval()
    loaded = time.perf_counter()
    if log is not None:
        log(f"loaded {len(data.questions)} spoken questions and {len(data.facts)} facts of split {split!r} and the "
            f"model(s) in {loaded - start:.1f} s")
    results = evaluate(model, processor, data, tasks=tasks, baseline_model=baseline, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                       voice_prompt=voice_prompt, seed=seed, num_examples=num_examples, progress=progress)
    results = {"model": str(model_dir), "codec": None if codec_dir is None else str(codec_dir),
               "baseline_text_model": None if baseline_dir is None else str(baseline_dir), "corpus": str(corpus),
               "device": str(model.device), **results}
    results["settings"]["voice"] = None if voice is None else str(voice)
    results["settings"]["max_examples"] = max_examples
    results["timing"]["load_seconds"] = loaded - start
    if output is not None:
        Path(output).write_text(json.dumps(results, indent=2) + "\n")
    return results


__all__ = [
    "EvalSplit",
    "markdown_comparison",
    "Fact",
    "LABELS",
    "MODES",
    "SCHEMA",
    "IndependentRecognizer",
    "SpeechRecognizer",
    "SpokenQuestion",
    "TASKS",
    "baseline_answers",
    "character_error_rate",
    "decode_speech",
    "describe_recognizer",
    "edit_distance",
    "evaluate",
    "format_table",
    "generate_answers",
    "greedy_kwargs",
    "load_eval_split",
    "load_model_and_processor",
    "normalize_answer",
    "resolve_voice",
    "run_evaluation",
    "score_answers",
    "score_spoken_answers",
    "speak_and_transcribe",
    "transcribe_waveforms",
    "transcription_scores",
    "word_error_rate",
]

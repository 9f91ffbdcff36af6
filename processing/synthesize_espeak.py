"""Synthesize the MOSS-Speech-Nano spoken-QA corpus with espeak-ng.

Run from a checkout (needs espeak-ng: `apt-get install -y espeak-ng`):

    python processing/synthesize_espeak.py --output data/nano/corpus [--seed 0] [--max_facts N] \\
        [--voices en-us+f1 en-gb+m3 ...] [--question_voices en-gb+Andy ... | none] [--dev_voice en+m2] \\
        [--test_voice en-us+f4] [--dialect_test_voice en-gb-x-gbcwmd+Annie] [--num_workers 2]

The world is closed: a few hundred facts (small-number addition and subtraction, capitals, colours of things,
opposites in both directions, the day after / before a weekday, the number after one..nineteen, the month after a
month), each a lowercase question with a short answer, all made of the words of the CTC alphabet
`" abcdefghijklmnopqrstuvwxyz'"` (numbers are spelled out). Per category ~20 % of the facts (seeded) are `heldout`:
they are never spoken in training; only their words are.

The result, written with `DatasetDict.save_to_disk`, has seven splits:

- `facts`: one row per fact, no audio: `fact_id, category, question, answer, fact_split` (`train` / `heldout`);
- `train`: train-fact questions and answers in every training voice, the canonical-voice answers of train facts (with
  `--canonical_questions` also their questions in the canonical voice, for the speech decoder), and
  `word` rows: every distinct word of the world spoken alone by every training voice and by the canonical voice;
  plus train-fact questions in every *question voice* (35 more voices, each a training dialect with its own named
  espeak-ng variant, with a wider prosody range): they only ask, so a listener hears many more voices at little cost;
  with `--reading_voices K`, `reading` rows: every `reading_sentences` sentence (a question frame filled with another
  category's phrase, "what colour is france": no fact, no answer) spoken by K voices drawn from those voices;
- `validation`: held-out-fact questions in the dev voice (for tuning);
- `test`: held-out-fact questions in the test voice (the evaluation split; never tune on it);
- `test_seen`: train-fact questions in the test voice (voice shift only);
- `test_dialect`, `test_seen_dialect`: the same two sets spoken by the dialect test voice, a dialect (West Midlands)
  and a variant (`Annie`) that no training or question voice uses.

Audio rows have the columns `utt_id, fact_id ("" for words and reading sentences), category (likewise), kind (question
/ answer / word / reading), text (what is spoken), question, answer ("" for words and reading sentences), voice,
speed, pitch, canonical, audio`. The canonical voice (`en-us`, speed 160, pitch 50) is the assistant's voice; every
other utterance gets a seeded random speed (130-190 words per minute) and pitch (30-70; question voices 110-210 and
15-90), derived from the seed and the utterance id, so a row is the same in a tiny corpus and in the full one. Voices
are espeak-ng voices `<language>` or `<language>+<variant>`; the variants of the test, dev and dialect test voices
(`f4`, `m2`, `Annie` by default) and the dialect test voice's dialect are never used in training.

Reading the audio: `audio` is a `datasets.Audio(sampling_rate=16000)` column holding FLAC bytes. `datasets` 5.2
decodes `Audio` only through torchcodec, which is not installed here, so read it undecoded and with soundfile:

    corpus = load_corpus("data/nano/corpus")          # casts every audio column to Audio(decode=False)
    waveform, rate = load_audio(corpus["test"][0])    # float32 mono, 16000

(or `split.cast_column("audio", datasets.Audio(decode=False))` yourself, then `load_audio(row)`).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm.auto import tqdm

if TYPE_CHECKING:
    import datasets

SAMPLING_RATE = 16_000
ALPHABET = " abcdefghijklmnopqrstuvwxyz'"
CANONICAL_VOICE, CANONICAL_SPEED, CANONICAL_PITCH = "en-us", 160, 50
DEV_VOICE = "en+m2"
TEST_VOICE = "en-us+f4"
# Twelve training voices: six accents x female/male variants, neither the test voice's variant (f4) nor the dev
# voice's (m2). Mbrola voices are left out: they need the separate mbrola program.
TRAIN_VOICES = (
    "en-us+f1", "en-us+f2", "en-gb+f3", "en-gb-x-rp+f5", "en-029+f1", "en-gb-scotland+f3",
    "en-us+m1", "en-us+m3", "en-gb+m4", "en-gb-scotland+m5", "en-us-nyc+m6", "en-gb-x-gbclan+m7",
)
# Question voices: each of the seven training dialects with five named variants of its own (none of the held-out
# variants, and no whispering, croaking or robot variants: their questions would not sound like speech).
QUESTION_VOICES = tuple(
    f"{dialect}+{variant}" for i, dialect in enumerate(
        ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-us-nyc", "en-gb-x-gbclan"))
    for variant in ("adam", "Alex", "Alicia", "Andrea", "Andy", "aunty", "belinda", "benjamin", "boris", "caleb",
                    "david", "Denis", "ed", "edward", "Gene", "gustave", "Hugo", "iven", "Jacky", "john", "Lee",
                    "linda", "max", "Michael", "Mike", "norbert", "paul", "quincy", "rob", "robert", "steph",
                    "travis", "victor", "zac", "grandma")[5 * i:5 * i + 5])
DIALECT_TEST_VOICE = "en-gb-x-gbcwmd+Annie"
SPEED_RANGE = (130, 190)  # words per minute, inclusive
PITCH_RANGE = (30, 70)  # espeak-ng pitch 0-99, inclusive
QUESTION_SPEED_RANGE = (110, 210)
QUESTION_PITCH_RANGE = (15, 90)
HELDOUT_FRACTION = 0.2
INSTALL_HINT = "apt-get install -y espeak-ng"

FACT_COLUMNS = ("fact_id", "category", "question", "answer", "fact_split")
ROW_COLUMNS = ("utt_id", "fact_id", "category", "kind", "text", "question", "answer", "voice", "speed", "pitch",
               "canonical", "audio")
AUDIO_SPLITS = ("train", "validation", "test", "test_seen", "test_dialect", "test_seen_dialect")

# ------------------------------------------------------------------------------------------------ the world

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
           "seventeen eighteen nineteen twenty").split()
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()
CAPITALS = (
    ("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"), ("japan", "tokyo"),
    ("china", "beijing"), ("russia", "moscow"), ("egypt", "cairo"), ("canada", "ottawa"), ("kenya", "nairobi"),
    ("peru", "lima"), ("norway", "oslo"), ("sweden", "stockholm"), ("poland", "warsaw"), ("greece", "athens"),
    ("portugal", "lisbon"), ("ireland", "dublin"), ("austria", "vienna"), ("hungary", "budapest"),
    ("cuba", "havana"), ("chile", "santiago"), ("thailand", "bangkok"), ("england", "london"),
    ("finland", "helsinki"), ("denmark", "copenhagen"),
)
COLOURS = (
    ("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("blood", "red"), ("a carrot", "orange"), ("milk", "white"), ("a lemon", "yellow"), ("a tomato", "red"),
    ("chocolate", "brown"), ("a frog", "green"), ("the sea", "blue"), ("a crow", "black"), ("an elephant", "grey"),
    ("a plum", "purple"), ("a pig", "pink"), ("the sun", "yellow"), ("a strawberry", "red"), ("mud", "brown"),
)
# Every word appears in one pair only, so "the opposite of x" has a single answer.
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("open", "closed"), ("light", "dark"),
    ("old", "young"), ("wet", "dry"), ("hard", "soft"), ("early", "late"), ("full", "empty"), ("rich", "poor"),
    ("thick", "thin"), ("strong", "weak"), ("loud", "quiet"), ("high", "low"), ("long", "short"), ("up", "down"),
    ("in", "out"), ("day", "night"), ("yes", "no"), ("push", "pull"), ("buy", "sell"), ("first", "last"),
    ("good", "bad"), ("near", "far"), ("clean", "dirty"), ("front", "back"), ("true", "false"), ("give", "take"),
)
CATEGORIES = ("addition", "subtraction", "capital", "colour", "opposite", "day_after", "day_before", "number_after",
              "month_after")


def check_text(text: str, where: str = "text") -> str:
    """Return `text` if it is lowercase words of the CTC alphabet separated by single spaces, else raise ValueError."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}.")
    bad = sorted(set(text) - set(ALPHABET))
    if not text or bad or text != text.strip() or "  " in text:
        raise ValueError(f"{where}={text!r} is not lowercase words of the CTC alphabet {ALPHABET!r} separated by "
                         f"single spaces" + (f" (bad characters: {bad})" if bad else "") + ".")
    return text


def _world() -> dict[str, list[tuple[str, str]]]:
    """All (question, answer) pairs of the world by category, in a fixed order."""
    world: dict[str, list[tuple[str, str]]] = {c: [] for c in CATEGORIES}
    for a in range(1, 10):
        for b in range(1, 10):
            if a + b <= 12:
                world["addition"].append((f"what is {NUMBERS[a]} plus {NUMBERS[b]}", NUMBERS[a + b]))
    for a in range(2, 11):
        for b in range(1, a):
            world["subtraction"].append((f"what is {NUMBERS[a]} minus {NUMBERS[b]}", NUMBERS[a - b]))
    world["capital"] = [(f"what is the capital of {country}", city) for country, city in CAPITALS]
    world["colour"] = [(f"what colour is {thing}", colour) for thing, colour in COLOURS]
    for x, y in OPPOSITES:
        world["opposite"] += [(f"what is the opposite of {x}", y), (f"what is the opposite of {y}", x)]
    for i, day in enumerate(WEEKDAYS):
        world["day_after"].append((f"what day comes after {day}", WEEKDAYS[(i + 1) % 7]))
        world["day_before"].append((f"what day comes before {day}", WEEKDAYS[(i - 1) % 7]))
    world["number_after"] = [(f"what number comes after {NUMBERS[n]}", NUMBERS[n + 1]) for n in range(1, 20)]
    world["month_after"] = [(f"what month comes after {m}", MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    return world


def build_facts(seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION) -> list[dict[str, str]]:
    """Every fact of the world with its split: dicts with `fact_id, category, question, answer, fact_split`.

    Per category, `round(heldout_fraction * n)` facts (at least one) are drawn with `numpy.random.default_rng(seed)`
    as `heldout`, the rest are `train`. Fact ids (`<category>-NNN`) do not depend on the seed.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction!r}: expected a number strictly between 0 and 1.")
    rng = np.random.default_rng(seed)
    facts, seen = [], set()
    for category, pairs in _world().items():
        n_heldout = max(1, round(heldout_fraction * len(pairs)))
        heldout = set(rng.choice(len(pairs), size=n_heldout, replace=False).tolist())
        for i, (question, answer) in enumerate(pairs):
            fact_id = f"{category}-{i:03d}"
            check_text(question, f"question of {fact_id}")
            check_text(answer, f"answer of {fact_id}")
            if question in seen:  # a closed world needs one answer per question
                raise ValueError(f"question {question!r} appears twice in the world.")
            seen.add(question)
            facts.append({"fact_id": fact_id, "category": category, "question": question, "answer": answer,
                          "fact_split": "heldout" if i in heldout else "train"})
    return facts


def select_facts(facts: Sequence[dict[str, str]], max_facts: int | None) -> list[dict[str, str]]:
    """At most `max_facts` facts, both splits present (~20 % held out), spread over the categories round-robin."""
    if max_facts is None or max_facts >= len(facts):
        return list(facts)
    if max_facts < 2:
        raise ValueError(f"max_facts={max_facts}: expected at least 2 (one train and one held-out fact) or None.")
    n_heldout = max(1, round(HELDOUT_FRACTION * max_facts))
    picked: set[str] = set()
    for split, n in (("heldout", n_heldout), ("train", max_facts - n_heldout)):
        queues = [[f for f in facts if f["category"] == c and f["fact_split"] == split] for c in CATEGORIES]
        chosen: list[str] = []
        while len(chosen) < n and any(queues):
            for queue in queues:
                if queue and len(chosen) < n:
                    chosen.append(queue.pop(0)["fact_id"])
        picked.update(chosen)
    return [f for f in facts if f["fact_id"] in picked]


# ------------------------------------------------------------------------------------------------ espeak-ng


def _espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError(f"espeak-ng is not installed (needed to synthesize the corpus): run `{INSTALL_HINT}`.")
    return path


def available_voices() -> tuple[set[str], set[str]]:
    """(English language codes, variant names) that this espeak-ng can speak, from `--voices=en` / `--voices=variant`.

    Mbrola voices (files `mb/...`) are left out: they need the separate mbrola program and data.
    """
    binary = _espeak_binary()
    languages: set[str] = set()
    listing = subprocess.run([binary, "--voices=en"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 5 or parts[1] == "variant" or parts[4].startswith("mb/"):
            continue
        languages.add(parts[1])
        # "Other Languages" lists aliases as "(en 2)(en-gb 3)": `en` is spoken by the best-priority voice.
        languages.update(tok.strip("()") for tok in " ".join(parts[5:]).replace(")(", ") (").split()
                         if tok.startswith("("))
    variants: set[str] = set()
    listing = subprocess.run([binary, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines()[1:]:
        if "!v/" in line:  # the file name may contain a space ("!v/Mr serious"); aliases follow as "(en-us 5)"
            variants.add(line.split("!v/", 1)[1].split("(")[0].strip())
    return languages, variants


def validate_voices(voices: Iterable[str], available: tuple[set[str], set[str]] | None = None) -> None:
    """Raise ValueError naming each voice that is not `<language>` or `<language>+<variant>` known to espeak-ng."""
    languages, variants = available if available is not None else available_voices()
    bad = []
    for voice in voices:
        language, _, variant = voice.partition("+")
        if language not in languages or ("+" in voice and variant not in variants):
            bad.append(voice)
    if bad:
        raise ValueError(f"unknown espeak-ng voice(s) {bad}: expected <language> or <language>+<variant> with a "
                         f"language from `espeak-ng --voices=en` ({sorted(languages)}) and a variant file name from "
                         f"`espeak-ng --voices=variant` (e.g. f1..f5, m1..m8).")


def synthesize(text: str, voice: str = CANONICAL_VOICE, speed: int = CANONICAL_SPEED,
               pitch: int = CANONICAL_PITCH) -> np.ndarray:
    """Speak `text` with espeak-ng: a float32 mono waveform at 16 kHz (espeak's 22.05 kHz resampled by torchaudio).

    `voice` is not checked here (espeak-ng silently ignores an unknown variant): use `validate_voices` first.
    """
    check_text(text)
    if not (80 <= int(speed) <= 450):
        raise ValueError(f"speed={speed!r}: expected words per minute in 80..450.")
    if not (0 <= int(pitch) <= 99):
        raise ValueError(f"pitch={pitch!r}: expected 0..99.")
    command = [_espeak_binary(), "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "--stdout", text]
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed for voice={voice!r} text={text!r}: "
                           f"{result.stderr.decode(errors='replace').strip()}")
    waveform, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if waveform.ndim > 1:
        waveform = waveform.mean(axis=1)
    if rate != SAMPLING_RATE:
        waveform = torchaudio.functional.resample(torch.from_numpy(waveform), rate, SAMPLING_RATE).numpy()
    if waveform.size == 0 or not np.abs(waveform).max() > 0:
        raise RuntimeError(f"espeak-ng produced silence for voice={voice!r} text={text!r}.")
    return np.clip(waveform, -1.0, 1.0).astype(np.float32)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core: intra-op threads would only contend


def _synthesize_flac(job: tuple[str, str, int, int]) -> bytes:
    """Worker: one utterance as 16-bit FLAC bytes at 16 kHz."""
    buffer = io.BytesIO()
    sf.write(buffer, synthesize(*job), SAMPLING_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ corpus


def _prosody(seed: int, utt_id: str, wide: bool = False) -> tuple[int, int]:
    """Seeded speed and pitch of one utterance, a function of (seed, utt_id, wide) only."""
    rng = np.random.default_rng([seed, zlib.crc32(utt_id.encode())])
    speeds, pitches = (QUESTION_SPEED_RANGE, QUESTION_PITCH_RANGE) if wide else (SPEED_RANGE, PITCH_RANGE)
    return int(rng.integers(speeds[0], speeds[1] + 1)), int(rng.integers(pitches[0], pitches[1] + 1))


def _row(seed: int, fact: dict[str, str] | None, kind: str, voice: str, *, word: str = "",
         canonical: bool = False, wide: bool = False) -> dict[str, Any]:
    text = word if fact is None else fact[kind]
    utt_id = f"{kind}/{word.replace(' ', '_')}/{voice}" if fact is None else f"{fact['fact_id']}/{kind}/{voice}"
    speed, pitch = (CANONICAL_SPEED, CANONICAL_PITCH) if canonical else _prosody(seed, utt_id, wide)
    return {"utt_id": utt_id, "fact_id": fact["fact_id"] if fact else "", "category": fact["category"] if fact else "",
            "kind": kind, "text": check_text(text, f"text of {utt_id}"), "question": fact["question"] if fact else "",
            "answer": fact["answer"] if fact else "", "voice": voice, "speed": speed, "pitch": pitch,
            "canonical": canonical}


# The question frame of each one-slot category and the phrases that fill its slot in the world.
READING_FRAMES = {
    "capital": ("what is the capital of {}", tuple(country for country, _ in CAPITALS)),
    "colour": ("what colour is {}", tuple(thing for thing, _ in COLOURS)),
    "opposite": ("what is the opposite of {}", tuple(w for pair in OPPOSITES for w in pair)),
    "day_after": ("what day comes after {}", WEEKDAYS),
    "day_before": ("what day comes before {}", WEEKDAYS),
    "number_after": ("what number comes after {}", tuple(NUMBERS[1:20])),
    "month_after": ("what month comes after {}", MONTHS),
}


def reading_sentences(facts: Sequence[dict[str, str]]) -> list[str]:
    """Question-shaped sentences that ask nothing: each category's frame filled with another category's phrase.

    "what colour is france", "what is the capital of seven": every slot phrase of the world (held-out facts' included)
    heard inside the sentence frames the questions use, so a listener must read a question word by word instead of
    recognising whole utterances. None is the question of a fact (checked against `facts`), none has an answer.
    """
    questions = {f["question"] for f in facts}
    sentences = [frame.format(filler) for category, (frame, _) in READING_FRAMES.items()
                 for other, (_, fillers) in READING_FRAMES.items() if other != category for filler in fillers]
    return sorted(set(sentences) - questions)


def plan_corpus(facts: Sequence[dict[str, str]], seed: int, train_voices: Sequence[str], dev_voice: str,
                test_voice: str, question_voices: Sequence[str] = (),
                dialect_test_voice: str = DIALECT_TEST_VOICE,
                canonical_questions: bool = False, reading_voices: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The rows (without audio) of every audio split, in a fixed order.

    `reading_voices` > 0 adds `reading` rows: every `reading_sentences` sentence spoken by that many voices drawn
    (seeded, per sentence) from the training and question voices.
    """
    if not isinstance(reading_voices, int) or reading_voices < 0:
        raise ValueError(f"reading_voices={reading_voices!r}: expected an int >= 0.")
    speakers = [*train_voices, *question_voices]
    if reading_voices > len(speakers):
        raise ValueError(f"reading_voices={reading_voices} but only {len(speakers)} training and question voices.")
    train_facts = [f for f in facts if f["fact_split"] == "train"]
    heldout_facts = [f for f in facts if f["fact_split"] == "heldout"]
    train = [_row(seed, f, kind, voice) for f in train_facts for voice in train_voices
             for kind in ("question", "answer")]
    train += [_row(seed, f, "answer", CANONICAL_VOICE, canonical=True) for f in train_facts]
    if canonical_questions:  # whole sentences in the assistant's voice, for its speech decoder
        train += [_row(seed, f, "question", CANONICAL_VOICE, canonical=True) for f in train_facts]
    train += [_row(seed, f, "question", voice, wide=True) for f in train_facts for voice in question_voices]
    # Words of the whole world (held-out facts included), so held-out questions use only words heard in training.
    words = sorted({w for f in facts for w in f"{f['question']} {f['answer']}".split()})
    train += [_row(seed, None, "word", voice, word=w) for w in words for voice in train_voices]
    train += [_row(seed, None, "word", CANONICAL_VOICE, word=w, canonical=True) for w in words]
    for sentence in reading_sentences(facts) if reading_voices else ():
        rng = np.random.default_rng([seed, zlib.crc32(sentence.encode())])
        for index in sorted(rng.choice(len(speakers), size=reading_voices, replace=False).tolist()):
            train.append(_row(seed, None, "reading", speakers[index], word=sentence,
                              wide=speakers[index] in question_voices))
    return {
        "train": train,
        "validation": [_row(seed, f, "question", dev_voice) for f in heldout_facts],
        "test": [_row(seed, f, "question", test_voice) for f in heldout_facts],
        "test_seen": [_row(seed, f, "question", test_voice) for f in train_facts],
        "test_dialect": [_row(seed, f, "question", dialect_test_voice) for f in heldout_facts],
        "test_seen_dialect": [_row(seed, f, "question", dialect_test_voice) for f in train_facts],
    }


def _check_voice_roles(train_voices: Sequence[str], dev_voice: str, test_voice: str,
                       question_voices: Sequence[str] = (), dialect_test_voice: str = DIALECT_TEST_VOICE) -> None:
    if not train_voices:
        raise ValueError("train_voices is empty: expected at least one training voice.")
    heard = [*train_voices, *question_voices]
    if len(set(heard)) != len(heard):
        raise ValueError(f"train_voices + question_voices={heard} has duplicates.")
    held_out = {"test": test_voice, "dev": dev_voice, "dialect test": dialect_test_voice}
    if len(set(held_out.values())) != len(held_out):
        raise ValueError(f"the test, dev and dialect test voices {list(held_out.values())} must be different voices.")
    held_dialect = dialect_test_voice.partition("+")[0]
    for voice in heard:
        for role, held in (*held_out.items(), ("canonical", CANONICAL_VOICE)):
            variant = held.partition("+")[2]
            if voice == held or (role != "canonical" and variant and voice.partition("+")[2] == variant):
                raise ValueError(f"training voice {voice!r} is (or shares the variant of) the {role} voice "
                                 f"{held!r}: the {role} voice must never be heard in training.")
        if voice.partition("+")[0] == held_dialect:
            raise ValueError(f"training voice {voice!r} speaks the dialect of the dialect test voice "
                             f"{dialect_test_voice!r}: that dialect must never be heard in training.")


def build_corpus(seed: int = 0, max_facts: int | None = None, train_voices: Sequence[str] = TRAIN_VOICES,
                 dev_voice: str = DEV_VOICE, test_voice: str = TEST_VOICE, num_workers: int = 2,
                 heldout_fraction: float = HELDOUT_FRACTION, progress: bool = True,
                 question_voices: Sequence[str] = QUESTION_VOICES,
                 dialect_test_voice: str = DIALECT_TEST_VOICE,
                 canonical_questions: bool = False, reading_voices: int = 0) -> datasets.DatasetDict:
    """Synthesize the corpus: a DatasetDict with `facts` and the audio splits of `AUDIO_SPLITS` (module doc).

    `num_workers` processes synthesize in parallel (0: in this process); the result does not depend on it.
    Raises RuntimeError when espeak-ng is missing and ValueError for unknown voices or voice roles that leak.
    """
    import datasets

    train_voices, question_voices = list(train_voices), list(question_voices)
    _check_voice_roles(train_voices, dev_voice, test_voice, question_voices, dialect_test_voice)
    validate_voices([*train_voices, *question_voices, dev_voice, test_voice, dialect_test_voice, CANONICAL_VOICE])
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: expected 0 (in process) or more.")
    facts = select_facts(build_facts(seed, heldout_fraction), max_facts)
    plan = plan_corpus(facts, seed, train_voices, dev_voice, test_voice, question_voices, dialect_test_voice,
                       canonical_questions, reading_voices)
    rows = [row for split in AUDIO_SPLITS for row in plan[split]]
    jobs = [(row["text"], row["voice"], row["speed"], row["pitch"]) for row in rows]
    bar = tqdm(total=len(jobs), desc="espeak-ng", unit="utt", disable=not progress)
    if num_workers == 0:
        flacs = []
        for job in jobs:
            flacs.append(_synthesize_flac(job))
            bar.update()
    else:
        # spawn, not fork: forking a process that has run torch can deadlock its thread pools.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker) as pool:
            flacs = []
            for flac in pool.map(_synthesize_flac, jobs, chunksize=16):
                flacs.append(flac)
                bar.update()
    bar.close()
    for row, flac in zip(rows, flacs, strict=True):
        row["audio"] = {"bytes": flac, "path": None}

    # Built as a plain struct, then cast: datasets 5.2 *encodes* Audio values through torchcodec, a cast needs none.
    row_features = datasets.Features({
        **{c: datasets.Value("string") for c in ROW_COLUMNS[:8]},
        "speed": datasets.Value("int32"), "pitch": datasets.Value("int32"), "canonical": datasets.Value("bool"),
        "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
    })
    splits = {"facts": datasets.Dataset.from_dict({c: [f[c] for f in facts] for c in FACT_COLUMNS})}
    for split in AUDIO_SPLITS:
        data = datasets.Dataset.from_dict({c: [row[c] for row in plan[split]] for c in ROW_COLUMNS},
                                          features=row_features)
        splits[split] = data.cast_column("audio", datasets.Audio(sampling_rate=SAMPLING_RATE))
    return datasets.DatasetDict(splits)


# ------------------------------------------------------------------------------------------------ readers


def load_corpus(path: str | Path) -> datasets.DatasetDict:
    """Load a saved corpus with every audio column cast to `Audio(decode=False)` (read rows with `load_audio`)."""
    import datasets

    corpus = datasets.load_from_disk(str(path))
    if not isinstance(corpus, datasets.DatasetDict):
        raise ValueError(f"path={str(path)!r} holds a {type(corpus).__name__}, expected the corpus' DatasetDict.")
    return datasets.DatasetDict({name: split.cast_column("audio", _undecoded()) if "audio" in split.column_names
                                 else split for name, split in corpus.items()})


def load_audio(row: dict[str, Any]) -> tuple[np.ndarray, int]:
    """A corpus row's audio (or the audio value itself) as (float32 mono waveform, sampling rate), via soundfile.

    Accepts undecoded `Audio(decode=False)` values `{"bytes", "path"}` and `{"array", "sampling_rate"}` dicts.
    """
    value = row.get("audio", row) if isinstance(row, dict) else row
    if not isinstance(value, dict):
        raise TypeError(f"expected a corpus row or an audio dict, got {type(value).__name__} (cast the column to "
                        f"datasets.Audio(decode=False): decoding needs torchcodec).")
    if value.get("array") is not None:
        waveform, rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
    elif value.get("bytes") is not None:
        waveform, rate = sf.read(io.BytesIO(value["bytes"]), dtype="float32")
    elif value.get("path") is not None:
        waveform, rate = sf.read(value["path"], dtype="float32")
    else:
        raise ValueError(f"audio value with keys {sorted(value)} has neither array, bytes nor path.")
    return (waveform.mean(axis=1) if waveform.ndim > 1 else waveform), int(rate)


def summarize(corpus: datasets.DatasetDict, seconds: float | None = None) -> dict[str, Any]:
    """Counts of the corpus: facts per split and category, utterances and hours of audio per split, voices."""
    facts = corpus["facts"]
    summary: dict[str, Any] = {"facts": {}, "utterances": {}, "utterances_by_kind": {}, "hours": {}}
    for split in ("train", "heldout"):
        counts = Counter(c for c, s in zip(facts["category"], facts["fact_split"]) if s == split)
        summary["facts"][split] = {**{c: counts[c] for c in CATEGORIES if counts[c]}, "total": sum(counts.values())}
    total_seconds = 0.0
    for split in AUDIO_SPLITS:
        data = corpus[split]
        audio = data.cast_column("audio", _undecoded())["audio"]
        split_seconds = sum(sf.info(io.BytesIO(a["bytes"])).duration for a in audio)
        total_seconds += split_seconds
        summary["utterances"][split] = len(data)
        summary["utterances_by_kind"][split] = dict(sorted(Counter(data["kind"]).items()))
        summary["hours"][split] = round(split_seconds / 3600, 3)
    summary["hours"]["total"] = round(total_seconds / 3600, 3)
    train = corpus["train"]
    summary["distinct_words"] = len({t for t, k in zip(train["text"], train["kind"]) if k == "word"})
    summary["voices"] = {split: sorted(set(corpus[split]["voice"])) for split in AUDIO_SPLITS}
    if seconds is not None:
        summary["seconds"] = round(seconds, 1)
    return summary


def _undecoded():
    import datasets

    return datasets.Audio(sampling_rate=SAMPLING_RATE, decode=False)


# ------------------------------------------------------------------------------------------------ CLI


def save_corpus(corpus: datasets.DatasetDict, output: str | Path, overwrite: bool = False) -> None:
    """Save atomically: written next to `output`, then renamed; an existing corpus is replaced only with overwrite."""
    output = Path(output)
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"output={str(output)!r} exists: pass --overwrite to replace it.")
        if not (output / "dataset_dict.json").is_file():  # never delete a folder that is not a saved corpus
            raise FileExistsError(f"output={str(output)!r} exists and is not a saved DatasetDict: remove it yourself.")
    tmp = output.with_name(f"{output.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    output.parent.mkdir(parents=True, exist_ok=True)
    corpus.save_to_disk(str(tmp))
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


@dataclass
class SynthesizeEspeakArguments:
    """Flags of `processing/synthesize_espeak.py` (see the module docstring)."""

    output: str | None = field(default=None, metadata={"help": "Directory for DatasetDict.save_to_disk (required)."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out facts and of every utterance's prosody."})
    max_facts: int | None = field(default=None, metadata={"help": "Keep only this many facts (quick tests)."})
    voices: list[str] = field(default_factory=lambda: list(TRAIN_VOICES), metadata={"help": "Training voices."})
    question_voices: list[str] = field(default_factory=lambda: list(QUESTION_VOICES), metadata={
        "help": "Voices that speak only the train-fact questions ('none': no question voices)."})
    dev_voice: str = field(default=DEV_VOICE, metadata={"help": "Voice of the validation split."})
    test_voice: str = field(default=TEST_VOICE, metadata={"help": "Voice of the test and test_seen splits."})
    dialect_test_voice: str = field(default=DIALECT_TEST_VOICE, metadata={
        "help": "Voice of the test_dialect / test_seen_dialect splits: its dialect and variant are never used in "
                "training."})
    heldout_fraction: float = field(default=HELDOUT_FRACTION, metadata={
        "help": "Fraction of each category's facts held out of speech."})
    canonical_questions: bool = field(default=False, metadata={
        "help": "The canonical (assistant) voice also asks every train-fact question, at its own prosody: whole "
                "sentences for training its speech decoder (which otherwise hears it say single words only)."})
    reading_voices: int = field(default=0, metadata={
        "help": "Speak every reading sentence (a question frame filled with another category's phrase, e.g. 'what "
                "colour is france': no fact, no answer) with this many voices drawn from the training and question "
                "voices; 0: none."})
    num_workers: int = field(default=2, metadata={"help": "espeak-ng worker processes (0: in this process)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing corpus at --output."})
    progress: bool = field(default=True, metadata={"help": "Progress bar (--no_progress: none)."})
    # The package's THREADS_HELP is not imported for this: the spawned synthesis workers import this module and
    # need none of the package.
    threads: int | None = field(default=None, metadata={
        "metavar": "N", "help": "torch CPU threads of this process (default: modeling_moss_speech.threads' policy); "
                                "each espeak-ng worker process uses one."})

    def __post_init__(self) -> None:
        from modeling_moss_speech.apps.script_utils import none_means_empty

        if self.output is None:
            raise ValueError("--output is required.")
        self.question_voices = none_means_empty(self.question_voices)


def make_parser() -> Any:
    """The command-line parser (`--config file.yaml` and the flags of `SynthesizeEspeakArguments`)."""
    from modeling_moss_speech.apps.script_utils import ScriptArgumentParser

    return ScriptArgumentParser(SynthesizeEspeakArguments, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point: build, save and print the JSON summary (also returned)."""
    from modeling_moss_speech.threads import set_threads

    (args,) = make_parser().parse_args_and_config(argv)
    set_threads(args.threads)
    if Path(args.output).exists() and not args.overwrite:  # fail before minutes of synthesis, not after
        raise FileExistsError(f"--output {args.output} exists: pass --overwrite to replace it.")
    start = time.perf_counter()
    corpus = build_corpus(seed=args.seed, max_facts=args.max_facts, train_voices=args.voices,
                          dev_voice=args.dev_voice, test_voice=args.test_voice, num_workers=args.num_workers,
                          question_voices=args.question_voices, dialect_test_voice=args.dialect_test_voice,
                          heldout_fraction=args.heldout_fraction, progress=args.progress,
                          canonical_questions=args.canonical_questions, reading_voices=args.reading_voices)
    save_corpus(corpus, args.output, overwrite=args.overwrite)
    summary = {"output": str(args.output), "seed": args.seed, **summarize(corpus, time.perf_counter() - start)}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, ValueError, FileExistsError) as error:
        sys.exit(f"error: {error}")

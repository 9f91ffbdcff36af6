"""processing/synthesize_espeak.py: the closed world of facts, and a tiny real espeak-ng corpus built and read back.

espeak-ng is installed by the README's test command (`apt-get install -y espeak-ng sox`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

PROCESSING = Path(__file__).resolve().parents[1] / "processing"
if str(PROCESSING) not in sys.path:  # importable by name, so the synthesis pool's spawned workers can import it too
    sys.path.insert(0, str(PROCESSING))

import synthesize_espeak as se  # noqa: E402

TRAIN_VOICES = ["en-us+f1", "en-gb+m3"]
QUESTION_VOICES = ["en-gb-scotland+Andy"]
MAX_FACTS = 6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 6-fact, 2-voice corpus made through the CLI with the 2-process pool, loaded back."""
    output = tmp_path_factory.mktemp("corpus") / "corpus"
    summary = se.main(["--output", str(output), "--seed", "3", "--max_facts", str(MAX_FACTS), "--voices",
                       *TRAIN_VOICES, "--question_voices", *QUESTION_VOICES, "--num_workers", "2",
                       "--no_progress"])
    return summary, se.load_corpus(output)


def test_world_of_facts():
    facts = se.build_facts(0)
    counts = Counter(f["category"] for f in facts)
    assert counts == {"addition": 60, "subtraction": 45, "capital": 25, "colour": 20, "opposite": 60,
                      "day_after": 7, "day_before": 7, "number_after": 19, "month_after": 12}
    assert len({f["question"] for f in facts}) == len({f["fact_id"] for f in facts}) == len(facts)
    for f in facts:
        assert set(f["question"] + f["answer"]) <= set(se.ALPHABET)
    by_id = {f["fact_id"]: f for f in facts}
    assert (by_id["addition-000"]["question"], by_id["addition-000"]["answer"]) == ("what is one plus one", "two")
    assert {f["answer"] for f in facts if f["question"] == "what day comes after sunday"} == {"monday"}
    for category, n in counts.items():  # ~20 % held out in every category, at least one
        held = sum(f["fact_split"] == "heldout" for f in facts if f["category"] == category)
        assert held == max(1, round(0.2 * n))
    assert se.build_facts(0) == facts  # deterministic
    assert [f["fact_split"] for f in se.build_facts(1)] != [f["fact_split"] for f in facts]


def test_tiny_corpus_splits(built):
    summary, corpus = built
    assert set(corpus) == {"facts", "train", "validation", "test", "test_seen", "test_dialect", "test_seen_dialect"}
    assert corpus["facts"].column_names == list(se.FACT_COLUMNS)
    for split in se.AUDIO_SPLITS:
        assert corpus[split].column_names == list(se.ROW_COLUMNS)
    facts = {f["fact_id"]: f for f in corpus["facts"]}
    assert len(facts) == MAX_FACTS
    train_ids = {i for i, f in facts.items() if f["fact_split"] == "train"}
    heldout_ids = set(facts) - train_ids
    assert train_ids and heldout_ids

    train = corpus["train"].remove_columns("audio").to_list()
    spoken = [r for r in train if r["kind"] != "word"]
    assert {r["fact_id"] for r in spoken} == train_ids  # held-out facts are never spoken in training...
    words = {(r["text"], r["voice"]) for r in train if r["kind"] == "word"}
    for fact_id in heldout_ids:  # ...but all their words are, by every training voice and the canonical voice
        for word in f"{facts[fact_id]['question']} {facts[fact_id]['answer']}".split():
            for voice in [*TRAIN_VOICES, se.CANONICAL_VOICE]:
                assert (word, voice) in words
    assert {r["voice"] for r in train} == {*TRAIN_VOICES, *QUESTION_VOICES, se.CANONICAL_VOICE}
    asking = [r for r in train if r["voice"] in QUESTION_VOICES]  # question voices only ask, with wider prosody
    assert {r["kind"] for r in asking} == {"question"} and {r["fact_id"] for r in asking} == train_ids
    assert all(110 <= r["speed"] <= 210 and 15 <= r["pitch"] <= 90 for r in asking)
    canonical = [r for r in train if r["canonical"]]
    assert all((r["voice"], r["speed"], r["pitch"]) == ("en-us", 160, 50) for r in canonical)
    assert {r["fact_id"] for r in canonical if r["kind"] == "answer"} == train_ids
    assert all(r["kind"] in ("answer", "word") for r in canonical)
    for r in spoken:
        assert r["text"] == r[r["kind"]] and r["question"] == facts[r["fact_id"]]["question"]
    assert len(spoken) == len(train_ids) * (2 * len(TRAIN_VOICES) + 1 + len(QUESTION_VOICES))
    non_canonical = [r for r in train if not r["canonical"] and r["voice"] not in QUESTION_VOICES]
    assert all(130 <= r["speed"] <= 190 and 30 <= r["pitch"] <= 70 for r in non_canonical)
    assert len({(r["speed"], r["pitch"]) for r in non_canonical}) > len(non_canonical) // 2  # really varied

    for split, voice, ids in (("validation", se.DEV_VOICE, heldout_ids), ("test", se.TEST_VOICE, heldout_ids),
                              ("test_seen", se.TEST_VOICE, train_ids),
                              ("test_dialect", se.DIALECT_TEST_VOICE, heldout_ids),
                              ("test_seen_dialect", se.DIALECT_TEST_VOICE, train_ids)):
        rows = corpus[split].remove_columns("audio").to_list()
        assert {r["fact_id"] for r in rows} == ids and len(rows) == len(ids)
        assert {(r["kind"], r["voice"], r["canonical"]) for r in rows} == {("question", voice, False)}
    assert len({r["utt_id"] for split in se.AUDIO_SPLITS for r in corpus[split]}) == sum(
        len(corpus[s]) for s in se.AUDIO_SPLITS)

    assert summary["facts"]["train"]["total"] == len(train_ids)
    assert summary["utterances"] == {s: len(corpus[s]) for s in se.AUDIO_SPLITS}
    assert summary["hours"]["total"] > 0
    json.dumps(summary)


def test_tiny_corpus_audio(built):
    _, corpus = built
    for split in se.AUDIO_SPLITS:
        for row in corpus[split]:
            waveform, rate = se.load_audio(row)
            assert rate == 16_000 and waveform.dtype == np.float32 and waveform.ndim == 1
            seconds = len(waveform) / rate
            words = len(row["text"].split())
            assert 0.2 < seconds < 0.6 + 0.8 * words, (row["utt_id"], seconds)
            assert np.sqrt(np.mean(waveform**2)) > 0.01, row["utt_id"]
    first = corpus["test"][0]
    assert first["audio"]["path"] is None and first["audio"]["bytes"][:4] == b"fLaC"


def test_deterministic_in_process(built):
    """The same seed gives the same facts, splits, prosody and audio bytes, with or without the worker pool."""
    _, corpus = built
    facts = se.select_facts(se.build_facts(3), MAX_FACTS)
    assert facts == corpus["facts"].to_list()
    plan = se.plan_corpus(facts, 3, TRAIN_VOICES, se.DEV_VOICE, se.TEST_VOICE, QUESTION_VOICES)
    for split in se.AUDIO_SPLITS:
        rows = corpus[split].to_list()
        assert [{k: v for k, v in r.items() if k != "audio"} for r in rows] == plan[split]
        for row in rows[:4]:  # re-synthesized in this process: byte-identical FLAC
            job = (row["text"], row["voice"], row["speed"], row["pitch"])
            assert se._synthesize_flac(job) == row["audio"]["bytes"], row["utt_id"]


def test_synthesize_and_checks(monkeypatch):
    waveform = se.synthesize("what is two plus two", "en-gb+f3", 170, 40)
    assert waveform.dtype == np.float32 and 0.5 < len(waveform) / 16_000 < 3.0
    np.testing.assert_array_equal(waveform, se.synthesize("what is two plus two", "en-gb+f3", 170, 40))
    with pytest.raises(ValueError, match="CTC alphabet"):
        se.synthesize("What is 2 plus 2?")
    with pytest.raises(ValueError, match="unknown espeak-ng voice"):
        se.validate_voices(["en-us+f1", "en+nosuchvariant", "xx-yy"])
    with pytest.raises(ValueError, match="test voice"):
        se.build_corpus(max_facts=4, train_voices=["en-gb+f4"], progress=False)
    with pytest.raises(ValueError, match="dev voice"):
        se.build_corpus(max_facts=4, train_voices=["en-us+m2"], progress=False)
    with pytest.raises(ValueError, match="dialect test voice"):  # its variant...
        se.build_corpus(max_facts=4, question_voices=["en-us+Annie"], progress=False)
    with pytest.raises(ValueError, match="dialect of the dialect test voice"):  # ...and its dialect are held out
        se.build_corpus(max_facts=4, question_voices=["en-gb-x-gbcwmd+Andy"], progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        se.build_corpus(max_facts=4, train_voices=["en-us+f1"], question_voices=["en-us+f1"], progress=False)
    with pytest.raises(ValueError, match="max_facts"):
        se.select_facts(se.build_facts(0), 1)
    monkeypatch.setattr(se.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
        se.synthesize("hello")


def test_canonical_questions_add_only_train_fact_sentences_in_the_assistant_voice():
    facts = se.build_facts(0)
    plain = se.plan_corpus(facts, 0, TRAIN_VOICES, se.DEV_VOICE, se.TEST_VOICE)
    more = se.plan_corpus(facts, 0, TRAIN_VOICES, se.DEV_VOICE, se.TEST_VOICE, canonical_questions=True)
    added = [row for row in more["train"] if row not in plain["train"]]
    train_facts = {f["fact_id"] for f in facts if f["fact_split"] == "train"}
    assert len(added) == len(train_facts) == len(more["train"]) - len(plain["train"])
    assert {row["fact_id"] for row in added} == train_facts  # held-out facts are never spoken
    assert all(row["kind"] == "question" and row["voice"] == se.CANONICAL_VOICE and row["canonical"]
               and (row["speed"], row["pitch"]) == (se.CANONICAL_SPEED, se.CANONICAL_PITCH) for row in added)
    assert all(more[split] == plain[split] for split in se.AUDIO_SPLITS if split != "train")


def test_reading_sentences_use_every_slot_phrase_and_ask_no_fact():
    facts = se.build_facts(0)
    sentences = se.reading_sentences(facts)
    questions = {f["question"] for f in facts}
    assert sentences and not set(sentences) & questions
    heard = " ".join(sentences)
    for phrase in {p for _, fillers in se.READING_FRAMES.values() for p in fillers}:
        assert f" {phrase}" in heard, phrase  # held-out facts' phrases included
    assert "what colour is france" in sentences and "what is the capital of france" not in sentences

    plain = se.plan_corpus(facts, 0, TRAIN_VOICES, se.DEV_VOICE, se.TEST_VOICE, QUESTION_VOICES)
    more = se.plan_corpus(facts, 0, TRAIN_VOICES, se.DEV_VOICE, se.TEST_VOICE, QUESTION_VOICES, reading_voices=2)
    added = more["train"][len(plain["train"]):]
    assert more["train"][:len(plain["train"])] == plain["train"]
    assert all(more[split] == plain[split] for split in se.AUDIO_SPLITS if split != "train")
    assert len(added) == 2 * len(sentences) and {row["kind"] for row in added} == {"reading"}
    assert all(row["fact_id"] == "" and row["answer"] == "" and row["voice"] in (*TRAIN_VOICES, *QUESTION_VOICES)
               for row in added)
    by_sentence: dict[str, set[str]] = {}
    for row in added:
        by_sentence.setdefault(row["text"], set()).add(row["voice"])
    assert set(by_sentence) == set(sentences) and all(len(v) == 2 for v in by_sentence.values())
    assert len({v for vs in by_sentence.values() for v in vs}) > 2  # drawn per sentence, not one fixed pair
    again = se.plan_corpus(facts, 0, TRAIN_VOICES, se.DEV_VOICE, se.TEST_VOICE, QUESTION_VOICES, reading_voices=2)
    assert again == more
    for bad in (-1, 1.5, len(TRAIN_VOICES) + len(QUESTION_VOICES) + 1):
        with pytest.raises(ValueError, match="reading_voices"):
            se.plan_corpus(facts, 0, TRAIN_VOICES, se.DEV_VOICE, se.TEST_VOICE, QUESTION_VOICES, reading_voices=bad)

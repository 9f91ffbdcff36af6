"""`moss-speech eval`: scoring, corpus loading, and exact accuracies from a tiny model whose answers are forced.

A tiny corpus is built in a temporary directory: five spoken questions (tones whose lengths make 7..11 codes,
one at 22.05 kHz) about four facts. An oracle wraps `generate`: it recognises each prompt (a speech question by its
number of codes, a text question by its tokens) and forces a planned answer through per-channel logits processors,
right for some questions and wrong for others. Stand-ins for the independent recogniser (`IndependentRecognizer.
recognize`; its grammar is still built from the corpus) and for the codec's CTC recogniser (`transcribe`) hear a
waveform by its length: n codes decode to n × 80 ms of speech, so a spoken answer of n codes is heard as the word
planned for n; the CTC stand-in also mishears some decoded speech, so the two columns differ. Every accuracy is then
known exactly.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import (
    EOSP,
    IM_END,
    MODALITY_PAD,
    PAD,
    SOSP,
    ForceAt,
    ctc_config,
    tiny_codec_config,
    tiny_config,
    tiny_tokenizer,
    tone,
)
from transformers import LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechFeatureExtractor, MossSpeechForCausalLM
from modeling_moss_speech.apps.cli.main import build_parser, main
from modeling_moss_speech.apps.evaluation import (
    SCHEMA,
    TASKS,
    EvalSplit,
    Fact,
    IndependentRecognizer,
    character_error_rate,
    edit_distance,
    evaluate,
    format_table,
    load_eval_split,
    normalize_answer,
    score_answers,
    transcription_scores,
    word_error_rate,
)
from modeling_moss_speech.feature_extraction_moss_speech import prepare_waveforms
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor

FACTS = {  # fact_id: (category, question, answer)
    "add_1": ("addition", "what is two plus three", "five"),
    "add_2": ("addition", "what is one plus one", "two"),
    "cap_1": ("capital", "what is the capital of france", "paris"),
    "col_1": ("color", "what color is the sea", "blue"),
}
# utt_id, fact_id, seconds, sampling rate, spoken text; ceil(seconds × 12.5) codes = 7, 8, 9, 10, 11.
QUESTIONS = [
    ("q0", "add_1", 0.50, 16000, "what is two plus three"),
    ("q1", "add_2", 0.60, 16000, "what is one plus one"),
    ("q2", "cap_1", 0.70, 16000, "what is the capital of france"),
    ("q3", "col_1", 0.78, 16000, "what color is the sea"),
    ("q4", "add_1", 0.85, 22050, "What is two plus THREE?"),
]
CODES_OF = {"q0": 7, "q1": 8, "q2": 9, "q3": 10, "q4": 11}
WORD_CODES = {"no": 1, "five": 2, "two": 3, "paris": 4, "blue": 5}  # a spoken answer of n codes is heard as...
HEARD = {n: word for word, n in WORD_CODES.items()} | {
    7: "what is two plus three", 8: "what is one plus one", 9: "what is the capital of paris",  # q2 misheard
    10: "what color is the sea", 11: "what is two plus three"}
HEARD_AFTER_CODEC = {10: "what color is the",  # the CTC head mishears q3 once encoded and decoded,
                     4: "pairs"}  # and the decoded spoken answer "paris" (the independent recogniser hears both)
FRAME = 1280  # samples of one code (80 ms) at 16 kHz

ANSWERS = {
    "s2t": {"q0": "five", "q1": "two", "q2": "the sea", "q3": "blue", "q4": "three"},         # 3 / 5
    "s2s": {"q0": "five", "q1": "no", "q2": "paris", "q3": "blue", "q4": "five"},             # 4 / 5
    "t2s": {"add_1": "five", "add_2": "two", "cap_1": "no", "col_1": ""},                     # 2 / 4 ("": no speech)
    "t2t": {"add_1": "five", "add_2": "three", "cap_1": "Paris!", "col_1": "blue"},           # 3 / 4
    "baseline": {"add_1": "five", "add_2": "two", "cap_1": "paris", "col_1": "blue"},         # 4 / 4
}
EXPECTED = {"s2t": (3, 5), "s2s": (4, 5), "t2s": (2, 4), "t2t": (3, 4)}  # spoken answers: independent score


# ---------------------------------------------------------------------------------------------- scoring


def test_normalize_answer():
    assert normalize_answer("  Seven!\n") == "seven"
    assert normalize_answer("Buenos   Aires.") == "buenos aires"
    assert normalize_answer("what's\tthe DAY-after 3 ") == "whats the dayafter"
    assert normalize_answer("Évian") == "évian"
    assert normalize_answer("!!") == ""
    with pytest.raises(TypeError, match="must be a str"):
        normalize_answer(None)


def test_edit_distance_and_character_error_rate():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("abc", "abc") == 0
    assert edit_distance(["a", "b"], ["b"]) == 1
    # Corpus-level: (1 + 0) edits over 4 + 3 normalised reference characters; case and punctuation do not count.
    assert character_error_rate(["blue", "Red!"], ["blur", "red"]) == pytest.approx(1 / 7)
    assert character_error_rate(["", ""], ["", ""]) == 0.0
    assert character_error_rate([""], ["x"]) == 1.0
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        character_error_rate(["a", "b"], ["a"])


def test_word_error_rate_and_transcription_scores():
    # One substituted word of 2 + 1 reference words; normalisation as for the CER.
    assert word_error_rate(["the red", "Blue!"], ["the bed", "blue"]) == pytest.approx(1 / 3)
    assert word_error_rate([""], [""]) == 0.0 and word_error_rate([""], ["x"]) == 1.0
    with pytest.raises(TypeError, match="lists of strings"):
        word_error_rate("abc", "abd")
    scores = transcription_scores(["red blue", "it's green"], ["Red  blue.", "its gren"])
    assert scores["correct"] == 1 and scores["total"] == 2 and scores["accuracy"] == 0.5
    # The apostrophe is dropped by the normalisation, so "it's" == "its"; "gren" misses one of 8 + 9 characters.
    assert scores["cer"] == pytest.approx(1 / 17) and scores["wer"] == pytest.approx(1 / 4)
    assert transcription_scores([], [])["accuracy"] is None


def test_score_answers_counts_categories_and_keeps_examples():
    records = [{"id": str(i), "category": "even" if i % 2 == 0 else "odd", "reference": "yes",
                "prediction": "Yes." if i < 3 else "no"} for i in range(5)]
    out = score_answers(records, num_examples=2)
    assert (out["correct"], out["total"], out["accuracy"]) == (3, 5, 0.6)
    assert out["by_category"] == {"even": {"correct": 2, "total": 3, "accuracy": 2 / 3},
                                  "odd": {"correct": 1, "total": 2, "accuracy": 0.5}}
    assert [r["id"] for r in out["examples"]] == ["0", "1"] and all(r["correct"] for r in out["examples"])
    assert [r["id"] for r in out["errors"]] == ["3", "4"] and not any(r["correct"] for r in out["errors"])
    assert score_answers([])["accuracy"] is None


# ------------------------------------------------------------------------------------------------ corpus


def _wav_bytes(wave: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def build_corpus(root: Path) -> Path:
    """A DatasetDict like processing/synthesize_espeak.py writes: facts, and a test split with non-question rows."""
    from datasets import Audio, Dataset, DatasetDict, Features, Value

    columns = ("utt_id", "fact_id", "category", "kind", "text", "question", "answer", "voice")
    rows = {name: [] for name in (*columns, "audio")}

    def add(utt_id, fact_id, kind, text, seconds, rate, voice="en-us+f4"):
        category, question, answer = FACTS.get(fact_id, ("", "", ""))
        for name, value in zip(columns, (utt_id, fact_id, category, kind, text, question, answer, voice)):
            rows[name].append(value)
        wave = tone(seconds, rate=rate, seed=len(rows["audio"])).numpy()
        rows["audio"].append({"bytes": _wav_bytes(wave, rate), "path": None})

    add("a0", "add_1", "answer", "five", 0.4, 16000, voice="en-us")  # answers and words are not questions
    for utt_id, fact_id, seconds, rate, text in QUESTIONS:
        add(utt_id, fact_id, "question", text, seconds, rate, voice="en+f3" if utt_id == "q4" else "en-us+f4")
        if utt_id == "q1":
            add("w0", "", "word", "blue", 0.3, 16000)
    # Built as a plain struct, then cast (as the synthesis script does): datasets encodes Audio values with torchcodec.
    features = Features({**{name: Value("string") for name in columns},
                         "audio": {"bytes": Value("binary"), "path": Value("string")}})
    facts = Dataset.from_dict({"fact_id": list(FACTS), "category": [v[0] for v in FACTS.values()],
                               "question": [v[1] for v in FACTS.values()], "answer": [v[2] for v in FACTS.values()],
                               "fact_split": ["heldout"] * len(FACTS)})
    audio = Audio(sampling_rate=16000)
    corpus = DatasetDict({
        "facts": facts,
        "test": Dataset.from_dict(rows, features=features).cast_column("audio", audio),
        "broken": Dataset.from_dict({"utt_id": ["x"], "kind": ["question"]}),
        "answers_only": Dataset.from_dict({k: v[:1] for k, v in rows.items()}, features=features).cast_column(
            "audio", audio),
    })
    corpus.save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


def test_load_eval_split(corpus):
    data = load_eval_split(corpus, "test")
    assert [q.utt_id for q in data.questions] == [q[0] for q in QUESTIONS]
    assert [f.fact_id for f in data.facts] == ["add_1", "add_2", "cap_1", "col_1"]  # q4 asks add_1 again
    assert data.facts[2] == Fact("cap_1", "capital", "what is the capital of france", "paris")
    q4 = data.questions[4]
    assert (q4.sampling_rate, q4.voice, q4.text, q4.category) == (22050, "en+f3", "What is two plus THREE?", "addition")
    assert q4.waveform.dtype == np.float32 and q4.waveform.ndim == 1
    assert q4.waveform.size == round(0.85 * 22050)
    small = load_eval_split(corpus, "test", max_examples=2)
    assert [q.utt_id for q in small.questions] == ["q0", "q1"]
    assert [f.fact_id for f in small.facts] == ["add_1", "add_2"]


@pytest.mark.parametrize("split, kwargs, error, message", [
    ("nope", {}, ValueError, r"split 'nope' is not in corpus .*\['answers_only', 'broken', 'facts', 'test'\]"),
    ("broken", {}, ValueError, r"lacks the columns \['fact_id', 'text', 'question', 'answer', 'audio'\]"),
    ("answers_only", {}, ValueError, "has no spoken questions"),
    ("test", {"max_examples": 0}, ValueError, "max_examples must be an integer >= 1"),
])
def test_load_eval_split_errors(corpus, split, kwargs, error, message):
    with pytest.raises(error, match=message):
        load_eval_split(corpus, split, **kwargs)


def test_load_eval_split_needs_a_corpus_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_split(tmp_path / "missing")


# ------------------------------------------------------------------------------------ controlled answers


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i:i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def _fact_of(text_ids: list[int], tokenizer) -> str:
    found = [fid for fid, (_, q, _) in FACTS.items() if _contains(text_ids, tokenizer(q, add_special_tokens=False)
                                                                    ["input_ids"])]
    assert len(found) == 1, found
    return found[0]


def _text_plan(row: int, answer: str, tokenizer, first_step: int = 1) -> dict[tuple[int, int], int]:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [IM_END]
    return {(row, first_step + i): token for i, token in enumerate(ids)}


def _codes_heard(wave, sampling_rate: int) -> tuple[int, bool]:
    """(codes a waveform is long, whether it is decoded speech: a whole number of codes) at any rate."""
    frames = len(wave) * 16000 / sampling_rate / FRAME
    return math.ceil(frames - 1e-9), abs(frames - round(frames)) < 1e-9


def oracle(monkeypatch, calls: list) -> None:
    """Patch both models' generate so that every prompt gets its planned answer (see the module docstring)."""
    tokenizer = tiny_tokenizer()
    utt_of_codes = {n: utt for utt, n in CODES_OF.items()}
    speech_generate, text_generate = MossSpeechForCausalLM.generate, Qwen3ForCausalLM.generate

    def generate(self, input_ids, attention_mask=None, **kwargs):
        prompt_length = input_ids.shape[1]
        text_plan, audio_plan = {}, {}
        for row, grid in enumerate(input_ids.tolist()):
            codes = sum(1 for text_id, audio_id in grid if text_id == MODALITY_PAD and audio_id < EOSP)
            speech_out = grid[-1][0] == SOSP
            key = utt_of_codes[codes] if codes else _fact_of([text_id for text_id, _ in grid], tokenizer)
            mode = ("s2" if codes else "t2") + ("s" if speech_out else "t")
            answer = ANSWERS[mode][key]
            if speech_out:
                n = WORD_CODES.get(answer, 0)
                audio_plan.update({(row, step): 5 for step in range(1, n + 1)})
                audio_plan[(row, n + 1)] = EOSP
                text_plan[(row, n + 2)] = IM_END
            else:
                text_plan.update(_text_plan(row, answer, tokenizer))
            calls.append((mode, key))
        calls.append(("kwargs", kwargs))
        return speech_generate(self, input_ids, attention_mask=attention_mask,
                               text_logits_processor=[ForceAt(prompt_length, text_plan)],
                               audio_logits_processor=[ForceAt(prompt_length, audio_plan)], **kwargs)

    def baseline_generate(self, input_ids=None, attention_mask=None, **kwargs):
        plan = {}
        for row, ids in enumerate(input_ids.tolist()):
            key = _fact_of(ids, tokenizer)
            plan.update(_text_plan(row, ANSWERS["baseline"][key], tokenizer))
            calls.append(("baseline", key))
        return text_generate(self, input_ids=input_ids, attention_mask=attention_mask,
                             logits_processor=LogitsProcessorList([ForceAt(input_ids.shape[1], plan)]), **kwargs)

    def transcribe(self, audio, sampling_rate=None, batch_size=32):
        assert sampling_rate == 16000
        texts = []
        for wave in audio if isinstance(audio, list) else [audio]:
            n, decoded = _codes_heard(wave, 16000)
            texts.append(HEARD_AFTER_CODEC.get(n, HEARD.get(n, "")) if decoded else HEARD.get(n, ""))
        return texts

    def recognize(self, waveform, sampling_rate):
        n, _ = _codes_heard(waveform, sampling_rate)
        heard = HEARD.get(n, "")  # a closed grammar hears its own phrases only, else nothing
        return heard if normalize_answer(heard) in {normalize_answer(p) for p in self.vocabulary} else ""

    monkeypatch.setattr(MossSpeechForCausalLM, "generate", generate)
    monkeypatch.setattr(Qwen3ForCausalLM, "generate", baseline_generate)
    def transcribe_codes(self, codes, lengths=None):
        return [HEARD.get(len(c), "") for c in codes]

    monkeypatch.setattr(IndependentRecognizer, "recognize", recognize)
    monkeypatch.setattr(MossSpeechCodecModel, "transcribe", transcribe, raising=False)
    monkeypatch.setattr(MossSpeechCodecModel, "transcribe_codes", transcribe_codes, raising=False)
    monkeypatch.setattr(MossSpeechCodecModel, "can_transcribe", property(lambda self: True), raising=False)


def tiny_baseline() -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=PAD,
                         eos_token_id=[PAD, IM_END], max_position_embeddings=512)
    torch.manual_seed(1)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny() -> tuple[MossSpeechForCausalLM, MossSpeechProcessor]:
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(tiny_codec_config()).eval()
    model = MossSpeechForCausalLM(tiny_config()).eval()
    processor = MossSpeechProcessor.from_model_config(model.config, tiny_tokenizer(), MossSpeechFeatureExtractor(),
                                                      codec=codec)
    return model, processor


def check_results(results: dict, tasks: tuple[str, ...] = TASKS) -> None:
    """Every number of a run over the tiny corpus, as planned (all tasks, or the modes of `tasks` + retention)."""
    assert results["counts"] == {"spoken_questions": 5, "facts": 4}
    assert list(results["modes"]) == [t for t in TASKS if t in tasks and t != "codec"]
    for mode, (correct, total) in EXPECTED.items():
        if mode not in tasks:
            continue
        got = results["modes"][mode]
        assert (got["correct"], got["total"]) == (correct, total), mode
        assert got["accuracy"] == pytest.approx(correct / total), mode
    if tasks != TASKS:  # the CLI runs a subset: S->T, T->S, T->T and the baseline
        assert tasks == ("s2t", "t2s", "t2t") and results["codec_roundtrip"] is None
        assert results["text_retention"]["retention"] == pytest.approx(0.75)
        return
    s2t = results["modes"]["s2t"]
    assert s2t["by_category"]["addition"] == {"correct": 2, "total": 3, "accuracy": 2 / 3}  # q0, q1 right; q4 wrong
    # Records are in corpus order whatever the batching, and carry what was asked and answered.
    assert [r["id"] for r in s2t["examples"]] == ["q0", "q1", "q2", "q3", "q4"][:len(s2t["examples"])]
    assert [(r["id"], r["prediction"]) for r in s2t["errors"]] == [("q2", "the sea"), ("q4", "three")]
    # Spoken answers: the independent recogniser's score first, then the CTC head's on the decoded speech (it
    # mishears q2's "paris") and on the answer codes directly (no vocoder).
    s2s = results["modes"]["s2s"]
    assert list(s2s)[:7] == ["label", "input", "output", "scorer", "correct", "total", "accuracy"]
    assert s2s["scorer"].startswith("PocketSphinx ")  # the answers of the corpus' facts:
    assert s2s["scorer"].endswith("JSGF grammar of 4 phrases")
    assert s2s["ctc"] == {"correct": 3, "total": 5, "accuracy": 0.6}
    assert s2s["from_codes"] == {"correct": 4, "total": 5, "accuracy": 0.8}
    assert results["modes"]["t2s"]["ctc"] == {"correct": 2, "total": 4, "accuracy": 0.5}
    assert results["modes"]["t2s"]["from_codes"] == {"correct": 2, "total": 4, "accuracy": 0.5}
    assert not {"from_codes", "ctc", "scorer"} & set(results["modes"]["s2t"])
    assert [(r["id"], r["prediction"], r["ctc_transcript"], r["num_codes"]) for r in s2s["errors"]] == [
        ("q1", "", "no", 1)]  # "no" is not an answer of the corpus: not in the recogniser's grammar
    assert {r["id"]: r["ctc_transcript"] for r in s2s["examples"]}["q2"] == "pairs"
    t2s = {r["id"]: r for r in results["modes"]["t2s"]["examples"]}
    assert (t2s["col_1"]["prediction"], t2s["col_1"]["num_codes"]) == ("", 0)  # no speech: nothing decoded
    assert t2s["add_1"]["question"] == "what is two plus three" and t2s["add_1"]["reference"] == "five"
    t2t = {r["id"]: r["prediction"] for r in results["modes"]["t2t"]["examples"]}
    assert t2t["cap_1"] == "paris!"  # right after normalisation

    retention = results["text_retention"]
    assert (retention["model_accuracy"], retention["baseline_accuracy"]) == (0.75, 1.0)
    assert retention["retention"] == pytest.approx(0.75)
    assert retention["baseline"]["correct"] == 4

    codec = results["codec_roundtrip"]
    assert list(codec)[:6] == ["total", "scorer", "original", "roundtrip", "accuracy_gap_points", "ctc"]
    assert codec["total"] == 5 and codec["scorer"].endswith("grammar of 4 phrases")  # the corpus' questions
    # Independent: q2 misheard before and after the round trip; the CTC head also loses q3 in the round trip.
    assert (codec["original"]["correct"], codec["roundtrip"]["correct"]) == (4, 4)
    assert codec["accuracy_gap_points"] == pytest.approx(0.0)
    ctc = codec["ctc"]
    assert (ctc["original"]["correct"], ctc["roundtrip"]["correct"]) == (4, 3)
    assert ctc["accuracy_gap_points"] == pytest.approx(20.0)
    references = [normalize_answer(q[4]) for q in QUESTIONS]
    heard = [HEARD[CODES_OF[q[0]]] for q in QUESTIONS]
    assert ctc["original"]["cer"] == pytest.approx(character_error_rate(references, heard))
    heard[3] = HEARD_AFTER_CODEC[10]
    assert ctc["roundtrip"]["cer"] == pytest.approx(character_error_rate(references, heard))
    assert ctc["original"]["cer"] > 0 and ctc["cer_gap_points"] > 0
    assert codec["examples"][3] == {"id": "q3", "reference": "what color is the sea",
                                    "original": "what color is the sea", "roundtrip": "what color is the sea",
                                    "ctc_original": "what color is the sea", "ctc_roundtrip": "what color is the"}
    assert results["schema"] == SCHEMA == "moss-speech-eval/2" and results["settings"]["ctc_columns"] is True
    assert results["settings"]["decoding"] == "greedy"
    json.dumps(results)  # JSON-ready


def test_evaluate_gives_the_planned_accuracies(tiny, corpus, monkeypatch):
    model, processor = tiny
    calls: list = []
    oracle(monkeypatch, calls)
    data = load_eval_split(corpus, "test")
    results = evaluate(model, processor, data, baseline_model=tiny_baseline(), batch_size=2, max_new_tokens=16)
    check_results(results)
    # Every question asked once per mode, in batches of at most 2, greedily.
    asked = [c for c in calls if c[0] != "kwargs"]
    assert sorted(k for m, k in asked if m == "s2t") == ["q0", "q1", "q2", "q3", "q4"]
    assert sorted(k for m, k in asked if m == "baseline") == sorted(FACTS)
    settings = [c[1] for c in calls if c[0] == "kwargs"]
    assert len(settings) == 3 + 3 + 2 + 2  # 5 spoken questions and 4 facts, batches of 2
    for kwargs in settings:
        assert kwargs["do_sample"] is False and kwargs["text_do_sample"] is False
        assert kwargs["audio_do_sample"] is False and kwargs["audio_repetition_penalty"] == 1.0
        assert kwargs["max_new_tokens"] == 16
    table = format_table(results)
    for line in ("S->T", "S->S", "T->S", "T->T", "T->T text-only baseline", "text retention", "encode -> decode"):
        assert line in table
    assert "60.0 %" in table and "75.0 %" in table and "20.0 pt" in table


def test_evaluate_selected_tasks_and_input_checks(tiny, corpus, monkeypatch):
    model, processor = tiny
    oracle(monkeypatch, [])
    data = load_eval_split(corpus, "test")
    only = evaluate(model, processor, data, tasks=["t2t", "s2t"], batch_size=8, max_new_tokens=8, num_examples=1)
    assert list(only["modes"]) == ["s2t", "t2t"] and only["text_retention"] is None
    assert only["codec_roundtrip"] is None and only["settings"]["tasks"] == ["s2t", "t2t"]
    assert len(only["modes"]["s2t"]["examples"]) == 1 and only["modes"]["t2t"]["accuracy"] == 0.75

    with pytest.raises(ValueError, match=r"tasks must be a non-empty list among"):
        evaluate(model, processor, data, tasks=["s2x"])
    with pytest.raises(ValueError, match="needs the 't2t' task"):
        evaluate(model, processor, data, tasks=["s2t"], baseline_model=tiny_baseline())
    with pytest.raises(TypeError, match="text-only causal LM"):
        evaluate(model, processor, data, baseline_model=model)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate(model, processor, data, batch_size=0)
    no_speech = EvalSplit("empty", [], data.facts)
    with pytest.raises(ValueError, match="has no spoken questions"):
        evaluate(model, processor, no_speech, tasks=["s2t"])
    assert evaluate(model, processor, no_speech, tasks=["t2t"])["modes"]["t2t"]["total"] == 4

    with pytest.raises(TypeError, match=r"answer_recognizer must have a recognize\(waveform, sampling_rate\)"):
        evaluate(model, processor, data, tasks=["t2s"], answer_recognizer=object())
    # A codec without a CTC head (the release's) is scored by the independent recogniser alone.
    monkeypatch.setattr(MossSpeechCodecModel, "can_transcribe", property(lambda self: False), raising=False)
    alone = evaluate(model, processor, data, tasks=["s2s"], batch_size=8, max_new_tokens=8)
    assert (alone["modes"]["s2s"]["correct"], alone["modes"]["s2s"]["total"]) == EXPECTED["s2s"]
    assert not {"ctc", "from_codes"} & set(alone["modes"]["s2s"]) and alone["settings"]["ctc_columns"] is False
    assert alone["modes"]["s2s"]["examples"][0]["ctc_transcript"] is None
    codec_less = MossSpeechProcessor.from_model_config(model.config, tiny_tokenizer())
    with pytest.raises(ValueError, match="need a speech codec"):
        evaluate(model, codec_less, data, tasks=["s2t"])


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in ("seconds", "timing")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_evaluate_with_the_codecs_own_recogniser_is_deterministic(corpus):
    """The real path: a nano-like codec (CTC head, Griffin-Lim, no speaker encoder) and free greedy answers."""
    torch.manual_seed(0)
    encoder = ctc_config().encoder_config.to_dict()
    codec = MossSpeechCodecModel(tiny_codec_config(encoder_config=encoder, vocoder_type="griffin_lim",
                                                   griffin_lim_iters=4, speaker_config=None)).eval()
    assert codec.can_transcribe
    model = MossSpeechForCausalLM(tiny_config()).eval()
    processor = MossSpeechProcessor.from_model_config(model.config, tiny_tokenizer(), MossSpeechFeatureExtractor(),
                                                      codec=codec)
    data = load_eval_split(corpus, "test", max_examples=2)
    runs = [evaluate(model, processor, data, tasks=["s2s", "codec"], batch_size=2, max_new_tokens=6)
            for _ in range(2)]
    assert _without_times(runs[0]) == _without_times(runs[1])
    results = runs[0]
    assert results["modes"]["s2s"]["total"] == 2
    for record in results["modes"]["s2s"]["examples"]:
        assert isinstance(record["prediction"], str) and 0 <= record["num_codes"] <= 6
    roundtrip = results["codec_roundtrip"]
    waves = [prepare_waveforms(q.waveform, q.sampling_rate, target_rate=16000)[0] for q in data.questions]
    assert [e["ctc_original"] for e in roundtrip["examples"]] == codec.transcribe(waves, sampling_rate=16000)
    assert 0 <= roundtrip["ctc"]["original"]["accuracy"] <= 1 and roundtrip["ctc"]["roundtrip"]["cer"] >= 0
    # PocketSphinx (real, not a stand-in) hears only phrases of its grammar, or nothing, in the tones.
    questions = {normalize_answer(q) for q in data.question_vocabulary}
    assert all(normalize_answer(e[k]) in questions | {""} for e in roundtrip["examples"] for k in ("original",
                                                                                                  "roundtrip"))
    answers = {normalize_answer(a) for a in data.answer_vocabulary} | {""}
    assert all(normalize_answer(r["prediction"]) in answers for r in results["modes"]["s2s"]["examples"])
    json.dumps(results)


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny) -> dict[str, Path]:
    """The tiny model saved as a nano-like directory (processor beside it, codec in codec/) and a baseline."""
    model, processor = tiny
    root = tmp_path_factory.mktemp("eval_cli")
    model.save_pretrained(root / "lm")
    processor.save_pretrained(root / "lm")  # a codec given as a model is written to lm/codec
    assert (root / "lm" / "codec" / "config.json").is_file()
    tiny_baseline().save_pretrained(root / "text")
    return {"lm": root / "lm", "text": root / "text", "codec": root / "lm" / "codec", "root": root}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_prints_the_table_and_writes_json(checkpoint, corpus, monkeypatch, capsys, tmp_path):
    oracle(monkeypatch, [])
    output = tmp_path / "results.json"
    # Not S->S and the codec round trip: decoding long speech with the tiny HiFT is slow (the full run is above).
    code, out, err = run(capsys, "eval", "--model", checkpoint["lm"], "--corpus", corpus, "--split", "test",
                         "--baseline-text-model", checkpoint["text"], "--batch-size", 3, "--max-new-tokens", 16,
                         "--tasks", "t2t", "s2t", "t2s", "--output", output, "--device", "cpu")
    assert code == 0, err
    results = json.loads(output.read_text())
    check_results(results, ("s2t", "t2s", "t2t"))
    assert results["model"] == str(checkpoint["lm"]) and results["corpus"] == str(corpus)
    assert results["baseline_text_model"] == str(checkpoint["text"]) and results["settings"]["batch_size"] == 3
    assert results["timing"]["total_seconds"] > 0 and results["timing"]["load_seconds"] > 0
    assert out == format_table(results) + "\n"
    assert [line.split()[:3] for line in out.splitlines()[2:8]] == [
        ["S->T", "3", "5"], ["T->S", "2", "4"], ["decoded", "speech", "read"], ["answer", "codes", "read"],
        ["T->T", "3", "4"], ["T->T", "text-only", "baseline"]]
    assert "speech heard by: PocketSphinx " in out  # which recogniser scored T->S
    assert f"results in {output}" in err


def test_cli_eval_text_only_task_with_the_codec_given(checkpoint, corpus, monkeypatch, capsys):
    oracle(monkeypatch, [])
    code, out, err = run(capsys, "-q", "eval", "--model", checkpoint["lm"], "--codec", checkpoint["codec"],
                         "--corpus", corpus, "--tasks", "t2t", "--max-examples", 2)
    assert code == 0, err
    assert "S->T" not in out
    assert out.splitlines()[2].split() == ["T->T", "1", "2", "50.0", "%"]  # add_1 right, add_2 wrong


def test_cli_eval_defaults_to_the_shipped_checkpoint(checkpoint, corpus, monkeypatch, capsys):
    from modeling_moss_speech import pretrained

    oracle(monkeypatch, [])
    monkeypatch.setattr(pretrained, "nano_path", lambda: checkpoint["lm"])
    code, out, err = run(capsys, "-q", "eval", "--corpus", corpus, "--tasks", "s2t", "--max-examples", 3)
    assert code == 0, err
    assert out.splitlines()[2].split()[:3] == ["S->T", "2", "3"]  # q0 and q1 right, q2 wrong


@pytest.mark.parametrize("args, message", [
    (["--corpus", "{root}/missing"], "--corpus: directory '{root}/missing' does not exist"),
    (["--corpus", "{corpus}", "--split", "nope"], "split 'nope' is not in corpus"),
    (["--corpus", "{corpus}", "--baseline-text-model", "{lm}"],
     "--baseline-text-model: '{lm}' holds a 'moss_speech' checkpoint, expected a text-only causal LM"),
    (["--corpus", "{corpus}", "--baseline-text-model", "{text}", "--tasks", "s2t"], "needs the t2t task"),
    (["--corpus", "{corpus}", "--tasks", "all"], "argument --tasks: invalid choice: 'all'"),
    (["--corpus", "{corpus}", "--voice", "nobody"], "--voice: 'nobody' is neither a file nor a voice of"),
    (["--corpus", "{corpus}", "--output", "{root}/nowhere/r.json"], "--output: directory"),
    (["--corpus", "{corpus}", "--codec", "{lm}"], "--codec: '{lm}' holds a 'moss_speech' checkpoint"),
    (["--corpus", "{corpus}", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
])
def test_cli_eval_errors(checkpoint, corpus, capsys, args, message):
    names = {"root": checkpoint["root"], "lm": checkpoint["lm"], "text": checkpoint["text"], "corpus": corpus}
    code, out, err = run(capsys, "eval", "--model", checkpoint["lm"], *[a.format(**names) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("moss-speech: error: ") and len(err.strip().splitlines()) == 1
    assert message.format(**names) in err


def test_cli_eval_help_documents_every_option(capsys):
    code, out, _ = run(capsys, "eval", "--help")
    assert code == 0 and "examples:" in out
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for action in commands.choices["eval"]._actions:
        assert action.help and len(action.help) > 10, action.dest
        for option in action.option_strings:
            assert option in out
    assert all(task in out for task in TASKS)


def test_markdown_comparison_puts_runs_side_by_side():
    from modeling_moss_speech.apps.evaluation import markdown_comparison

    def result(s2t_correct: int, retention: float) -> dict:
        return {"modes": {"s2t": {"label": "S->T (speech in, text out)", "correct": s2t_correct, "total": 4,
                                  "accuracy": s2t_correct / 4}},
                "text_retention": {"retention": retention, "baseline_accuracy": 1.0},
                "codec_roundtrip": {"original": {"accuracy": 0.5, "cer": 0.1},
                                    "roundtrip": {"accuracy": 0.25, "cer": 0.2}}}

    table = markdown_comparison({"frozen": result(3, 1.0), "no freezing": result(1, 0.5)}).splitlines()
    assert table[0] == "| measure | frozen | no freezing |"
    assert table[2] == "| S->T (speech in, text out) | 75.0 % (3/4) | 25.0 % (1/4) |"
    assert "100.0 % (baseline 100.0 %)" in table[3] and "50.0 %" in table[3]
    assert table[4].endswith("| 50.0 % -> 25.0 % (CER 10.0 % -> 20.0 %) | 50.0 % -> 25.0 % (CER 10.0 % -> 20.0 %) |")
    with pytest.raises(ValueError, match="empty"):
        markdown_comparison({})


def test_markdown_comparison_puts_the_independent_recogniser_first():
    from modeling_moss_speech.apps.evaluation import markdown_comparison

    spoken = {"label": "S->S", "input": "speech", "output": "speech", "scorer": "PocketSphinx", "correct": 3,
              "total": 4, "accuracy": 0.75, "ctc": {"correct": 1, "total": 4, "accuracy": 0.25},
              "from_codes": {"correct": 2, "total": 4, "accuracy": 0.5}}
    trip = {"total": 4, "scorer": "PocketSphinx", "original": {"correct": 4, "accuracy": 1.0},
            "roundtrip": {"correct": 2, "accuracy": 0.5}, "accuracy_gap_points": 50.0,
            "ctc": {"original": {"accuracy": 0.5, "cer": 0.1}, "roundtrip": {"accuracy": 0.25, "cer": 0.2}}}
    legacy = {"label": "S->S", "input": "speech", "output": "speech", "correct": 1, "total": 4, "accuracy": 0.25,
              "from_codes": {"correct": 2, "total": 4, "accuracy": 0.5}}  # schema /1: the CTC head only
    legacy_trip = dict(trip["ctc"])
    table = markdown_comparison({"new": {"modes": {"s2s": spoken}, "codec_roundtrip": trip},
                                 "old": {"modes": {"s2s": legacy}, "codec_roundtrip": legacy_trip}}).splitlines()
    assert table[2:] == [
        "| S->S: spoken answer heard by the independent recogniser | 75.0 % (3/4) | n/a |",
        "| S->S: spoken answer read by the codec's CTC head | 25.0 % (1/4) | 25.0 % (1/4) |",
        "| S->S: answer codes read by the CTC head (no vocoder) | 50.0 % (2/4) | 50.0 % (2/4) |",
        "| codec round trip: heard by the independent recogniser, original -> encode/decode "
        "| 100.0 % -> 50.0 % | n/a |",
        "| codec: CTC exact match, original -> encode/decode | 50.0 % -> 25.0 % (CER 10.0 % -> 20.0 %) "
        "| 50.0 % -> 25.0 % (CER 10.0 % -> 20.0 %) |"]


def test_cli_eval_without_pocketsphinx_names_the_extra(checkpoint, corpus, monkeypatch, capsys):
    oracle(monkeypatch, [])
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # `import pocketsphinx` now raises ImportError
    for tasks in (["s2s"], ["t2s"], ["codec"]):
        code, out, err = run(capsys, "eval", "--model", checkpoint["lm"], "--corpus", corpus, "--tasks", *tasks)
        assert code == 2 and out == "", tasks
        assert "pip install 'moss-speech[eval]'" in err and len(err.strip().splitlines()) == 1
    # Text answers need no recogniser.
    code, out, err = run(capsys, "-q", "eval", "--model", checkpoint["lm"], "--corpus", corpus, "--tasks", "s2t",
                         "--max-examples", 2)
    assert code == 0, err

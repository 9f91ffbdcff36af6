"""The shipped MOSS-Speech-Nano checkpoint answers spoken questions: the README's first command, as tests.

The example question (`examples/colour_of_banana.wav`) is a fact trained as speech, asked in the held-out test voice;
a second question is spoken here by espeak-ng in the held-out dialect test voice (a dialect and a variant that no
training voice uses).
Decoding is greedy, so answers are deterministic. Spoken answers are heard by an independent recogniser
(PocketSphinx constrained to the world's answers) and read from their codes by the codec's own CTC head.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torchaudio
from helpers import espeak
from transformers import AutoModelForCausalLM, AutoProcessor

from modeling_moss_speech import MossSpeechChat, pretrained
from modeling_moss_speech.apps.evaluation import IndependentRecognizer, greedy_kwargs, normalize_answer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {"colour_of_banana.wav": "yellow"}
HELD_OUT_DIALECT_QUESTION = ("what is the capital of japan", "tokyo")  # a fact trained as speech


@functools.cache
def answer_recognizer() -> IndependentRecognizer:
    sys.path.insert(0, str(ROOT / "processing"))
    from synthesize_espeak import build_facts

    return IndependentRecognizer(sorted({fact["answer"] for fact in build_facts(0)}))


@pytest.fixture(scope="module")
def nano():
    try:
        path = pretrained.nano_path()
    except FileNotFoundError as error:
        pytest.fail(f"the shipped checkpoint is missing: {error}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def _ask(model, processor, wav: Path, output_modality: str):
    conversation = [{"role": "user", "content": {"type": "audio", "path": str(wav)}}]
    chat = MossSpeechChat(model, processor)
    return chat.reply(conversation, output_modality=output_modality, **greedy_kwargs(40))


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_spoken_question_gets_the_right_spoken_answer(nano, example):
    model, processor = nano
    first = _ask(model, processor, ROOT / "examples" / example, "audio")
    assert first.audio is not None and first.codes.numel() > 0, "no spoken answer"
    # The independent recogniser (PocketSphinx, grammar: every answer of the world) hears the spoken answer; the
    # codec's own CTC head, reading the answer's codes, agrees.
    heard = answer_recognizer().recognize(first.audio, first.sampling_rate)
    assert heard == EXAMPLES[example], (heard, first.codes.tolist())
    assert normalize_answer(processor.codec.transcribe_codes([first.codes])[0]) == EXAMPLES[example]
    assert first.sampling_rate == 24000 and first.audio.numel() == 1920 * first.codes.numel()
    again = _ask(model, processor, ROOT / "examples" / example, "audio")
    assert torch.equal(first.codes, again.codes)  # greedy decoding: the same answer every time


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_spoken_question_gets_the_right_text_answer(nano, example):
    model, processor = nano
    answer = _ask(model, processor, ROOT / "examples" / example, "text")
    assert normalize_answer(answer.text) == EXAMPLES[example]


def _readme_first_command(wav: Path, tmp_path: Path) -> tuple[str, str]:
    """`moss-speech chat --wav WAV --out answer.wav`: (printed answer, spoken answer as heard by PocketSphinx)."""
    out = tmp_path / "answer.wav"
    result = subprocess.run([sys.executable, "-m", "modeling_moss_speech", "chat", "--wav", str(wav), "--out",
                             str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    speech, rate = sf.read(str(out), dtype="float32")
    assert rate == 24000 and len(speech) > 0.2 * rate
    return normalize_answer(result.stdout), answer_recognizer().recognize(torch.from_numpy(speech), rate)


def test_readme_first_command_answers_with_speech_and_text(tmp_path):
    assert _readme_first_command(ROOT / "examples" / "colour_of_banana.wav", tmp_path) == ("yellow", "yellow")


def test_readme_first_command_answers_a_held_out_dialect(tmp_path):
    """A question spoken in a dialect and voice never used in training (espeak-ng en-gb-x-gbcwmd+Annie, West
    Midlands English) gets the right answer, printed and spoken."""
    sys.path.insert(0, str(ROOT / "processing"))
    from synthesize_espeak import DIALECT_TEST_VOICE, QUESTION_VOICES, TRAIN_VOICES

    for voice in (*TRAIN_VOICES, *QUESTION_VOICES):
        assert not voice.startswith("en-gb-x-gbcwmd") and not voice.endswith("+Annie"), voice
    question, expected = HELD_OUT_DIALECT_QUESTION
    wav, rate = espeak(question, DIALECT_TEST_VOICE, speed=150, pitch=60)
    sf.write(str(tmp_path / "question.wav"), wav.numpy(), rate)
    assert _readme_first_command(tmp_path / "question.wav", tmp_path) == (expected, expected)


@pytest.mark.parametrize("channels", [1, 2])
def test_same_question_at_any_rate_gets_the_same_answer(nano, channels, tmp_path):
    """A user's recording may come at any common rate, mono or stereo: the answer must not depend on it."""
    model, processor = nano
    wav, rate = sf.read(str(ROOT / "examples" / "colour_of_banana.wav"), dtype="float32")
    answers = {}
    for target in (16000, 22050, 44100, 48000):
        audio = torchaudio.functional.resample(torch.from_numpy(wav), rate, target)
        audio = audio if channels == 1 else torch.stack([audio, audio * 0.8]).T  # frames × channels, as files store
        path = tmp_path / f"q_{target}_{channels}.wav"
        sf.write(str(path), audio.numpy(), target)
        answers[target] = normalize_answer(_ask(model, processor, path, "text").text)
    assert set(answers.values()) == {"yellow"}, answers

"""An independent speech recogniser for scoring spoken answers: PocketSphinx constrained to a closed vocabulary.

The codec's own CTC head reads the codec's codes, so it cannot judge whether the codec's *decoded audio* is
intelligible: it is trained on the same features that the codec encodes. [`IndependentRecognizer`] is a recogniser
that shares nothing with the codec — CMU PocketSphinx with its bundled US-English acoustic model and CMUdict — whose
search is a JSGF grammar of the closed world's phrases (the answers of the corpus' facts, or its questions): every
utterance is heard as exactly one of those phrases, or as "" when the decoder finds none.

```python
from modeling_moss_speech.apps.recognition import IndependentRecognizer

recognizer = IndependentRecognizer(["paris", "yellow", "twenty one"])   # multi-word phrases stay whole
recognizer.recognize(waveform, sampling_rate=24000)                      # -> "paris"
```

PocketSphinx is an optional dependency: `pip install 'moss-speech[eval]'`.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torchaudio

INSTALL_HINT = "pip install 'moss-speech[eval]'"
SAMPLING_RATE = 16_000  # the bundled en-us acoustic model's rate
# PocketSphinx is thrown off by synthetic audio's exact digital silence (espeak-ng, Griffin-Lim pauses): all-zero
# frames have a floored log energy that skews its cepstral mean normalisation, and clean espeak-ng answer words are
# heard 31-36 % right as they are, 84-90 % right with a faint noise floor. So every utterance is peak-normalised to
# _PEAK, padded with _PAD_SECONDS of silence on both sides and gets Gaussian noise of standard deviation _NOISE
# (-48 dB below the peak), seeded by _SEED: the transcript is a function of the waveform alone.
_PEAK, _NOISE, _PAD_SECONDS, _SEED = 0.5, 2e-3, 0.3, 0
# bestpath=False: the grammar's Viterbi path, without the lattice rescoring pass (90 % vs 87 % of clean canonical
# answer words, averaged over three noise seeds). The decoder's default batch CMN keeps utterances independent.
_DECODER_OPTIONS = {"bestpath": False}


def normalize_answer(text: str) -> str:
    """Lowercase, drop every character that is not a letter or whitespace, collapse whitespace to single spaces.

    The one normalisation of every score (evaluation's exact match and the recogniser's vocabulary).

    >>> normalize_answer("  Seven!\\n")
    'seven'
    >>> normalize_answer("Buenos-Aires,  42")
    'buenosaires'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer: text must be a str, got {type(text).__name__}.")
    kept = "".join(c for c in text.lower() if c.isalpha() or c.isspace())
    return " ".join(kept.split())


@runtime_checkable
class SpeechRecognizer(Protocol):
    """What evaluation needs of a recogniser: the text heard in one waveform."""

    def recognize(self, waveform: Any, sampling_rate: int) -> str:
        """The transcript of a mono (or multi-channel) waveform at `sampling_rate`."""


def require_pocketsphinx() -> Any:
    """The `pocketsphinx` module, or an ImportError naming the extra that installs it."""
    try:
        import pocketsphinx
    except ImportError as error:
        raise ImportError("the independent recogniser that scores spoken answers needs PocketSphinx, which is not "
                          f"installed: {INSTALL_HINT} (or pip install pocketsphinx).") from error
    return pocketsphinx


def _phrase_words(phrase: str) -> list[str]:
    """The dictionary words of a phrase: lowercase, letters and apostrophes kept (CMUdict spells "what's")."""
    return re.sub(r"[^\w\s']|[\d_]", " ", phrase.lower()).split()


def to_recognizer_input(waveform: Any, sampling_rate: int) -> torch.Tensor:
    """A waveform as float32 mono at 16 kHz: channels (the shorter axis of a 2-D array) averaged, resampled."""
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive integer (Hz), got {sampling_rate!r}.")
    if isinstance(waveform, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(waveform))
    elif isinstance(waveform, torch.Tensor):
        wave = waveform.detach().cpu()
    else:
        raise TypeError(f"waveform must be a numpy array or a torch tensor, got {type(waveform).__name__}.")
    if not wave.is_floating_point():
        raise TypeError(f"waveform must hold floating-point samples in [-1, 1], got dtype {wave.dtype}.")
    wave = wave.float()
    if wave.ndim == 2:
        wave = wave.mean(dim=0 if wave.shape[0] <= wave.shape[1] else 1)
    if wave.ndim != 1 or wave.numel() == 0:
        raise ValueError(f"waveform must be a non-empty 1-D (samples) or 2-D (channels, samples) array, got shape "
                         f"{tuple(waveform.shape)}.")
    if not torch.isfinite(wave).all():
        raise ValueError("waveform holds NaN or infinite samples.")
    if int(sampling_rate) != SAMPLING_RATE:
        wave = torchaudio.functional.resample(wave, int(sampling_rate), SAMPLING_RATE)
    return wave


class IndependentRecognizer:
    """PocketSphinx (US-English model, CMUdict) whose grammar is a closed list of phrases; independent of the codec.

    Args:
        vocabulary: The phrases it can hear (answers such as "paris" or "twenty one"; each phrase is one alternative
            of the grammar, so a multi-word phrase is heard whole or not at all). Case and punctuation other than
            apostrophes are ignored, duplicates dropped; every word must be in PocketSphinx's dictionary (CMUdict).

    Measured on clean espeak-ng speech (canonical voice `en-us`, 160 words per minute), with the grammar of the 135
    answers of MOSS-Speech-Nano's world: 90 % of the answer words heard right (`bench/bench_recognizer.py`).
    """

    sampling_rate = SAMPLING_RATE

    def __init__(self, vocabulary: Iterable[str]):
        if isinstance(vocabulary, str) or not isinstance(vocabulary, Iterable):
            raise TypeError("vocabulary must be an iterable of phrases (str), got "
                            f"{type(vocabulary).__name__}{' (a single str)' if isinstance(vocabulary, str) else ''}.")
        phrases: dict[str, str] = {}  # grammar words -> the phrase as given (what recognize returns)
        for phrase in vocabulary:
            if not isinstance(phrase, str):
                raise TypeError(f"vocabulary must hold str phrases, got {type(phrase).__name__} ({phrase!r}).")
            words = _phrase_words(phrase)
            if not words:
                raise ValueError(f"vocabulary phrase {phrase!r} has no words.")
            phrases.setdefault(" ".join(words), phrase)
        if not phrases:
            raise ValueError("vocabulary is empty: the recogniser needs at least one phrase to hear.")
        pocketsphinx = require_pocketsphinx()
        self._decoder = pocketsphinx.Decoder(samprate=SAMPLING_RATE, lm=None, loglevel="FATAL",
                                             **_DECODER_OPTIONS)
        unknown = sorted({w for words in phrases for w in words.split() if self._decoder.lookup_word(w) is None})
        if unknown:
            raise ValueError(f"vocabulary words {unknown[:20]}{' ...' if len(unknown) > 20 else ''} are not in "
                             "PocketSphinx's pronunciation dictionary (CMUdict): spell them as dictionary words "
                             "(numbers in words, e.g. 'twenty one').")
        self._phrase_of = phrases
        self.vocabulary: tuple[str, ...] = tuple(phrases.values())
        self.grammar = ("#JSGF V1.0;\ngrammar answers;\npublic <answer> = "
                        + " | ".join(f"( {words} )" for words in phrases) + " ;\n")
        self._decoder.add_jsgf_string("answers", self.grammar)
        self._decoder.activate_search("answers")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.vocabulary)} phrases)"

    @property
    def description(self) -> str:
        """What scored the speech, for results: the recogniser, its version and its grammar's size."""
        try:
            version = " " + importlib.metadata.version("pocketsphinx")
        except importlib.metadata.PackageNotFoundError:  # e.g. built from source without metadata
            version = ""
        return f"PocketSphinx{version} (en-us model, CMUdict), JSGF grammar of {len(self.vocabulary)} phrases"

    def recognize(self, waveform: Any, sampling_rate: int) -> str:
        """The phrase of the vocabulary (as given) heard in `waveform` (numpy or torch, float, 1-D or (channels,
        samples)), or "" when none is heard (silence included)."""
        wave = to_recognizer_input(waveform, sampling_rate)
        peak = float(wave.abs().max())
        if peak == 0.0:
            return ""
        pad = torch.zeros(round(_PAD_SECONDS * SAMPLING_RATE))
        wave = torch.cat([pad, wave * (_PEAK / peak), pad])
        noise = torch.randn(wave.numel(), generator=torch.Generator().manual_seed(_SEED))
        pcm = ((wave + _NOISE * noise).clamp(-1.0, 1.0) * 32767).round().to(torch.int16).numpy()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm.tobytes(), full_utt=True)
        self._decoder.end_utt()
        hypothesis = self._decoder.hyp()
        heard = " ".join(hypothesis.hypstr.split()) if hypothesis is not None else ""
        return self._phrase_of.get(heard, heard)


__all__ = [
    "INSTALL_HINT",
    "IndependentRecognizer",
    "SAMPLING_RATE",
    "SpeechRecognizer",
    "normalize_answer",
    "require_pocketsphinx",
    "to_recognizer_input",
]

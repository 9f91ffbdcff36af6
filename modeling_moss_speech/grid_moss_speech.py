"""The layout of MOSS-Speech's (batch, length, 2) token grid: rows of segments, turns and conversations, and back.

A row is `[text_id, audio_id]`. [`GridLayout`] builds rows (processor prompts and training rows, data preparation,
analysis, test grids) and reads them back (decoding, analysis, generation's modality):

- a text segment of `n` tokens is `n` rows `(token, audio_pad)`;
- a speech segment of `n` codes is `n + 2` rows: `(sosp, audio_pad)`, `(modality_pad, code)` per code,
  `(modality_pad, eosp)`; the text channel holds the modality pad while speech is spoken, which is also how the
  model tells a speech row from a text row;
- a turn is three segments: the text `"<|im_start|>{role}\\n"`, its content (text or speech), the text
  `"<|im_end|>\\n"`; segments are tokenized separately, so BPE never merges across a segment boundary;
- a prompt is the turns in order; when the first turn is not a system turn, a default system turn follows the
  conversation (the release's placement, kept so prompts match the ones the model was trained and evaluated
  with), then the generation prompt `"<|im_start|>assistant\\n"` (plus the start-of-speech token for spoken answers,
  so an audio-output prompt ends with the row `(sosp, audio_pad)`);
- a training conversation is the prompt of the conversation up to its last assistant turn followed by that turn,
  with a mask of the rows the assistant produces;
- a batch is left-padded with `(text_pad, audio_pad)` rows.

Text is tokenized by a `tokenize(str) -> list[int]` callable (the processor's tokenizer with
`add_special_tokens=False`), so this module depends on no tokenizer class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .configuration_moss_speech import MODALITIES

TURN_END = "<|im_end|>\n"
IM_END_TOKEN = "<|im_end|>"

Tokenize = Callable[[str], Sequence[int]]
Turn = tuple[str, "str | Sequence[int] | torch.Tensor"]


def turn_header(role: str) -> str:
    """The text segment that opens a turn of `role`."""
    return f"<|im_start|>{role}\n"


@dataclass
class GridSegment:
    """A run of rows of one modality: text ids (`modality="text"`) or speech codes (`modality="audio"`)."""

    modality: str
    ids: list[int]


def _id(name: str, value: Any, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"GridLayout: {name} must be an integer >= 0, got {value!r}.")
    return value


def _ints(values: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of integer ids, got {type(values).__name__}.")
    return [int(v) for v in values]


@dataclass(frozen=True)
class GridLayout:
    """The special ids that lay out a grid, and every rule that builds or reads rows with them.

    Args:
        sosp_token_id: Text id that opens a speech segment (start of speech).
        eosp_token_id: Audio id that closes a speech segment (end of speech).
        modality_pad_token_id: Text id of speech rows.
        audio_pad_token_id: Audio id of text rows and of padding.
        text_pad_token_id: Text id of padding rows; `None` when no padding is built or skipped.
        num_codes: Speech codes are `0 .. num_codes - 1`; `eosp_token_id` when `None` (codes lie below it).
    """

    sosp_token_id: int
    eosp_token_id: int
    modality_pad_token_id: int
    audio_pad_token_id: int
    text_pad_token_id: int | None = None
    num_codes: int | None = None

    def __post_init__(self) -> None:
        for name in ("sosp_token_id", "eosp_token_id", "modality_pad_token_id", "audio_pad_token_id"):
            _id(name, getattr(self, name))
        _id("text_pad_token_id", self.text_pad_token_id, optional=True)
        if _id("num_codes", self.num_codes, optional=True) is None:
            object.__setattr__(self, "num_codes", self.eosp_token_id)

    @classmethod
    def from_config(cls, config: Any) -> GridLayout:
        """The layout of a `MossSpeechConfig` (or any object with its special ids); text padding is `pad_token_id`."""
        names = ("sosp_token_id", "eosp_token_id", "modality_pad_token_id", "audio_pad_token_id")
        missing = [name for name in names if getattr(config, name, None) is None]
        if missing:
            raise TypeError(f"config must be a MossSpeechConfig (or have its special ids), missing {missing} on "
                            f"{type(config).__name__}.")
        return cls(**{name: getattr(config, name) for name in names},
                   text_pad_token_id=getattr(config, "pad_token_id", None))

    # ---------------------------------------------------------------------------------------------- segments

    def text_rows(self, ids: Sequence[int] | torch.Tensor) -> list[list[int]]:
        """Rows of a text segment: `(token, audio_pad)` per token."""
        return [[i, self.audio_pad_token_id] for i in _ints(ids, "text ids")]

    def speech_rows(self, codes: Sequence[int] | torch.Tensor) -> list[list[int]]:
        """Rows of a speech segment: `(sosp, audio_pad)`, `(modality_pad, code)` per code, `(modality_pad, eosp)`."""
        pad = self.modality_pad_token_id
        return ([[self.sosp_token_id, self.audio_pad_token_id]] + [[pad, c] for c in _ints(codes, "codes")]
                + [[pad, self.eosp_token_id]])

    def segment_rows(self, segments: Sequence[GridSegment]) -> list[list[int]]:
        """Rows of segments in order (the inverse of [`split_rows`] on rows it splits exactly)."""
        rows: list[list[int]] = []
        for segment in segments:
            if segment.modality not in MODALITIES:
                raise ValueError(f"segment modality must be one of {MODALITIES}, got {segment.modality!r}.")
            rows += self.text_rows(segment.ids) if segment.modality == "text" else self.speech_rows(segment.ids)
        return rows

    # ------------------------------------------------------------------------------------------------ turns

    def turn_rows(
        self, role: str, content: str | Sequence[int] | torch.Tensor, tokenize: Tokenize, trained: bool = False,
        im_end_token_id: int | None = None,
    ) -> tuple[list[list[int]], list[bool]]:
        """Rows of one turn (header, content, closing) and which of them are trained when `trained`.

        `content` is a `str` (a text turn) or a sequence of speech codes. A trained turn trains its content rows (a
        speech segment's start and end rows included) and its closing up to and including `im_end_token_id` (the
        turn's own stop token; the newline after it is not); the header is never trained.
        """
        header = self.text_rows(tokenize(turn_header(role)))
        body = self.text_rows(tokenize(content)) if isinstance(content, str) else self.speech_rows(content)
        closing_ids = list(tokenize(TURN_END))
        stop = closing_ids.index(im_end_token_id) + 1 if im_end_token_id in closing_ids else len(closing_ids)
        mask = [False] * len(header) + [trained] * len(body) + [trained and i < stop for i in range(len(closing_ids))]
        return header + body + self.text_rows(closing_ids), mask

    def _system_turn(self, system_prompt: str, tokenize: Tokenize) -> list[list[int]]:
        return self.turn_rows("system", system_prompt, tokenize)[0]

    def conversation_rows(
        self,
        turns: Sequence[Turn],
        tokenize: Tokenize,
        system_prompt: str,
        add_generation_prompt: bool = True,
        output_modality: str = "text",
        sosp_token: str | None = None,
    ) -> list[list[int]]:
        """Rows of the prompt of `turns` (`(role, content)` pairs, content as in [`turn_rows`]).

        `system_prompt` is the text of the default system turn, placed after the conversation when its first turn is
        not a system turn. With `add_generation_prompt` the assistant prefix ends the prompt; for
        `output_modality="audio"` it ends with `sosp_token` (the tokenizer's string of `sosp_token_id`), tokenized
        with the prefix as one segment, which must end with `sosp_token_id` (else `ValueError`).
        """
        if not turns:
            raise ValueError("turns is empty: a conversation needs at least one turn.")
        if output_modality not in MODALITIES:
            raise ValueError(f"output_modality must be one of {MODALITIES}, got {output_modality!r}.")
        rows: list[list[int]] = []
        for role, content in turns:
            rows += self.turn_rows(role, content, tokenize)[0]
        # The release appends its default system turn after the conversation and checks only the first turn.
        if turns[0][0] != "system":
            rows += self._system_turn(system_prompt, tokenize)
        if add_generation_prompt:
            prefix = turn_header("assistant")
            if output_modality == "audio":
                if sosp_token is None:
                    raise ValueError("sosp_token is required for an audio-output generation prompt.")
                prefix += sosp_token
            ids = list(tokenize(prefix))
            if output_modality == "audio" and (not ids or ids[-1] != self.sosp_token_id):
                raise ValueError(f"the audio-output prefix {prefix!r} tokenizes to {ids}, which does not end with "
                                 f"sosp_token_id {self.sosp_token_id}.")
            rows += self.text_rows(ids)
        return rows

    def training_rows(
        self, turns: Sequence[Turn], tokenize: Tokenize, system_prompt: str, im_end_token_id: int | None = None
    ) -> tuple[list[list[int]], list[bool]]:
        """Rows of a conversation that holds its answer, and the assistant mask (see [`turn_rows`]).

        The rows equal the prompt [`conversation_rows`] builds for the conversation up to its LAST assistant turn
        (the default system turn, when the first turn is not a system turn, right before that assistant turn),
        followed by that turn and any later turns; so a model is trained on the rows it is prompted with. Every
        assistant turn is trained.
        """
        assistants = [index for index, (role, _) in enumerate(turns) if role == "assistant"]
        if not assistants:
            raise ValueError(f"turns hold no assistant turn (roles: {[role for role, _ in turns]}); training needs "
                             "the answer in the conversation.")
        rows: list[list[int]] = []
        mask: list[bool] = []
        for index, (role, content) in enumerate(turns):
            if index == assistants[-1] and turns[0][0] != "system":
                # Where inference places the default system turn: after the history, before the answer.
                system = self._system_turn(system_prompt, tokenize)
                rows += system
                mask += [False] * len(system)
            turn, trained = self.turn_rows(role, content, tokenize, trained=role == "assistant",
                                           im_end_token_id=im_end_token_id)
            rows += turn
            mask += trained
        return rows, mask

    # ------------------------------------------------------------------------------------------------ batch

    def pad_row(self) -> list[int]:
        """The padding row `(text_pad, audio_pad)` (also the end-of-text row of pre-training examples)."""
        if self.text_pad_token_id is None:
            raise ValueError("GridLayout has no text_pad_token_id: padding rows need one.")
        return [self.text_pad_token_id, self.audio_pad_token_id]

    def left_pad(self, grids: Sequence[Sequence[Sequence[int]] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, 2) LongTensor of rows left-padded with `(text_pad, audio_pad)`, and the (B, L) attention mask."""
        if not grids:
            raise ValueError("grids is empty: pass at least one (L, 2) grid.")
        tensors = [torch.as_tensor(grid, dtype=torch.long).reshape(-1, 2) for grid in grids]
        length = max(t.shape[0] for t in tensors)
        out = torch.empty(len(tensors), length, 2, dtype=torch.long)
        out[..., 0], out[..., 1] = self.pad_row()
        mask = torch.zeros(len(tensors), length, dtype=torch.long)
        for index, rows in enumerate(tensors):
            out[index, length - rows.shape[0] :] = rows
            mask[index, length - rows.shape[0] :] = 1
        return out, mask

    # ---------------------------------------------------------------------------------------------- reading

    def split_rows(
        self, rows: Sequence[Sequence[int]] | torch.Tensor, text_vocab_size: int | None = None, where: str = "rows"
    ) -> list[GridSegment]:
        """The text and speech segments of (generated) rows, in order.

        Text segments hold the text ids of rows that are not speech rows, start-of-speech and text padding left
        out. A speech segment holds the audio ids of modality-pad rows; it opens at a start-of-speech row (or at the
        first speech row, when the prompt already opened it) and closes at end-of-speech, at the next text row, or
        at the end (a segment closed right after opening is empty). Raises `ValueError` (naming `where` and the row)
        for an audio id in a speech segment outside `[0, num_codes)` that is not end-of-speech, and, when
        `text_vocab_size` is given, for a text id outside `[0, text_vocab_size)`.
        """
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        skip_text = {self.modality_pad_token_id, self.sosp_token_id, self.text_pad_token_id}
        segments: list[GridSegment] = []
        speech: GridSegment | None = None

        def text(token: int) -> None:
            if not segments or segments[-1].modality != "text":
                segments.append(GridSegment("text", []))
            segments[-1].ids.append(token)

        for position, (text_id, audio_id) in enumerate(rows):
            if text_id == self.modality_pad_token_id:
                if speech is None:  # speech opened by the prompt (audio output ends the prompt with sosp)
                    speech = GridSegment("audio", [])
                    segments.append(speech)
                if audio_id == self.eosp_token_id:
                    speech = None
                elif 0 <= audio_id < self.num_codes:
                    speech.ids.append(audio_id)
                else:
                    raise ValueError(f"{where}: row {position} holds audio id {audio_id} inside a speech segment, "
                                     f"outside the codebook [0, {self.num_codes}) and not end-of-speech "
                                     f"({self.eosp_token_id}).")
                continue
            if text_vocab_size is not None and not 0 <= text_id < text_vocab_size:
                raise ValueError(f"{where}: row {position} holds text id {text_id}, outside the tokenizer's "
                                 f"vocabulary [0, {text_vocab_size}).")
            speech = None  # a text row closes an unterminated segment
            if text_id == self.sosp_token_id:
                speech = GridSegment("audio", [])
                segments.append(speech)
            elif text_id not in skip_text:
                text(text_id)
        return segments

    # ------------------------------------------------------------------------------------------- generation

    def is_speech_row(self, rows: torch.Tensor) -> torch.BoolTensor:
        """Which rows of a (..., 2) tensor are speech rows (text id = modality pad): the embedding rule."""
        return rows[..., 0] == self.modality_pad_token_id

    def initial_audio_mode(self, last_rows: torch.Tensor) -> torch.BoolTensor:
        """Mode (True = audio) at the first generated row, from the (B, 2) last prompt rows, as the release reads it.

        A prompt ending in a speech code continues speech; one ending with start-of-speech starts it.
        """
        is_audio = self.is_speech_row(last_rows) & (last_rows[:, 1] != self.audio_pad_token_id)
        return self.update_audio_mode(is_audio, last_rows)

    def update_audio_mode(self, is_audio: torch.BoolTensor, rows: torch.Tensor) -> torch.BoolTensor:
        """Next mode after appending (B, 2) `rows`: text→audio on start-of-speech, audio→text on end-of-speech."""
        is_audio = is_audio | (rows[:, 0] == self.sosp_token_id)
        return is_audio & (rows[:, 1] != self.eosp_token_id)


__all__ = ["GridLayout", "GridSegment", "IM_END_TOKEN", "TURN_END", "turn_header"]

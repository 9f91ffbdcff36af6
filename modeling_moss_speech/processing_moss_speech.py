"""MossSpeechProcessor: chat conversations → (B, L, 2) token grids, and generated grids → text + 24 kHz speech.

The grid is built segment by segment exactly as the release's processor does, by the one owner of the layout,
[`GridLayout`] in `grid_moss_speech.py` (segments, turns, the default system turn's placement, the generation
prompt, left padding, and splitting generated rows back into segments); a text segment is
`tokenizer(s, add_special_tokens=False)`.

Every special id is a processor attribute (saved in `processor_config.json`, release values by default), so a
tiny tokenizer with other ids works the same way. The speech codec is optional and loaded lazily.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, BatchFeature, ProcessorMixin
from transformers.utils import logging
from transformers.utils.chat_template_utils import render_jinja_template

from .configuration_moss_speech import MODALITIES, MossSpeechConfig
from .feature_extraction_moss_speech import MossSpeechFeatureExtractor, load_audio
from .grid_moss_speech import IM_END_TOKEN, GridLayout
from .modeling_moss_speech_codec import MossSpeechCodecModel, MossSpeechVoicePrompt

logger = logging.get_logger(__name__)

ROLES = ("system", "user", "assistant")

# The release processor's fallback system prompts, used only when a conversation does not start with a system turn.
DEFAULT_SYSTEM_PROMPTS = {
    "text": "You are a helpful assistant. Respond with text outputs.",
    "audio": "You are a helpful assistant. Respond with spoken outputs.",
}

# The release replaces these tokens in decoded text (they survive `skip_special_tokens=True`).
TEXT_REPLACEMENTS = (("<|empty|>", "."), ("<|end_empty|>", ":"))

CODEC_SUBFOLDER = "codec"
AUDIO_PLACEHOLDER = "<audio>"

# Renders the TEXT form of a prompt, for display and for `apply_chat_template(tokenize=False)`; speech turns show
# as `audio_placeholder`. Token grids are never tokenized from this string (the release builds them per segment).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- set parts = [message['content']] if message['content'] is mapping else message['content'] %}"
    "{%- for part in parts %}"
    "{%- if part is string %}{{- part }}"
    "{%- elif part['type'] is defined and part['type'] == 'text' %}{{- part['text'] }}"
    "{%- else %}{{- audio_placeholder | default('<audio>') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if messages | length == 0 or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + (default_system_prompt | default("
    "'You are a helpful assistant. Respond with text outputs.')) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if output_modality is defined and output_modality == 'audio' %}"
    "{{- sosp_token | default('<|object_ref_start|>') }}"
    "{%- endif %}"
    "{%- endif %}"
)


@dataclass
class MossSpeechResponse:
    """One decoded answer of [`MossSpeechProcessor.batch_decode`].

    Args:
        text: The text channel of the text rows, special tokens skipped, `<|empty|>` → "." and `<|end_empty|>` → ":".
        audio: 1-D float32 waveform of all speech codes, or `None` (no speech, or `decode_audio=False`).
        sampling_rate: Rate of `audio` in Hz (24000 for the release's codec), `None` when `audio` is `None`.
        codes: 1-D LongTensor, the codes of every speech segment, concatenated.
        segments: The codes of each speech segment (an empty tensor for a segment closed right after opening).
    """

    text: str
    audio: torch.FloatTensor | None = None
    sampling_rate: int | None = None
    codes: torch.LongTensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    segments: list[torch.LongTensor] = field(default_factory=list)


@dataclass
class _Content:
    """Parsed content of one message: text, or speech (codes, or a waveform still to be encoded)."""

    where: str
    text: str | None = None
    codes: torch.LongTensor | None = None
    waveform: torch.Tensor | None = None

    @property
    def is_audio(self) -> bool:
        return self.text is None


class _CodecSlot:
    """Holds the codec outside the processor's serialised state.

    `ProcessorMixin.to_dict` deep-copies the processor's `__dict__`; sharing the model here keeps that from copying
    codec weights every time the processor is printed or saved.
    """

    def __init__(self, model: MossSpeechCodecModel | None = None) -> None:
        self.model = model
        self.base: str | None = None  # directory (or repo id) the processor was loaded from
        self.base_subfolder = ""

    def __deepcopy__(self, memo: dict) -> _CodecSlot:
        copied = _CodecSlot(self.model)
        copied.base, copied.base_subfolder = self.base, self.base_subfolder
        return copied


def _check_id(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"MossSpeechProcessor: {name} must be an integer >= 0, got {value!r}.")
    return int(value)


class MossSpeechProcessor(ProcessorMixin):
    r"""Processor of MOSS-Speech: builds the two-channel prompt grid and decodes generated grids.

    Holds a tokenizer, a [`MossSpeechFeatureExtractor`] (validates, downmixes and resamples input audio to the
    codec's 16 kHz) and, optionally, a [`MossSpeechCodecModel`] that turns audio turns into codes and generated codes
    into speech. The codec is given as a model (`codec=`) or as a directory / repo id (`codec_path=`) loaded with
    `MossSpeechCodecModel.from_pretrained` the first time it is needed.

    Args:
        feature_extractor: Audio preprocessing; a default `MossSpeechFeatureExtractor()` when `None`.
        tokenizer: The text tokenizer (the release's is Qwen3's).
        chat_template: Jinja template of the prompt's text form; [`CHAT_TEMPLATE`] by default.
        codec: A codec model to use as is.
        codec_path: Directory or Hub repo id of a codec, loaded lazily (saved in `processor_config.json`).
        codec_subfolder: Subfolder of the processor's own directory holding a codec (written by `save_pretrained`
            when the codec was given as a model without a path).
        sosp_token_id: Text id that opens a speech segment (start of speech).
        eosp_token_id: Audio id that closes a speech segment (end of speech).
        modality_pad_token_id: Text id of speech rows.
        audio_pad_token_id: Audio id of text rows and of left padding.
        text_pad_token_id: Text id of left padding; the tokenizer's pad id when `None`.
        num_codes: Valid speech codes are `0 .. num_codes - 1`.
        default_system_prompts: Fallback system prompt per output modality ("text", "audio").

    Example:

    ```python
    >>> processor = MossSpeechProcessor(tokenizer=tokenizer, codec_path="path/to/MOSS-Speech-Codec")
    >>> inputs = processor([{"role": "user", "content": {"type": "audio", "path": "question.wav"}}],
    ...                    output_modality="audio")
    >>> rows = model.generate(**inputs)
    >>> answer = processor.batch_decode(rows)[0]     # answer.text, answer.audio (24 kHz), answer.codes
    ```
    """

    def __init__(
        self,
        feature_extractor: MossSpeechFeatureExtractor | None = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        codec: MossSpeechCodecModel | None = None,
        codec_path: str | os.PathLike | None = None,
        codec_subfolder: str | None = None,
        sosp_token_id: int = 151646,
        eosp_token_id: int = 16384,
        modality_pad_token_id: int = 151667,
        audio_pad_token_id: int = 512,
        text_pad_token_id: int | None = None,
        num_codes: int = 16384,
        default_system_prompts: dict[str, str] | None = None,
    ) -> None:
        if tokenizer is None:
            raise ValueError("MossSpeechProcessor: tokenizer is required, got None.")
        if feature_extractor is None:
            feature_extractor = MossSpeechFeatureExtractor()
        if not isinstance(feature_extractor, MossSpeechFeatureExtractor):
            raise TypeError("MossSpeechProcessor: feature_extractor must be a MossSpeechFeatureExtractor, got "
                            f"{type(feature_extractor).__name__}.")
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

        if text_pad_token_id is None:
            text_pad_token_id = tokenizer.pad_token_id
            if text_pad_token_id is None:
                raise ValueError("MossSpeechProcessor: text_pad_token_id is None and the tokenizer has no pad token; "
                                 "pass text_pad_token_id (the release uses <|endoftext|> = 151643).")
        self.sosp_token_id = _check_id("sosp_token_id", sosp_token_id)
        self.eosp_token_id = _check_id("eosp_token_id", eosp_token_id)
        self.modality_pad_token_id = _check_id("modality_pad_token_id", modality_pad_token_id)
        self.audio_pad_token_id = _check_id("audio_pad_token_id", audio_pad_token_id)
        self.text_pad_token_id = _check_id("text_pad_token_id", text_pad_token_id)
        self.num_codes = _check_id("num_codes", num_codes)
        if self.num_codes < 1:
            raise ValueError(f"MossSpeechProcessor: num_codes must be >= 1, got {num_codes}.")
        if self.sosp_token_id == self.modality_pad_token_id:
            raise ValueError(f"MossSpeechProcessor: sosp_token_id and modality_pad_token_id must differ, both are "
                             f"{self.sosp_token_id}.")
        if self.eosp_token_id < self.num_codes:
            raise ValueError(f"MossSpeechProcessor: eosp_token_id ({self.eosp_token_id}) must not be a speech code, "
                             f"i.e. must be >= num_codes ({self.num_codes}).")
        if self.audio_pad_token_id == self.eosp_token_id:
            raise ValueError(f"MossSpeechProcessor: audio_pad_token_id and eosp_token_id must differ, both are "
                             f"{self.eosp_token_id}.")

        prompts = dict(DEFAULT_SYSTEM_PROMPTS)
        if default_system_prompts is not None:
            if not isinstance(default_system_prompts, Mapping) or not set(default_system_prompts) <= set(MODALITIES):
                raise ValueError("MossSpeechProcessor: default_system_prompts must be a dict with keys among "
                                 f"{MODALITIES}, got {default_system_prompts!r}.")
            for key, value in default_system_prompts.items():
                if not isinstance(value, str):
                    raise TypeError(f"MossSpeechProcessor: default_system_prompts[{key!r}] must be a str, got "
                                    f"{type(value).__name__}.")
            prompts.update(default_system_prompts)
        self.default_system_prompts = prompts

        if codec is not None and not isinstance(codec, MossSpeechCodecModel):
            raise TypeError(f"MossSpeechProcessor: codec must be a MossSpeechCodecModel, got {type(codec).__name__}.")
        if codec_path is not None and not isinstance(codec_path, (str, os.PathLike)):
            raise TypeError(f"MossSpeechProcessor: codec_path must be a path or a repo id, got {codec_path!r}.")
        self.codec_path = None if codec_path is None else str(codec_path)
        self.codec_subfolder = codec_subfolder
        self._codec_slot = _CodecSlot(codec)

    # ------------------------------------------------------------------------------------------ configuration

    @staticmethod
    def special_ids_from_config(config: MossSpeechConfig) -> dict[str, int]:
        """The processor's special-id arguments read from a model config (tiny test configs have their own ids)."""
        names = ("sosp_token_id", "eosp_token_id", "modality_pad_token_id", "audio_pad_token_id")
        missing = [name for name in names if getattr(config, name, None) is None]
        if missing:
            raise TypeError(f"config must be a MossSpeechConfig (or have its special ids), missing {missing} on "
                            f"{type(config).__name__}.")
        ids = {name: getattr(config, name) for name in names}
        # Codes are the audio ids below end-of-speech (MossSpeechConfig.num_audio_codes).
        ids["num_codes"] = config.eosp_token_id
        if getattr(config, "pad_token_id", None) is not None:
            ids["text_pad_token_id"] = config.pad_token_id
        return ids

    @classmethod
    def from_model_config(
        cls,
        config: MossSpeechConfig,
        tokenizer: Any,
        feature_extractor: MossSpeechFeatureExtractor | None = None,
        **kwargs: Any,
    ) -> MossSpeechProcessor:
        """A processor whose special ids are those of `config`; `kwargs` (codec, codec_path, …) as in `__init__`."""
        return cls(feature_extractor, tokenizer, **{**cls.special_ids_from_config(config), **kwargs})

    @property
    def model_input_names(self) -> list[str]:
        """What `__call__` returns and `MossSpeechForCausalLM.generate` takes."""
        return ["input_ids", "attention_mask"]

    @property
    def grid_layout(self) -> GridLayout:
        """The grid layout of this processor's special ids (builds prompts and splits generated rows)."""
        return GridLayout(self.sosp_token_id, self.eosp_token_id, self.modality_pad_token_id, self.audio_pad_token_id,
                          self.text_pad_token_id, self.num_codes)

    @property
    def sosp_token(self) -> str:
        """The tokenizer's string for `sosp_token_id` (`<|object_ref_start|>` in the release's tokenizer)."""
        token = self.tokenizer.convert_ids_to_tokens(self.sosp_token_id)
        if token is None or token == self.tokenizer.unk_token:
            raise ValueError(f"MossSpeechProcessor: sosp_token_id {self.sosp_token_id} is not a token of the "
                             f"tokenizer ({len(self.tokenizer)} tokens); audio output needs it in the prompt.")
        return token

    # ------------------------------------------------------------------------------------------------- codec

    @property
    def codec(self) -> MossSpeechCodecModel | None:
        """The speech codec; loaded from `codec_path` (or the processor's `codec_subfolder`) on first access."""
        slot = self._codec_slot
        if slot.model is None and (self.codec_path is not None or self.codec_subfolder is not None):
            slot.model = self._load_codec()
        return slot.model

    @codec.setter
    def codec(self, value: MossSpeechCodecModel | None) -> None:
        if value is not None and not isinstance(value, MossSpeechCodecModel):
            raise TypeError(f"codec must be a MossSpeechCodecModel or None, got {type(value).__name__}.")
        self._codec_slot.model = value

    def _load_codec(self) -> MossSpeechCodecModel:
        slot = self._codec_slot
        if self.codec_path is not None:
            logger.info(f"Loading the MOSS-Speech codec from {self.codec_path}")
            return MossSpeechCodecModel.from_pretrained(self.codec_path).eval()
        if slot.base is None:
            raise ValueError(f"MossSpeechProcessor: codec_subfolder={self.codec_subfolder!r} is relative to the "
                             "processor's directory, but this processor was not loaded with from_pretrained; pass "
                             "codec= or codec_path= instead.")
        subfolder = "/".join(p for p in (slot.base_subfolder, self.codec_subfolder) if p)
        logger.info(f"Loading the MOSS-Speech codec from {slot.base} (subfolder {subfolder})")
        return MossSpeechCodecModel.from_pretrained(slot.base, subfolder=subfolder).eval()

    def _require_codec(self, purpose: str) -> MossSpeechCodecModel:
        codec = self.codec
        if codec is None:
            raise ValueError(f"MossSpeechProcessor has no codec {purpose}: create it with codec=MossSpeechCodecModel"
                             "(...) or codec_path=<directory or repo id>, or set processor.codec.")
        return codec

    # ----------------------------------------------------------------------------------------------- inputs

    def __call__(
        self,
        conversations: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        output_modality: str | Sequence[str] = "text",
        return_tensors: str | None = "pt",
        system_prompt: str | Sequence[str | None] | None = None,
        add_generation_prompt: bool = True,
    ) -> BatchFeature:
        """Prompt grids of one conversation or a batch, left-padded: `input_ids` (B, L, 2) and `attention_mask` (B, L).

        Args:
            conversations: A list of messages `{"role": "system" | "user" | "assistant", "content": ...}`, or a list of
                such lists. Content is a `str` (text turn) or ONE speech part: `{"type": "audio", "path": ...}`, the
                release's `{"path": ..., "type": "audio/wav"}`, `{"type": "audio", "audio": (waveform, rate)}`,
                `{"array": ..., "sampling_rate": ...}` (a `datasets` Audio value), `{"type": "audio", "codes": [...]}`
                (pre-computed codes, no codec needed), a `pathlib.Path`, or a one-element list of any of these (or
                of `{"type": "text", "text": ...}`). Audio files are read with soundfile; all audio of the batch is
                encoded in one codec call.
            output_modality: "text" or "audio" (the answer's modality), or one per conversation.
            return_tensors: "pt", "np" or `None` (lists).
            system_prompt: Text of the default system turn (added when the first turn is not a system turn, after the
                conversation as in the release); one per conversation or one for all. `None`: the release's fallback
                for the output modality (`default_system_prompts`).
            add_generation_prompt: End with the assistant prefix (and start of speech for audio output).
        """
        batch, _ = self._as_batch(conversations)
        modalities = self._per_conversation(output_modality, len(batch))
        prompts = self._system_prompts(system_prompt, len(batch))
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")

        parsed = [self._parse_conversation(conversation, where, load=True) for conversation, where in batch]
        self._encode_waveforms([content for turns in parsed for _, content in turns if content.waveform is not None])

        layout = self.grid_layout
        rows = []
        for turns, modality, prompt in zip(parsed, modalities, prompts):
            sosp_token = self.sosp_token if add_generation_prompt and modality == "audio" else None
            try:
                rows.append(layout.conversation_rows(
                    self._grid_turns(turns), self._tokenize, self._system_prompt(prompt, modality),
                    add_generation_prompt=add_generation_prompt, output_modality=modality, sosp_token=sosp_token))
            except ValueError as error:
                raise ValueError(f"MossSpeechProcessor: {error}") from error
        input_ids, attention_mask = layout.left_pad(rows)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        elif return_tensors is None:
            data = {key: value.tolist() for key, value in data.items()}
        return BatchFeature(data=data)

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        return_tensors: str | None = "pt",
        output_modality: str | Sequence[str] = "text",
        system_prompt: str | Sequence[str | None] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> BatchFeature | torch.Tensor | str | list[str]:
        """The prompt of a conversation (or a batch): the token grid, or its text form with `tokenize=False`.

        With `tokenize=True` this is `self(conversation, ...)` (a `BatchFeature`, or only `input_ids` with
        `return_dict=False`, as transformers' processors do); `chat_template` and `kwargs` are not used there because
        the grid is built per segment, never by tokenizing a rendered string (the release does the same). With
        `tokenize=False` the Jinja `chat_template` renders the prompt as text (speech turns as "<audio>"), one
        string per conversation; `kwargs` are passed to the template.
        """
        if continue_final_message:
            raise ValueError("continue_final_message=True is not supported: MOSS-Speech prompts end with the "
                             "assistant prefix (add_generation_prompt=True).")
        if tokenize:
            out = self(conversation, output_modality=output_modality, return_tensors=return_tensors,
                       system_prompt=system_prompt, add_generation_prompt=add_generation_prompt)
            return out if return_dict else out["input_ids"]

        batch, is_batched = self._as_batch(conversation)
        modalities = self._per_conversation(output_modality, len(batch))
        prompts = self._system_prompts(system_prompt, len(batch))
        template = self._template_source(chat_template)
        rendered = []
        for (messages, where), modality, prompt in zip(batch, modalities, prompts):
            turns = self._parse_conversation(messages, where, load=False)
            # The template sees plain strings and speech markers only (no arrays, paths or tensors).
            display = [{"role": role, "content": content.text if not content.is_audio else [{"type": "audio"}]}
                       for role, content in turns]
            texts, _ = render_jinja_template(
                conversations=[display], chat_template=template, add_generation_prompt=add_generation_prompt,
                output_modality=modality, audio_placeholder=AUDIO_PLACEHOLDER,
                default_system_prompt=prompt if prompt is not None else self.default_system_prompts[modality],
                sosp_token=self.sosp_token if modality == "audio" else "", **kwargs,
            )
            rendered.append(texts[0])
        return rendered if is_batched else rendered[0]

    def training_rows(
        self,
        conversations: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        output_modality: str | Sequence[str | None] | None = None,
        system_prompt: str | Sequence[str | None] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Unpadded training grids of conversations that contain their answers, with a per-row assistant mask.

        Each conversation must hold at least one assistant turn. Its grid is the prompt that `__call__` builds for the
        conversation up to its LAST assistant turn (default system turn included, placed after the history exactly
        where inference puts it, i.e. right before that assistant turn), followed by that turn's content and closing
        `"<|im_end|>\\n"`, then any later turns. So the rows a model is trained on equal the rows it is prompted with.
        Earlier assistant turns stay where they are in the history.

        Args:
            conversations: One conversation or a list of them, with the content forms `__call__` accepts; all audio
                of the call is encoded in one codec call.
            output_modality: "text", "audio" or `None` (one for all or one per conversation): selects the default
                system prompt; `None` takes the modality of the last assistant turn (speech content → "audio").
            system_prompt: As in `__call__`.

        Returns:
            One dict per conversation: `input_ids` (L, 2) LongTensor and `assistant_masks` (L,) BoolTensor, true on the
            rows an assistant turn produces (its content rows, a speech segment's start and end rows included, and its
            `<|im_end|>` row), false on headers, other turns and the turn-closing newline.
        """
        batch, _ = self._as_batch(conversations)
        values = [output_modality] * len(batch) if output_modality is None or isinstance(output_modality, str) \
            else output_modality
        if not isinstance(values, Sequence) or len(values) != len(batch):
            raise ValueError(f"output_modality must be 'text', 'audio' or None, or a list of {len(batch)} of them (one "
                             f"per conversation), got {output_modality!r}.")
        for value in values:
            if value is not None and value not in MODALITIES:
                raise ValueError(f"output_modality must be 'text', 'audio' or None, got {value!r}.")
        prompts = self._system_prompts(system_prompt, len(batch))

        parsed = []
        for conversation, where in batch:
            turns = self._parse_conversation(conversation, where, load=True)
            if not any(role == "assistant" for role, _ in turns):
                raise ValueError(f"{where} has no assistant turn: training needs the answer in the conversation "
                                 f"(roles found: {[role for role, _ in turns]}).")
            parsed.append(turns)
        self._encode_waveforms([content for turns in parsed for _, content in turns if content.waveform is not None])

        out = []
        for turns, modality, prompt in zip(parsed, values, prompts):
            if modality is None:
                last = [content for role, content in turns if role == "assistant"][-1]
                modality = "audio" if last.is_audio else "text"
            rows, mask = self.grid_layout.training_rows(
                self._grid_turns(turns), self._tokenize, self._system_prompt(prompt, modality),
                im_end_token_id=self.tokenizer.convert_tokens_to_ids(IM_END_TOKEN))
            out.append({"input_ids": torch.tensor(rows, dtype=torch.long),
                        "assistant_masks": torch.tensor(mask, dtype=torch.bool)})
        return out

    # ------------------------------------------------------------------------------------- input validation

    def _template_source(self, chat_template: str | None) -> str:
        """The Jinja source `apply_chat_template` renders.

        `chat_template` is the name of one of the processor's templates or a template itself; `None` picks the
        processor's template (the one named "default" when it holds several, as transformers saves them).
        """
        templates = self.chat_template
        if isinstance(templates, Mapping):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if "default" not in templates:
                raise ValueError(f"this processor has several chat templates ({', '.join(templates)}) and none is "
                                 "named 'default': pass chat_template=<name>.")
            return templates["default"]
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ValueError("this processor has no chat template: pass chat_template=<Jinja template>.")
        return templates

    @staticmethod
    def _as_batch(conversations: Any) -> tuple[list[tuple[Sequence[Mapping], str]], bool]:
        """[(messages, name for errors)] and whether a batch was given."""
        if isinstance(conversations, (str, Mapping)) or not isinstance(conversations, Sequence):
            raise TypeError("conversations must be a list of messages (dicts with 'role' and 'content') or a list of "
                            f"such lists, got {type(conversations).__name__}.")
        if len(conversations) == 0:
            raise ValueError("conversations is empty: pass at least one message.")
        if isinstance(conversations[0], Mapping):
            return [(conversations, "conversation")], False
        for index, conversation in enumerate(conversations):
            if isinstance(conversation, (str, Mapping)) or not isinstance(conversation, Sequence):
                raise TypeError(f"conversations[{index}] must be a list of messages, got "
                                f"{type(conversation).__name__}.")
        return [(conversation, f"conversations[{index}]") for index, conversation in enumerate(conversations)], True

    @staticmethod
    def _per_conversation(output_modality: Any, batch_size: int) -> list[str]:
        values = [output_modality] * batch_size if isinstance(output_modality, str) else output_modality
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != batch_size:
            raise ValueError(f"output_modality must be 'text' or 'audio', or a list of {batch_size} of them (one per "
                             f"conversation), got {output_modality!r}.")
        for value in values:
            if value not in MODALITIES:
                raise ValueError(f"output_modality must be 'text' or 'audio', got {value!r}.")
        return list(values)

    def _system_prompts(self, system_prompt: Any, batch_size: int) -> list[str | None]:
        if system_prompt is None or isinstance(system_prompt, str):
            values = [system_prompt] * batch_size
        elif isinstance(system_prompt, Sequence) and len(system_prompt) == batch_size:
            values = list(system_prompt)
        else:
            raise ValueError(f"system_prompt must be a str, None, or a list of {batch_size} of them (one per "
                             f"conversation), got {system_prompt!r}.")
        for value in values:
            if value is not None and not isinstance(value, str):
                raise TypeError(f"system_prompt must hold str or None, got {type(value).__name__}.")
        return values

    def _parse_conversation(self, messages: Sequence[Mapping], where: str, load: bool) -> list[tuple[str, _Content]]:
        if len(messages) == 0:
            raise ValueError(f"{where} is empty: a conversation needs at least one message.")
        turns = []
        for index, message in enumerate(messages):
            name = f"{where}[{index}]"
            if not isinstance(message, Mapping):
                raise TypeError(f"{name} must be a dict with 'role' and 'content', got {type(message).__name__}.")
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"{name}['role'] must be one of {ROLES}, got {role!r}.")
            if "content" not in message:
                raise ValueError(f"{name} has no 'content'.")
            turns.append((role, self._parse_content(message["content"], f"{name}['content']", load)))
        return turns

    def _parse_content(self, content: Any, where: str, load: bool) -> _Content:
        if isinstance(content, str):
            return _Content(where, text=content)
        if isinstance(content, os.PathLike):
            return self._audio_file_content(content, where, load)
        if isinstance(content, Mapping):
            return self._parse_part(content, where, load)
        if isinstance(content, Sequence):
            if len(content) != 1:
                raise ValueError(f"{where} has {len(content)} content parts; MOSS-Speech takes exactly one per "
                                 "message (one modality per turn): put each part in its own message.")
            part = content[0]
            if isinstance(part, (str, Mapping, os.PathLike)):
                return self._parse_content(part, f"{where}[0]", load)
            raise TypeError(f"{where}[0] must be a str or a dict, got {type(part).__name__}.")
        raise TypeError(f"{where} must be a str (text), a dict (one audio or text part) or a list with one part, got "
                        f"{type(content).__name__}.")

    def _parse_part(self, part: Mapping, where: str, load: bool) -> _Content:
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise TypeError(f"{where}['text'] must be a str, got {type(text).__name__}.")
            return _Content(where, text=text)
        if kind is not None and kind not in ("audio", "filepath") and not str(kind).startswith("audio/"):
            raise ValueError(f"{where}['type'] is {kind!r}; expected 'text' or 'audio' (the release's 'audio/wav' and "
                             "'filepath' are accepted too).")
        if "codes" in part:
            return _Content(where, codes=self._check_codes(part["codes"], f"{where}['codes']"))
        if "array" in part:  # a `datasets` Audio value: the decoded array wins over its (maybe relative) path
            return self._array_content(part["array"], part.get("sampling_rate"), f"{where}['array']", load)
        if "audio" in part:
            return self._audio_value_content(part["audio"], part.get("sampling_rate"), f"{where}['audio']", load)
        if "path" in part:
            return self._audio_file_content(part["path"], f"{where}['path']", load)
        raise ValueError(f"{where} has neither text nor audio: got keys {sorted(map(str, part))}; expected "
                         "{'type': 'text', 'text': ...} or an audio part with 'path', 'audio', 'array' or 'codes'.")

    def _audio_value_content(self, value: Any, sampling_rate: Any, where: str, load: bool) -> _Content:
        if isinstance(value, (str, os.PathLike)):
            return self._audio_file_content(value, where, load)
        if isinstance(value, Mapping):
            return self._parse_part(value, where, load)
        if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], (int, float, np.number)):
            return self._array_content(value[0], value[1], where, load)
        if callable(getattr(value, "get_all_samples", None)):
            # A torchcodec AudioDecoder, which `datasets` returns for Audio columns.
            return _Content(where, waveform=self._load_audio(value, None, where)) if load else _Content(where)
        return self._array_content(value, sampling_rate, where, load)

    def _array_content(self, array: Any, sampling_rate: Any, where: str, load: bool) -> _Content:
        if sampling_rate is None:
            raise ValueError(f"{where}: an audio array needs its sampling rate; pass (waveform, sampling_rate) or "
                             "{'array': waveform, 'sampling_rate': rate}.")
        return _Content(where, waveform=self._load_audio(array, sampling_rate, where)) if load else _Content(where)

    def _audio_file_content(self, path: Any, where: str, load: bool) -> _Content:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{where} must be a path to an audio file, got {type(path).__name__}.")
        return _Content(where, waveform=self._load_audio(path, None, where)) if load else _Content(where)

    def _load_audio(self, audio: Any, sampling_rate: Any, where: str) -> torch.Tensor:
        """Mono float32 waveform at the feature extractor's rate (the codec's input rate)."""
        return load_audio(audio, sampling_rate, target_rate=self.feature_extractor.sampling_rate, where=where)[0]

    def _check_codes(self, codes: Any, where: str) -> torch.LongTensor:
        if isinstance(codes, torch.Tensor):
            values = codes.detach().cpu()
        elif isinstance(codes, np.ndarray):
            values = torch.from_numpy(codes)
        elif isinstance(codes, (list, tuple)):
            if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in codes):
                raise TypeError(f"{where} must hold integer codes, got {codes!r}.")
            values = torch.tensor(list(codes), dtype=torch.long)
        else:
            raise TypeError(f"{where} must be a list, numpy array or tensor of integer codes, got "
                            f"{type(codes).__name__}.")
        if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"{where} must hold integer codes, got dtype {values.dtype}.")
        if values.ndim == 2 and values.shape[0] == 1:
            values = values[0]
        if values.ndim != 1:
            raise ValueError(f"{where} must be 1-D (one code per 80 ms), got shape {tuple(values.shape)}.")
        if values.numel() == 0:
            raise ValueError(f"{where} is empty: a speech turn needs at least one code.")
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= self.num_codes:
            raise ValueError(f"{where} holds code {low if low < 0 else high}, outside the codebook "
                             f"[0, {self.num_codes}).")
        return values.long()

    def _encode_waveforms(self, contents: list[_Content]) -> None:
        """Encode every waveform of the batch in one codec call and store the codes on each content."""
        if not contents:
            return
        codec = self._require_codec(f"to encode audio turns (first one: {contents[0].where})")
        codes = codec.encode([c.waveform for c in contents], sampling_rate=self.feature_extractor.sampling_rate).codes
        for content, item in zip(contents, codes):
            content.codes = self._check_codes(item, f"the codes the codec returned for {content.where}")
            content.waveform = None

    # -------------------------------------------------------------------------------------------- the grid

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _system_prompt(self, system_prompt: str | None, modality: str) -> str:
        """The default system turn's text: the given prompt, else the fallback for the output modality."""
        return system_prompt if system_prompt is not None else self.default_system_prompts[modality]

    @staticmethod
    def _grid_turns(turns: list[tuple[str, _Content]]) -> list[tuple[str, str | torch.LongTensor]]:
        """Parsed turns as the grid layout takes them: text, or the (already encoded) speech codes."""
        return [(role, content.codes if content.is_audio else content.text) for role, content in turns]

    # ----------------------------------------------------------------------------------------------- output

    def batch_decode(
        self,
        sequences: Any,
        lengths: torch.Tensor | Sequence[int] | None = None,
        decode_audio: bool = True,
        voice_prompt: Any = None,
        generator: torch.Generator | None = None,
    ) -> list[MossSpeechResponse]:
        """Text and speech of generated rows: one [`MossSpeechResponse`] per batch element.

        Args:
            sequences: (B, T, 2) or (T, 2) rows as `generate` returns them (tensor, array or nested lists), or a
                `MossSpeechGenerateOutput` (its `sequences` and `lengths` are used).
            lengths: Rows to read per element (the rest is ignored); all `T` when `None`.
            decode_audio: Turn the codes into speech with the codec (one batched `decode` call for every element that
                has codes); `False` returns codes only and needs no codec.
            voice_prompt: Voice of the speech: a `MossSpeechVoicePrompt`, the path of one saved as `.safetensors`,
                the path of an audio file or a `(waveform, sampling_rate)` pair (both turned into a prompt by the
                codec), or a list with one of these (or `None`) per element; `None` speaks without a prompt.
            generator: Random generator of the vocoder's noise (reproducible speech).

        Text comes from rows whose text id is not the modality pad (padding, start-of-speech and special tokens
        skipped). Speech codes are the audio ids of modality-pad rows; a segment opens at a start-of-speech row (or
        at the first speech row, when the prompt already opened it) and closes at end-of-speech, at the next text
        row, or at the end. A code outside `[0, num_codes)` or a text id outside the tokenizer's vocabulary
        `[0, len(tokenizer))` raises `ValueError` (the tokenizer would fail on a negative id and drop a too large one).
        """
        if hasattr(sequences, "sequences") and not isinstance(sequences, torch.Tensor):
            if lengths is None:
                lengths = getattr(sequences, "lengths", None)
            sequences = sequences.sequences
        grid = self._as_grid(sequences)
        batch, total = grid.shape[:2]
        lengths = self._as_lengths(lengths, batch, total)

        responses = []
        layout = self.grid_layout
        text_vocab = len(self.tokenizer)
        for index in range(batch):
            rows = grid[index, : lengths[index]].tolist()
            parts = layout.split_rows(rows, text_vocab, f"sequences[{index}]")
            text_ids = [token for part in parts if part.modality == "text" for token in part.ids]
            segments = [part.ids for part in parts if part.modality == "audio"]
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            for token, replacement in TEXT_REPLACEMENTS:
                text = text.replace(token, replacement)
            tensors = [torch.tensor(s, dtype=torch.long) for s in segments]
            codes = torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.long)
            responses.append(MossSpeechResponse(text=text, codes=codes, segments=tensors))

        speaking = [i for i, response in enumerate(responses) if response.codes.numel() > 0]
        if decode_audio and speaking:
            codec = self._require_codec("to decode speech (pass decode_audio=False to get codes only)")
            prompts = self._voice_prompts(voice_prompt, batch, codec)
            out = codec.decode([responses[i].codes for i in speaking], voice_prompt=[prompts[i] for i in speaking],
                               generator=generator)
            for row, index in enumerate(speaking):
                responses[index].audio = out.waveforms[row, : int(out.lengths[row])].float().cpu().clone()
                responses[index].sampling_rate = int(out.sampling_rate)
        return responses

    def decode(
        self,
        sequences: Any,
        lengths: torch.Tensor | Sequence[int] | None = None,
        decode_audio: bool = True,
        voice_prompt: Any = None,
        generator: torch.Generator | None = None,
    ) -> list[MossSpeechResponse]:
        """Same as [`batch_decode`]; a (T, 2) input gives a list of one response (the release returned a list)."""
        return self.batch_decode(sequences, lengths=lengths, decode_audio=decode_audio, voice_prompt=voice_prompt,
                                 generator=generator)

    @staticmethod
    def _as_grid(sequences: Any) -> torch.Tensor:
        if isinstance(sequences, torch.Tensor):
            grid = sequences.detach().cpu()
        elif isinstance(sequences, (np.ndarray, list, tuple)):
            grid = torch.as_tensor(np.asarray(sequences))
        else:
            raise TypeError(f"sequences must be a tensor, array or nested list of (T, 2) or (B, T, 2) rows, got "
                            f"{type(sequences).__name__}.")
        if grid.dtype.is_floating_point or grid.dtype == torch.bool or grid.is_complex():
            raise TypeError(f"sequences must hold integer token ids, got dtype {grid.dtype}.")
        if grid.ndim == 2:
            grid = grid[None]
        if grid.ndim != 3 or grid.shape[-1] != 2:
            raise ValueError(f"sequences must have shape (T, 2) or (B, T, 2) (text, audio channels), got "
                             f"{tuple(grid.shape)}.")
        return grid.long()

    @staticmethod
    def _as_lengths(lengths: Any, batch: int, total: int) -> list[int]:
        if lengths is None:
            return [total] * batch
        values = lengths.tolist() if isinstance(lengths, (torch.Tensor, np.ndarray)) else list(lengths)
        valid = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= total for v in values)
        if len(values) != batch or not valid:
            raise ValueError(f"lengths must give 0..{total} rows for each of the {batch} elements, got {lengths!r}.")
        return [int(v) for v in values]

    def _voice_prompts(self, voice_prompt: Any, batch: int, codec: MossSpeechCodecModel) -> list:
        if isinstance(voice_prompt, list):
            if len(voice_prompt) != batch:
                raise ValueError(f"voice_prompt as a list needs one entry per element ({batch}), got "
                                 f"{len(voice_prompt)}.")
            return [self._voice_prompt(p, codec, f"voice_prompt[{i}]") for i, p in enumerate(voice_prompt)]
        return [self._voice_prompt(voice_prompt, codec, "voice_prompt")] * batch

    def _voice_prompt(self, value: Any, codec: MossSpeechCodecModel, where: str) -> MossSpeechVoicePrompt | None:
        if value is None or isinstance(value, MossSpeechVoicePrompt):
            return value
        if isinstance(value, (str, os.PathLike)):
            if str(value).endswith(".safetensors"):
                if not Path(value).is_file():
                    raise FileNotFoundError(f"{where}: voice prompt file {str(value)!r} does not exist.")
                return MossSpeechVoicePrompt.load(str(value))
            waveform, sampling_rate = load_audio(value, where=where)
            return codec.voice_prompt(waveform, sampling_rate=sampling_rate)
        if isinstance(value, tuple) and len(value) == 2:
            waveform, sampling_rate = value
            if isinstance(waveform, (list, tuple)):
                waveform = np.asarray(waveform, dtype=np.float32)
            return codec.voice_prompt(waveform, sampling_rate=sampling_rate)
        raise TypeError(f"{where} must be a MossSpeechVoicePrompt, a path, a (waveform, sampling_rate) pair or None, "
                        f"got {type(value).__name__}.")

    # ------------------------------------------------------------------------------------------ save / load

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Save tokenizer, feature extractor, chat template, special ids and the codec reference.

        The codec's weights are written (to `codec/`) only when nothing else can reload them: a codec given as a
        model without `codec_path`, or one that already lived in the loaded processor's own `codec/` folder.
        """
        save_directory = str(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        subfolder = self._save_codec(save_directory)
        previous = self.codec_subfolder
        self.codec_subfolder = subfolder
        try:
            files = super().save_pretrained(save_directory, push_to_hub=False)
        finally:
            self.codec_subfolder = previous
        if push_to_hub:
            # Upload after the codec folder is written (the base class would only upload files it wrote itself).
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, **kwargs)
        return files

    def _save_codec(self, save_directory: str) -> str | None:
        if self.codec_path is not None:
            return None  # reloadable from codec_path
        slot = self._codec_slot
        target = os.path.join(save_directory, CODEC_SUBFOLDER)
        if slot.model is not None:
            slot.model.save_pretrained(target)
            return CODEC_SUBFOLDER
        if self.codec_subfolder is None:
            return None
        if slot.base is not None and os.path.isdir(slot.base):
            source = os.path.join(slot.base, slot.base_subfolder, self.codec_subfolder)
            if os.path.abspath(source) != os.path.abspath(target):
                shutil.copytree(source, target, dirs_exist_ok=True)
            return CODEC_SUBFOLDER
        self.codec.save_pretrained(target)  # a codec inside a Hub repo: load it, then write it
        return CODEC_SUBFOLDER

    _INIT_VALUE_NAMES = (
        "codec_path", "codec_subfolder", "sosp_token_id", "eosp_token_id", "modality_pad_token_id",
        "audio_pad_token_id", "text_pad_token_id", "num_codes", "default_system_prompts",
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> MossSpeechProcessor:
        """Load a saved processor; `codec=`, `codec_path=` and the special ids may be overridden as keywords."""
        # Our own arguments must not reach the tokenizer's from_pretrained (it would store them in its config).
        overrides = {name: kwargs.pop(name) for name in (*cls._INIT_VALUE_NAMES, "codec") if name in kwargs}
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if overrides:
            values = {name: getattr(processor, name) for name in cls._INIT_VALUE_NAMES}
            values.update(overrides)
            processor = cls(processor.feature_extractor, processor.tokenizer, chat_template=processor.chat_template,
                            **values)
        processor._codec_slot.base = str(pretrained_model_name_or_path)
        processor._codec_slot.base_subfolder = kwargs.get("subfolder", "") or ""
        return processor


def register_processor() -> None:
    """Make `AutoProcessor.from_pretrained` resolve `MossSpeechProcessor` (the package's __init__ runs it; idempotent).

    Not run at import of this module: a copy of it loaded as a checkpoint's remote code would otherwise register its
    own class globally, and a second checkpoint's processor would then be built from the first one's code.
    """
    AutoProcessor.register(MossSpeechConfig, MossSpeechProcessor, exist_ok=True)


__all__ = ["CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPTS", "MossSpeechProcessor", "MossSpeechResponse",
           "register_processor"]

"""Bad input through the public API, on the shipped MOSS-Speech-Nano: a clear error, or a documented graceful handling.

One table (`CASES`), one parametrised test. An error case names the exception and a pattern its message must match
(the argument, the value, what was expected); a graceful case names a check of the result (and of the log).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from modeling_moss_speech import MossSpeechChat, MossSpeechVoicePrompt, pretrained
from modeling_moss_speech.processing_moss_speech import MossSpeechResponse

TEXT_VOCAB = 969  # the nano tokenizer's size
GREEDY = {"max_new_tokens": 8, "do_sample": False}
QUESTION = {"role": "user", "content": "what colour is a banana"}


@pytest.fixture(scope="module")
def nano() -> SimpleNamespace:
    path = pretrained.nano_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    codec = processor.codec
    speech = 0.1 * torch.randn(32000, generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(model=model, processor=processor, codec=codec, chat=MossSpeechChat(model, processor),
                           prompt=codec.voice_prompt(speech, 16000))


def _prompt(ctx, **changes: Any) -> MossSpeechVoicePrompt:
    """The fixture's voice prompt with some fields replaced (as if made by a differently sized codec)."""
    fields = {"tokens": ctx.prompt.tokens, "mel": ctx.prompt.mel, "speaker_embedding": ctx.prompt.speaker_embedding}
    return MossSpeechVoicePrompt(**{**fields, **changes})


def _grid(ctx, text_id: int) -> torch.Tensor:
    pad = ctx.processor.audio_pad_token_id
    return torch.tensor([[[5, pad], [text_id, pad]]])


def _not_safetensors(ctx) -> str:
    path = ctx.tmp_path / "voice.safetensors"
    path.write_text("a text file, not safetensors")
    return str(path)


def _square_wave(amplitude: float) -> np.ndarray:
    t = np.arange(16000) / 16000
    return (amplitude * np.sign(np.sin(2 * np.pi * 100 * t))).astype(np.float32)


def _reply_to_one_message(ctx) -> tuple[Any, Any]:
    return ctx.chat.reply(QUESTION, output_modality="text", **GREEDY), ctx.chat.reply(
        [QUESTION], output_modality="text", **GREEDY)


def _same_reply_as_a_one_message_conversation(result, caplog) -> None:
    one, listed = result
    assert isinstance(one, MossSpeechResponse) and one.text == listed.text and one.text


def _loud_and_clipped(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    loud = ctx.codec.encode(_square_wave(1.5), sampling_rate=16000).codes[0]
    return loud, ctx.codec.encode(_square_wave(1.0), sampling_rate=16000).codes[0]


def _clipped_with_a_warning(result, caplog) -> None:
    loud, clipped = result
    assert torch.equal(loud, clipped)
    assert "samples up to 1.5 in magnitude, outside float audio's [-1, 1]: clipped" in caplog.text


@dataclass
class Case:
    name: str
    run: Callable[[SimpleNamespace], Any]
    error: type[Exception] | None = None
    match: str = ""
    check: Callable[[Any, pytest.LogCaptureFixture], None] | None = None


CASES = [
    # MossSpeechChat.reply: one message dict is a one-message conversation (documented in `reply`)
    Case("reply to one message dict", _reply_to_one_message, check=_same_reply_as_a_one_message_conversation),
    Case("reply to a string", lambda ctx: ctx.chat.reply("hi", output_modality="text"), TypeError,
         r"conversations must be a list of messages .* or one message dict, got str"),
    # processor.batch_decode: text ids out of range raise, as audio ids do
    Case("batch_decode negative text id", lambda ctx: ctx.processor.batch_decode(_grid(ctx, -1)), ValueError,
         r"sequences\[0\]: row 1 holds text id -1, outside the tokenizer's vocabulary \[0, 969\)"),
    Case("batch_decode text id = vocabulary size", lambda ctx: ctx.processor.batch_decode(_grid(ctx, TEXT_VOCAB)),
         ValueError, r"row 1 holds text id 969, outside the tokenizer's vocabulary \[0, 969\)"),
    Case("batch_decode audio id out of range", lambda ctx: ctx.processor.batch_decode(
        torch.tensor([[[ctx.processor.modality_pad_token_id, 600]]])), ValueError,
         r"row 0 holds audio id 600 inside a speech segment, outside the codebook \[0, 512\)"),
    # codec.voice_prompt: at least one code's worth of audio (80 ms)
    Case("voice_prompt of 20 ms", lambda ctx: ctx.codec.voice_prompt(np.zeros(320, np.float32), 16000), ValueError,
         r"`audio` is 20.0 ms long: a voice prompt needs at least 80 ms \(one code\)"),
    Case("voice_prompt of 79 ms", lambda ctx: ctx.codec.voice_prompt(np.zeros(1264, np.float32), 16000), ValueError,
         r"`audio` is 79.0 ms long"),
    # voice prompts that do not fit the codec: refused where they are used
    Case("prompt with 40 mel bins", lambda ctx: ctx.codec.decode([[1, 2]], voice_prompt=_prompt(
        ctx, mel=ctx.prompt.mel[:, :40])), ValueError, r"voice_prompt: its mel has 40 bins, this codec's flow uses 80"),
    Case("prompt with a 7-value speaker vector", lambda ctx: ctx.codec.decode([[1, 2]], voice_prompt=[_prompt(
        ctx, speaker_embedding=torch.zeros(7))]), ValueError,
         r"voice_prompt\[0\]: its speaker embedding has 7 values, this codec's flow uses 192"),
    Case("prompt mel shorter than its codes", lambda ctx: ctx.codec.decode([[1, 2]], voice_prompt=_prompt(
        ctx, mel=ctx.prompt.mel[:5])), ValueError, r"its mel has 5 frames, fewer than its 25 codes need"),
    Case("prompt codes outside the codebook", lambda ctx: ctx.codec.stream_decoder(_prompt(
        ctx, tokens=ctx.prompt.tokens + 512)), ValueError, r"its tokens hold code \d+, outside this codec's codebook"),
    Case("prompt with float tokens", lambda ctx: _prompt(ctx, tokens=ctx.prompt.tokens.float()), TypeError,
         r"voice prompt tokens must be integer codes, got dtype torch.float32"),
    # MossSpeechVoicePrompt.load names the file
    Case("load a file that is not safetensors", lambda ctx: MossSpeechVoicePrompt.load(_not_safetensors(ctx)),
         ValueError, r"voice\.safetensors' is not a MOSS-Speech voice prompt file: not readable as safetensors"),
    Case("load a missing file", lambda ctx: MossSpeechVoicePrompt.load(str(ctx.tmp_path / "none.safetensors")),
         FileNotFoundError, r"voice prompt file '.*none\.safetensors' does not exist"),
    # codec.decode of empty codes says so
    Case("decode [[]]", lambda ctx: ctx.codec.decode([[]]), ValueError, r"codes\[0\] is empty"),
    Case("decode a (1, 0) tensor", lambda ctx: ctx.codec.decode(torch.zeros(1, 0, dtype=torch.long)), ValueError,
         r"codes is empty \(shape \(1, 0\)\)"),
    # audio beyond [-1, 1] is clipped with a warning (documented in the feature extractor and `encode`)
    Case("a +-1.5 square wave", _loud_and_clipped, check=_clipped_with_a_warning),
    Case("encode with max_batch_seconds=0", lambda ctx: ctx.codec.encode(np.zeros(1600, np.float32), 16000,
                                                                         max_batch_seconds=0), ValueError,
         r"`max_batch_seconds` must be a positive number of seconds, got 0"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, nano: SimpleNamespace, tmp_path, caplog):
    ctx = SimpleNamespace(**vars(nano), tmp_path=tmp_path)
    if case.error is not None:
        with pytest.raises(case.error, match=case.match):
            case.run(ctx)
        return
    with caplog.at_level(logging.WARNING):
        result = case.run(ctx)
    case.check(result, caplog)

"""MossSpeechChat: a whole turn in one call, and speech streamed while it is generated."""

from __future__ import annotations

import pytest
import soundfile as sf
import torch
from helpers import ForceAt, espeak, tiny_codec_config, tiny_config, tiny_tokenizer

from modeling_moss_speech import MossSpeechChat, MossSpeechCodecModel, MossSpeechForCausalLM, MossSpeechProcessor

SOSP, EOSP, IM_END = 290, 64, 282


def make_chat(**generation_kwargs) -> tuple[MossSpeechChat, MossSpeechProcessor]:
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(tiny_codec_config()).eval()
    processor = MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer(), codec=codec)
    model = MossSpeechForCausalLM(tiny_config()).eval()
    return MossSpeechChat(model, processor, **generation_kwargs), processor


def forced(prompt_length: int, speech_steps: dict[int, int]) -> dict:
    """Greedy decoding where row r speaks until step speech_steps[r] (eosp), then ends its turn."""
    text_plan = {(row, step + 1): IM_END for row, step in speech_steps.items()}
    audio_plan = {(row, step): EOSP for row, step in speech_steps.items()}
    return dict(
        do_sample=False, max_new_tokens=40,
        text_logits_processor=[ForceAt(prompt_length, text_plan, suppress=(0, *range(280, 300)))],
        audio_logits_processor=[ForceAt(prompt_length, audio_plan, suppress=(EOSP,))],
    )


def test_streamed_reply_equals_offline_reply_length(tmp_path):
    wav, rate = espeak("What colour is the sky?")
    conversations = [
        [{"role": "user", "content": {"type": "audio", "audio": (wav.numpy(), rate)}}],
        [{"role": "user", "content": "What colour is grass?"}],
    ]
    chat, processor = make_chat()
    prompt_length = processor(conversations, output_modality="audio")["input_ids"].shape[1]
    plan = forced(prompt_length, {0: 30, 1: 12})

    offline = chat.reply(conversations, output_modality="audio", generator=torch.Generator().manual_seed(0), **plan)
    received: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    files = [tmp_path / "a.wav", tmp_path / "b.wav"]
    plan = forced(prompt_length, {0: 30, 1: 12})
    streamed = chat.reply(conversations, output_modality="audio", stream_to=files, chunk_size=8,
                          on_audio=lambda row, chunk: received[row].append(chunk),
                          generator=torch.Generator().manual_seed(0), **plan)
    assert len(received[0]) >= 3  # several chunks arrived while generating
    for row, (a, b) in enumerate(zip(offline, streamed)):
        assert a.codes.tolist() == b.codes.tolist() and a.codes.numel() == (29 if row == 0 else 11)
        assert b.audio.numel() == a.audio.numel() == a.codes.numel() * 1920
        assert torch.equal(torch.cat(received[row]), b.audio)
        on_disk, sr = sf.read(files[row], dtype="float32")
        assert sr == 24000 and on_disk.shape == (a.audio.numel(),)


def test_single_conversation_text_reply():
    chat, processor = make_chat(do_sample=False, max_new_tokens=6)
    reply = chat.reply([{"role": "user", "content": "What colour is grass?"}], output_modality="text")
    assert isinstance(reply.text, str) and reply.audio is None


def test_seeded_sampling_gives_the_same_answer_streamed_or_not(tmp_path):
    chat, processor = make_chat(do_sample=True, temperature=1.0, max_new_tokens=20)
    conversation = [{"role": "user", "content": "What colour is grass?"}]

    def seeded():
        return {"generator": torch.Generator().manual_seed(7), "vocoder_generator": torch.Generator().manual_seed(8)}

    offline = chat.reply(conversation, output_modality="audio", **seeded())
    streamed = chat.reply(conversation, output_modality="audio", stream_to=tmp_path / "a.wav", chunk_size=4,
                          **seeded())
    assert offline.codes.numel() > 0
    assert offline.codes.tolist() == streamed.codes.tolist() and offline.text == streamed.text
    assert offline.audio.numel() == streamed.audio.numel()
    with pytest.raises(ValueError, match="decode_audio=False"):
        chat.reply(conversation, stream_to=tmp_path / "b.wav", decode_audio=False)

"""MossSpeechProcessor: the release's grids token for token (real Qwen3 tokenizer), batching, chat template,
save/AutoProcessor round trips, and processor → generate → decode end to end with tiny random models."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import EMPTY, END_EMPTY, ForceAt, espeak, qwen3_tokenizer, tiny_codec_config, tiny_config, tiny_tokenizer
from transformers import AutoProcessor
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechConfig, MossSpeechForCausalLM
from modeling_moss_speech.processing_moss_speech import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPTS,
    MossSpeechProcessor,
    MossSpeechResponse,
)

# The release's special ids (its config.json and processor) and the Qwen3 ids of the fixed turn strings.
PAD, IM_START, IM_END, SOSP, MODALITY_PAD = 151643, 151644, 151645, 151646, 151667
AUDIO_PAD, EOSP = 512, 16384
USER, ASSISTANT, SYSTEM, NEWLINE = [IM_START, 872, 198], [IM_START, 77091, 198], [IM_START, 8948, 198], 198
TURN_END = [IM_END, NEWLINE]
HELLO_WORLD = [9707, 1879]


def qwen_ids(text: str) -> list[int]:
    return qwen3_tokenizer()(text, add_special_tokens=False)["input_ids"]


def text_rows(ids: list[int], audio_pad: int = AUDIO_PAD) -> list[list[int]]:
    return [[i, audio_pad] for i in ids]


def speech_rows(codes: list[int]) -> list[list[int]]:
    return [[SOSP, AUDIO_PAD]] + [[MODALITY_PAD, c] for c in codes] + [[MODALITY_PAD, EOSP]]


def default_system_rows(modality: str) -> list[list[int]]:
    return text_rows(SYSTEM + qwen_ids(DEFAULT_SYSTEM_PROMPTS[modality]) + TURN_END)


def generation_prefix(modality: str) -> list[list[int]]:
    return text_rows(ASSISTANT + ([SOSP] if modality == "audio" else []))


@pytest.fixture(scope="module")
def qwen() -> MossSpeechProcessor:
    return MossSpeechProcessor(tokenizer=qwen3_tokenizer())


@pytest.fixture(scope="module")
def codec() -> MossSpeechCodecModel:
    torch.manual_seed(0)
    return MossSpeechCodecModel(tiny_codec_config()).eval()  # 64 codes = the tiny LM's eosp id


@pytest.fixture
def tiny(codec) -> MossSpeechProcessor:
    return MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer(), codec=codec)


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory) -> tuple[Path, np.ndarray, int]:
    wav, rate = espeak("What is the capital of France?")
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    sf.write(path, wav.numpy(), rate)
    return path, wav.numpy(), rate


def grid(out) -> list[list[int]]:
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape[0] == 1
    assert out["attention_mask"].tolist() == [[1] * out["input_ids"].shape[1]]
    return out["input_ids"][0].tolist()


# ----------------------------------------------------------------------------------------------- real tokenizer


def test_real_qwen3_tokenizer_ids():
    tokenizer = qwen3_tokenizer()
    assert tokenizer("<|im_start|>assistant\n<|object_ref_start|>", add_special_tokens=False)["input_ids"] == [
        IM_START, 77091, 198, SOSP]
    assert qwen_ids("Hello world") == HELLO_WORLD and qwen_ids("<|im_end|>\n") == TURN_END
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == PAD
    assert tokenizer.convert_ids_to_tokens(MODALITY_PAD) == "<think>" and len(tokenizer) == 151669


@pytest.mark.parametrize("speech_in", [True, False], ids=["speech_in", "text_in"])
@pytest.mark.parametrize("modality", ["audio", "text"])
def test_four_modes_golden_grid(qwen, speech_in, modality):
    """S→S, S→T, T→S, T→T: turn, content, turn end, default system turn AFTER the conversation, prefix."""
    content = {"type": "audio", "codes": [7, 8, 9]} if speech_in else "Hello world"
    rows = grid(qwen([{"role": "user", "content": content}], output_modality=modality))
    body = speech_rows([7, 8, 9]) if speech_in else text_rows(HELLO_WORLD)
    expected = text_rows(USER) + body + text_rows(TURN_END) + default_system_rows(modality)
    assert rows == expected + generation_prefix(modality)
    assert rows[-1] == ([SOSP, AUDIO_PAD] if modality == "audio" else [NEWLINE, AUDIO_PAD])
    if speech_in:  # the speech segment: n + 2 rows, (sosp, pad), (modality pad, code)…, (modality pad, eosp)
        assert rows[3:8] == [[SOSP, 512], [MODALITY_PAD, 7], [MODALITY_PAD, 8], [MODALITY_PAD, 9], [MODALITY_PAD, EOSP]]
    prompt = qwen3_tokenizer().decode([r[0] for r in default_system_rows(modality)])
    assert prompt == f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPTS[modality]}<|im_end|>\n"
    assert DEFAULT_SYSTEM_PROMPTS == {"text": "You are a helpful assistant. Respond with text outputs.",
                                      "audio": "You are a helpful assistant. Respond with spoken outputs."}


def test_explicit_system_turn_first_means_no_default(qwen):
    system = "You are a helpful voice assistant. Answer the user's questions with spoken responses."
    conversation = [{"role": "system", "content": system}, {"role": "user", "content": "Hello world"}]
    rows = grid(qwen(conversation, output_modality="audio"))
    assert rows == text_rows(SYSTEM + qwen_ids(system) + TURN_END + USER + HELLO_WORLD + TURN_END) + \
        generation_prefix("audio")


def test_default_system_turn_quirks_and_override(qwen):
    """Only the FIRST turn is checked, so a later system turn still gets the default; system_prompt= sets its text."""
    conversation = [{"role": "user", "content": "Hello world"}, {"role": "system", "content": "Be brief."}]
    rows = grid(qwen(conversation))
    head = text_rows(USER + HELLO_WORLD + TURN_END + SYSTEM + qwen_ids("Be brief.") + TURN_END)
    assert rows == head + default_system_rows("text") + generation_prefix("text")
    rows = grid(qwen(conversation[:1], system_prompt="Answer in French."))
    assert rows == text_rows(USER + HELLO_WORLD + TURN_END + SYSTEM + qwen_ids("Answer in French.") + TURN_END) + \
        generation_prefix("text")


def test_multi_turn_with_assistant_speech_in_history(qwen):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": {"type": "audio", "codes": torch.tensor([1, 2, 3])}},
        {"role": "assistant", "content": [{"type": "audio", "codes": np.array([[4, 5]])}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello world"}]},
        {"role": "assistant", "content": "Hello world"},
        {"role": "user", "content": {"codes": [16383, 0]}},
    ]
    rows = grid(qwen(conversation, output_modality="audio"))
    expected = (
        text_rows(SYSTEM + qwen_ids("Be brief.") + TURN_END + USER) + speech_rows([1, 2, 3]) + text_rows(TURN_END)
        + text_rows(ASSISTANT) + speech_rows([4, 5]) + text_rows(TURN_END)
        + text_rows(USER + HELLO_WORLD + TURN_END + ASSISTANT + HELLO_WORLD + TURN_END + USER)
        + speech_rows([16383, 0]) + text_rows(TURN_END) + generation_prefix("audio")
    )
    assert rows == expected


def test_segments_are_tokenized_separately(qwen):
    """No BPE merge across a segment boundary: "user\\n" + "\\nHello" is not tokenized as "user\\n\\nHello"."""
    rows = grid(qwen([{"role": "user", "content": "\nHello"}]))
    assert rows[:7] == text_rows(USER + [198, 9707] + TURN_END)
    assert qwen_ids("<|im_start|>user\n\nHello") != USER + [198, 9707]  # "\n\n" would merge into one token


def test_batch_of_three_left_padded(qwen):
    conversations = [
        [{"role": "user", "content": "Hello world"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": {"type": "audio", "codes": [3] * 9}}],
        [{"role": "user", "content": {"type": "audio", "codes": [1, 2]}}, {"role": "assistant", "content": "Hi"},
         {"role": "user", "content": "What is two plus three?"}],
    ]
    modalities = ["text", "audio", "text"]
    out = qwen(conversations, output_modality=modalities)
    singles = [grid(qwen(c, output_modality=m)) for c, m in zip(conversations, modalities)]
    lengths = [len(s) for s in singles]
    assert len(set(lengths)) == 3
    length = max(lengths)
    assert out["input_ids"].shape == (3, length, 2) and out["attention_mask"].shape == (3, length)
    for index, single in enumerate(singles):
        pad = length - len(single)
        assert out["input_ids"][index].tolist() == [[PAD, AUDIO_PAD]] * pad + single
        assert out["attention_mask"][index].tolist() == [0] * pad + [1] * len(single)
    as_numpy = qwen(conversations, output_modality=modalities, return_tensors="np")["input_ids"]
    assert isinstance(as_numpy, np.ndarray) and (as_numpy == out["input_ids"].numpy()).all()
    as_lists = qwen(conversations, output_modality=modalities, return_tensors=None)["input_ids"]
    assert as_lists == out["input_ids"].tolist()


def test_apply_chat_template_matches_call(qwen):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
                    {"role": "assistant", "content": {"type": "audio", "codes": [5, 6]}},
                    {"role": "user", "content": "What is two plus three?"}]
    for modality in ("text", "audio"):
        expected = qwen(conversation, output_modality=modality)
        got = qwen.apply_chat_template(conversation, output_modality=modality)
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["attention_mask"], expected["attention_mask"])
        ids = qwen.apply_chat_template(conversation, output_modality=modality, return_dict=False)
        assert torch.equal(ids, expected["input_ids"])
    text = qwen.apply_chat_template(conversation, tokenize=False, output_modality="audio")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>\n"
                    "<|im_start|>assistant\n<audio><|im_end|>\n<|im_start|>user\nWhat is two plus three?<|im_end|>\n"
                    "<|im_start|>assistant\n<|object_ref_start|>")


def test_apply_chat_template_picks_a_named_or_given_template(qwen):
    conversation = [{"role": "user", "content": "Hi"}]
    processor = copy.copy(qwen)  # the fixture is shared: change a copy's templates only
    processor.chat_template = {"default": "D{{ messages[0].content }}", "short": "S{{ messages[0].content }}"}
    assert processor.apply_chat_template(conversation, tokenize=False) == "DHi"
    assert processor.apply_chat_template(conversation, tokenize=False, chat_template="short") == "SHi"
    assert processor.apply_chat_template(conversation, tokenize=False, chat_template="X{{ messages|length }}") == "X1"
    processor.chat_template = {"short": "S"}
    with pytest.raises(ValueError, match="none is named 'default'"):
        processor.apply_chat_template(conversation, tokenize=False)
    processor.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        processor.apply_chat_template(conversation, tokenize=False)
    assert qwen.chat_template == CHAT_TEMPLATE


def test_chat_template_text_tokenizes_to_the_grid_for_text_turns(qwen):
    batch = [[{"role": "user", "content": "Hello world"}],
             [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]]
    texts = qwen.apply_chat_template(batch, tokenize=False, output_modality=["audio", "text"])
    assert texts[0].startswith("<|im_start|>user\nHello world<|im_end|>\n<|im_start|>system\n")
    assert qwen.apply_chat_template(batch[0], tokenize=False, add_generation_prompt=False).endswith("<|im_end|>\n")
    for text, conversation, modality in zip(texts, batch, ["audio", "text"]):
        assert qwen_ids(text) == [r[0] for r in grid(qwen(conversation, output_modality=modality))]


def test_save_and_auto_processor_round_trip(qwen, tmp_path):
    custom = MossSpeechProcessor(tokenizer=qwen3_tokenizer(), default_system_prompts={"text": "Be brief."},
                                 codec_path="some-org/some-codec")
    custom.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "MossSpeechProcessor" and config["sosp_token_id"] == SOSP
    assert (config["eosp_token_id"], config["modality_pad_token_id"], config["audio_pad_token_id"],
            config["text_pad_token_id"], config["num_codes"]) == (EOSP, MODALITY_PAD, AUDIO_PAD, PAD, 16384)
    assert config["codec_path"] == "some-org/some-codec" and not (tmp_path / "codec").exists()
    assert (tmp_path / "chat_template.jinja").read_text() == custom.chat_template
    assert PROCESSOR_MAPPING[MossSpeechConfig] is MossSpeechProcessor

    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MossSpeechProcessor and loaded.codec_path == "some-org/some-codec"
    assert loaded.chat_template == custom.chat_template
    assert loaded.default_system_prompts["text"] == "Be brief."
    conversations = [[{"role": "user", "content": "Hello world"}],
                     [{"role": "user", "content": {"type": "audio", "codes": [4, 2]}}]]
    for modality in ("text", "audio"):
        a = custom(conversations, output_modality=modality)["input_ids"]
        b = loaded(conversations, output_modality=modality)["input_ids"]
        assert torch.equal(a, b)
    assert qwen_ids("Be brief.")[0] in custom(conversations[0])["input_ids"][0, :, 0].tolist()


def test_special_ids_come_from_the_model_config(tiny):
    config = tiny_config()
    assert MossSpeechProcessor.special_ids_from_config(config) == {
        "sosp_token_id": 290, "eosp_token_id": 64, "modality_pad_token_id": 291, "audio_pad_token_id": 10,
        "num_codes": 64, "text_pad_token_id": 280}
    assert (tiny.sosp_token_id, tiny.text_pad_token_id, tiny.sosp_token) == (290, 280, "<|object_ref_start|>")
    release = MossSpeechProcessor.special_ids_from_config(MossSpeechConfig())
    assert release == {"sosp_token_id": SOSP, "eosp_token_id": EOSP, "modality_pad_token_id": MODALITY_PAD,
                       "audio_pad_token_id": AUDIO_PAD, "num_codes": 16384, "text_pad_token_id": PAD}
    rows = grid(tiny([{"role": "user", "content": {"type": "audio", "codes": [63, 0]}}], output_modality="audio"))
    assert rows[3:7] == [[290, 10], [291, 63], [291, 0], [291, 64]] and rows[-1] == [290, 10]


# ---------------------------------------------------------------------------------------------- audio input


def test_audio_forms_give_the_codec_codes_in_one_encode_call(tiny, codec, speech_file, monkeypatch):
    path, wav, rate = speech_file
    expected_codes = codec.encode(wav, sampling_rate=rate).codes[0].tolist()
    stereo = np.stack([wav, wav])

    class Decoder:  # what `datasets` hands out for Audio columns (torchcodec's AudioDecoder)
        def get_all_samples(self):
            return SimpleNamespace(data=torch.from_numpy(wav)[None], sample_rate=rate)

    forms = [
        {"type": "audio", "path": str(path)},
        {"path": str(path), "type": "audio/wav"},  # the release's form
        {"path": str(path), "type": "filepath"},
        path,
        [{"type": "audio", "path": path}],
        {"type": "audio", "audio": (wav, rate)},
        {"type": "audio", "audio": (torch.from_numpy(stereo), rate)},
        {"type": "audio", "audio": str(path)},
        {"type": "audio", "audio": wav, "sampling_rate": rate},
        {"array": wav, "sampling_rate": rate, "path": "question.wav"},  # a datasets Audio value
        {"type": "audio", "audio": {"array": wav, "sampling_rate": rate, "path": None}},
        {"type": "audio", "audio": Decoder()},
        {"type": "audio", "codes": expected_codes},
    ]
    calls = []
    encode = codec.encode
    monkeypatch.setattr(codec, "encode", lambda *args, **kwargs: calls.append(len(args[0])) or encode(*args, **kwargs))
    out = tiny([[{"role": "user", "content": form}] for form in forms], output_modality="audio")
    assert calls == [len(forms) - 1]  # every waveform of the batch in one call
    expected = grid(tiny([{"role": "user", "content": {"type": "audio", "codes": expected_codes}}],
                         output_modality="audio"))
    assert len(expected_codes) == 26
    for index in range(len(forms)):
        assert out["input_ids"][index].tolist() == expected, f"form {index}"


# ------------------------------------------------------------------------------------------------ decoding


def test_decode_segments_padding_and_text(tiny):
    words = tiny.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    rows = (
        [[words[0], 10], [290, 10], [291, 3], [291, 4], [291, 64]]  # text, then a 2-code segment
        + [[290, 10], [291, 64]]                                    # an empty segment
        + [[words[1], 10], [EMPTY, 10], [END_EMPTY, 10], [290, 10], [291, 7], [291, 8], [291, 9], [291, 64]]
        + [[282, 55], [280, 10], [280, 10]]                         # im_end (audio id ignored), padding
    )
    (response,) = tiny.batch_decode(torch.tensor(rows), decode_audio=False)
    assert isinstance(response, MossSpeechResponse)
    assert response.text == "hello world . :"
    assert [s.tolist() for s in response.segments] == [[3, 4], [], [7, 8, 9]]
    assert response.codes.tolist() == [3, 4, 7, 8, 9] and response.codes.dtype == torch.long
    assert response.audio is None and response.sampling_rate is None

    # A prompt ending with sosp makes the answer start inside a segment; it may stay unterminated.
    unterminated = [[291, 5], [291, 6], [291, 64], [282, 10], [290, 10], [291, 1]]
    (response,) = tiny.decode(unterminated, decode_audio=False)
    assert [s.tolist() for s in response.segments] == [[5, 6], [1]]
    batch = torch.tensor([unterminated, rows[:6]])
    responses = tiny.batch_decode(batch, lengths=[2, 6], decode_audio=False)
    assert [r.codes.tolist() for r in responses] == [[5, 6], [3, 4]]
    assert [len(r.segments) for r in responses] == [1, 2]


def test_decode_without_codec_and_bad_rows(tiny):
    no_codec = MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer())
    rows = torch.tensor([[[290, 10], [291, 3], [291, 64], [282, 10]]])
    assert no_codec.batch_decode(rows, decode_audio=False)[0].codes.tolist() == [3]
    with pytest.raises(ValueError, match="no codec to decode speech"):
        no_codec.batch_decode(rows)
    text_only = no_codec.batch_decode(torch.tensor([[[5, 10], [282, 10]]]))[0]  # no speech: no codec needed
    assert text_only.audio is None and text_only.codes.numel() == 0
    with pytest.raises(ValueError, match="audio id 70 .* outside the codebook \\[0, 64\\)"):
        tiny.batch_decode(torch.tensor([[[290, 10], [291, 3], [291, 70]]]), decode_audio=False)
    with pytest.raises(ValueError, match="shape \\(T, 2\\) or \\(B, T, 2\\)"):
        tiny.batch_decode(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        tiny.batch_decode(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="lengths"):
        tiny.batch_decode(rows, lengths=[9])


def test_real_tokenizer_decode_hides_the_modality_pad(qwen):
    rows = [[9707, 512], [SOSP, 512], [MODALITY_PAD, 5], [MODALITY_PAD, 16383], [MODALITY_PAD, EOSP], [IM_END, 3216],
            [PAD, 512]]
    (response,) = qwen.batch_decode(rows, decode_audio=False)
    assert response.text == "Hello" and response.codes.tolist() == [5, 16383]
    with pytest.raises(ValueError, match="16385"):
        qwen.batch_decode([[MODALITY_PAD, 16385]], decode_audio=False)


# ------------------------------------------------------------------------------------------------ end to end


def test_end_to_end_four_modes(tiny, codec, speech_file, monkeypatch):
    """S→S, S→T, T→S, T→T in one batch: processor → tiny random LM generate → processor decode."""
    path, wav, rate = speech_file
    torch.manual_seed(0)
    model = MossSpeechForCausalLM(tiny_config()).eval()
    conversations = [
        [{"role": "user", "content": {"type": "audio", "path": str(path)}}],
        [{"role": "user", "content": {"type": "audio", "audio": (wav, rate)}}],
        [{"role": "user", "content": "Hello, what is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a joke."}],
    ]
    modalities = ["audio", "text", "audio", "text"]
    inputs = tiny(conversations, output_modality=modalities)
    prompt_length = inputs["input_ids"].shape[1]
    assert inputs["input_ids"][[0, 2], -1].tolist() == [[290, 10], [290, 10]]  # audio output: ends in (sosp, pad)

    # Speech rows 0 and 2 end with eosp at steps 5 and 7, then im_end; text rows 1 and 3 stop at steps 4 and 6.
    text_plan = {(0, 6): 282, (1, 4): 282, (2, 8): 282, (3, 6): 282}
    out = model.generate(
        **inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
        # Only regular words in text (no [UNK], stop, speech or reserved ids), so text answers are never empty.
        text_logits_processor=[ForceAt(prompt_length, text_plan, suppress=(0, *range(280, 300)))],
        audio_logits_processor=[ForceAt(prompt_length, {(0, 5): 64, (2, 7): 64}, suppress=(64,))],
    )
    assert out.lengths.tolist() == [6, 4, 8, 6]
    assert [spans[0][0] for spans in out.modality_spans] == modalities

    decodes = []
    decode = codec.decode
    monkeypatch.setattr(codec, "decode", lambda *a, **k: decodes.append(len(a[0])) or decode(*a, **k))
    voice = [(wav, rate), None, None, None]  # row 0 speaks in the espeak voice, row 2 without a prompt
    responses = tiny.batch_decode(out, voice_prompt=voice, generator=torch.Generator().manual_seed(0))
    assert decodes == [2]  # one batched codec call for the two spoken answers
    assert len(responses) == 4
    for index, (response, modality) in enumerate(zip(responses, modalities)):
        rows = out.sequences[index, : out.lengths[index]]
        if modality == "audio":
            n_codes = {0: 4, 2: 6}[index]
            assert response.codes.tolist() == rows[:n_codes, 1].tolist()
            assert all(0 <= c < 64 for c in response.codes.tolist())
            assert len(response.segments) == 1 and response.text == ""
            assert response.sampling_rate == 24000 and response.audio.dtype == torch.float32
            assert response.audio.shape == (n_codes * 1920,) and torch.isfinite(response.audio).all()
        else:
            assert response.audio is None and response.codes.numel() == 0 and response.segments == []
            expected = tiny.tokenizer.decode(rows[:-1, 0].tolist(), skip_special_tokens=True)
            expected = expected.replace("<|empty|>", ".").replace("<|end_empty|>", ":")
            assert response.text == expected and response.text.strip()


# ------------------------------------------------------------------------------------------- save / codec


def test_codec_saved_inside_only_without_a_path(tiny, codec, speech_file, tmp_path):
    path, wav, rate = speech_file
    conversation = [{"role": "user", "content": {"type": "audio", "path": path}}]
    expected = tiny(conversation)["input_ids"]

    tiny.save_pretrained(tmp_path / "with_codec")
    assert json.loads((tmp_path / "with_codec" / "processor_config.json").read_text())["codec_subfolder"] == "codec"
    loaded = AutoProcessor.from_pretrained(tmp_path / "with_codec")
    assert loaded._codec_slot.model is None  # lazily loaded on first use
    assert torch.equal(loaded(conversation)["input_ids"], expected)
    assert isinstance(loaded.codec, MossSpeechCodecModel) and loaded.sosp_token_id == 290
    loaded_lazy = AutoProcessor.from_pretrained(tmp_path / "with_codec")
    loaded_lazy.save_pretrained(tmp_path / "copy")  # not loaded yet: the codec folder is copied
    assert (tmp_path / "copy" / "codec" / "config.json").exists()

    codec.save_pretrained(tmp_path / "codec_elsewhere")
    by_path = AutoProcessor.from_pretrained(tmp_path / "with_codec", codec_path=str(tmp_path / "codec_elsewhere"))
    assert "codec_path" not in by_path.tokenizer.init_kwargs
    by_path.save_pretrained(tmp_path / "by_path")
    saved = json.loads((tmp_path / "by_path" / "processor_config.json").read_text())
    assert saved["codec_path"] == str(tmp_path / "codec_elsewhere") and saved["codec_subfolder"] is None
    assert not (tmp_path / "by_path" / "codec").exists()
    reloaded = AutoProcessor.from_pretrained(tmp_path / "by_path")
    assert torch.equal(reloaded(conversation)["input_ids"], expected)


# ------------------------------------------------------------------------------------------------ bad input


def _user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def _audio(**part) -> list[dict]:
    return _user({"type": "audio", **part})


def _corrupt_wav(tmp_path: Path) -> list[dict]:
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 3)
    return _audio(path=str(path))


def _text_file(tmp_path: Path) -> list[dict]:
    path = tmp_path / "notes.txt"
    path.write_text("not audio")
    return _audio(path=path)


# name: (conversation, or a function of tmp_path giving it; call kwargs; error; message)
BAD_INPUTS = {
    "unknown role": (_user("hi") + [{"role": "robot", "content": "hi"}], {}, ValueError,
                     "conversation\\[1\\]\\['role'\\] must be one of"),
    "unknown output modality": (_user("hi"), {"output_modality": "video"}, ValueError,
                                "output_modality must be 'text' or 'audio'"),
    "one modality per conversation": (_user("hi"), {"output_modality": ["text", "audio"]}, ValueError,
                                      "a list of 1 of them"),
    "empty batch": ([], {}, ValueError, "conversations is empty"),
    "empty conversation": ([_user("hi"), []], {}, ValueError, "conversations\\[1\\] is empty"),
    "a message instead of a conversation": ({"role": "user", "content": "hi"}, {}, TypeError,
                                            "conversations must be a list"),
    "no content": ([{"role": "user"}], {}, ValueError, "has no 'content'"),
    "missing audio file": (lambda tmp: _audio(path=str(tmp / "missing.wav")), {}, FileNotFoundError,
                           "audio file .*missing.wav' does not exist"),
    "corrupt wav": (_corrupt_wav, {}, ValueError, "could not read audio file .*corrupt.wav"),
    "not an audio file": (_text_file, {}, ValueError, "could not read audio file .*notes.txt"),
    "array without rate": (_audio(audio=np.zeros(1600, dtype=np.float32)), {}, ValueError,
                           "needs its sampling rate"),
    "datasets array without rate": (_user({"array": np.zeros(1600, dtype=np.float32)}), {}, ValueError,
                                    "needs its sampling rate"),
    "integer pcm": (_audio(audio=(np.zeros(1600, dtype=np.int16), 16000)), {}, TypeError,
                    "\\['audio'\\]: .*float dtype"),
    "code above the codebook": (_audio(codes=[1, 64]), {}, ValueError,
                                "holds code 64, outside the codebook \\[0, 64\\)"),
    "negative code": (_audio(codes=[-1]), {}, ValueError, "outside the codebook"),
    "float codes": (_audio(codes=[1.0, 2.0]), {}, TypeError, "integer codes"),
    "float code tensor": (_audio(codes=torch.tensor([1.5])), {}, TypeError, "integer codes"),
    "no codes": (_audio(codes=[]), {}, ValueError, "empty: a speech turn needs at least one code"),
    "2-D codes": (_audio(codes=torch.zeros(2, 2, dtype=torch.long)), {}, ValueError, "must be 1-D"),
    "two content parts": (_user([{"type": "text", "text": "hi"}, {"type": "audio", "codes": [1]}]), {}, ValueError,
                          "has 2 content parts; MOSS-Speech takes exactly one"),
    "no content part": (_user([]), {}, ValueError, "has 0 content parts"),
    "image part": (_user({"type": "image", "url": "x.png"}), {}, ValueError, "\\['type'\\] is 'image'"),
    "audio part without audio": (_user({"type": "audio"}), {}, ValueError, "neither text nor audio"),
    "content of another type": (_user(42), {}, TypeError, "must be a str \\(text\\), a dict"),
    "unknown return_tensors": (_user("hi"), {"return_tensors": "tf"}, ValueError, "return_tensors"),
    "bad system_prompt": (_user("hi"), {"system_prompt": 3}, ValueError, "system_prompt"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs(name, tmp_path):
    conversation, kwargs, error, message = BAD_INPUTS[name]
    if callable(conversation):
        conversation = conversation(tmp_path)
    processor = MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer())  # all fail before encoding
    with pytest.raises(error, match=message):
        processor(conversation, **kwargs)


def test_bad_construction_and_missing_codec():
    no_codec = MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer())
    with pytest.raises(ValueError, match="no codec to encode audio turns .*conversation\\[0\\]\\['content'\\]"):
        no_codec([{"role": "user", "content": {"type": "audio", "audio": (np.zeros(1600, np.float32), 16000)}}])
    with pytest.raises(ValueError, match="tokenizer is required"):
        MossSpeechProcessor()
    with pytest.raises(ValueError, match="eosp_token_id \\(10\\) must not be a speech code"):
        MossSpeechProcessor(tokenizer=tiny_tokenizer(), eosp_token_id=10, num_codes=64)
    with pytest.raises(ValueError, match="sosp_token_id must be an integer"):
        MossSpeechProcessor(tokenizer=tiny_tokenizer(), sosp_token_id=-1)
    with pytest.raises(TypeError, match="codec must be a MossSpeechCodecModel"):
        MossSpeechProcessor(tokenizer=tiny_tokenizer(), codec="path")
    with pytest.raises(ValueError, match="default_system_prompts"):
        MossSpeechProcessor(tokenizer=tiny_tokenizer(), default_system_prompts={"video": "x"})
    # "[unused_273]" is not split off as one token, so the prefix cannot end with it.
    wrong_sosp = MossSpeechProcessor(tokenizer=tiny_tokenizer(), sosp_token_id=273, modality_pad_token_id=291)
    with pytest.raises(ValueError, match="does not end with sosp_token_id 273"):
        wrong_sosp([{"role": "user", "content": "hi"}], output_modality="audio")
    with pytest.raises(ValueError, match="continue_final_message"):
        no_codec.apply_chat_template([{"role": "user", "content": "hi"}], continue_final_message=True)

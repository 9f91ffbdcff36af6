"""The web demo's handlers, driven without a browser, and `moss-speech demo` (with the server launch stubbed out).

A tiny random LM, codec and processor are saved to a temporary directory (`save_tiny_checkpoint`) and loaded back
with the demo's loader. The LM's answers are fixed whatever is sampled: a spoken answer is `MIN_CODES` speech codes,
end-of-speech, then `ANSWER_WORD` ("five"); a written answer is `ANSWER_WORD`.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import (
    ANSWER_WORD,
    MIN_CODES,
    save_tiny_checkpoint,
    tiny_codec_config,
    tiny_tokenizer,
)

gr = pytest.importorskip("gradio", reason="the demo tests need the [demo] extra: pip install -e '.[dev]'")

from modeling_moss_speech import (  # noqa: E402 - after the skip
    MossSpeechCodecModel,
    MossSpeechGenerationConfig,
    MossSpeechProcessor,
)
from modeling_moss_speech.apps import demo as demo_module  # noqa: E402
from modeling_moss_speech.apps.cli.main import main  # noqa: E402
from modeling_moss_speech.apps.demo import (  # noqa: E402
    NO_VOICE,
    DemoSession,
    MossSpeechDemo,
    SamplingSettings,
    build_demo,
    load_checkpoint,
)

SAMPLES_PER_CODE = 1920
SETTINGS = dict(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.1, max_new_tokens=40, greedy=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def app(assets) -> MossSpeechDemo:
    model, processor = load_checkpoint(assets["lm"], device="cpu")
    return MossSpeechDemo(model, processor, voices={"speaker": assets["voice"], "clip": assets["speaker"]},
                          chunk_size=2)


def ask(app: MossSpeechDemo, session: DemoSession, audio=None, text=None, modality="audio", voice=None,
        voice_file=None, **settings) -> list[tuple]:
    """Every update `respond` yields for one question."""
    values = {**SETTINGS, **settings}
    return list(app.respond(session, None if audio is None else str(audio), text, modality, voice, voice_file,
                            *values.values()))


def chunks_of(updates: list[tuple]) -> list[np.ndarray]:
    """The streamed audio chunks (16-bit wav bytes) of the updates, decoded."""
    out = []
    for update in updates:
        if isinstance(update[1], bytes):
            wave, rate = sf.read(io.BytesIO(update[1]), dtype="float32")
            assert rate == 24000
            out.append(wave)
    return out


def error_of(excinfo) -> str:
    return excinfo.value.message if hasattr(excinfo.value, "message") else str(excinfo.value)


# ---------------------------------------------------------------------------------------------- answers


def test_spoken_question_gets_a_streamed_spoken_answer(app, assets):
    session = DemoSession()
    updates = ask(app, session, audio=assets["question"])

    messages, _, state, question_audio, question_text = updates[0]
    assert state is session and question_audio is None and question_text == ""  # inputs cleared at once
    assert messages[0] == {"role": "user", "content": [{"path": str(assets["question"])}]}
    assert messages[1] == {"role": "assistant", "content": "…"}

    chunks = chunks_of(updates)
    # 12 codes in chunks of 2: the first once 2 + 5 (HiFT's held-back audio) + 3 (lookahead) codes are in, one more
    # two codes later, then the flush.
    assert len(chunks) == 3
    assert sum(c.size for c in chunks) == MIN_CODES * SAMPLES_PER_CODE
    assert any("speaking…" in str(u[0][-1]["content"]) for u in updates if isinstance(u[1], bytes))

    final = updates[-1][0]
    audio, text = final[-1]["content"]
    assert final[-1]["role"] == "assistant" and text == ANSWER_WORD
    answer, rate = sf.read(audio["path"], dtype="float32")
    assert rate == 24000 and answer.size == MIN_CODES * SAMPLES_PER_CODE
    assert np.abs(answer - np.concatenate(chunks)).max() < 1e-3  # the player holds what was streamed

    user, assistant = session.conversation
    info = sf.info(str(assets["question"]))
    assert user["content"]["type"] == "audio"
    assert len(user["content"]["codes"]) == MossSpeechCodecModel.expected_num_codes(info.frames, info.samplerate)
    assert assistant == {"role": "assistant", "content": {"type": "audio", "codes": assistant["content"]["codes"]}}
    assert len(assistant["content"]["codes"]) == MIN_CODES and session.turn is None


def test_typed_questions_text_answers_and_history(app):
    session = DemoSession()
    updates = ask(app, session, text="  What is two plus three?  ", modality="text", greedy=True)
    assert not chunks_of(updates)
    assert updates[-1][0] == [{"role": "user", "content": "What is two plus three?"},
                              {"role": "assistant", "content": [ANSWER_WORD]}]
    ask(app, session, text="and in speech?", voice="speaker")
    assert [turn["role"] for turn in session.conversation] == ["user", "assistant"] * 2
    assert session.conversation[1]["content"] == ANSWER_WORD
    assert len(session.conversation[3]["content"]["codes"]) == MIN_CODES
    # "five" is in the history now, so the repetition penalty lets <|im_end|> win right after the speech.
    assert len(session.messages) == 4 and [type(c) for c in session.messages[-1]["content"]] == [dict]

    messages, audio, cleared = app.clear(session)
    assert messages == [] and audio is None and cleared.conversation == [] and cleared.messages == []


def test_stop_ends_generation_and_keeps_the_partial_answer(app, monkeypatch):
    # Speech that would go on for 400 codes: Stop, pressed after the first chunk, must cut it short.
    monkeypatch.setattr(app.model.generation_config, "min_new_tokens", 400)
    session = DemoSession()
    updates = app.respond(session, None, "tell me a story", "audio", NO_VOICE, None,
                          *{**SETTINGS, "max_new_tokens": 400}.values())
    for update in updates:
        if isinstance(update[1], bytes):
            break
    messages, state = app.stop(session)
    assert state is session and session.turn is None
    audio, note = messages[-1]["content"]
    spoken = len(session.conversation[-1]["content"]["codes"])
    assert note == "*(stopped)*" and 4 <= spoken < 400
    assert sf.info(audio["path"]).frames == spoken * SAMPLES_PER_CODE
    rest = list(updates)  # the handler drains what was left and ends with the same chat
    assert rest[-1][0] == messages
    assert len(session.conversation) == 2


def test_a_page_closed_mid_answer_leaves_a_whole_session(app, monkeypatch):
    monkeypatch.setattr(app.model.generation_config, "min_new_tokens", 400)
    session = DemoSession()
    updates = app.respond(session, None, "tell me a story", "audio", NO_VOICE, None,
                          *{**SETTINGS, "max_new_tokens": 400}.values())
    next(update for update in updates if isinstance(update[1], bytes))
    updates.close()  # what Gradio does when the tab goes away: generation stops, the answer so far is kept
    assert session.turn is None and len(session.conversation) == 2
    assert len(session.conversation[1]["content"]["codes"]) < 400
    assert isinstance(session.messages[-1]["content"], list)


def test_voices_shipped_uploaded_and_cached(app, assets):
    assert app.voice_choices() == [NO_VOICE, "speaker", "clip"] and app.default_voice == "speaker"
    gr_ = demo_module.require_gradio()
    shipped = app._voice_prompt(gr_, "speaker", None)
    assert app._voice_prompt(gr_, "speaker", None) is shipped  # loaded once
    assert app._voice_prompt(gr_, NO_VOICE, None) is None
    from_clip = app._voice_prompt(gr_, "clip", None)
    assert from_clip.tokens.numel() > 0
    assert app._voice_prompt(gr_, "speaker", str(assets["speaker"])) is from_clip  # an upload wins over the menu
    session = DemoSession()
    ask(app, session, text="hello", voice_file=str(assets["voice"]))
    assert len(session.conversation[-1]["content"]["codes"]) == MIN_CODES


def test_transcripts_shown_when_the_codec_can_recognise_speech(app, assets, monkeypatch):
    monkeypatch.setattr(MossSpeechCodecModel, "can_transcribe", True, raising=False)
    monkeypatch.setattr(app.codec, "transcribe_codes", lambda codes: [f"{len(codes[0])} codes"], raising=False)
    session = DemoSession()
    updates = ask(app, session, audio=assets["question"], modality="text")
    question, answer = updates[-1][0]
    codes = len(session.conversation[0]["content"]["codes"])
    assert question["content"] == [{"path": str(assets["question"])}, f"*heard:* {codes} codes"]
    assert answer["content"] == [ANSWER_WORD]


def test_transcript_of_a_real_ctc_codec(app):
    torch.manual_seed(0)
    config = tiny_codec_config()
    config.encoder_config.ctc_alphabet = "abcdefghijklmnopqrstuvwxyz '"
    codec = MossSpeechCodecModel(config).eval()
    processor = MossSpeechProcessor.from_model_config(app.model.config, tiny_tokenizer(), codec=codec)
    demo = MossSpeechDemo(app.model, processor)
    codes = torch.arange(20) % 64
    assert codec.can_transcribe and demo._transcript(codes) == codec.transcribe_codes([codes])[0].strip()


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "Ask something first: record or upload a spoken question, or type one."),
    ({"text": "   "}, "Ask something first"),
    ({"audio": "{corrupt}"}, "Cannot read the question as audio"),
    ({"text": "hi", "top_p": 1.5}, "Sampling settings: top p must be in (0, 1], got 1.5."),
    ({"text": "hi", "max_new_tokens": 0}, "max new tokens must be >= 1"),
    ({"text": "hi", "modality": "video"}, "Answer modality must be 'audio' (speech) or 'text'"),
    ({"text": "hi", "voice": "nobody"}, "Unknown voice 'nobody'"),
    ({"text": "hi", "voice_file": "{corrupt}"}, "Cannot read the uploaded voice as audio"),
    ({"text": "hi", "voice_file": "{question}.safetensors"}, "Cannot read the uploaded voice"),
])
def test_bad_input_is_a_one_line_page_error(app, assets, kwargs, message):
    names = {key: str(value) for key, value in assets.items()}
    kwargs = {key: value.format(**names) if isinstance(value, str) else value for key, value in kwargs.items()}
    session = DemoSession()
    with pytest.raises(gr.Error) as excinfo:
        ask(app, session, **kwargs)
    assert message in error_of(excinfo) and "\n" not in error_of(excinfo)
    assert session.conversation == [] and session.messages == []


def test_generation_failure_is_reported_and_rolled_back(app, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory\n  (details)")

    monkeypatch.setattr(app.model, "generate", fail)
    session = DemoSession()
    updates = app.respond(session, None, "hi", "audio", NO_VOICE, None, *SETTINGS.values())
    seen = []
    with pytest.raises(gr.Error) as excinfo:
        for update in updates:
            seen.append(update)
    assert error_of(excinfo) == "The model could not answer: out of memory (details)"
    assert seen[-1][0][-1]["content"] == "⚠️ No answer: out of memory (details)"
    assert session.conversation == [] and session.turn is None


def test_unexpected_errors_are_one_line(app, assets, monkeypatch):
    monkeypatch.setattr(app.codec, "encode", lambda *a, **k: (_ for _ in ()).throw(KeyError("codes")))
    with pytest.raises(gr.Error) as excinfo:
        ask(app, DemoSession(), audio=assets["question"])
    assert error_of(excinfo) == "Something went wrong: 'codes'"


def test_warnings(app, assets):
    with pytest.warns(UserWarning, match="Both a recording and typed text were given"):
        ask(app, DemoSession(), audio=assets["question"], text="ignored", modality="text", greedy=True)
    with pytest.warns(UserWarning, match="The answer was cut at 5 tokens"):
        ask(app, DemoSession(), text="hi", max_new_tokens=5)


def test_load_checkpoint_finds_a_codec_beside_the_model(app, assets, tmp_path):
    # The shipped nano layout: the processor names no codec, the codec sits in the model's codec/ folder.
    app.model.save_pretrained(tmp_path)
    MossSpeechProcessor.from_model_config(app.model.config, tiny_tokenizer()).save_pretrained(tmp_path)
    shutil.copytree(assets["codec"], tmp_path / "codec")
    model, processor = load_checkpoint(tmp_path, device="cpu")
    assert isinstance(processor.codec, MossSpeechCodecModel) and processor.codec_path == str(tmp_path / "codec")
    assert model.dtype == torch.float32 and not model.training


def test_constructor_checks(app, assets):
    with pytest.raises(ValueError, match="does not exist"):
        MossSpeechDemo(app.model, app.processor, voices={"x": assets["root"] / "missing.safetensors"})
    with pytest.raises(ValueError, match="default_voice must be one of"):
        MossSpeechDemo(app.model, app.processor, default_voice="speaker")
    with pytest.raises(ValueError, match="chunk_size"):
        MossSpeechDemo(app.model, app.processor, chunk_size=0)
    processor = MossSpeechProcessor.from_model_config(app.model.config, tiny_tokenizer())
    with pytest.raises(ValueError, match="needs a speech codec"):
        MossSpeechDemo(app.model, processor)
    with pytest.raises(TypeError, match="MossSpeechForCausalLM"):
        MossSpeechDemo(object(), app.processor)


def test_sampling_settings():
    config = MossSpeechGenerationConfig(audio_temperature=0.8, max_new_tokens=300)
    settings = SamplingSettings.from_generation_config(config)
    assert (settings.temperature, settings.top_k, settings.max_new_tokens, settings.greedy) == (0.8, 20, 300, False)
    kwargs = SamplingSettings(greedy=True).generate_kwargs()
    assert kwargs["do_sample"] is kwargs["audio_do_sample"] is kwargs["text_do_sample"] is False
    assert "temperature" not in kwargs and kwargs["audio_repetition_penalty"] == 1.1
    assert SamplingSettings(temperature="0.5", top_k=3.0).checked().top_k == 3


# ------------------------------------------------------------------------------------------- page and CLI


def test_build_demo_wires_the_page(app):
    demo = build_demo(app.model, app.processor, voices={"speaker": app.voices["speaker"]}, title="Nano")
    assert isinstance(demo, gr.Blocks) and isinstance(demo.moss_speech, MossSpeechDemo)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"moss-chat", "moss-answer-audio", "moss-question-audio", "moss-question-text", "moss-ask", "moss-stop",
            "moss-clear", "moss-voice", "moss-voice-file", "moss-output-modality"} <= ids
    (answer,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "moss-answer-audio"]
    assert answer.streaming
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"ask", "stop", "clear"} <= names
    assert all(getattr(b, "elem_id", None) != "moss-model" for b in demo.blocks.values())  # no description given


def _model_line(demo) -> str:
    """The page's line naming its model."""
    (block,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "moss-model"]
    return block.value


@pytest.fixture
def launched(monkeypatch):
    calls = []
    monkeypatch.setattr(demo_module, "launch_demo", lambda demo, **kwargs: calls.append((demo, kwargs)))
    return calls


def test_cli_demo_launches_on_localhost(assets, launched, capsys):
    assert main(["demo", "--model", str(assets["lm"]), "--port", "7999", "--device", "cpu"]) == 0
    (demo, kwargs), = launched
    assert kwargs == {"host": "127.0.0.1", "port": 7999, "share": False}
    assert demo.moss_speech.voice_choices() == [NO_VOICE, "speaker"]  # the checkpoint's voices/ folder
    assert "http://127.0.0.1:7999" in capsys.readouterr().err
    assert _model_line(demo) == f"Model: `{assets['lm']}`"


def test_cli_demo_defaults_to_the_shipped_model(assets, launched, monkeypatch, capsys):
    from modeling_moss_speech import pretrained

    monkeypatch.setattr(pretrained, "nano_path", lambda: assets["lm"])
    assert main(["demo", "--host", "0.0.0.0", "--share", "--codec", str(assets["codec"])]) == 0
    (demo, kwargs), = launched
    assert kwargs == {"host": "0.0.0.0", "port": 7860, "share": True}
    assert demo.moss_speech.voice_choices() == [NO_VOICE, "speaker"]
    assert _model_line(demo) == f"Model: {pretrained.NANO_DESCRIPTION}"
    assert "MOSS-Speech-Nano" in _model_line(demo) and "255 facts" in _model_line(demo)


def test_cli_demo_errors(assets, launched, monkeypatch, capsys):
    from modeling_moss_speech import pretrained

    def missing():
        raise FileNotFoundError("the shipped MOSS-Speech-Nano checkpoint is not installed")

    monkeypatch.setattr(pretrained, "nano_path", missing)
    assert main(["demo"]) == 2
    assert "the shipped MOSS-Speech-Nano checkpoint is not installed" in capsys.readouterr().err
    assert main(["demo", "--model", str(assets["codec"])]) == 2
    assert "expected 'moss_speech'" in capsys.readouterr().err
    assert main(["demo", "--model", str(assets["lm"]), "--port", "70000"]) == 2
    assert "argument --port" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the [demo] extra were not installed
    assert main(["demo", "--model", str(assets["lm"])]) == 2
    assert "pip install 'moss-speech[demo]'" in capsys.readouterr().err
    assert not launched


def test_cli_demo_help(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model", "--codec", "--host", "--port", "--share", "--device", "--dtype"):
        assert option in out
    assert "examples:" in out


def test_space_app_snippet_builds_the_demo(assets, monkeypatch):
    card = (Path(__file__).resolve().parents[1] / "model_cards" / "space_app.md").read_text()
    (app_py,) = re.findall(r"^### app.py\n\n```python\n(.*?)^```", card, flags=re.S | re.M)
    monkeypatch.setenv("MOSS_SPEECH_MODEL", str(assets["lm"]))
    namespace = {"__name__": "space_app"}  # not __main__: build the page, do not serve it
    exec(compile(app_py, "space_app.md", "exec"), namespace)  # noqa: S102 - the snippet is the test
    assert isinstance(namespace["demo"], gr.Blocks)
    assert namespace["demo"].moss_speech.voice_choices() == [NO_VOICE, "speaker"]


def test_session_copies_are_independent():
    import copy

    session = DemoSession()
    session.conversation.append({"role": "user", "content": "hi"})
    session.turn = object()
    copied = copy.deepcopy(session)
    assert copied.conversation == session.conversation and copied.conversation is not session.conversation
    assert copied.turn is None and isinstance(copied.lock, type(threading.Lock()))
    json.dumps(copied.conversation)

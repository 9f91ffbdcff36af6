"""Web demo: talk to MOSS-Speech in the browser, with spoken answers streamed while they are generated.

```
moss-speech demo                                   # the shipped nano model on http://127.0.0.1:7860
moss-speech demo --model DIR --codec CODEC --port 8000
```

```py
from modeling_moss_speech.apps.demo import build_demo, launch_demo, load_checkpoint

model, processor = load_checkpoint("path/to/MOSS-Speech")
demo = build_demo(model, processor, voices={"alice": "alice.safetensors"})   # a gradio.Blocks (e.g. a Space's app.py)
launch_demo(demo)                                                          # localhost, no share link
```

The page takes a question from the microphone, an audio file or a text box, answers in speech or text, and keeps
the conversation as a chat with audio players. While a spoken answer is generated, every decoded chunk goes to a
streaming audio player (the chat's `on_audio` callback feeds a queue that the event handler drains); a Stop button
ends generation through a stopping criterion. The event handlers are methods of [`MossSpeechDemo`] that take and
return plain values, so they run without a browser. Gradio is an optional dependency (`pip install
'moss-speech[demo]'`), imported only when a demo is built; streaming audio to the browser needs `ffmpeg` on the
PATH (Gradio encodes the stream with it).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from .. import pretrained
from ..chat_moss_speech import MossSpeechChat
from ..feature_extraction_moss_speech import load_audio
from ..loading import one_line
from ..modeling_moss_speech_codec import MossSpeechVoicePrompt
from ..processing_moss_speech import CODEC_SUBFOLDER, MossSpeechProcessor

logger = logging.getLogger(__name__)

GRADIO_MISSING = "the web demo needs Gradio, which is not installed: pip install 'moss-speech[demo]'"
NO_VOICE = "codec default (no voice prompt)"
MODALITY_CHOICES = (("Speech", "audio"), ("Text", "text"))
VOICE_FILE_TYPES = (".wav", ".flac", ".ogg", ".mp3", ".safetensors")
_UPDATE_EVERY_S = 0.2  # how often live text/progress is pushed to the page (audio chunks go out at once)


def require_gradio():
    """The `gradio` module, or an ImportError that says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(GRADIO_MISSING) from error
    return gradio


def _page_error(gr: Any, message: str) -> Exception:
    """A `gr.Error` for the page; its traceback is not printed (unexpected errors are logged where caught)."""
    return gr.Error(message, print_exception=False)


# ------------------------------------------------------------------------------------------------- settings


@dataclass
class SamplingSettings:
    """The sampling settings of the page's accordion; they apply to both channels (text and speech).

    Args:
        temperature: Sampling temperature, > 0.
        top_p: Nucleus mass in (0, 1].
        top_k: Sample among the k most likely ids (0: no limit).
        repetition_penalty: Penalty on ids already in the conversation (1.0: none), > 0.
        max_new_tokens: Most rows (text tokens or speech codes) to generate, >= 1.
        greedy: Take the most likely id at every step (the other settings are then ignored).
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    repetition_penalty: float = 1.1
    max_new_tokens: int = 500
    greedy: bool = False

    @classmethod
    def from_generation_config(cls, generation_config: Any) -> SamplingSettings:
        """The checkpoint's defaults: its speech channel's settings when it has per-channel ones."""
        values = {}
        if hasattr(generation_config, "channel_settings"):
            values.update(generation_config.channel_settings("audio"))
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
            if values.get(name) is None:
                values[name] = getattr(generation_config, name, None)
        settings = cls()
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
            if values.get(name) is not None:
                setattr(settings, name, type(getattr(settings, name))(values[name]))
        settings.greedy = values.get("do_sample", getattr(generation_config, "do_sample", True)) is False
        return settings

    def checked(self) -> SamplingSettings:
        """These settings with numbers coerced, or a ValueError naming the bad one (requests can bypass sliders)."""
        try:
            out = SamplingSettings(float(self.temperature), float(self.top_p), int(self.top_k),
                                   float(self.repetition_penalty), int(self.max_new_tokens), bool(self.greedy))
        except (TypeError, ValueError) as error:
            raise ValueError(f"sampling settings must be numbers ({one_line(error)})") from error
        for name, ok, expected in (
            ("temperature", out.temperature > 0, "> 0"), ("top_p", 0 < out.top_p <= 1, "in (0, 1]"),
            ("top_k", out.top_k >= 0, ">= 0"), ("repetition_penalty", out.repetition_penalty > 0, "> 0"),
            ("max_new_tokens", out.max_new_tokens >= 1, ">= 1"),
        ):
            if not ok or not np.isfinite(getattr(out, name)):
                raise ValueError(f"{name.replace('_', ' ')} must be {expected}, got {getattr(self, name)!r}")
        return out

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `generate`: the shared fields and both channels' fields (they override the shared
        ones in a checkpoint's generation config, so they are set too)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        values = {"do_sample": not self.greedy}
        if not self.greedy:
            values.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        values["repetition_penalty"] = self.repetition_penalty
        for name, value in values.items():
            kwargs[name] = kwargs["text_" + name] = kwargs["audio_" + name] = value
        return kwargs


# ------------------------------------------------------------------------------------------------- sessions


class _Monitor(StoppingCriteria):
    """Called by `generate` once per new row: reports the row's text id and stops everything once asked to."""

    def __init__(self, turn: _Turn) -> None:
        self.turn = turn

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None, **kwargs: Any) -> torch.BoolTensor:
        self.turn.rows += 1
        self.turn.events.put(("row", int(input_ids[0, -1])))
        return torch.full((input_ids.shape[0],), self.turn.stop.is_set(), dtype=torch.bool, device=input_ids.device)


class _Turn:
    """One answer being generated in a worker thread; its progress arrives on `events`."""

    def __init__(self, modality: str, max_new_tokens: int) -> None:
        self.modality, self.max_new_tokens = modality, max_new_tokens
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stop = threading.Event()  # read by the stopping criterion at every row
        self.stopped_by_user = False
        self.thread: threading.Thread | None = None
        self.reply: Any = None
        self.error: BaseException | None = None
        self.rows = 0
        self.finished = False  # its answer was added to the session (by the handler or by Stop)

    def start(self, run: Any) -> None:
        def work() -> None:
            try:
                self.reply = run(self)
            except BaseException as error:  # reported on the page by the handler
                self.error = error
            finally:
                self.events.put(("done", None))

        self.thread = threading.Thread(target=work, name="moss-speech-demo-turn", daemon=True)
        self.thread.start()

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class DemoSession:
    """One browser tab's state: the model's conversation, the chat shown on the page, the answer being generated.

    Gradio keeps one per tab (`gr.State(DemoSession)`); a deep copy has the same turns and no running answer.
    """

    def __init__(self) -> None:
        self.conversation: list[dict[str, Any]] = []  # what the model sees (speech turns as codes)
        self.messages: list[dict[str, Any]] = []  # what the chat shows (audio players, text)
        self.turn: _Turn | None = None
        self.lock = threading.Lock()  # the handler and Stop may finish the same turn

    def __deepcopy__(self, memo: dict) -> DemoSession:
        copied = DemoSession()
        copied.conversation = copy.deepcopy(self.conversation, memo)
        copied.messages = copy.deepcopy(self.messages, memo)
        return copied


# ---------------------------------------------------------------------------------------------------- the demo


class MossSpeechDemo:
    """The web demo's logic, without the page: event handlers taking and returning plain values.

    Args:
        model: A `MossSpeechForCausalLM` (eval mode, on its device).
        processor: A `MossSpeechProcessor` with a speech codec.
        voices: Voices offered in the page, name → a voice prompt saved with `MossSpeechVoicePrompt.save`
            (`.safetensors`) or an audio file of the speaker.
        default_voice: Name of the voice selected at start (default: the first of `voices`, else no prompt).
        chunk_size: Speech codes per streamed chunk (12.5 codes = 1 s of speech).
        max_question_seconds: Longest spoken question accepted.
        system_prompt: Text of the system turn (default: the processor's fallback for the answer's modality).
    """

    def __init__(self, model: Any, processor: Any, voices: Mapping[str, str | os.PathLike] | None = None,
                 default_voice: str | None = None, chunk_size: int = 10, max_question_seconds: float = 60.0,
                 system_prompt: str | None = None) -> None:
        if not hasattr(model, "generate") or not hasattr(model, "config"):
            raise TypeError(f"model must be a MossSpeechForCausalLM, got {type(model).__name__}")
        if not hasattr(processor, "batch_decode") or not hasattr(processor, "codec"):
            raise TypeError(f"processor must be a MossSpeechProcessor, got {type(processor).__name__}")
        codec = processor.codec
        if codec is None:
            raise ValueError("the demo needs a speech codec, but the processor has none: create it with codec= or "
                             "codec_path=, or pass --codec DIR")
        self.model, self.processor, self.codec = model, processor, codec
        self.voices = {str(name): Path(path) for name, path in (voices or {}).items()}
        for name, path in self.voices.items():
            if name == NO_VOICE:
                raise ValueError(f"voices: {NO_VOICE!r} is reserved for speaking without a voice prompt")
            if not path.is_file():
                raise ValueError(f"voices[{name!r}]: file {str(path)!r} does not exist")
        if default_voice is None:
            default_voice = next(iter(self.voices), NO_VOICE)
        if default_voice not in self.voice_choices():
            raise ValueError(f"default_voice must be one of {self.voice_choices()}, got {default_voice!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if not max_question_seconds > 0:
            raise ValueError(f"max_question_seconds must be > 0, got {max_question_seconds!r}")
        self.default_voice, self.chunk_size = default_voice, chunk_size
        self.max_question_seconds, self.system_prompt = float(max_question_seconds), system_prompt
        self.defaults = SamplingSettings.from_generation_config(getattr(model, "generation_config", None))
        self._voice_cache: dict[tuple[str, int], MossSpeechVoicePrompt] = {}
        self._generate_lock = threading.Lock()  # one answer at a time per model, whatever the web server does
        self._files = tempfile.TemporaryDirectory(prefix="moss-speech-demo-")  # answers' wav files
        config = model.config
        self._skip_text = {config.modality_pad_token_id, config.sosp_token_id, processor.text_pad_token_id}

    # ------------------------------------------------------------------------------------------ choices

    def voice_choices(self) -> list[str]:
        """Names offered in the voice menu: no prompt, then the shipped voices."""
        return [NO_VOICE, *self.voices]

    @property
    def rate(self) -> int:
        """Sampling rate of spoken answers (24 kHz for MOSS-Speech codecs)."""
        return int(self.codec.config.output_sampling_rate)

    # --------------------------------------------------------------------------------------- handlers

    def respond(self, session: DemoSession, question_audio: str | None, question_text: str | None,
                output_modality: str, voice: str | None, voice_file: str | None, temperature: float,
                top_p: float, top_k: int, repetition_penalty: float, max_new_tokens: int,
                greedy: bool) -> Iterator[tuple[Any, ...]]:
        """Answer one question; yields `(chat messages, audio chunk, session, question audio, question text)`.

        The audio chunk is a 16-bit wav (bytes) of newly decoded speech, or `gr.skip()` when the update carries
        none; the last two clear the question inputs once the question is taken. Problems raise `gr.Error` with a
        one-line message; non-fatal surprises are shown with `gr.Warning`.
        """
        gr = require_gradio()
        try:
            yield from self._respond(gr, session, question_audio, question_text, output_modality, voice, voice_file,
                                     SamplingSettings(temperature, top_p, top_k, repetition_penalty, max_new_tokens,
                                                      greedy))
        except gr.Error:
            raise
        except Exception as error:  # never a stack trace in the page: log it, show one line
            logger.exception("moss-speech demo: answering failed")
            raise _page_error(gr, f"Something went wrong: {one_line(error)}") from error

    def stop(self, session: DemoSession) -> tuple[list[dict[str, Any]], DemoSession]:
        """Stop the answer being generated (it keeps what was said so far); returns `(chat messages, session)`."""
        turn = session.turn
        if turn is not None:
            turn.stopped_by_user = True
            turn.stop.set()
            if turn.thread is not None:
                turn.thread.join(timeout=60)  # the stopping criterion ends generation at the next row
            if not turn.running():
                self._finish(session, turn)
        return _shown(session), session

    def clear(self, session: DemoSession) -> tuple[list[dict[str, Any]], None, DemoSession]:
        """Stop any answer and start a new conversation; returns `(chat messages, answer audio, session)`."""
        turn = session.turn
        if turn is not None:
            turn.stop.set()
            if turn.thread is not None:
                turn.thread.join(timeout=60)
        with session.lock:
            if session.turn is turn:
                session.turn = None
            session.conversation.clear()
            session.messages.clear()
        return [], None, session

    # ------------------------------------------------------------------------------------- internals

    def _respond(self, gr: Any, session: DemoSession, question_audio: str | None, question_text: str | None,
                 output_modality: str, voice: str | None, voice_file: str | None,
                 settings: SamplingSettings) -> Iterator[tuple[Any, ...]]:
        if session.turn is not None and session.turn.running():
            raise _page_error(gr, "Still answering the previous question: wait for it or press Stop.")
        if output_modality not in ("audio", "text"):
            raise _page_error(gr, f"Answer modality must be 'audio' (speech) or 'text', got {output_modality!r}.")
        try:
            settings = settings.checked()
        except ValueError as error:
            raise _page_error(gr, f"Sampling settings: {error}.") from error
        text = (question_text or "").strip()
        if not question_audio and not text:
            raise _page_error(gr, "Ask something first: record or upload a spoken question, or type one.")
        if question_audio and text:
            gr.Warning("Both a recording and typed text were given: answering the recording (the text is ignored).")
        voice_prompt = self._voice_prompt(gr, voice, voice_file) if output_modality == "audio" else None

        if question_audio:
            content, shown = self._spoken_question(gr, question_audio)
        else:
            content, shown = text, text
        turn = _Turn(output_modality, settings.max_new_tokens)
        with session.lock:
            session.conversation.append({"role": "user", "content": content})
            session.messages.append({"role": "user", "content": shown})
            session.messages.append({"role": "assistant", "content": "…"})
            session.turn = turn
        conversation = list(session.conversation)
        if self.system_prompt is not None:
            conversation.insert(0, {"role": "system", "content": self.system_prompt})
        skip = gr.skip()
        yield _shown(session), skip, session, None, ""

        chat = MossSpeechChat(self.model, self.processor, voice=voice_prompt)
        kwargs = {**settings.generate_kwargs(), "stopping_criteria": StoppingCriteriaList([_Monitor(turn)])}

        def run(turn: _Turn) -> Any:
            def on_audio(row: int, chunk: torch.Tensor) -> None:
                turn.events.put(("audio", chunk.detach().float().cpu().numpy()))

            streaming = {"on_audio": on_audio, "chunk_size": self.chunk_size} if output_modality == "audio" else {}
            with self._generate_lock:
                return chat.reply(conversation, output_modality=output_modality, **streaming, **kwargs)

        turn.start(run)
        try:
            text_ids: list[int] = []
            seconds, shown_at = 0.0, 0.0
            while True:
                kind, value = turn.events.get()
                if kind == "done" or turn.finished:  # finished: Stop already put the answer in the chat
                    break
                if kind == "audio":
                    seconds += value.size / self.rate
                    self._live(session, turn, f"🔊 speaking… {seconds:.1f} s")
                    yield _shown(session), _wav_bytes(value, self.rate), session, skip, skip
                    shown_at = time.monotonic()
                elif kind == "row" and value not in self._skip_text:
                    text_ids.append(value)
                    if time.monotonic() - shown_at >= _UPDATE_EVERY_S:
                        live = self.processor.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
                        if live and seconds == 0:
                            self._live(session, turn, live + " …")
                            yield _shown(session), skip, session, skip, skip
                            shown_at = time.monotonic()
        finally:
            turn.stop.set()  # the page went away (generator closed) or the answer is complete: end the thread
            if turn.thread is not None:
                turn.thread.join(timeout=60)
            if not turn.running():
                self._finish(session, turn)  # also when this handler failed or was closed: the session stays whole

        if turn.error is not None:
            error = turn.error
            yield _shown(session), skip, session, skip, skip
            logger.error("moss-speech demo: generation failed", exc_info=(type(error), error, error.__traceback__))
            raise _page_error(gr, f"The model could not answer: {one_line(error)}")
        yield _shown(session), skip, session, skip, skip

    @staticmethod
    def _live(session: DemoSession, turn: _Turn, content: str) -> None:
        """Show progress in the answer's message, unless Stop or Clear already replaced it."""
        with session.lock:
            if session.turn is turn and not turn.finished:
                session.messages[-1]["content"] = content

    def _finish(self, session: DemoSession, turn: _Turn) -> None:
        """Put the turn's answer (or its error) into the session, once, whoever gets here first."""
        gr = require_gradio()
        with session.lock:
            if turn.finished or session.turn is not turn:
                return
            turn.finished = True
            session.turn = None
            stopped = turn.stopped_by_user
            if turn.error is not None:
                session.conversation.pop()  # the model never answered it
                session.messages[-1]["content"] = f"⚠️ No answer: {one_line(turn.error)}"
                return
            reply = turn.reply
            answer, shown = self._answer(reply, turn.modality)
            if answer is None:
                session.conversation.pop()
                session.messages[-1]["content"] = "(stopped before answering)" if stopped else "(no answer)"
                return
            session.conversation.append({"role": "assistant", "content": answer})
            if stopped:
                shown.append("*(stopped)*")
            session.messages[-1]["content"] = shown
        if turn.modality == "audio" and reply.codes.numel() == 0 and not stopped:
            gr.Warning("The model answered in text, not in speech.")
        if turn.rows >= turn.max_new_tokens and not stopped:
            gr.Warning(f"The answer was cut at {turn.max_new_tokens} tokens: raise 'max new tokens' under Sampling "
                       "settings for longer answers.")

    def _answer(self, reply: Any, modality: str) -> tuple[Any, list[Any]]:
        """(the model's assistant content, what the chat shows) of a reply; `(None, [])` if it is empty."""
        text = reply.text.strip()
        codes = reply.codes
        shown: list[Any] = []
        if reply.audio is not None and reply.audio.numel() > 0:
            handle, path = tempfile.mkstemp(prefix="answer-", suffix=".wav", dir=self._files.name)
            os.close(handle)
            sf.write(path, reply.audio.float().cpu().numpy(), reply.sampling_rate, subtype="PCM_16")
            shown.append({"path": path, "mime_type": "audio/wav"})
        transcript = self._transcript(codes) if codes.numel() else ""
        if text:
            shown.append(text)
        elif transcript:
            shown.append(f"*heard:* {transcript}")
        if codes.numel() and (modality == "audio" or not text):
            return {"type": "audio", "codes": codes.tolist()}, shown
        if text:
            return text, shown
        return None, []

    def _transcript(self, codes: torch.Tensor) -> str:
        """What the codec's recogniser hears in `codes` ("" for codecs without one, such as the release's)."""
        if not getattr(self.codec, "can_transcribe", False):
            return ""
        try:
            return self.codec.transcribe_codes([codes])[0].strip()
        except Exception:  # a transcript is a nicety: never fail a turn for it
            logger.exception("moss-speech demo: transcription failed")
            return ""

    def _spoken_question(self, gr: Any, path: str) -> tuple[dict[str, Any], list[Any]]:
        """The model's content (codes) and the chat's content (player, transcript) of a recorded question."""
        wave, rate = _read_audio(gr, path, "the question")
        seconds = wave.shape[-1] / rate
        if seconds > self.max_question_seconds:
            raise _page_error(gr, f"The question is {seconds:.0f} s long; this demo takes at most "
                           f"{self.max_question_seconds:.0f} s.")
        codes = self.codec.encode(wave, sampling_rate=rate).codes[0]
        shown: list[Any] = [{"path": str(path)}]
        transcript = self._transcript(codes)
        if transcript:
            shown.append(f"*heard:* {transcript}")
        return {"type": "audio", "codes": codes.tolist()}, shown

    def _voice_prompt(self, gr: Any, voice: str | None, voice_file: str | None) -> MossSpeechVoicePrompt | None:
        """The prompt of an uploaded voice file, else of the chosen voice; `None` speaks without a prompt."""
        if voice_file:
            path, what = Path(voice_file), "the uploaded voice"
        elif voice in (None, "", NO_VOICE):
            return None
        elif voice in self.voices:
            path, what = self.voices[voice], f"voice {voice!r}"
        else:
            raise _page_error(gr, f"Unknown voice {voice!r}: choose one of {', '.join(self.voice_choices())}.")
        try:
            key = (str(path.resolve()), path.stat().st_mtime_ns)
        except OSError as error:
            raise _page_error(gr, f"Cannot read {what}: {one_line(error)}") from error
        if key not in self._voice_cache:
            if path.suffix == ".safetensors":
                try:
                    prompt = MossSpeechVoicePrompt.load(str(path))
                except Exception as error:
                    raise _page_error(gr, f"{what.capitalize()} is not a MOSS-Speech voice prompt file "
                                   f"({one_line(error)}).") from error
            else:
                wave, rate = _read_audio(gr, str(path), what)
                prompt = self.codec.voice_prompt(wave, sampling_rate=rate)
            self._voice_cache[key] = prompt
        return self._voice_cache[key]


# ------------------------------------------------------------------------------------------------- audio I/O


def _read_audio(gr: Any, path: str, what: str) -> tuple[torch.Tensor, int]:
    """An audio file as a mono float32 waveform at its own rate (`load_audio`), or a `gr.Error`."""
    try:
        return load_audio(path, where=what)
    except (OSError, TypeError, ValueError) as error:
        read_error = error
    # Browsers may record other formats than soundfile reads (webm, mp4): Gradio decodes them with ffmpeg.
    try:
        from gradio.processing_utils import audio_from_file

        rate, samples = audio_from_file(str(path))
    except Exception:
        raise _page_error(gr, f"Cannot read {what} as audio ({one_line(read_error)}).") from read_error
    scale = float(np.iinfo(samples.dtype).max) if samples.dtype.kind in "iu" else 1.0
    try:  # (frames, channels) as Gradio returns them, turned to load_audio's (channels, samples)
        return load_audio((samples.astype(np.float32) / scale).reshape(len(samples), -1).T, rate, where=what)
    except (TypeError, ValueError) as error:
        raise _page_error(gr, f"Cannot read {what} as audio ({one_line(error)}).") from error


def _shown(session: DemoSession) -> list[dict[str, Any]]:
    """A snapshot of the chat (the live message is edited in place while the answer comes)."""
    return [dict(message) for message in session.messages]


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A mono 16-bit wav file in memory: what Gradio's streaming audio output takes chunk by chunk."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------- the page


def build_demo(model: Any, processor: Any, *, voices: Mapping[str, str | os.PathLike] | None = None,
               default_voice: str | None = None, title: str = "MOSS-Speech", chunk_size: int = 10,
               max_question_seconds: float = 60.0, system_prompt: str | None = None,
               description: str | None = None):
    """The demo page as a `gradio.Blocks`: `.launch()` it, or use it as a Space's `demo`.

    Args:
        model: A `MossSpeechForCausalLM`.
        processor: A `MossSpeechProcessor` with a codec.
        voices: Voices offered in the page, name → `.safetensors` voice prompt or speaker audio file.
        default_voice: The voice selected at start (default: the first of `voices`, else none).
        title: Heading of the page and title of the browser tab.
        chunk_size: Speech codes per streamed chunk (12.5 codes = 1 s).
        max_question_seconds: Longest spoken question accepted.
        system_prompt: Text of the system turn (default: the processor's fallback for the answer's modality).
        description: A line under the heading naming the model the page talks to (e.g.
            `model_description(model_dir)`); none by default.

    The `MossSpeechDemo` behind the page is its `moss_speech` attribute.
    """
    gr = require_gradio()
    app = MossSpeechDemo(model, processor, voices=voices, default_voice=default_voice, chunk_size=chunk_size,
                         max_question_seconds=max_question_seconds, system_prompt=system_prompt)
    defaults = app.defaults
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nAsk by voice (microphone or file) or in writing. Spoken answers play while they "
                    "are generated; the conversation keeps every turn.")
        if description:
            gr.Markdown(description, elem_id="moss-model")
        session = gr.State(DemoSession)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=440, elem_id="moss-chat", feedback_options=None)
                answer_audio = gr.Audio(label="Spoken answer (live)", streaming=True, autoplay=True,
                                        interactive=False, elem_id="moss-answer-audio")
            with gr.Column(scale=2):
                question_audio = gr.Audio(sources=["microphone", "upload"], type="filepath",
                                          label="Ask by voice", elem_id="moss-question-audio")
                question_text = gr.Textbox(label="…or type a question", lines=2, elem_id="moss-question-text",
                                           placeholder="what is three plus four")
                modality = gr.Radio(list(MODALITY_CHOICES), value="audio", label="Answer in",
                                    elem_id="moss-output-modality")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="moss-ask")
                    stop = gr.Button("Stop", variant="stop", elem_id="moss-stop")
                    clear = gr.Button("Clear", elem_id="moss-clear")
                with gr.Accordion("Voice", open=False):
                    voice = gr.Dropdown(app.voice_choices(), value=app.default_voice, label="Voice of the answers",
                                        elem_id="moss-voice")
                    voice_file = gr.File(label="…or upload a voice prompt (a short clip of the speaker, or a "
                                               ".safetensors voice prompt)", file_types=list(VOICE_FILE_TYPES),
                                         type="filepath", elem_id="moss-voice-file")
                with gr.Accordion("Sampling settings", open=False):
                    gr.Markdown("Applied to both the text and the speech channel.")
                    temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label="top p")
                    top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="top k (0: no limit)")
                    repetition_penalty = gr.Slider(1.0, 2.0, value=max(1.0, defaults.repetition_penalty), step=0.01,
                                                   label="repetition penalty")
                    max_new_tokens = gr.Slider(1, max(2000, defaults.max_new_tokens), step=1,
                                               value=defaults.max_new_tokens, label="max new tokens")
                    greedy = gr.Checkbox(value=defaults.greedy, label="greedy (no sampling)")

        inputs = [session, question_audio, question_text, modality, voice, voice_file, temperature, top_p, top_k,
                  repetition_penalty, max_new_tokens, greedy]
        outputs = [chatbot, answer_audio, session, question_audio, question_text]
        # Progress shows in the chat itself ("…", "speaking… 1.2 s") and errors as toasts: no overlays, which would
        # also cover the question inputs (outputs here, so that they are cleared once a question is taken).
        quiet = {"show_progress": "hidden"}
        asked = gr.on([ask.click, question_text.submit], app.respond, inputs, outputs, api_name="ask", **quiet)
        stop.click(app.stop, [session], [chatbot, session], cancels=[asked], api_name="stop", **quiet)
        clear.click(app.clear, [session], [chatbot, answer_audio, session], cancels=[asked], api_name="clear",
                    **quiet)
        # The chat's own trash icon: forget the conversation too, not only what is shown.
        chatbot.clear(app.clear, [session], [chatbot, answer_audio, session], cancels=[asked], api_visibility="private",
                      **quiet)
    demo.moss_speech = app
    return demo


def launch_demo(demo: Any, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs: Any):
    """Serve `demo` (one answer at a time) on `host:port` (default port: Gradio's, 7860); blocks unless
    `prevent_thread_lock=True` is passed. Returns what `gradio.Blocks.launch` returns."""
    if shutil.which("ffmpeg") is None:
        logger.warning("ffmpeg is not on the PATH: Gradio needs it to stream spoken answers to the browser "
                       "(apt-get install ffmpeg, or your system's package)")
    return demo.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=share,
                                                          show_error=False, **kwargs)


def model_description(model_dir: str | os.PathLike) -> str:
    """One line naming the checkpoint a page talks to; for the shipped MOSS-Speech-Nano, what it knows."""
    try:
        is_nano = Path(model_dir).resolve() == pretrained.nano_path().resolve()
    except FileNotFoundError:
        is_nano = False
    return f"Model: {pretrained.NANO_DESCRIPTION}" if is_nano else f"Model: `{model_dir}`"


def load_checkpoint(model_dir: str | os.PathLike, codec_dir: str | os.PathLike | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """`(model, processor)` of a checkpoint directory, on `device` (default: cuda if available, else cpu).

    The processor is the one saved in `model_dir`, with the codec of `codec_dir` when given (else the one it names,
    else the `codec/` folder of `model_dir`); the LM is loaded in `dtype` (default: float32 on CPU, bfloat16 on
    GPU), the codec in float32.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    overrides = {"codec_path": str(codec_dir)} if codec_dir is not None else {}
    processor = MossSpeechProcessor.from_pretrained(str(model_dir), **overrides)
    beside = Path(model_dir) / CODEC_SUBFOLDER
    if processor.codec_path is None and processor.codec_subfolder is None and (beside / "config.json").is_file():
        processor.codec_path = str(beside)  # a codec shipped beside the model (the nano layout), as `chat` does
    if processor.codec is not None:
        processor.codec = processor.codec.to(device=device, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    return model, processor


__all__ = ["DemoSession", "MossSpeechDemo", "SamplingSettings", "build_demo", "launch_demo", "load_checkpoint",
           "model_description", "require_gradio"]

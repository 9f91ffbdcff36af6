"""One call for a whole spoken turn: conversation → grid → generate → text and 24 kHz speech, optionally streamed.

```python
chat = MossSpeechChat(model, processor, voice=processor.codec.voice_prompt(wav, sr))
reply = chat.reply([{"role": "user", "content": {"type": "audio", "path": "question.wav"}}], output_modality="audio",
                   stream_to="answer.wav")
print(reply.text)
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import soundfile as sf
import torch
from transformers.generation.streamers import BaseStreamer

from .modeling_moss_speech_codec import MossSpeechCodecModel, MossSpeechStreamDecoder, MossSpeechVoicePrompt


class MossSpeechAudioStreamer(BaseStreamer):
    """A `generate` streamer that turns speech codes into audio while they are generated.

    For every batch row, the audio ids of speech rows (text id = modality pad, audio id a code) go into that row's
    [`MossSpeechStreamDecoder`]; each ready chunk is handed to `on_audio(row, chunk)` and/or appended to the row's
    wav file in `output_files`. Several speech segments of a row are decoded as one utterance, like
    `processor.decode` does. `end()` flushes every row.
    """

    def __init__(
        self,
        codec: MossSpeechCodecModel,
        modality_pad_token_id: int,
        eosp_token_id: int,
        voice_prompt: MossSpeechVoicePrompt | Sequence[MossSpeechVoicePrompt | None] | None = None,
        on_audio: Callable[[int, torch.Tensor], None] | None = None,
        output_files: Sequence[str | Path | None] | None = None,
        chunk_size: int = 25,
        generator: torch.Generator | None = None,
    ) -> None:
        self.codec, self.modality_pad, self.eosp = codec, modality_pad_token_id, eosp_token_id
        self.voice_prompt, self.on_audio, self.output_files = voice_prompt, on_audio, output_files
        self.chunk_size, self.generator = chunk_size, generator
        self.decoders: list[MossSpeechStreamDecoder] | None = None
        self.writers: list[sf.SoundFile | None] = []
        self.chunks: list[list[torch.Tensor]] = []

    def _start(self, batch: int) -> None:
        prompts = self.voice_prompt if isinstance(self.voice_prompt, (list, tuple)) else [self.voice_prompt] * batch
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} voice prompts for a batch of {batch}.")
        self.decoders = [self.codec.stream_decoder(p, chunk_size=self.chunk_size, generator=self.generator)
                         for p in prompts]
        files = list(self.output_files) if self.output_files is not None else [None] * batch
        if len(files) != batch:
            raise ValueError(f"got {len(files)} output files for a batch of {batch}.")
        rate = self.codec.config.output_sampling_rate
        self.writers = [None if f is None else sf.SoundFile(str(f), "w", samplerate=rate, channels=1,
                                                            subtype="PCM_16") for f in files]
        self.chunks = [[] for _ in range(batch)]

    def _emit(self, row: int, chunk: torch.Tensor) -> None:
        if chunk.numel() == 0:
            return
        self.chunks[row].append(chunk.detach().float().cpu())
        if self.writers[row] is not None:
            self.writers[row].write(chunk.detach().float().cpu().numpy())
            self.writers[row].flush()
        if self.on_audio is not None:
            self.on_audio(row, chunk)

    def put(self, value: torch.Tensor) -> None:
        """Receive one generated (B, 2) row per batch element."""
        if value.ndim != 2 or value.shape[-1] != 2:
            raise ValueError(f"MossSpeechAudioStreamer expects (batch, 2) rows, got {tuple(value.shape)}.")
        if self.decoders is None:
            self._start(value.shape[0])
        rows = value.tolist()
        for index, (text_id, audio_id) in enumerate(rows):
            if text_id == self.modality_pad and audio_id != self.eosp:
                for chunk in self.decoders[index].push(audio_id):
                    self._emit(index, chunk)

    def end(self) -> None:
        """Flush every row's decoder and close the files."""
        if self.decoders is None:
            return
        for index, decoder in enumerate(self.decoders):
            self._emit(index, decoder.flush())
        for writer in self.writers:
            if writer is not None:
                writer.close()

    def audio(self, row: int) -> torch.Tensor | None:
        """Everything streamed for `row` so far (1-D float32), or `None` if it produced no speech."""
        if not self.chunks or not self.chunks[row]:
            return None
        return torch.cat(self.chunks[row])


class MossSpeechChat:
    """Talk to MOSS-Speech: `reply(conversations)` runs a whole turn for one conversation or a batch.

    Args:
        model: A `MossSpeechForCausalLM`.
        processor: A `MossSpeechProcessor` (its codec turns audio in and out).
        voice: The voice to answer in (a `MossSpeechVoicePrompt`, or `None` for the codec's default).
        **generation_kwargs: Defaults for `model.generate` (e.g. `max_new_tokens`, `audio_temperature`).
    """

    def __init__(self, model, processor, voice: MossSpeechVoicePrompt | None = None, **generation_kwargs) -> None:
        self.model, self.processor, self.voice = model, processor, voice
        self.generation_kwargs = generation_kwargs

    def reply(
        self,
        conversations,
        output_modality: str | Sequence[str] = "audio",
        on_audio: Callable[[int, torch.Tensor], None] | None = None,
        stream_to: str | Path | Sequence[str | Path | None] | None = None,
        chunk_size: int = 25,
        generator: torch.Generator | None = None,
        vocoder_generator: torch.Generator | None = None,
        decode_audio: bool = True,
        **generation_kwargs,
    ):
        """Answer one conversation (returns one response) or a batch (returns a list).

        `conversations` is a list of messages (one conversation), a list of such lists (a batch), or a single
        message dict, answered as a one-message conversation (returns one response).

        With `on_audio` or `stream_to`, speech is decoded while it is generated: chunks go to `on_audio(row, chunk)`
        and/or are appended to the wav file(s) as they come; the returned responses hold the same audio.
        `generator` drives sampling and `vocoder_generator` the vocoder's source noise, so a seeded answer has the
        same codes streamed or not. `decode_audio=False` skips speech decoding (no codec needed: text answers).
        """
        if isinstance(conversations, Mapping):  # one message: a one-message conversation, not a batch of keys
            conversations = [conversations]
        if isinstance(conversations, str) or not isinstance(conversations, Sequence):
            raise TypeError("conversations must be a list of messages (dicts with 'role' and 'content'), a list of "
                            f"such lists or one message dict, got {type(conversations).__name__}.")
        single = bool(conversations) and isinstance(conversations[0], Mapping)
        batch = [conversations] if single else list(conversations)
        inputs = self.processor(batch, output_modality=output_modality, return_tensors="pt")
        device = self.model.device
        kwargs = {**self.generation_kwargs, **generation_kwargs}
        streamer = kwargs.pop("streamer", None)
        if on_audio is not None or stream_to is not None:
            if not decode_audio:
                raise ValueError("on_audio / stream_to decode speech: they cannot be combined with decode_audio=False.")
            if streamer is not None:
                raise ValueError("pass either streamer= or on_audio=/stream_to=, not both.")
            files = [stream_to] if isinstance(stream_to, (str, Path)) else stream_to
            config = self.model.config
            streamer = MossSpeechAudioStreamer(
                self.processor.codec, config.modality_pad_token_id, config.eosp_token_id, self.voice, on_audio,
                files, chunk_size=chunk_size, generator=vocoder_generator,
            )
        out = self.model.generate(
            inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device), streamer=streamer,
            generator=generator, return_dict_in_generate=True, **kwargs,
        )
        if isinstance(streamer, MossSpeechAudioStreamer):
            responses = self.processor.batch_decode(out.sequences.cpu(), lengths=out.lengths.cpu(),
                                                    decode_audio=False)
            for row, response in enumerate(responses):
                response.audio = streamer.audio(row)
                response.sampling_rate = self.processor.codec.config.output_sampling_rate
        else:
            responses = self.processor.batch_decode(out.sequences.cpu(), lengths=out.lengths.cpu(),
                                                    decode_audio=decode_audio, voice_prompt=self.voice,
                                                    generator=vocoder_generator)
        return responses[0] if single else responses


__all__ = ["MossSpeechAudioStreamer", "MossSpeechChat"]

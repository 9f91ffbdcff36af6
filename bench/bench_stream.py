"""End-to-end streaming latency: time to first audio and per-chunk decode cost along a long spoken answer.

The LM generates a speech answer of `--seconds` (12.5 codes per second; end of speech suppressed so the answer has
that length) from a question prompt, and a `generate` streamer pushes each code into the codec's
`MossSpeechStreamDecoder` as it comes, as `MossSpeechChat(stream_to=...)` does. Measured on this machine, float32:

- `time_to_first_audio_s`: from the `generate` call (the end of the question) to the first audio sample returned:
  prefill + generating chunk_size + the vocoder's held-back codes (Griffin-Lim 2, HiFT 5) + 3 lookahead codes +
  the first chunk's decode;
- `chunk_decode_s`: the decode time of every chunk along the answer (flow + vocoder), the flush separately;
- `rtf`: whole-answer wall time (generation and decoding, sequential as in `generate`) / seconds of audio.

Setups: the shipped MOSS-Speech-Nano (LM + codec, Griffin-Lim vocoder, prompt-less as `moss-speech chat` speaks;
its codec bounds the estimator's attention context, `estimator_left_chunks` = 25 chunks = 10 s, and the mel's
distance from the unbounded stream on the same codes is reported), and the release-size codec (random weights,
HiFT, a random voice prompt) driven by the nano LM (a small LM: the codec's cost is what is measured), with the
release's unbounded context and with `--release-left-chunks`. The nano answer runs `--repeats` times and every time
is reported at its minimum over the runs (a shared machine's load comes and goes within a run). Targets: per-chunk
cost flat (last chunk <= 1.3x the first), nano TTFA <= 0.5 s and RTF <= 0.5 on 2 cores.

    python bench/bench_stream.py                       # all, nano 60 s (3 runs), release-size 20 s
    python bench/bench_stream.py --only nano --seconds 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
from transformers.generation.streamers import BaseStreamer

from modeling_moss_speech import (
    MossSpeechCodecConfig,
    MossSpeechCodecModel,
    MossSpeechForCausalLM,
    MossSpeechVoicePrompt,
)
from modeling_moss_speech.modeling_moss_speech_codec_stream import MossSpeechFlowStream
from modeling_moss_speech.pretrained import nano_path
from modeling_moss_speech.threads import add_threads_argument, set_threads


class Only:
    """Logits processor that leaves one id (the text channel of a speech row: the modality pad)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kept = scores[:, self.keep].clone()
        scores.fill_(float("-inf"))
        scores[:, self.keep] = kept
        return scores


class Suppress:
    """Logits processor that forbids ids (the end of speech: the answer keeps its length)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.ids] = float("-inf")
        return scores


class TimedStreamer(BaseStreamer):
    """Pushes speech codes into a stream decoder, timing each chunk's decode and the first audio."""

    def __init__(self, decoder, modality_pad: int, eosp: int, start: float) -> None:
        self.decoder, self.modality_pad, self.eosp, self.start = decoder, modality_pad, eosp, start
        self.chunks: list[dict] = []
        self.first_audio_s: float | None = None
        self.codes = 0
        self.code_ids: list[int] = []
        self.samples = 0
        self.decode_s = 0.0
        self.flush_s = 0.0

    def put(self, value: torch.Tensor) -> None:
        text_id, audio_id = value[0].tolist()
        if text_id != self.modality_pad or audio_id == self.eosp:
            return
        self.codes += 1
        self.code_ids.append(audio_id)
        begin = time.perf_counter()
        pieces = self.decoder.push(audio_id)
        spent = time.perf_counter() - begin
        self.decode_s += spent
        if pieces:
            samples = sum(p.numel() for p in pieces)
            self.samples += samples
            self.chunks.append({"codes": self.codes, "decode_s": spent, "samples": samples})
            if self.first_audio_s is None and samples:
                self.first_audio_s = time.perf_counter() - self.start

    def end(self) -> None:
        begin = time.perf_counter()
        tail = self.decoder.flush()
        self.flush_s = time.perf_counter() - begin
        self.decode_s += self.flush_s
        self.samples += tail.numel()


def answer(lm: MossSpeechForCausalLM, codec: MossSpeechCodecModel, voice, seconds: float, chunk_size: int,
           prompt_len: int) -> dict:
    config = lm.config
    n_codes = math.ceil(seconds * 12.5)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(5, config.vocab_size - 8, (1, prompt_len), generator=generator)
    grid = torch.stack([text, torch.full_like(text, config.audio_pad_token_id)], dim=-1)
    grid[:, -1, 0] = config.sosp_token_id  # the audio-output assistant prefix ends with sosp
    decoder = codec.stream_decoder(voice, chunk_size=chunk_size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    streamer = TimedStreamer(decoder, config.modality_pad_token_id, config.eosp_token_id, start)
    lm.generate(grid, do_sample=False, max_new_tokens=n_codes, eos_token_id=[], streamer=streamer,
                text_logits_processor=[Only(config.modality_pad_token_id)],
                audio_logits_processor=[Suppress([config.eosp_token_id])])
    wall = time.perf_counter() - start
    rate = codec.config.output_sampling_rate
    audio_s = streamer.samples / rate
    times = [c["decode_s"] for c in streamer.chunks]
    return {
        "answer_codes": streamer.codes,
        "audio_s": audio_s,
        "chunk_size_codes": chunk_size,
        "time_to_first_audio_s": streamer.first_audio_s,
        "first_chunk_audio_s": streamer.chunks[0]["samples"] / rate if streamer.chunks else None,
        **chunk_stats(times),
        "flush_s": streamer.flush_s,
        "decode_s": streamer.decode_s,
        "generate_s": wall - streamer.decode_s,
        "wall_s": wall,
        "rtf": wall / audio_s,
        "decode_rtf": streamer.decode_s / audio_s,
        "flow_cache_mb": decoder.flow_stream.cache_bytes() / 2**20,
        "estimator_left_chunks": codec.config.flow_config.estimator_left_chunks,
        "code_ids": streamer.code_ids,
    }


def chunk_stats(times: list[float]) -> dict:
    """The per-chunk decode times and how they change along the answer."""
    steady = times[1:] or times  # the first chunk also holds one-time work (the voice prompt, first allocations)
    return {
        "chunks": len(times),
        "chunk_decode_s": [round(t, 4) for t in times],
        "first_chunk_decode_s": times[0],
        "second_chunk_decode_s": steady[0],
        "last_chunk_decode_s": times[-1],
        "median_chunk_decode_s": statistics.median(times),
        "last_over_first": times[-1] / times[0],
        "last3_over_first3_excluding_first_chunk": statistics.mean(steady[-3:]) / statistics.mean(steady[:3]),
    }


def best_of(runs: list[dict]) -> dict:
    """One result from repeated runs of the same answer: each time (every chunk's decode, TTFA, wall) at its minimum
    over the runs, as timeit does, so that a neighbour's load on a shared machine does not pass for a trend."""
    best = {**runs[0], "repeats": len(runs),
            **chunk_stats([min(chunk) for chunk in zip(*(run["chunk_decode_s"] for run in runs))])}
    for key in ("time_to_first_audio_s", "flush_s", "decode_s", "generate_s", "wall_s", "rtf", "decode_rtf"):
        best[key] = min(run[key] for run in runs)
    return best


def context_effect(codec: MossSpeechCodecModel, codes: list[int], chunk_size: int) -> dict:
    """How far the bounded estimator context moves the streamed mel from the unbounded one, on the same codes."""
    config = codec.config.flow_config
    left = config.estimator_left_chunks
    mels = []
    for bound in (None, left):
        config.estimator_left_chunks = bound
        stream = MossSpeechFlowStream(codec.flow, num_codes=codec.config.num_codes)
        pieces, done, lookahead = [], 0, config.pre_lookahead_len
        while done + chunk_size + lookahead <= len(codes):
            pieces.append(stream.step(codes[: done + chunk_size + lookahead], done + chunk_size))
            done += chunk_size
        pieces.append(stream.step(codes, len(codes), finalize=True))
        mels.append(torch.cat(pieces, dim=2))
    config.estimator_left_chunks = left
    exact, bounded = mels
    context = left * config.estimator_static_chunk_size
    error = (bounded - exact)[:, :, context:]
    return {"estimator_left_chunks": left, "context_s": context / 50,
            "mel_snr_db_after_context": float(10 * torch.log10(exact[:, :, context:].pow(2).sum()
                                                               / error.pow(2).sum().clamp(min=1e-20))),
            "mel_max_abs_diff": float((bounded - exact).abs().max()),
            "mel_mean_abs_diff_after_context": float(error.abs().mean())}


def random_voice(codec: MossSpeechCodecModel, seconds: float = 3.0) -> MossSpeechVoicePrompt:
    """A voice prompt of the right shapes (codes, 4 mel frames per code, x-vector) from random numbers."""
    generator = torch.Generator().manual_seed(1)
    n = int(seconds * 12.5)
    cfg = codec.config.flow_config
    return MossSpeechVoicePrompt(torch.randint(0, codec.config.num_codes, (n,), generator=generator),
                                 torch.randn(n * cfg.token_mel_ratio, cfg.output_size, generator=generator) - 5,
                                 torch.randn(cfg.spk_embed_dim, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["nano", "release"], default=None)
    parser.add_argument("--seconds", type=float, default=60.0, help="answer length for nano")
    parser.add_argument("--release-seconds", type=float, default=20.0,
                        help="answer length for the release-size codec (its flow caches ~230 MB per second)")
    parser.add_argument("--chunk-size", type=int, default=25)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the nano answer; every time is reported at its minimum over them")
    parser.add_argument("--release-left-chunks", type=int, default=25,
                        help="the release-size codec is also run with this estimator_left_chunks (default 25: 10 s)")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    load_start = os.getloadavg()
    lm = MossSpeechForCausalLM.from_pretrained(nano_path()).eval()
    results = {}
    with torch.inference_mode():
        if args.only in (None, "nano"):
            # Prompt-less, as `moss-speech chat` speaks nano answers by default (the canonical voice is the flow's own).
            codec = MossSpeechCodecModel.from_pretrained(nano_path() / "codec").eval()
            runs = [answer(lm, codec, None, args.seconds, args.chunk_size, args.prompt_len)
                    for _ in range(args.repeats)]
            results["nano"] = best_of(runs)
            results["nano"]["vocoder"] = codec.config.vocoder_type
            if codec.config.flow_config.estimator_left_chunks is not None:
                results["nano"]["bounded_context_vs_unbounded"] = context_effect(codec, runs[0]["code_ids"],
                                                                                 args.chunk_size)
        if args.only in (None, "release"):
            for left in (None, args.release_left_chunks):
                torch.manual_seed(0)
                codec = MossSpeechCodecModel(MossSpeechCodecConfig(flow_config={"estimator_left_chunks": left})).eval()
                name = "release_codec_nano_lm" + ("" if left is None else f"_left_chunks_{left}")
                results[name] = best_of([answer(lm, codec, random_voice(codec), args.release_seconds,
                                                args.chunk_size, args.prompt_len)])
                results[name]["vocoder"] = codec.config.vocoder_type
    for result in results.values():
        result.pop("code_ids")
    print(json.dumps({
        "bench": "stream", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "load_average_start_end": [load_start, os.getloadavg()],
        "targets": {"last_over_first_max": 1.3, "nano_time_to_first_audio_s_max": 0.5, "nano_rtf_max": 0.5},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()

"""Real-time factors of the MOSS-Speech codec: encode, decode, streaming first-chunk latency.

Random weights (the speed does not depend on them), float32, CPU unless --device. Two configurations: the
release-size codec and a small one. RTF = compute seconds / seconds of audio (lower is faster; < 1 is faster than
real time); for a batch, the audio of all rows counts. Prints one JSON object:

    python bench/bench_codec.py                 # release size and small, 5 s utterances
    python bench/bench_codec.py --only small    # skip the release-size model (about 2 GB of float32 weights)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from modeling_moss_speech import MossSpeechCodecConfig, MossSpeechCodecModel
from modeling_moss_speech.threads import add_threads_argument, set_threads

SMALL = dict(
    encoder_config=dict(d_model=256, encoder_attention_heads=4, encoder_ffn_dim=1024, encoder_layers=4,
                        quantize_position=4, pooling_position=4, quantize_vocab_size=1024),
    flow_config=dict(vocab_size=1024, input_size=128, encoder_attention_heads=4, encoder_linear_units=512,
                     encoder_num_blocks=2, encoder_num_up_blocks=2, estimator_channels=128, estimator_num_heads=4,
                     estimator_attention_head_dim=32, estimator_n_blocks=1, estimator_num_mid_blocks=2,
                     estimator_time_embed_dim=256, n_timesteps=10),
    vocoder_config=dict(base_channels=128, f0_predictor_channels=128),
    speaker_config=dict(init_channels=64, growth_rate=16, block_layers=[4, 8, 4], fcm_channels=16),
)


def best_time(fn, repeats: int) -> tuple[float, object]:
    result = fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def speechlike(seconds: float, rate: int, seed: int) -> torch.Tensor:
    """A harmonic signal with a moving pitch and noise: exercises the same code paths as speech."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / rate
    wav = sum(0.2 / k * torch.sin(k * phase) for k in range(1, 6)) + 0.02 * torch.randn(t.shape, generator=g)
    return wav.float()


def run(name: str, config: MossSpeechCodecConfig, args) -> dict:
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(config).eval().to(args.device)
    params = sum(p.numel() for p in codec.parameters())
    seconds = args.seconds
    n_codes = math.ceil(seconds * 12.5)
    out_rate = config.output_sampling_rate
    report = {"parameters": params, "utterance_seconds": seconds}
    with torch.inference_mode():
        for batch in (1, 8):
            audio = [speechlike(seconds, 16000, i) for i in range(batch)]
            enc, _ = best_time(lambda audio=audio: codec.encode(audio, sampling_rate=16000), args.repeats)
            codes = torch.randint(0, config.num_codes, (batch, n_codes))
            dec, out = best_time(lambda codes=codes: codec.decode(codes, generator=torch.Generator().manual_seed(0)),
                                 args.repeats)
            decoded_seconds = batch * out.waveforms.shape[-1] / out_rate
            report[f"batch{batch}"] = {
                "encode_s": enc, "encode_rtf": enc / (batch * seconds),
                "decode_s": dec, "decode_rtf": dec / decoded_seconds,
            }
        prompt = codec.voice_prompt(speechlike(3.0, 24000, 7), sampling_rate=24000)
        codes = torch.randint(0, config.num_codes, (n_codes,)).tolist()
        for chunk in (25, 5):
            start = time.perf_counter()
            stream = codec.stream_decode(iter(codes), voice_prompt=prompt, chunk_size=chunk)
            first = next(stream)
            latency = time.perf_counter() - start
            rest = sum(c.numel() for c in stream)
            total = time.perf_counter() - start
            report[f"stream_chunk{chunk}"] = {
                "first_chunk_latency_s": latency, "first_chunk_audio_s": first.numel() / out_rate,
                "total_s": total, "rtf": total / ((first.numel() + rest) / out_rate),
            }
    report["batch8_decode_speedup_per_row"] = report["batch1"]["decode_rtf"] / report["batch8"]["decode_rtf"]
    report["batch8_encode_speedup_per_row"] = report["batch1"]["encode_rtf"] / report["batch8"]["encode_rtf"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["release", "small"], default=None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    configs = {"release": MossSpeechCodecConfig(), "small": MossSpeechCodecConfig(**SMALL)}
    results = {name: run(name, cfg, args) for name, cfg in configs.items() if args.only in (None, name)}
    print(json.dumps({"bench": "codec", "device": args.device, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "machine": platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""How close streamed speech is to the offline decode: waveform SNR and log-mel distance, per setup.

For each setup the same codes are decoded offline (`codec.decode`: full-context flow, one vocoder pass) and streamed
(`codec.stream_decode`: cached chunk-causal flow, streamed vocoder), and compared:

- `snr_stream_vs_offline_db`: waveform SNR of the stream against the offline decode (what a listener compares);
- `snr_stream_vs_revocoded_db`: against one vocoder pass over the very mel the stream produced, with the same seed:
  isolates the chunk stitching of the vocoder from the flow's streaming/offline difference (with the noise on the
  two excitations are different draws, so this too sits at the noise floor);
- `snr_offline_other_seed_db`: the offline decode against itself with another vocoder seed: the floor set by the
  random excitation alone (noise on), which no stitching can beat;
- `logmel_l1_stream_vs_offline`: mean |Δ| of the 24 kHz log-mel (`prompt_mel_spectrogram`) of the two waveforms,
  insensitive to the noise's phase; `logmel_l1_offline_other_seed` is its floor.

Setups: the release-size codec (random weights, HiFT) with the excitation noise on and off, and the shipped nano
codec (Griffin-Lim, its canonical voice). Prints one JSON object:

    python bench/stream_continuity.py --seconds 4 --chunk-size 10
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from modeling_moss_speech import MossSpeechCodecConfig, MossSpeechCodecModel, MossSpeechVoicePrompt
from modeling_moss_speech.modeling_moss_speech_codec import prompt_mel_spectrogram
from modeling_moss_speech.pretrained import nano_path
from modeling_moss_speech.threads import add_threads_argument, set_threads


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - estimate).pow(2).sum().clamp(min=1e-20)))


def logmel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((prompt_mel_spectrogram(a) - prompt_mel_spectrogram(b)).abs().mean())


def silence_noise(codec: MossSpeechCodecModel) -> None:
    """Excitation without its random part (sines only): `noise off`."""
    source = codec.hift.m_source
    source.draw_noise = lambda lengths, total, generator, device: torch.zeros(
        len(lengths), source.num_harmonics, total, device=device)


def compare(codec: MossSpeechCodecModel, codes: torch.Tensor, voice, chunk_size: int) -> dict:
    seed = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    offline = codec.decode(codes[None], voice_prompt=voice, generator=seed(0)).waveforms[0]
    other = codec.decode(codes[None], voice_prompt=voice, generator=seed(1)).waveforms[0]
    decoder = codec.stream_decoder(voice, chunk_size=chunk_size, generator=seed(0))
    mels, pieces = [], []
    step = decoder.flow_stream.step

    def recording_step(*args, **kwargs):
        mel = step(*args, **kwargs)
        mels.append(mel)
        return mel

    decoder.flow_stream.step = recording_step
    for code in codes.tolist():
        pieces += decoder.push(code)
    pieces.append(decoder.flush())
    streamed = torch.cat(pieces)
    revocoded = codec.vocoder(torch.cat(mels, dim=2), generator=seed(0))[0][0]
    return {
        "samples_equal_offline": streamed.numel() == offline.numel(),
        "snr_stream_vs_offline_db": snr_db(offline, streamed),
        "snr_stream_vs_revocoded_db": snr_db(revocoded, streamed),
        "snr_offline_other_seed_db": snr_db(offline, other),
        "logmel_l1_stream_vs_offline": logmel_l1(offline, streamed),
        "logmel_l1_revocoded_vs_offline": logmel_l1(offline, revocoded),
        "logmel_l1_offline_other_seed": logmel_l1(offline, other),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--only", choices=["release", "nano"], default=None)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    n_codes = math.ceil(args.seconds * 12.5)
    results = {}
    with torch.inference_mode():
        if args.only in (None, "release"):
            torch.manual_seed(0)
            codec = MossSpeechCodecModel(MossSpeechCodecConfig()).eval()
            codes = torch.randint(0, codec.config.num_codes, (n_codes,), generator=torch.Generator().manual_seed(2))
            results["release_noise_on"] = compare(codec, codes, None, args.chunk_size)
            silence_noise(codec)
            results["release_noise_off"] = compare(codec, codes, None, args.chunk_size)
        if args.only in (None, "nano"):
            codec = MossSpeechCodecModel.from_pretrained(nano_path() / "codec").eval()
            voice = MossSpeechVoicePrompt.load(str(nano_path() / "voices" / "canonical.safetensors"))
            codes = torch.randint(0, codec.config.num_codes, (n_codes,), generator=torch.Generator().manual_seed(2))
            results["nano_griffin_lim"] = compare(codec, codes, voice, args.chunk_size)
    print(json.dumps({"bench": "stream_continuity", "seconds": args.seconds, "chunk_size": args.chunk_size,
                      "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Make the codec's CTC recogniser robust to decoded speech: train its head on the codes of clean AND vocoded audio.

The recogniser is `encoder → codes → ctc_head`. Trained on clean espeak-ng audio only, it cannot read the codec's own
decoded speech (the Griffin-Lim vocoder's artefacts change the codes the encoder hears), so spoken answers could not
be checked by ear. This step decodes training utterances with the codec (flow + vocoder, with and without a voice
prompt), encodes the result again, and trains ONLY the CTC head on both code streams. The encoder and codebook are
untouched, so the codes (what the LLM was trained on) stay exactly the same.

    python training/train_speech_recognizer.py --codec outputs/nano/codec --corpus data/nano/corpus \\
        --voice outputs/nano/voices/canonical.safetensors --output outputs/nano/codec_asr

Prints JSON: validation CER / exact match of the original audio and of its encode→decode round trip, before and
after.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from tqdm.auto import tqdm
from train_speech_tokenizer import _read_split, _targets, recognition_scores

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechVoicePrompt
from modeling_moss_speech.apps.script_utils import ScriptArgumentParser, threads_field
from modeling_moss_speech.threads import set_threads


@torch.no_grad()
def vocoded_codes(codec: MossSpeechCodecModel, codes: list[torch.Tensor], prompts: list, batch_size: int,
                  desc: str) -> list[torch.Tensor]:
    """Codes of the codec's own speech for `codes`: decode (flow + vocoder) → 16 kHz → encode."""
    out: list[torch.Tensor] = []
    rate = codec.config.output_sampling_rate
    for start in tqdm(range(0, len(codes), batch_size), desc=desc, leave=False):
        batch = codes[start : start + batch_size]
        speech = codec.decode(batch, voice_prompt=prompts[start : start + batch_size])
        waves = [torchaudio.functional.resample(speech.waveforms[i, : int(speech.lengths[i])], rate, 16000)
                 for i in range(len(batch))]
        out.extend(codec.encode(waves, sampling_rate=16000).codes)
    return out


@torch.no_grad()
def scores(codec: MossSpeechCodecModel, waves, texts, voice) -> dict[str, dict[str, float]]:
    codes = codec.encode(waves, sampling_rate=16000).codes
    heard = codec.transcribe_codes(codes)
    again = codec.transcribe_codes(vocoded_codes(codec, codes, [voice] * len(codes), 16, "round trip"))
    return {"original": recognition_scores(heard, texts), "roundtrip": recognition_scores(again, texts)}


@dataclass
class TrainSpeechRecognizerArguments:
    """Flags of `training/train_speech_recognizer.py` (see the module docstring)."""

    codec: str | None = field(default=None, metadata={
        "help": "The trained codec: tokenizer with CTC head + decoder (required)."})
    corpus: str | None = field(default=None, metadata={
        "help": "DatasetDict of processing/synthesize_espeak.py (required)."})
    output: str | None = field(default=None, metadata={"help": "Where the codec is saved (required)."})
    voice: str | None = field(default=None, metadata={
        "help": "A saved voice prompt used for half of the decoded speech."})
    max_train_examples: int = field(default=3000, metadata={"help": "Train utterances decoded and trained on."})
    eval_examples: int = field(default=50, metadata={"help": "Validation utterances scored before and after."})
    max_steps: int = field(default=1500, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Code streams per batch."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the CTC head."})
    threads: int | None = threads_field()
    seed: int = field(default=0, metadata={"help": "Seed of the data order."})

    def __post_init__(self) -> None:
        for name in ("codec", "corpus", "output"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required.")


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `TrainSpeechRecognizerArguments`)."""
    return ScriptArgumentParser(TrainSpeechRecognizerArguments, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    """Train the CTC head as the flags say; prints and returns the JSON summary."""
    (args,) = make_parser().parse_args_and_config(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.monotonic()

    codec = MossSpeechCodecModel.from_pretrained(args.codec).eval()
    codec._require_ctc()
    alphabet = codec.config.encoder_config.ctc_alphabet
    voice = MossSpeechVoicePrompt.load(args.voice) if args.voice else None
    waves, texts = _read_split(args.corpus, "train", args.max_train_examples)
    eval_waves, eval_texts = _read_split(args.corpus, "validation", args.eval_examples)
    before = scores(codec, eval_waves, eval_texts, voice)

    clean = codec.encode(waves, sampling_rate=16000).codes
    prompts = [voice if i % 2 else None for i in range(len(clean))]
    decoded = vocoded_codes(codec, clean, prompts, 16, "vocoded training speech")
    targets = _targets(texts, alphabet)
    upsample = codec.config.encoder_config.ctc_upsample
    # Both streams, each usable only where CTC can align it (enough frames for the characters).
    examples = [(c, t) for stream in (clean, decoded) for c, t in zip(stream, targets)
                if c.numel() * upsample >= t.numel()]

    head = codec.encoder.ctc_head
    codec.requires_grad_(False)
    head.requires_grad_(True)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.max_steps)))
    progress = tqdm(range(args.max_steps), desc="recogniser head")
    for step in progress:
        batch = rng.sample(examples, min(args.batch_size, len(examples)))
        lengths = torch.tensor([c.numel() for c, _ in batch])
        codes = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        for row, (c, _) in enumerate(batch):
            codes[row, : c.numel()] = c
        mask = torch.arange(codes.shape[1])[None] < lengths[:, None]
        log_probs = head(codec.encoder.code_vectors(codes), mask)
        loss = F.ctc_loss(log_probs.transpose(0, 1), torch.cat([t for _, t in batch]), lengths * upsample,
                          torch.tensor([t.numel() for _, t in batch]), blank=0, zero_infinity=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            progress.set_postfix(ctc=f"{loss.item():.3f}")
    head.eval()
    after = scores(codec, eval_waves, eval_texts, voice)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    codec.save_pretrained(args.output)
    summary = {"steps": args.max_steps, "minutes": round((time.monotonic() - started) / 60, 2),
               "examples": len(examples), "validation_before": before, "validation_after": after,
               "output": args.output}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

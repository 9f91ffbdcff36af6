"""Train the flow-matching speech decoder of a MOSS-Speech codec whose speech tokenizer is already trained.

The second half of the nano codec recipe (after `training/train_speech_tokenizer.py`): the frozen tokenizer turns
every training utterance into codes, the 24 kHz log-mel of the same audio (`prompt_mel_spectrogram`, the decoder's
target) is trimmed to 4 frames per code, and the flow is trained with its conditional flow-matching loss
(`MossSpeechCodecFlow.compute_loss`: random prompt prefixes, unified streaming/full-context training, guidance
dropout). The saved codec uses the weight-free Griffin-Lim vocoder by default (`--vocoder_type`).

    python training/train_speech_decoder.py --codec outputs/nano/codec_tokenizer --corpus data/nano/corpus \\
        --codec_config training/configs/nano_codec.json --output outputs/nano/codec --max_minutes 18 --threads 1 \\
        --save_voices outputs/nano/voices

`--max_minutes` bounds the training loop (the learning rate follows a warmup + cosine schedule over whichever of
`--max_steps` and `--max_minutes` ends first); reading the corpus, encoding it and the final check come on top and
are reported separately. Canonical-voice rows (the assistant's voice) are drawn `--canonical_weight` times as often.
Prints a JSON summary: steps, minutes, final loss, validation loss and, when the codec has a CTC recogniser
(`codec.transcribe`), a round-trip check on validation utterances: encode → decode (in the canonical voice) →
16 kHz → transcribe, next to the transcription of the original audio.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm.auto import tqdm

from modeling_moss_speech import MossSpeechCodecConfig, MossSpeechCodecModel
from modeling_moss_speech.apps.evaluation import transcription_scores
from modeling_moss_speech.apps.script_utils import ScriptArgumentParser, threads_field
from modeling_moss_speech.modeling_moss_speech_codec import prompt_mel_spectrogram
from modeling_moss_speech.threads import set_threads

logger = logging.getLogger("train_speech_decoder")

CONFIG_KEYS = ("flow_config", "vocoder_config", "vocoder_type", "griffin_lim_iters", "speaker_config")
INFERENCE_ONLY = ("n_timesteps", "inference_cfg_rate", "inference_noise_scale")


@dataclass
class Utterance:
    """One corpus row as the decoder sees it."""

    utt_id: str
    text: str
    voice: str
    kind: str
    canonical: bool
    waveform: np.ndarray  # 16 kHz mono float32


def read_split(corpus: str, split: str, limit: int | None = None, seed: int = 0) -> list[Utterance]:
    """Rows of a corpus split (`processing/synthesize_espeak.py` layout), audio read with soundfile at 16 kHz."""
    from datasets import Audio, load_from_disk

    dataset = load_from_disk(corpus)[split].cast_column("audio", Audio(decode=False))
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(limit))
    rows = []
    for row in tqdm(dataset, desc=f"read {split}", leave=False):
        audio = row["audio"]
        source = io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"]
        data, rate = sf.read(source, dtype="float32")
        if rate != 16000:
            raise ValueError(f"corpus audio must be 16 kHz, got {rate} Hz in {split} row {row.get('utt_id')!r}.")
        rows.append(Utterance(utt_id=str(row.get("utt_id", len(rows))), text=str(row.get("text", "")),
                              voice=str(row.get("voice", "")), kind=str(row.get("kind", "")),
                              canonical=bool(row.get("canonical", False)),
                              waveform=data if data.ndim == 1 else data.mean(axis=1)))
    return rows


def build_codec(source_dir: str, config_path: str | None, vocoder_type: str, seed: int,
                inference_noise_scale: float | None = None) -> MossSpeechCodecModel:
    """The codec to train: the source codec's config with the decoder fields of `config_path` (if any) and the
    requested vocoder; its tokenizer (and any HiFT / speaker encoder) weights copied, and the flow's too when its
    config is unchanged (continuing a training)."""
    source = MossSpeechCodecModel.from_pretrained(source_dir)
    values = source.config.to_dict()
    if config_path is not None:
        override = json.loads(Path(config_path).read_text())
        values.update({key: override[key] for key in CONFIG_KEYS if key in override})
    values["vocoder_type"] = vocoder_type
    if inference_noise_scale is not None:
        values["flow_config"] = {**values["flow_config"], "inference_noise_scale": inference_noise_scale}
    torch.manual_seed(seed)
    codec = MossSpeechCodecModel(MossSpeechCodecConfig.from_dict(values))
    codec.encoder.load_state_dict(source.encoder.state_dict())
    # Inference-only settings (ODE steps, guidance, starting noise) do not change the weights a flow needs.
    weights_config = [{k: v for k, v in c.flow_config.to_dict().items() if k not in INFERENCE_ONLY}
                      for c in (codec.config, source.config)]
    if weights_config[0] == weights_config[1]:
        codec.flow.load_state_dict(source.flow.state_dict())
        logger.info("flow: continuing from the weights in %s", source_dir)
    else:
        logger.info("flow: freshly initialised (its config differs from %s's)", source_dir)
    for name, key in (("speaker_encoder", "speaker_config"), ("hift", "vocoder_config")):
        # Kept as they were when both codecs have them with the same config.
        if getattr(codec, name) is not None and getattr(source, name) is not None \
                and getattr(codec.config, key).to_dict() == getattr(source.config, key).to_dict():
            getattr(codec, name).load_state_dict(getattr(source, name).state_dict())
    return codec


@torch.no_grad()
def decoder_targets(codec: MossSpeechCodecModel, rows: list[Utterance], batch_size: int = 64):
    """Codes (frozen tokenizer) and 24 kHz log-mel targets, trimmed to the same length (4 frames per code)."""
    codec.eval()
    ratio = codec.config.flow_config.token_mel_ratio
    rate, n_mels = codec.config.output_sampling_rate, codec.config.flow_config.output_size
    codes, mels = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="codes + mels", leave=False):
        chunk = rows[start : start + batch_size]
        batch_codes = codec.encode([r.waveform for r in chunk], sampling_rate=16000, batch_size=batch_size).codes
        for row, row_codes in zip(chunk, batch_codes):
            wav = torchaudio.functional.resample(torch.from_numpy(row.waveform), 16000, rate)
            mel = prompt_mel_spectrogram(wav, n_mels, rate)
            # ceil(12.5 Hz) codes vs floor(50 Hz) frames: the last code may lack frames; drop it rather than pad.
            n = min(row_codes.numel(), mel.shape[0] // ratio)
            codes.append(row_codes[:n].clone())
            mels.append(mel[: n * ratio].clone())
    return codes, mels


def make_batches(index: list[int], lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length within pools of 50 batches (little padding)."""
    order = index[:]
    rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        group = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(ids: list[int], codes: list[torch.Tensor], mels: list[torch.Tensor], ratio: int = 4):
    """Right-padded (B, T) codes, their lengths and (B, ratio·T, mel bins) target mels."""
    lengths = torch.tensor([codes[i].numel() for i in ids])
    token = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    feat = torch.zeros(len(ids), ratio * int(lengths.max()), mels[ids[0]].shape[1])
    for row, i in enumerate(ids):
        token[row, : codes[i].numel()] = codes[i]
        feat[row, : mels[i].shape[0]] = mels[i]
    return token, lengths, feat


@torch.no_grad()
def validation_loss(codec: MossSpeechCodecModel, codes, mels, batch_size: int) -> float:
    """Mean flow-matching loss on held-out rows with fixed randomness (comparable across runs)."""
    was_training = codec.flow.training
    codec.flow.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for start in range(0, len(codes), batch_size):
        ids = list(range(start, min(start + batch_size, len(codes))))
        token, lengths, feat = collate(ids, codes, mels, codec.config.flow_config.token_mel_ratio)
        losses.append(float(codec.flow.compute_loss(token, lengths, feat, generator=generator)))
    codec.flow.train(was_training)
    return float(np.mean(losses)) if losses else float("nan")


def recognition(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Exact-match accuracy and character error rate of transcriptions (evaluation's `transcription_scores`)."""
    scores = transcription_scores(references, hypotheses)
    return {"accuracy": round(scores["accuracy"] or 0.0, 4), "cer": round(scores["cer"], 4)}


@torch.no_grad()
def round_trip(codec: MossSpeechCodecModel, rows: list[Utterance], mels: list[torch.Tensor], voice_prompt) -> dict:
    """encode → decode → 16 kHz → CTC transcription, against the transcription of the original audio; plus the
    vocoder alone on each utterance's own mel (the ceiling a perfect flow would reach with this vocoder)."""
    codec.eval()
    rate = codec.config.output_sampling_rate

    def to_16k(waveforms: torch.Tensor, lengths: torch.Tensor) -> list[np.ndarray]:
        return [torchaudio.functional.resample(waveforms[i, : int(n)], rate, 16000).numpy()
                for i, n in enumerate(lengths)]

    waves = [r.waveform for r in rows]
    codes = codec.encode(waves, sampling_rate=16000).codes
    speech = codec.decode(codes, voice_prompt=voice_prompt)
    vocoded = [to_16k(*codec.vocoder(mel.T[None].to(codec.device), None)) for mel in mels if mel.shape[0]]
    references = [r.text for r in rows]
    original = codec.transcribe(waves, sampling_rate=16000)
    roundtrip = codec.transcribe(to_16k(speech.waveforms, speech.lengths), sampling_rate=16000)
    vocoder_only = codec.transcribe([w[0] for w in vocoded], sampling_rate=16000)
    kept = [r for r, mel in zip(references, mels) if mel.shape[0]]
    return {"utterances": len(rows), "original": recognition(original, references),
            "roundtrip": recognition(roundtrip, references), "vocoder_only": recognition(vocoder_only, kept),
            "examples": [{"reference": r, "original": o, "roundtrip": d}
                         for r, o, d in list(zip(references, original, roundtrip))[:5]]}


def pick_voice_rows(rows: list[Utterance], max_seconds: float = 4.0) -> dict[str, Utterance]:
    """One utterance each for the canonical voice, a female and a male training voice (espeak `+f*` / `+m*`
    variants): the longest row under `max_seconds`, a question if the voice has any (more phonetic variety)."""
    def best(candidates: list[Utterance]) -> Utterance | None:
        short = [r for r in candidates if r.waveform.size <= max_seconds * 16000] or candidates
        questions = [r for r in short if r.kind == "question"]
        pool = questions or short
        return max(pool, key=lambda r: r.waveform.size) if pool else None

    picked = {}
    canonical = [r for r in rows if r.canonical]
    if canonical:
        picked["canonical"] = best(canonical)
    others = sorted({r.voice for r in rows if not r.canonical})
    for name, marker in (("female", "+f"), ("male", "+m")):
        voice = next((v for v in others if marker in v), None)
        if voice is not None:
            picked[name] = best([r for r in rows if r.voice == voice and not r.canonical])
    return {name: row for name, row in picked.items() if row is not None}


@dataclass
class TrainSpeechDecoderArguments:
    """Flags of `training/train_speech_decoder.py` (see the module docstring)."""

    codec: str | None = field(default=None, metadata={
        "help": "Codec directory with a trained tokenizer (save_pretrained; required)."})
    corpus: str | None = field(default=None, metadata={
        "help": "DatasetDict directory from processing/synthesize_espeak.py (required)."})
    output: str | None = field(default=None, metadata={
        "help": "Where the codec with the trained decoder is saved (required)."})
    codec_config: str | None = field(default=None, metadata={
        "help": "JSON whose flow_config / vocoder_config / vocoder_type / griffin_lim_iters / speaker_config replace "
                "the codec's (e.g. training/configs/nano_codec.json)."})
    vocoder_type: str = field(default="griffin_lim", metadata={
        "help": "Vocoder of the saved codec (HiFT is not trained here).", "choices": ["griffin_lim", "hift"]})
    max_steps: int = field(default=100_000, metadata={"help": "Optimizer steps at most."})
    max_minutes: float | None = field(default=None, metadata={"help": "Budget of the training loop."})
    batch_size: int = field(default=16, metadata={"help": "Utterances per batch."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    canonical_weight: int = field(default=2, metadata={"help": "Draws of each canonical-voice row per epoch."})
    inference_noise_scale: float | None = field(default=None, metadata={
        "help": "The saved flow's starting-noise scale at inference (default: the source codec's)."})
    canonical_only: bool = field(default=False, metadata={
        "help": "Train on the assistant's (canonical) voice only: the voice every spoken answer uses."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Random subset of train (smoke runs)."})
    eval_examples: int = field(default=20, metadata={"help": "Validation utterances of the final check."})
    save_voices: str | None = field(default=None, metadata={
        "help": "Directory for canonical/female/male voice prompts."})
    threads: int | None = threads_field()
    seed: int = field(default=0, metadata={"help": "Seed of the data order, subsets and initialisation."})
    log_every: int = field(default=50, metadata={"help": "Steps between log lines."})

    def __post_init__(self) -> None:
        for name in ("codec", "corpus", "output"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required.")
        for name in ("max_steps", "batch_size", "canonical_weight", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"--max_minutes must be positive, got {self.max_minutes}.")


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `TrainSpeechDecoderArguments`)."""
    return ScriptArgumentParser(TrainSpeechDecoderArguments, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    """Train the decoder as the flags say; prints and returns the JSON summary."""
    (args,) = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_threads(args.threads)
    rng = random.Random(args.seed)
    started = time.monotonic()

    codec = build_codec(args.codec, args.codec_config, args.vocoder_type, args.seed, args.inference_noise_scale)
    train_rows = read_split(args.corpus, "train", args.max_train_examples, args.seed)
    eval_rows = read_split(args.corpus, "validation", args.eval_examples, args.seed)
    codes, mels = decoder_targets(codec, train_rows)
    eval_codes, eval_mels = decoder_targets(codec, eval_rows)
    usable = [i for i, c in enumerate(codes) if c.numel() > 0 and (train_rows[i].canonical or not args.canonical_only)]
    index = [i for i in usable for _ in range(args.canonical_weight if train_rows[i].canonical else 1)]
    if not index:
        raise ValueError(f"{args.corpus}: no usable training utterance (all shorter than one code).")
    lengths = [c.numel() for c in codes]
    prep_minutes = (time.monotonic() - started) / 60
    logger.info("%d training utterances (%d canonical, drawn x%d), %.1f min of audio; prep %.1f min",
                len(usable), sum(train_rows[i].canonical for i in usable), args.canonical_weight,
                sum(lengths[i] for i in usable) / 12.5 / 60, prep_minutes)

    flow = codec.flow.train()
    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    budget = 60 * args.max_minutes if args.max_minutes else math.inf
    generator = torch.Generator().manual_seed(args.seed)
    loop_start = time.monotonic()
    step, recent, history = 0, [], []
    progress = tqdm(total=args.max_steps if budget == math.inf else None, desc="flow")
    done = False
    while not done:
        for ids in make_batches(index, lengths, args.batch_size, rng):
            elapsed = time.monotonic() - loop_start
            fraction = max(step / args.max_steps, elapsed / budget)
            if fraction >= 1.0:
                done = True
                break
            # Warmup, then cosine decay over whichever budget (steps or minutes) runs out first.
            scale = min(1.0, (step + 1) / max(1, args.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * fraction))
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * scale
            token, token_len, feat = collate(ids, codes, mels, codec.config.flow_config.token_mel_ratio)
            loss = flow.compute_loss(token, token_len, feat, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            recent = (recent + [loss.item()])[-args.log_every :]
            progress.update(1)
            if step % args.log_every == 0:
                mean = float(np.mean(recent))
                progress.set_postfix(loss=f"{mean:.3f}", lr=f"{args.learning_rate * scale:.2e}")
                history.append({"step": step, "loss": round(mean, 4), "minutes": round(elapsed / 60, 2)})
                logger.info("step %d loss %.4f lr %.2e", step, mean, args.learning_rate * scale)
    progress.close()
    train_minutes = (time.monotonic() - loop_start) / 60

    codec.eval()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    codec.save_pretrained(args.output)
    voices = pick_voice_rows(train_rows)
    prompts = {name: codec.voice_prompt(row.waveform, sampling_rate=16000) for name, row in voices.items()}
    if args.save_voices:
        Path(args.save_voices).mkdir(parents=True, exist_ok=True)
        for name, prompt in prompts.items():
            row = voices[name]
            prompt.metadata.update({"voice": row.voice, "utt_id": row.utt_id, "text": row.text})
            prompt.save(str(Path(args.save_voices) / f"{name}.safetensors"))
    summary = {
        "steps": step,
        "minutes": round(train_minutes, 2),
        "prep_minutes": round(prep_minutes, 2),
        "final_loss": round(float(np.mean(recent)), 4) if recent else None,
        "validation_loss": round(validation_loss(codec, eval_codes, eval_mels, args.batch_size), 4),
        "train_utterances": len(usable),
        "flow_parameters": sum(p.numel() for p in flow.parameters()),
        "codec_parameters": sum(p.numel() for p in codec.parameters()),
        "vocoder_type": codec.config.vocoder_type,
        "history": history,
        "output": args.output,
        "voices": {name: {"voice": row.voice, "utt_id": row.utt_id, "text": row.text} for name, row in voices.items()},
    }
    if getattr(codec, "can_transcribe", False) and eval_rows:
        summary["round_trip"] = round_trip(codec, eval_rows, eval_mels, prompts.get("canonical"))
        summary["round_trip"]["voice_prompt"] = "canonical" if "canonical" in prompts else None
    else:
        summary["round_trip"] = None  # no CTC recogniser in this codec: nothing to transcribe with
    summary["total_minutes"] = round((time.monotonic() - started) / 60, 2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

"""Train the speech tokenizer of a MOSS-Speech codec (Whisper-VQ encoder + single codebook) with a CTC objective.

The release's tokenizer was trained with a speech-recognition objective so its codes are semantic; this does the
same at small scale: the encoder's pooled 12.5 Hz states are vector-quantized (straight-through estimator, EMA
codebook, k-means initialisation, dead-code restarts) and a CTC head recognises the transcript from the quantized
vectors alone, so whatever the codes carry is what the words need. The CTC head stays in the checkpoint
(`codec.transcribe`), a small recogniser for evaluation.

    python training/train_speech_tokenizer.py --corpus data/nano/corpus \\
        --codec_config training/configs/nano_codec.json --output outputs/nano/codec_tokenizer --max_steps 3000

Reads the corpus of `processing/synthesize_espeak.py` (a DatasetDict with `train` and `validation` splits, an
`audio` column and the spoken `text`). Saves a full `MossSpeechCodecModel` (the flow/vocoder are left as
initialised; `training/train_speech_decoder.py` trains them) and prints a JSON summary.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_moss_speech import MossSpeechCodecConfig, MossSpeechCodecModel
from modeling_moss_speech.apps.evaluation import transcription_scores
from modeling_moss_speech.apps.script_utils import ScriptArgumentParser, threads_field
from modeling_moss_speech.threads import set_threads

VQ_START_FRACTION = 0.15


def _read_split(corpus: str, split: str, limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    from datasets import Audio, load_from_disk

    dataset = load_from_disk(corpus)[split].cast_column("audio", Audio(decode=False))
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=0).select(range(limit))
    waves, texts = [], []
    for row in dataset:
        data, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
        if rate != 16000:
            raise ValueError(f"corpus audio must be 16 kHz, got {rate} Hz in {split}.")
        waves.append(data if data.ndim == 1 else data.mean(axis=1))
        texts.append(row["text"])
    return waves, texts


def _features(codec: MossSpeechCodecModel, waves: list[np.ndarray]) -> list[torch.Tensor]:
    """Per-utterance log-mel (mel bins, valid frames), computed once."""
    extractor = codec.feature_extractor
    out = []
    for start in tqdm(range(0, len(waves), 64), desc="features", leave=False):
        batch = [torch.from_numpy(w) for w in waves[start : start + 64]]
        feats = extractor.extract_features(batch)
        for row, mask in zip(feats["input_features"], feats["attention_mask"]):
            out.append(row[:, : int(mask.sum())].clone())
    return out


def _targets(texts: list[str], alphabet: str) -> list[torch.Tensor]:
    index = {c: i + 1 for i, c in enumerate(alphabet)}
    out = []
    for text in texts:
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"transcript {text!r} has characters outside the CTC alphabet: {missing}.")
        out.append(torch.tensor([index[c] for c in text], dtype=torch.long))
    return out


def warp_features(feat: torch.Tensor, frequency_factor: float = 1.0, time_factor: float = 1.0) -> torch.Tensor:
    """A log-mel (bins, frames) with its frequency axis scaled by `frequency_factor` (vocal-tract-length
    perturbation: formants move as between a shorter and a longer voice) and its time axis by `time_factor` (speaking
    rate), both by linear interpolation; factors above 1 move content up / make it longer."""
    if frequency_factor <= 0 or time_factor <= 0:
        raise ValueError(f"warp factors must be positive, got {frequency_factor} and {time_factor}.")
    bins, frames = feat.shape
    if frequency_factor != 1.0:
        # Output bin b reads input bin b / factor; past the top the highest bin repeats.
        source = (torch.arange(bins, dtype=feat.dtype) / frequency_factor).clamp(max=bins - 1)
        low = source.floor().long()
        high = (low + 1).clamp(max=bins - 1)
        weight = (source - low.to(feat.dtype))[:, None]
        feat = feat[low] * (1 - weight) + feat[high] * weight
    if time_factor != 1.0:
        length = max(2, round(frames * time_factor))
        feat = F.interpolate(feat[None], size=length, mode="linear", align_corners=True)[0]
    return feat


def _batch(features: list[torch.Tensor], ids: list[int], augment: bool, rng: random.Random,
           vtlp: float = 0.0, time_stretch: float = 0.0):
    feats = []
    for i in ids:
        feat = features[i]
        if augment:
            feat = warp_features(feat, 1.0 + rng.uniform(-vtlp, vtlp), 1.0 + rng.uniform(-time_stretch, time_stretch))
            feat = feat.clone()
            # Frequency masking: speaker identity lives partly in spectral detail the codes should not need.
            for _ in range(2):
                width = rng.randint(0, 12)
                start = rng.randint(0, feat.shape[0] - width)
                feat[start : start + width] = feat.min()
        feats.append(feat)
    longest = max(feat.shape[1] for feat in feats)
    longest += longest % 2
    batch = torch.zeros(len(ids), feats[0].shape[0], longest)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for row, feat in enumerate(feats):
        batch[row, :, : feat.shape[1]] = feat
        mask[row, : feat.shape[1]] = 1
    return batch, mask


def _ctc_forward(codec, feats, mask, quantize: bool):
    """Encoder → (straight-through) quantized code vectors → CTC log-probs; returns what the losses need."""
    encoder = codec.encoder
    out = encoder(feats, mask)
    hidden = out.last_hidden_state
    code_mask = out.codes_mask[:, : hidden.shape[1]]
    if quantize:
        chosen = encoder.codebook(out.codes).detach()
        vectors = hidden + (chosen - hidden).detach()
        commit = ((hidden - chosen) ** 2).mean(-1)[code_mask].mean()
    else:
        vectors, commit = hidden, hidden.new_zeros(())
    log_probs = encoder.ctc_head(encoder.with_code_positions(vectors), code_mask)
    return log_probs, code_mask, hidden, out.codes, commit


class EMACodebook:
    """Exponential-moving-average codebook updates with dead-code restarts (the codebook takes no gradients)."""

    def __init__(self, codebook: torch.nn.Embedding, decay: float = 0.99) -> None:
        self.codebook = codebook
        self.decay = decay
        self.count = torch.ones(codebook.num_embeddings)
        self.sum = codebook.weight.detach().clone()

    def kmeans_init(self, vectors: torch.Tensor, iterations: int = 15, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        k = self.codebook.num_embeddings
        if vectors.shape[0] >= k:
            centers = vectors[torch.randperm(vectors.shape[0], generator=g)[:k]].clone()
        else:  # too few states yet (tiny runs): jittered copies
            picks = torch.randint(0, vectors.shape[0], (k,), generator=g)
            centers = vectors[picks] + 0.01 * vectors.std() * torch.randn(k, vectors.shape[1], generator=g)
        for _ in range(iterations):
            assign = torch.cdist(vectors, centers).argmin(1)
            counts = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(centers).index_add_(0, assign, vectors)
            empty = counts == 0
            centers = torch.where(empty[:, None], centers, sums / counts.clamp(min=1)[:, None])
            if empty.any():
                centers[empty] = vectors[torch.randint(0, vectors.shape[0], (int(empty.sum()),), generator=g)]
        self.codebook.weight.data.copy_(centers)
        self.sum = centers.clone()
        self.count = torch.ones(k)

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        k = self.codebook.num_embeddings
        counts = torch.bincount(codes, minlength=k).float()
        sums = torch.zeros(k, vectors.shape[1]).index_add_(0, codes, vectors.float())
        self.count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.count.sum()
        smoothed = (self.count + 1e-5) / (total + k * 1e-5) * total
        self.codebook.weight.data.copy_(self.sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead(self, vectors: torch.Tensor, threshold: float = 0.03) -> int:
        dead = torch.nonzero(self.count < threshold).flatten()
        if dead.numel() == 0 or vectors.shape[0] == 0:
            return 0
        picks = vectors[torch.randint(0, vectors.shape[0], (dead.numel(),))].float()
        self.codebook.weight.data[dead] = picks
        self.sum[dead] = picks
        self.count[dead] = 1.0
        return int(dead.numel())


def recognition_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Character error rate and whole-utterance exact match of transcripts (evaluation's `transcription_scores`)."""
    scores = transcription_scores(references, hypotheses)
    return {"cer": scores["cer"], "exact_match": scores["accuracy"] or 0.0}


@torch.no_grad()
def evaluate(codec: MossSpeechCodecModel, waves: list[np.ndarray], texts: list[str]) -> dict[str, float]:
    """Scores of the inference path (waveform → codes → CTC), as `codec.transcribe` runs it."""
    codec.eval()
    hypotheses = codec.transcribe(waves, sampling_rate=16000)
    codec.train()
    return recognition_scores(hypotheses, texts)


@dataclass
class TrainSpeechTokenizerArguments:
    """Flags of `training/train_speech_tokenizer.py` (see the module docstring)."""

    corpus: str | None = field(default=None, metadata={
        "help": "DatasetDict directory from processing/synthesize_espeak.py (required)."})
    codec_config: str | None = field(default=None, metadata={
        "help": "JSON of MossSpeechCodecConfig fields, with ctc_alphabet (required)."})
    output: str | None = field(default=None, metadata={"help": "Where the codec is saved (required)."})
    init_from: str | None = field(default=None, metadata={
        "help": "Continue from this codec (its codebook is kept), with the encoder settings of --codec_config; a local "
                "encoder (encoder_attention_window set) may start from one with a position table, which is dropped."})
    max_steps: int = field(default=3000, metadata={"help": "Optimizer steps."})
    max_minutes: float | None = field(default=None, metadata={"help": "Stop early after this long."})
    batch_size: int = field(default=32, metadata={"help": "Utterances per batch."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate."})
    commitment: float = field(default=0.25, metadata={"help": "Weight of the VQ commitment loss."})
    eval_every: int = field(default=500, metadata={"help": "Steps between validation CER checks."})
    eval_examples: int = field(default=200, metadata={"help": "Validation utterances per check."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only this many train utterances."})
    threads: int | None = threads_field()
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and augmentation."})
    vtlp: float = field(default=0.0, metadata={
        "help": "Vocal-tract-length perturbation: each training example's mel axis is scaled by a factor drawn from "
                "[1 - vtlp, 1 + vtlp] (0: off; the nano recipe uses 0.08)."})
    time_stretch: float = field(default=0.0, metadata={
        "help": "Speaking-rate perturbation: each training example's frames are stretched by a factor drawn from "
                "[1 - time_stretch, 1 + time_stretch] (0: off)."})
    report_splits: list[str] = field(default_factory=list, metadata={
        "help": "Corpus splits whose character error rate the summary reports at the end (held-out voices: "
                "test_seen, test_seen_dialect, ...)."})

    def __post_init__(self) -> None:
        for name in ("corpus", "codec_config", "output"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required.")
        for name in ("max_steps", "batch_size", "eval_every", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}.")
        for name in ("vtlp", "time_stretch"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"--{name} must be in [0, 0.5), got {getattr(self, name)}.")


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `TrainSpeechTokenizerArguments`)."""
    return ScriptArgumentParser(TrainSpeechTokenizerArguments, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    """Train the tokenizer as the flags say; prints and returns the JSON summary."""
    (args,) = make_parser().parse_args_and_config(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    started = time.monotonic()

    config = MossSpeechCodecConfig(**json.loads(Path(args.codec_config).read_text()))
    alphabet = config.encoder_config.ctc_alphabet
    if not alphabet:
        raise ValueError(f"{args.codec_config}: encoder_config.ctc_alphabet must be set to train with CTC.")
    codec = MossSpeechCodecModel(config).train()
    if args.init_from:
        # The tokenizer's settings are --codec_config's; the decoder (flow, vocoder) is carried over as it is.
        values = MossSpeechCodecConfig.from_pretrained(args.init_from).to_dict()
        values["encoder_config"] = config.encoder_config.to_dict()
        config = MossSpeechCodecConfig.from_dict(values)
        codec, info = MossSpeechCodecModel.from_pretrained(args.init_from, config=config, strict=False,
                                                           output_loading_info=True)
        codec.train()
        # Only a position table the local encoder has no use for may be left behind; anything else is a mismatch.
        droppable = {"encoder.embed_positions.weight"} if config.encoder_config.encoder_attention_window else set()
        mismatched = sorted(set(info["missing_keys"]) | (set(info["unexpected_keys"]) - droppable))
        if mismatched:
            raise ValueError(f"--init_from {args.init_from} does not match --codec_config {args.codec_config}: "
                             f"{', '.join(mismatched)}.")

    train_waves, train_texts = _read_split(args.corpus, "train", args.max_train_examples)
    eval_waves, eval_texts = _read_split(args.corpus, "validation", args.eval_examples)
    features = _features(codec, train_waves)
    targets = _targets(train_texts, alphabet)
    _targets(eval_texts, alphabet)
    order = sorted(range(len(features)), key=lambda i: features[i].shape[1])
    # Length-bucketed batches limit padding; their order is shuffled every epoch.
    buckets = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]

    encoder = codec.encoder
    ema = EMACodebook(encoder.codebook)
    encoder.codebook.weight.requires_grad_(False)
    params = [p for p in codec.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.01)

    def progress_fraction(step: int) -> float:
        # Whichever budget runs out first drives the schedule, so a time-capped run still anneals fully.
        fraction = step / args.max_steps
        if args.max_minutes:
            fraction = max(fraction, (time.monotonic() - started) / (60 * args.max_minutes))
        return min(1.0, fraction)

    warmup = min(100, max(1, args.max_steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * progress_fraction(step)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history, pool, step, codebook_ready = [], [], 0, bool(args.init_from)
    progress = tqdm(total=args.max_steps, desc="tokenizer")
    while step < args.max_steps:
        rng.shuffle(buckets)
        for ids in buckets:
            if step >= args.max_steps:
                break
            fraction = progress_fraction(step)
            if fraction >= 1.0:
                args.max_steps = step
                break
            # The first part trains without quantization; the codebook is then initialised by k-means on those states.
            quantize = codebook_ready
            feats, mask = _batch(features, ids, augment=True, rng=rng, vtlp=args.vtlp, time_stretch=args.time_stretch)
            log_probs, code_mask, hidden, codes, commit = _ctc_forward(codec, feats, mask, quantize)
            frame_lengths = code_mask.sum(1) * config.encoder_config.ctc_upsample
            target = [targets[i] for i in ids]
            ctc = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(target), frame_lengths,
                             torch.tensor([t.numel() for t in target]), blank=0, zero_infinity=True)
            loss = ctc + args.commitment * commit
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            valid = hidden.detach()[code_mask]
            if not quantize:
                pool.append(valid)
                if progress_fraction(step + 1) >= VQ_START_FRACTION:
                    ema.kmeans_init(torch.cat(pool)[-20000:], seed=args.seed)
                    pool, codebook_ready = [], True
            else:
                ema.update(valid, codes[code_mask])
                if step % 100 == 0:
                    ema.restart_dead(valid)
            step += 1
            progress.update(1)
            if step % 25 == 0:
                progress.set_postfix(ctc=f"{ctc.item():.3f}", commit=f"{commit.item():.4f}")
            if step % args.eval_every == 0 and quantize:
                scores = evaluate(codec, eval_waves, eval_texts)
                scores["step"] = step
                history.append(scores)
                tqdm.write(json.dumps(scores))
    progress.close()

    final = evaluate(codec, eval_waves, eval_texts)
    codec.eval()
    usage = torch.zeros(config.encoder_config.quantize_vocab_size, dtype=torch.long)
    for codes in codec.encode(train_waves[:2000], sampling_rate=16000).codes:
        usage += torch.bincount(codes, minlength=usage.numel())
    held_out = {}
    for split in args.report_splits:
        waves, texts = _read_split(args.corpus, split)
        held_out[split] = {k: round(v, 4) for k, v in evaluate(codec, waves, texts).items()}
    codec.eval()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    codec.save_pretrained(args.output)
    summary = {
        "steps": step,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "train_utterances": len(features),
        "validation": {k: round(v, 4) for k, v in final.items()},
        "held_out_splits": held_out,
        "codes_used": int((usage > 0).sum()),
        "codebook_size": usage.numel(),
        "encoder_parameters": sum(p.numel() for p in codec.encoder.parameters()),
        "history": history,
        "output": args.output,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

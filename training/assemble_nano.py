"""Assemble a MOSS-Speech-Nano checkpoint directory: the fine-tuned LLM, its processor, the codec and voice prompts.

    python training/assemble_nano.py --model outputs/nano/sft --processor outputs/nano/tokenizer \\
        --codec outputs/nano/codec --corpus data/nano/corpus --data data/nano --output outputs/nano/final

The result is the shipped layout (`modeling_moss_speech/pretrained/moss-speech-nano/`): `config.json`,
`model.safetensors`, `generation_config.json` (greedy decoding, stop at `<|endoftext|>` / `<|im_end|>`), the
tokenizer and `processor_config.json` (the nano special ids), the codec in `codec/` (the processor's
CODEC_SUBFOLDER, loaded with the processor), and `voices/<name>.safetensors` voice prompts
(`MossSpeechVoicePrompt`): copies of those in `--voices_dir` (e.g. `training/train_speech_decoder.py
--save_voices`), and prompts made here from training-split utterances of each `--voices` corpus voice (default: the
canonical assistant voice `en-us`). With `--data`, the codec must be the one `processing/prepare_nano.py` encoded the
training data with (same fingerprint): the LLM only knows that codec's codes. `nano_info.json` lists the sources
and the sizes; a total over `--max_mb` is an error.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_moss_speech import (
    MossSpeechCodecModel,
    MossSpeechForCausalLM,
    MossSpeechProcessor,
    MossSpeechVoicePrompt,
)
from modeling_moss_speech.apps.script_utils import NANO_CODES_MANIFEST as CODES_MANIFEST
from modeling_moss_speech.apps.script_utils import (
    ScriptArgumentParser,
    load_audio_value,
    nano_codes_made_by,
    none_means_empty,
    threads_field,
)
from modeling_moss_speech.apps.script_utils import load_nano_corpus as load_corpus
from modeling_moss_speech.generation_moss_speech import MossSpeechGenerationConfig
from modeling_moss_speech.threads import set_threads

CANONICAL_VOICE = "en-us"


def voice_audio(corpus: Any, voice: str, seconds: float = 3.0, gap: float = 0.15) -> tuple[np.ndarray, int]:
    """Train-split answer (then word) utterances of `voice`, joined with short silences until `seconds` long."""
    train = corpus["train"]
    rows = [i for i, (v, k) in enumerate(zip(train["voice"], train["kind"])) if v == voice and k == "answer"]
    rows += [i for i, (v, k) in enumerate(zip(train["voice"], train["kind"])) if v == voice and k == "word"]
    if not rows:
        raise ValueError(f"voice {voice!r} speaks no answer or word in the corpus' train split (voices: "
                         f"{sorted(set(train['voice']))}).")
    pieces, total, rate = [], 0.0, None
    for index in rows:
        waveform, value_rate = load_audio_value(train[index]["audio"], f"train row {index}")
        if rate is not None and value_rate != rate:
            continue
        rate = value_rate
        pieces += [waveform.numpy(), np.zeros(int(gap * rate), dtype=np.float32)]
        total += waveform.numel() / rate + gap
        if total >= seconds:
            break
    return np.concatenate(pieces[:-1]), int(rate)


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def assemble(model: str | os.PathLike, processor: str | os.PathLike, codec: str | os.PathLike,
             output: str | os.PathLike, corpus: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
             voices: Sequence[str] = (CANONICAL_VOICE,), voice_seconds: float = 3.0,
             voices_dir: str | os.PathLike | None = None, max_mb: float | None = 30.0) -> dict[str, Any]:
    """Write the checkpoint directory (module docstring); returns the `nano_info.json` content."""
    output = Path(output)
    if data is not None:
        made_by = nano_codes_made_by(data, codec)
        if made_by is None:
            raise ValueError(f"--data {str(data)!r} has no codes/{CODES_MANIFEST} (run processing/prepare_nano.py).")
        if not made_by:
            raise ValueError(f"--codec {str(codec)!r} is not the codec the training data in {str(data)!r} was "
                             "encoded with (fingerprints differ): ship the codec prepare_nano.py used.")
    if voices and corpus is None:
        raise ValueError("--corpus is required to make voice prompts (or pass --voices none).")
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)

    llm = MossSpeechForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    config = llm.config
    # Greedy by default: a closed-world model answers deterministically. The sampling fields get their neutral values
    # (the release defaults that MossSpeechGenerationConfig fills in for None would make greedy decoding invalid).
    llm.generation_config = MossSpeechGenerationConfig(
        do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0, max_new_tokens=128,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    llm.save_pretrained(str(output))

    codec_model = MossSpeechCodecModel.from_pretrained(str(codec)).eval()
    nano_processor = MossSpeechProcessor.from_pretrained(str(processor), codec=codec_model, codec_path=None)
    expected = MossSpeechProcessor.special_ids_from_config(config)
    got = {name: getattr(nano_processor, name) for name in expected}
    if got != expected:
        raise ValueError(f"the processor's special ids {got} differ from the model's {expected}.")
    nano_processor.save_pretrained(str(output))  # writes the codec to codec/

    written = {}
    (output / "voices").mkdir()
    if voices_dir is not None:  # prompts made elsewhere (training/train_speech_decoder.py --save_voices)
        found = sorted(Path(voices_dir).glob("*.safetensors"))
        if not found:
            raise ValueError(f"--voices_dir {str(voices_dir)!r} holds no .safetensors voice prompt.")
        codebook = codec_model.config.encoder_config.quantize_vocab_size
        for path in found:
            prompt = MossSpeechVoicePrompt.load(str(path))
            if prompt.tokens.numel() and int(prompt.tokens.max()) >= codebook:
                raise ValueError(f"voice prompt {str(path)!r} holds codes outside this codec's codebook.")
            shutil.copyfile(path, output / "voices" / path.name)
            written[path.stem] = f"voices/{path.name}"
    if voices:
        data_corpus = load_corpus(corpus)
        for voice in voices:
            waveform, rate = voice_audio(data_corpus, voice, voice_seconds)
            prompt = codec_model.voice_prompt(waveform, sampling_rate=rate)
            prompt.metadata.update(voice=voice, seconds=round(len(waveform) / rate, 2))
            path = output / "voices" / f"{voice}.safetensors"
            prompt.save(str(path))
            written[voice] = str(path.relative_to(output))

    info = {"model": str(model), "processor": str(processor), "codec": str(codec), "voices": written,
            "llm_parameters": sum(p.numel() for p in llm.parameters()),
            "codec_parameters": sum(p.numel() for p in codec_model.parameters()),
            "size_mb": {"total": round(_size_mb(output), 2), "codec": round(_size_mb(output / "codec"), 2),
                        "llm": round((output / "model.safetensors").stat().st_size / 2**20, 2)}}
    (output / "nano_info.json").write_text(json.dumps(info, indent=2))
    if max_mb is not None and info["size_mb"]["total"] > max_mb:
        raise ValueError(f"the checkpoint in {str(output)!r} is {info['size_mb']['total']} MB, over --max_mb "
                         f"{max_mb} ({info['size_mb']}).")
    return info


@dataclass
class AssembleNanoArguments:
    """Flags of `training/assemble_nano.py` (see the module docstring)."""

    model: str | None = field(default=None, metadata={
        "help": "Fine-tuned MOSS-Speech directory (training/sft.py output; required)."})
    processor: str = field(default="outputs/nano/tokenizer", metadata={"help": "Nano processor/tokenizer directory."})
    codec: str | None = field(default=None, metadata={"help": "The trained nano codec directory (required)."})
    corpus: str = field(default="data/nano/corpus", metadata={"help": "Corpus the voice prompts are cut from."})
    data: str | None = field(default=None, metadata={
        "help": "prepare_nano.py's output: check the codec is the one it used."})
    output: str | None = field(default=None, metadata={
        "help": "Checkpoint directory to write (replaced if it exists; required)."})
    voices: list[str] = field(default_factory=lambda: [CANONICAL_VOICE], metadata={
        "help": "Corpus voices to make prompts of ('none': no prompts from the corpus)."})
    voices_dir: str | None = field(default=None, metadata={
        "help": "Also ship every .safetensors voice prompt of this folder (made with the same codec)."})
    voice_seconds: float = field(default=3.0, metadata={"help": "Length of each voice prompt's audio."})
    max_mb: float = field(default=30.0, metadata={"help": "Largest allowed total size (MB)."})
    threads: int | None = threads_field()

    def __post_init__(self) -> None:
        for name in ("model", "codec", "output"):
            if getattr(self, name) is None:
                raise ValueError(f"--{name} is required.")
        self.voices = none_means_empty(self.voices)


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `AssembleNanoArguments`)."""
    return ScriptArgumentParser(AssembleNanoArguments, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (see the module docstring)."""
    (args,) = make_parser().parse_args_and_config(argv)
    set_threads(args.threads)
    info = assemble(args.model, args.processor, args.codec, args.output, args.corpus, args.data, args.voices,
                    args.voice_seconds, args.voices_dir, args.max_mb)
    print(json.dumps(info), flush=True)
    return info


if __name__ == "__main__":
    main()

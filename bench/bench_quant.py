"""Quantized LM weights on CPU: decode speed, weight memory and logit drift of torchao int8 weight-only vs float32.

Both models are loaded the way a user loads them, `MossSpeechForCausalLM.from_pretrained(path)` and the same with
`quantization_config=TorchAoConfig(Int8WeightOnlyConfig())` (transformers' torchao integration: every `nn.Linear`
of the decoder layers becomes int8 with one float scale per output row; embeddings, norms and the two heads stay
float32; the codec is a separate model and is never quantized). Measured per model:

- `weight_mb`: bytes held by parameters and buffers (a quantized weight counts its int8 data and its scales);
- `decode_tokens_per_s`: `generate` of `--new-tokens` speech rows after a `--prompt-len` prompt (greedy, end of
  speech suppressed), prefill excluded (timed separately as `prefill_s`);
- drift over `--positions` positions, teacher-forced on one sequence (the float model's own greedy speech answer
  for the nano model; random rows for the random slice): `max_abs_logit_diff` and `top1_agreement` per channel
  (text and audio heads), and the float logits' range for scale.

Setups: the shipped MOSS-Speech-Nano, and a random release-shaped slice (hidden 4096, MLP 12288, 32/8 heads of 128,
one shared + one layer per modality; its text vocabulary is cut to 4096 rows so the two copies fit in memory: the
quantized part, the decoder layers, is release size).

    python bench/bench_quant.py                 # both
    python bench/bench_quant.py --only nano
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch
from transformers import TorchAoConfig

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM
from modeling_moss_speech.pretrained import nano_path
from modeling_moss_speech.threads import add_threads_argument, set_threads


def is_quantized(tensor: torch.Tensor) -> bool:
    """A torchao quantized weight: a tensor subclass made of inner tensors."""
    inner = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage of a tensor; a quantized weight counts its inner tensors (int8 data and scales)."""
    inner = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if is_quantized(inner):
        names, _ = inner.__tensor_flatten__()
        return sum(tensor_bytes(getattr(inner, name)) for name in names)
    return inner.numel() * inner.element_size()


def weight_mb(model: torch.nn.Module) -> float:
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()]) / 2**20


def speech_prompt(config, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """(1, prompt_len, 2) rows of random text ids ending with the start-of-speech id (audio channel padded)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(5, config.vocab_size - 8, (1, prompt_len), generator=generator)
    grid = torch.stack([text, torch.full_like(text, config.audio_pad_token_id)], dim=-1)
    grid[:, -1, 0] = config.sosp_token_id
    return grid


def suppress_end_of_speech(eosp: int):
    def processor(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, eosp] = float("-inf")
        return scores
    return processor


@torch.inference_mode()
def decode_speed(model: MossSpeechForCausalLM, prompt: torch.Tensor, new_tokens: int) -> dict:
    kwargs = dict(do_sample=False, eos_token_id=[],
                  audio_logits_processor=[suppress_end_of_speech(model.config.eosp_token_id)])
    model.generate(prompt, max_new_tokens=2, **kwargs)  # warm-up (first-call allocations)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, **kwargs)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    rows = model.generate(prompt, max_new_tokens=new_tokens, **kwargs)
    total = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_tokens_per_s": (new_tokens - 1) / max(total - prefill, 1e-9),
            "generate_s": total, "rows": rows}


@torch.inference_mode()
def drift(reference: MossSpeechForCausalLM, quantized: MossSpeechForCausalLM, sequence: torch.Tensor,
          positions: int) -> dict:
    out = {}
    ref, quant = reference(sequence), quantized(sequence)
    for channel in ("text_logits", "audio_logits"):
        a, b = ref[channel][0, -positions:].float(), quant[channel][0, -positions:].float()
        out[channel] = {"max_abs_logit_diff": float((a - b).abs().max()),
                        "mean_abs_logit_diff": float((a - b).abs().mean()),
                        "float_logit_range": [float(a.min()), float(a.max())],
                        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                        "positions": a.size(0)}
    return out


def compare(path: str, args: argparse.Namespace, sequence_from_generation: bool) -> dict:
    from torchao.quantization import Int8WeightOnlyConfig

    start = time.perf_counter()
    reference = MossSpeechForCausalLM.from_pretrained(path).eval()
    load_float = time.perf_counter() - start
    start = time.perf_counter()
    quantized = MossSpeechForCausalLM.from_pretrained(
        path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).eval()
    load_quant = time.perf_counter() - start
    config = reference.config
    prompt = speech_prompt(config, args.prompt_len)
    speeds = {}
    for name, model in (("float32", reference), ("int8_weight_only", quantized)):
        speeds[name] = decode_speed(model, prompt, args.new_tokens)
    if sequence_from_generation:
        rows = decode_speed(reference, prompt, args.positions)["rows"]
        sequence = torch.cat([prompt, rows], dim=1)
    else:
        generator = torch.Generator().manual_seed(1)
        text = torch.randint(5, config.vocab_size - 8, (1, args.prompt_len + args.positions), generator=generator)
        audio = torch.randint(0, config.eosp_token_id, text.shape, generator=generator)
        sequence = torch.stack([text, audio], dim=-1)
    result = {"float32": {"weight_mb": weight_mb(reference), "load_s": load_float},
              "int8_weight_only": {"weight_mb": weight_mb(quantized), "load_s": load_quant},
              "quantized_linear_weights": sum(is_quantized(m.weight) for m in quantized.modules()
                                              if isinstance(m, torch.nn.Linear)),
              "linear_layers": sum(isinstance(m, torch.nn.Linear) for m in quantized.modules()),
              "drift": drift(reference, quantized, sequence, args.positions)}
    for name, speed in speeds.items():
        speed.pop("rows")
        result[name].update(speed)
    result["decode_speedup"] = (result["int8_weight_only"]["decode_tokens_per_s"]
                                / result["float32"]["decode_tokens_per_s"])
    result["weight_memory_ratio"] = result["int8_weight_only"]["weight_mb"] / result["float32"]["weight_mb"]
    return result


def release_slice_config() -> MossSpeechConfig:
    """Release-size decoder layers (one shared + one per modality), a 4096-row text vocabulary."""
    release = MossSpeechConfig()
    return MossSpeechConfig(
        vocab_size=4096, num_hidden_layers=2, num_shared_layers=1, num_modality_layers=1,
        hidden_size=release.hidden_size, intermediate_size=release.intermediate_size,
        num_attention_heads=release.num_attention_heads, num_key_value_heads=release.num_key_value_heads,
        head_dim=release.head_dim, audio_vocab_size=release.audio_vocab_size, eosp_token_id=release.eosp_token_id,
        audio_pad_token_id=release.audio_pad_token_id, sosp_token_id=4090, modality_pad_token_id=4091,
        pad_token_id=4092, eos_token_id=[4092, 4093], max_position_embeddings=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["nano", "release_slice"], default=None)
    parser.add_argument("--positions", type=int, default=200, help="teacher-forced positions for the drift")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated rows timed for decode speed")
    parser.add_argument("--slice-new-tokens", type=int, default=16, help="generated rows for the release slice")
    parser.add_argument("--prompt-len", type=int, default=32)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    import torchao

    results = {}
    if args.only in (None, "nano"):
        results["nano"] = compare(str(nano_path()), args, sequence_from_generation=True)
    if args.only in (None, "release_slice"):
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            MossSpeechForCausalLM(release_slice_config()).save_pretrained(folder)
            slice_args = argparse.Namespace(**{**vars(args), "new_tokens": args.slice_new_tokens})
            results["release_slice"] = compare(folder, slice_args, sequence_from_generation=False)
    print(json.dumps({"bench": "quant", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "torchao": torchao.__version__, "machine": platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

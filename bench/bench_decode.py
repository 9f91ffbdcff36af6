"""Decode speed of MossSpeechForCausalLM vs. a plain Qwen3ForCausalLM doing the same layer-steps per token.

Same process, random weights, float32 on CPU (or --device). The Qwen3 twin has `num_shared_layers +
num_modality_layers` layers, the text vocabulary and the same hidden sizes, so with lazy tails one MOSS decode step
does the same work as one Qwen3 step. Prints one JSON object:

    python bench/bench_decode.py               # the bench config below
    python bench/bench_decode.py --quick       # smaller, for a smoke run
    python bench/bench_decode.py --no-compile  # skip the static-cache / torch.compile figures (compiling takes minutes)

Targets: lazy decode >= 0.95x Qwen3 at batch 1 and 8; batch-8 aggregate >= 5x batch 1; prefill <= 1.15x.
And MOSS decode with a static cache and a `torch.compile`d decode step (`compile=True`), lazy tails on, vs the
eager default (dynamic cache, lazy tails): compiled >= 1.5x eager. `compile_s` is the first call (compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM
from modeling_moss_speech.threads import add_threads_argument, set_threads


def bench_config(quick: bool) -> MossSpeechConfig:
    if quick:
        sizes = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     num_hidden_layers=4, num_shared_layers=3, num_modality_layers=1, vocab_size=8192)
    else:
        sizes = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=64, num_hidden_layers=8, num_shared_layers=6, num_modality_layers=2, vocab_size=32768)
    vocab = sizes["vocab_size"]
    return MossSpeechConfig(**sizes, audio_vocab_size=16512, sosp_token_id=vocab - 3, modality_pad_token_id=vocab - 2,
                            pad_token_id=vocab - 1, eos_token_id=[vocab - 1], eosp_token_id=16384,
                            audio_pad_token_id=512, max_position_embeddings=4096)


def qwen3_twin(config: MossSpeechConfig) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_shared_layers + config.num_modality_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=False,
    )).eval()


def best_time(fn, repeats: int) -> float:
    """Best of `repeats` runs after a warm-up: the least noisy estimate on a shared 2-core machine."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_batch_ceiling(hidden: int, out: int, repeats: int = 30) -> float:
    """How much more work per second an (8, h) @ (h, o) matmul does than a (1, h) one on this machine."""
    weight = torch.randn(out, hidden)
    one = best_time(lambda: torch.nn.functional.linear(torch.randn(1, hidden), weight), repeats)
    eight = best_time(lambda: torch.nn.functional.linear(torch.randn(8, hidden), weight), repeats)
    return 8 * one / eight


class Suppress:
    """Keeps a segment in one modality for the whole run (no start/end of speech, no stop)."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.ids] = float("-inf")
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small config and few tokens (smoke run)")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    add_threads_argument(parser)
    parser.add_argument("--no-compile", action="store_true", help="skip the static-cache and compiled figures")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--modes", default="text,audio", help="comma-separated segment modes (default text,audio)")
    args = parser.parse_args()
    set_threads(args.threads)
    new_tokens = args.new_tokens or (16 if args.quick else 48)
    prompt_len = args.prompt_len or (32 if args.quick else 128)

    load_start = os.getloadavg()
    torch.manual_seed(0)
    config = bench_config(args.quick)
    moss = MossSpeechForCausalLM(config).eval().to(args.device)
    qwen = qwen3_twin(config).to(args.device)
    moss_common = dict(do_sample=False, repetition_penalty=1.0, max_new_tokens=new_tokens, eos_token_id=[])

    def prompts(batch: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        text = torch.randint(0, config.vocab_size - 8, (batch, prompt_len))
        grid = torch.stack([text, torch.full_like(text, config.audio_pad_token_id)], dim=-1)
        if mode == "audio":
            grid[:, -1, 0] = config.sosp_token_id  # the audio-output assistant prefix ends with sosp
        return grid.to(args.device), text.to(args.device)

    results = {}
    with torch.inference_mode():
        batches = [int(b) for b in args.batches.split(",")]
        modes = args.modes.split(",")
        for batch in batches:
            for mode in modes:
                grid, text = prompts(batch, mode)
                stay = {"text_logits_processor": [Suppress([config.sosp_token_id])],
                        "audio_logits_processor": [Suppress([config.eosp_token_id])]}

                def run_qwen(n: int, text=text):
                    return qwen.generate(text, generation_config=GenerationConfig(
                        do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                        pad_token_id=config.pad_token_id))

                def run_moss(n: int, lazy: bool, grid=grid, stay=stay, **extra):
                    return moss.generate(grid, lazy_tails=lazy, **{**moss_common, "max_new_tokens": n}, **stay, **extra)

                # Prefill = a one-token generate (prompt pass + one sampling); decode = the extra time of
                # new_tokens - 1 further steps, so neither figure contains the other.
                qwen_prefill = best_time(lambda: run_qwen(1), args.repeats)
                qwen_decode = best_time(lambda: run_qwen(new_tokens), args.repeats) - qwen_prefill
                qwen_tps = batch * (new_tokens - 1) / qwen_decode
                entry = {"qwen3_tokens_per_s": qwen_tps}
                for lazy in (True, False):
                    key = "lazy" if lazy else "eager"
                    prefill = best_time(lambda lazy=lazy: run_moss(1, lazy), args.repeats)
                    decode = best_time(lambda lazy=lazy: run_moss(new_tokens, lazy), args.repeats) - prefill
                    tps = batch * (new_tokens - 1) / decode
                    entry[f"moss_{key}_tokens_per_s"] = tps
                    entry[f"ratio_{key}_over_qwen3"] = tps / qwen_tps
                    entry[f"prefill_{key}_over_qwen3"] = prefill / qwen_prefill
                entry["qwen3_prefill_s"] = qwen_prefill
                if not args.no_compile:
                    eager_rows = run_moss(new_tokens, True)
                    for key, extra in (("static", {"cache_implementation": "static", "compile": False}),
                                       ("compiled", {"compile": True})):
                        start = time.perf_counter()
                        rows = run_moss(new_tokens, True, **extra)
                        entry[f"{key}_first_call_s"] = time.perf_counter() - start
                        entry[f"{key}_same_tokens_as_eager"] = bool(torch.equal(rows, eager_rows))
                        prefill = best_time(lambda extra=extra: run_moss(1, True, **extra), args.repeats)
                        decode = best_time(lambda extra=extra: run_moss(new_tokens, True, **extra), args.repeats)
                        entry[f"moss_{key}_tokens_per_s"] = batch * (new_tokens - 1) / (decode - prefill)
                    entry["compile_s"] = entry.pop("compiled_first_call_s")
                    entry.pop("static_first_call_s")
                    entry["compiled_over_eager"] = entry["moss_compiled_tokens_per_s"] / entry["moss_lazy_tokens_per_s"]
                    entry["compiled_over_static_eager"] = (entry["moss_compiled_tokens_per_s"]
                                                           / entry["moss_static_tokens_per_s"])
                results[f"b{batch}_{mode}"] = entry
        for mode in modes if {1, 8} <= set(batches) else ():
            results[f"batch8_over_batch1_{mode}"] = {
                "moss_lazy": results[f"b8_{mode}"]["moss_lazy_tokens_per_s"]
                / results[f"b1_{mode}"]["moss_lazy_tokens_per_s"],
                "qwen3": results[f"b8_{mode}"]["qwen3_tokens_per_s"] / results[f"b1_{mode}"]["qwen3_tokens_per_s"],
            }
        results["gemm_batch8_over_batch1_ceiling"] = gemm_batch_ceiling(config.hidden_size, config.intermediate_size)
    report = {
        "bench": "decode",
        "load_average_start_end": [load_start, os.getloadavg()],
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_shared_layers",
                                                   "num_modality_layers", "vocab_size", "audio_vocab_size")},
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "results": results,
        "targets": {
            "lazy_decode_over_qwen3_min": 0.95,
            "batch8_over_batch1_min": 5.0,
            "prefill_over_qwen3_max": 1.15,
            "compiled_over_eager_min": 1.5,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

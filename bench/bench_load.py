"""Peak memory of `from_pretrained` on a sharded ~1 GB random MOSS-Speech checkpoint. Prints one JSON object.

The parent process writes a random float32 checkpoint (about 1.1 GB, safetensors shards of `--shard` each), then
loads it once per scenario in a fresh subprocess. The child samples its resident set size (RSS, and on Linux the
anonymous / file-backed split) every millisecond while `from_pretrained` runs and while every weight is then read
once (so weights left memory-mapped by the loader are counted when they become resident), and reports the peak
above its RSS just before loading (after imports). Target: the plain load peaks at <= 1.15x the
checkpoint size, i.e. no weight is materialised twice.

    python bench/bench_load.py              # ~1.1 GB checkpoint in a temporary directory
    python bench/bench_load.py --quick      # ~0.1 GB, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

SCENARIOS = {
    # name: from_pretrained keyword arguments (offload_folder is filled in by the child)
    "default": {},
    "device_map_auto": {"device_map": "auto"},
    "device_map_cpu": {"device_map": "cpu"},
    "bf16": {"dtype": "bfloat16"},
    "cpu_disk_offload": {"device_map": "auto", "max_memory_fraction": 0.4},
}


def bench_config(quick: bool):
    from modeling_moss_speech import MossSpeechConfig

    vocab = 8192 if quick else 32768
    sizes = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                 num_hidden_layers=6, num_shared_layers=5, num_modality_layers=1) if quick else \
        dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
             num_hidden_layers=12, num_shared_layers=10, num_modality_layers=2)
    return MossSpeechConfig(**sizes, vocab_size=vocab, audio_vocab_size=16512, sosp_token_id=vocab - 3,
                            modality_pad_token_id=vocab - 2, pad_token_id=vocab - 1, eos_token_id=[vocab - 1],
                            eosp_token_id=16384, audio_pad_token_id=512)


def write_checkpoint(path: str, quick: bool, shard: str) -> dict:
    """Save a random float32 model in safetensors shards; return its size and a few reference checksums."""
    import torch

    from modeling_moss_speech import MossSpeechForCausalLM

    torch.manual_seed(0)
    model = MossSpeechForCausalLM(bench_config(quick))
    model.save_pretrained(path, max_shard_size=shard)
    checks = {str(dtype): {name: float(model.get_parameter(name).to(dtype).sum(dtype=torch.float64))
                           for name in CHECKED} for dtype in (torch.float32, torch.bfloat16)}
    del model
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    return {"bytes": sum(os.path.getsize(os.path.join(path, f)) for f in shards), "shards": len(shards),
            "checks": checks}


CHECKED = ("model.embed_tokens.weight", "model.shared_block.layers.0.mlp.up_proj.weight", "audio_lm_head.weight")


class MemorySampler:
    """Peak RSS (and anonymous / file-backed RSS on Linux) of this process, sampled by a background thread."""

    def __init__(self, interval: float = 0.001):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict:
        values = {"rss": self.process.memory_info().rss, "anon": 0, "file": 0}
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(("RssAnon:", "RssFile:")):
                        values["anon" if line.startswith("RssAnon") else "file"] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.sample().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in self.sample().items():
            self.peak[key] = max(self.peak[key], value)


def child(path: str, scenario: str, checkpoint_bytes: int) -> dict:
    """Load `path` as `scenario` in this (fresh) process and measure the memory it takes."""
    import torch
    from transformers import AutoModelForCausalLM

    import modeling_moss_speech  # noqa: F401  (registers the Auto classes)

    kwargs = dict(SCENARIOS[scenario])
    fraction = kwargs.pop("max_memory_fraction", None)
    offload = None
    if fraction is not None:
        offload = tempfile.mkdtemp(prefix="moss_offload_")
        kwargs.update(max_memory={"cpu": int(checkpoint_bytes * fraction)}, offload_folder=offload)
    sampler = MemorySampler()
    before = sampler.sample()
    with sampler:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        load_s = time.perf_counter() - start
        # Read every weight once: memory-mapped weights become resident now, not at the first forward pass.
        touched = 0
        with torch.no_grad():
            for param in model.parameters():
                if param.device.type != "meta":  # offloaded to disk: loaded only inside a forward pass
                    param.sum()
                    touched += param.numel()
    checks = {name: float(model.get_parameter(name).sum(dtype=torch.float64)) for name in CHECKED
              if model.get_parameter(name).device.type != "meta"}
    devices = sorted({str(d) for d in getattr(model, "hf_device_map", {"": "cpu"}).values()})
    peak_delta = sampler.peak["rss"] - before["rss"]
    return {
        "scenario": scenario,
        "kwargs": {k: v for k, v in kwargs.items() if k != "offload_folder"},
        "devices": devices,
        "dtype": str(model.dtype),
        "load_s": round(load_s, 3),
        "rss_before_gb": round(before["rss"] / 1e9, 3),
        "peak_rss_gb": round(sampler.peak["rss"] / 1e9, 3),
        "peak_delta_gb": round(peak_delta / 1e9, 3),
        "peak_delta_over_checkpoint": round(peak_delta / checkpoint_bytes, 3),
        "peak_anon_delta_over_checkpoint": round((sampler.peak["anon"] - before["anon"]) / checkpoint_bytes, 3),
        "peak_file_delta_over_checkpoint": round((sampler.peak["file"] - before["file"]) / checkpoint_bytes, 3),
        "resident_params": touched,
        "checks": checks,
    }


def main() -> None:
    from modeling_moss_speech.threads import add_threads_argument, set_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~0.1 GB checkpoint (smoke run)")
    parser.add_argument("--shard", default="200MB", help="max_shard_size of the saved checkpoint")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of " + ", ".join(SCENARIOS))
    parser.add_argument("--child", nargs=3, metavar=("PATH", "SCENARIO", "BYTES"), help=argparse.SUPPRESS)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.child:
        path, scenario, size = args.child
        print(json.dumps(child(path, scenario, int(size))))
        return

    with tempfile.TemporaryDirectory(prefix="moss_load_", dir=args.dir) as path:
        checkpoint = write_checkpoint(path, args.quick, args.shard)
        runs = []
        for scenario in args.scenarios.split(","):
            child_args = [sys.executable, __file__, "--child", path, scenario, str(checkpoint["bytes"])]
            if args.threads is not None:
                child_args += ["--threads", str(args.threads)]
            out = subprocess.run(child_args,
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            got = result.pop("checks")
            result["weights_match"] = all(abs(got[k] - v) <= 1e-6 * (1 + abs(v))
                                          for k, v in checkpoint["checks"][result["dtype"]].items() if k in got)
            runs.append(result)
    report = {
        "bench": "load",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "checkpoint_gb": round(checkpoint["bytes"] / 1e9, 3),
        "shards": checkpoint["shards"],
        "shard_size": args.shard,
        "runs": runs,
        "target": {"default_peak_delta_over_checkpoint_max": 1.15},
        "within_target": next((r["peak_delta_over_checkpoint"] <= 1.15 for r in runs if r["scenario"] == "default"),
                              None),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The package on a CUDA GPU, against the same work on the CPU: one JSON object.

Needs a machine with a GPU (exits with code 2 otherwise). What it runs:
- the README's main command, `moss-speech chat --wav examples/colour_of_banana.wav --out answer.wav`, on the CPU and
  on CUDA in float32 and bfloat16, for a text and a spoken answer and streamed: the printed answers and the spoken
  answers' lengths must agree (greedy decoding), and its wall time;
- the shipped codec: codes of the example on CPU and CUDA (must be equal), and the decoded speech of those codes
  (flow + Griffin-Lim are deterministic: max difference);
- a release-shaped MOSS-Speech with random weights (bench_decode.py's config: hidden 1024, 6 shared + 2 per tail,
  vocab 32768 + 16512 speech codes): logits CUDA vs CPU in float32, argmax agreement of bfloat16 with float32,
  greedy generation on CUDA equal to the CPU's, and a left-padded batch equal to each row generated alone.

    python bench/bench_cuda.py                  # everything, about 2 minutes on an H200 machine
    python bench/bench_cuda.py --device cpu     # the same comparisons CPU against CPU (a smoke run without a GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf
import torch

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechForCausalLM
from modeling_moss_speech.pretrained import nano_path
from modeling_moss_speech.threads import add_threads_argument, set_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import bench_config  # noqa: E402

EXAMPLE = ROOT / "examples" / "colour_of_banana.wav"


def chat(out_dir: Path, device: str, dtype: str, modality: str, stream: bool = False) -> dict:
    """The README's main command on `device`: printed answer, spoken-answer seconds, wall time."""
    name = f"{device}_{dtype}_{modality}{'_stream' if stream else ''}".replace(":", "")
    out = out_dir / f"{name}.wav"
    command = [sys.executable, "-m", "modeling_moss_speech", "chat", "--wav", str(EXAMPLE), "--device", device,
               "--dtype", dtype, "--output-modality", modality, "--quiet", "--threads", str(torch.get_num_threads())]
    if modality == "audio":
        command += ["--out", str(out)]
    if stream:
        command.append("--stream")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    entry = {"command": " ".join(command[1:]), "modality": modality, "returncode": result.returncode,
             "wall_s": time.perf_counter() - start, "answer": result.stdout.strip()}
    if result.returncode != 0:
        entry["stderr_tail"] = result.stderr[-1500:]
    elif modality == "audio":
        speech, rate = sf.read(str(out), dtype="float32")
        entry["speech_s"] = len(speech) / rate
    return entry


@torch.no_grad()
def codec_check(device: str) -> dict:
    speech, rate = sf.read(str(EXAMPLE), dtype="float32")
    codes, waves = {}, {}
    for name, where in (("cpu", "cpu"), ("device", device)):
        codec = MossSpeechCodecModel.from_pretrained(nano_path() / "codec").eval().to(where)
        codes[name] = codec.encode([speech], sampling_rate=rate).codes[0].cpu()
        decoded = codec.decode([codes["cpu"].to(where)])
        waves[name] = decoded.waveforms[0, : int(decoded.lengths[0])].float().cpu()
    diff = (waves["cpu"] - waves["device"]).abs()
    return {"codes_equal": bool(torch.equal(codes["cpu"], codes["device"])), "codes": int(codes["cpu"].numel()),
            "decoded_max_abs_diff": float(diff.max()), "decoded_peak": float(waves["cpu"].abs().max()),
            "decoded_correlation": float(torch.corrcoef(torch.stack([waves["cpu"], waves["device"]]))[0, 1])}


@torch.no_grad()
def release_shaped_check(device: str, new_tokens: int = 24) -> dict:
    torch.manual_seed(0)
    config = bench_config(quick=False)
    cpu = MossSpeechForCausalLM(config).eval()
    gpu = copy.deepcopy(cpu).to(device)
    text = torch.randint(0, config.vocab_size - 8, (2, 96))
    grid = torch.stack([text, torch.full_like(text, config.audio_pad_token_id)], dim=-1)
    grid[:, 40:70, 1] = torch.randint(0, 16384, (2, 30))  # a speech span, so both channels carry tokens

    def logits(model, grid):  # both channels' logits, side by side
        out = model(grid)
        return torch.cat([out.text_logits, out.audio_logits], dim=-1).float().cpu()

    logits_cpu = logits(cpu, grid)
    logits_gpu = logits(gpu, grid.to(device))
    gpu_bf16 = copy.deepcopy(cpu).to(device, torch.bfloat16)
    logits_bf16 = logits(gpu_bf16, grid.to(device))
    common = dict(do_sample=False, repetition_penalty=1.0, max_new_tokens=new_tokens, eos_token_id=[])
    prompt = grid[:1, :64]
    rows_cpu = cpu.generate(prompt, **common)
    rows_gpu = gpu.generate(prompt.to(device), **common).cpu()
    # left padding: a shorter second row, padded on the left, must generate what it generates alone
    short = grid[1:, :40]
    pad = torch.full((1, 24, 2), config.pad_token_id)
    pad[..., 1] = config.audio_pad_token_id
    batch = torch.cat([prompt, torch.cat([pad, short], dim=1)])
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, :24] = 0
    # generate returns the new rows only
    rows_batch = gpu.generate(batch.to(device), attention_mask=mask.to(device), **common).cpu()
    rows_short = gpu.generate(short.to(device), **common).cpu()
    return {
        "logits_device_vs_cpu_float32_max_abs_diff": float((logits_cpu - logits_gpu).abs().max()),
        "logits_scale": float(logits_cpu.abs().max()),
        "argmax_bfloat16_agrees_with_float32": float((logits_bf16.argmax(-1) == logits_cpu.argmax(-1)).float().mean()),
        "greedy_device_equals_cpu": bool(torch.equal(rows_cpu, rows_gpu)),
        "left_padded_batch_equals_alone": bool(torch.equal(rows_batch[0], rows_gpu[0])
                                               and torch.equal(rows_batch[1], rows_short[0])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="bench_cuda_out", help="where the spoken answers are written")
    parser.add_argument("--device", default="cuda", help="the device compared with the CPU (default: cuda)")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"bench": "cuda", "error": "no CUDA device"}))
        sys.exit(2)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [chat(out_dir, where, dtype, modality)
            for where, dtype in (("cpu", "float32"), (device, "float32"), (device, "bfloat16"))
            for modality in ("text", "audio")]
    runs.append(chat(out_dir, device, "float32", "audio", stream=True))
    reference = {run["modality"]: run["answer"] for run in runs[:2]}  # the CPU's
    report = {
        "bench": "cuda",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
        "torch": torch.__version__,
        "readme_command": runs,
        "readme_command_same_answer_everywhere": all(
            run["returncode"] == 0 and run["answer"] == reference[run["modality"]] for run in runs),
        "codec": codec_check(device),
        "release_shaped": release_shaped_check(device),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""FSDP2 with training/configs/fsdp2.yaml: 2 CPU processes (gloo) against a single-process run of the real scripts.

accelerate 1.15 runs FSDP only on accelerator devices (on CPU it would be DDP; the scripts refuse that, tested here),
so tests/fsdp2_cpu_worker.py applies the config's wrapping with torch's `fully_shard` (each Qwen3DecoderLayer a unit,
then the root) and its memory-efficient loading (rank 1 builds the model on the meta device and receives rank 0's
weights into its shards). The 2-process global batch (2 rows per process) is the single-process run's accumulated
batch (2 micro-batches of 2 rows), so the losses, gradient norms and trained weights must agree.

Tolerance, measured (3 steps, float32, lr 1e-3, no warmup): the first step's losses are bit-identical (same weights,
same rows, the same two per-batch means averaged); over the 3 steps the loss differs by at most 4.8e-7 (pre-training
stage II and SFT; 0 in stage I) and the trained weights by at most 2.8e-6 (stage II; 8e-9 stage I, 2.2e-7 SFT), from
the order in which FSDP's reduce-scatter sums the two gradients versus the single process accumulating them (and,
for SFT, TRL's fused AdamW versus the worker's AdamW). The weight difference is one element of 61,568 whose gradient
is near zero: Adam divides by the gradient's own magnitude, which turns summation-order noise into an update
difference. Allowed: 2e-6 relative on losses and gradient norms (2e-5 at a loss of 10: 40x the measured difference,
far below the ~1e-2 a step changes the loss) and 2e-5 absolute on weights (1 % of what 3 steps at lr 1e-3 move
a weight).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import EOSP, audio_rows, make_prompt, text_rows, tiny_config, tiny_tokenizer
from safetensors.torch import load_file

from modeling_moss_speech import MossSpeechForCausalLM, MossSpeechProcessor

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fsdp2_cpu_worker.py"
FSDP2_YAML = REPO / "training" / "configs" / "fsdp2.yaml"
STEPS = 3
LOSS_RTOL, WEIGHT_ATOL = 2e-6, 2e-5

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
datasets = pytest.importorskip("datasets")


def child_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")


def run_worker(tmp_path: Path, port: int, *args: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """tests/fsdp2_cpu_worker.py on 2 processes; its JSON result and the gathered trained weights."""
    out, weights = tmp_path / "fsdp2.json", tmp_path / "fsdp2.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(WORKER), "--accelerate_config", str(FSDP2_YAML), "--out", str(out),
           "--save", str(weights), "--steps", str(STEPS), "--threads", "1", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), load_file(str(weights))


def check_sharding(result: dict, model_dir: Path) -> None:
    """Both ranks hold half of every unit; rank 1 never had the weights before sharding (meta-device build)."""
    model = MossSpeechForCausalLM.from_pretrained(model_dir)
    layers = sum(type(m).__name__ == "Qwen3DecoderLayer" for m in model.modules())
    total = sum(p.numel() for p in model.parameters())
    assert result["world_size"] == 2 and result["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    ranks = result["ranks"]
    assert [r["devices_before_sharding"] for r in ranks] == [["cpu"], ["meta"]]
    for rank in ranks:
        assert rank["is_fsdp"] and rank["all_dtensor"] and rank["units"] == layers + 1
        assert rank["parameters"] == total and rank["local_parameters"] < total
    assert sum(r["local_parameters"] for r in ranks) == total


def compare(reference: list[dict], sharded: list[dict], keys: tuple[str, ...]) -> float:
    """Assert the per-step values agree (the first step exactly); returns the largest absolute loss difference."""
    assert [h["step"] for h in reference] == [h["step"] for h in sharded] == list(range(1, STEPS + 1))
    assert sharded[0]["loss"] == reference[0]["loss"]
    worst = 0.0
    for ref, got in zip(reference, sharded):
        for key in keys:
            assert got[key] == pytest.approx(ref[key], rel=LOSS_RTOL, abs=0), (ref["step"], key, ref[key], got[key])
        worst = max(worst, abs(ref["loss"] - got["loss"]))
    return worst


def compare_weights(reference: dict[str, torch.Tensor], sharded: dict[str, torch.Tensor],
                    initial: dict[str, torch.Tensor]) -> float:
    """Assert the trained weights agree; returns the largest absolute difference."""
    assert set(reference) == set(sharded)
    for name, value in reference.items():
        torch.testing.assert_close(sharded[name], value, atol=WEIGHT_ATOL, rtol=0, msg=name)
    assert any(not torch.equal(reference[k], initial[k]) for k in reference)  # the runs did train
    return max((sharded[k] - reference[k]).abs().max().item() for k in reference)


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fsdp2") / "init"
    torch.manual_seed(0)
    MossSpeechForCausalLM(tiny_config()).save_pretrained(path)
    return path


def grid_data(path: Path) -> str:
    """36 sequences (speech-only, interleaved, text-only) of varied lengths: 7 packed batches of 2 rows."""
    def speech(seed: int, n: int) -> list:
        return audio_rows(torch.randint(0, EOSP, (n,), generator=torch.Generator().manual_seed(seed)).tolist())

    def text(seed: int, n: int) -> list:
        return text_rows(torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist())

    grids = [speech(i, 4 + i % 9) for i in range(14)] + [make_prompt(100 + i, 8 + i % 11).tolist() for i in range(14)]
    grids += [text(200 + i, 5 + i % 7) for i in range(8)]
    datasets.Dataset.from_dict({"input_ids": grids}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_pretrain_fsdp2_two_processes_match_one(tmp_path, initial, stage):
    sys.path.insert(0, str(REPO / "training"))
    import pretrain

    data = grid_data(tmp_path / "data")
    common = dict(stage=stage, lr="1e-3", warmup_steps="0", batch_size="2", max_length="32")
    sharded, sharded_weights = run_worker(tmp_path, 29611 if stage == "stage1" else 29612, "--mode", "pretrain",
                                          "--model", str(initial), "--data", data,
                                          *[t for k, v in common.items() for t in (f"--{k}", v)])
    check_sharding(sharded, initial)
    reference = pretrain.main([
        "--model", str(initial), "--datasets", data, "--output_dir", str(tmp_path / "ref"),
        "--stage", stage, "--max_length", "32", "--per_device_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--weight_decay", "0", "--max_steps", str(STEPS),
        "--log_every", "1", "--mixed_precision", "no", "--progress_bar", "false", "--seed", "0", "--threads", "1",
    ])
    worst = compare(reference["history"], sharded["history"], ("loss", "text_loss", "audio_loss", "grad_norm"))
    init_weights = load_file(str(initial / "model.safetensors"))
    weights = compare_weights(load_file(str(tmp_path / "ref" / "model.safetensors")), sharded_weights, init_weights)
    print(f"pretrain {stage}: max |loss difference| over {STEPS} steps {worst:.3g}, max |weight difference| "
          f"{weights:.3g}; losses {[h['loss'] for h in reference['history']]} vs "
          f"{[h['loss'] for h in sharded['history']]}")
    if stage == "stage1":  # the frozen text backbone stays bit-identical under FSDP2 as well
        frozen = [k for k in init_weights if not k.startswith(("model.audio_", "audio_lm_head."))]
        assert frozen and all(torch.equal(sharded_weights[k], init_weights[k]) for k in frozen)


def test_sft_fsdp2_two_processes_match_one(tmp_path, initial):
    proc_dir, data_dir = tmp_path / "proc", tmp_path / "sft_data"
    MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer()).save_pretrained(proc_dir)
    g = torch.Generator().manual_seed(0)
    words = ["hello", "good day", "paris", "what is the capital of france", "tell me a story"]

    def content(i: int, spoken: bool, n: int) -> dict:
        if spoken:
            return {"type": "audio", "codes": torch.randint(0, EOSP, (n,), generator=g).tolist(), "text": None}
        return {"type": "text", "codes": None, "text": words[i % len(words)]}

    rows = [{"messages": [{"role": "user", "content": content(i, i % 2 == 1, 3 + i % 5)},
                          {"role": "assistant", "content": content(i + 2, i % 3 != 0, 2 + (3 * i) % 7)}]}
            for i in range(4 * STEPS)]
    datasets.Dataset.from_list(rows).save_to_disk(str(data_dir))

    sharded, sharded_weights = run_worker(
        tmp_path, 29613, "--mode", "sft", "--stage", "sft", "--model", str(initial), "--processor", str(proc_dir),
        "--data", str(data_dir), "--batch_size", "2", "--max_length", "256", "--lr", "1e-3", "--warmup_steps", "0",
        "--lr_scheduler_type", "linear")
    check_sharding(sharded, initial)

    spec = importlib.util.spec_from_file_location("moss_speech_sft_fsdp2", REPO / "training" / "sft.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    argv = ["--model_name_or_path", str(initial), "--processor_name_or_path", str(proc_dir), "--dataset_name",
            str(data_dir), "--output_dir", str(tmp_path / "ref"), "--max_steps", str(STEPS),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--warmup_steps", "0", "--lr_scheduler_type", "linear", "--weight_decay", "0",
            "--train_sampling_strategy", "sequential", "--max_length", "256", "--bf16", "false", "--use_cpu", "true",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--threads", "1", "--seed", "0"]
    trainer = script.main(*script.make_parser().parse_args_and_config(argv))
    reference = [h for h in trainer.state.log_history if "loss" in h]
    # text_loss / audio_loss are left out: with one process TRL logs the mean of the micro-batches' channel means,
    # with two the target-weighted mean over the processes; loss and grad_norm are defined the same in both.
    worst = compare(reference, sharded["history"], ("loss", "grad_norm"))
    weights = compare_weights(load_file(str(tmp_path / "ref" / "model.safetensors")), sharded_weights,
                              load_file(str(initial / "model.safetensors")))
    print(f"sft: max |loss difference| over {STEPS} steps {worst:.3g}, max |weight difference| {weights:.3g}; "
          f"losses {[h['loss'] for h in reference]} vs {[h['loss'] for h in sharded['history']]}")


def test_accelerate_fsdp2_config_on_cpu_is_refused(tmp_path, initial):
    """accelerate turns fsdp2.yaml into DDP on CPU; pretrain.py stops instead of training full replicas."""
    data = grid_data(tmp_path / "data")
    env = dict(child_env(), ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_YAML), "--num_processes",
           "2", "--mixed_precision", "no", "--main_process_port", "29614", str(REPO / "training" / "pretrain.py"),
           "--model", str(initial), "--datasets", data, "--output_dir", str(tmp_path / "out"),
           "--max_steps", "1", "--progress_bar", "false", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "accelerate runs DistributedType.MULTI_CPU" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()

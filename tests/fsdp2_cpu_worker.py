"""FSDP2 on CPU (gloo): a few steps of pre-training or SFT with torch's `fully_shard`, as `fsdp2.yaml` asks for.

accelerate 1.15 enables FSDP only on accelerator devices: on CPU (`ACCELERATE_USE_CPU=true`) it runs the FSDP config
as plain DDP (`DistributedType.MULTI_CPU`), so this worker applies the config's wrapping itself: every module of a
class named by `fsdp_transformer_layer_cls_to_wrap` is its own `fully_shard` unit, then the root. With
`fsdp_cpu_ram_efficient_loading` only rank 0 reads the checkpoint; the other ranks build the model on the meta device,
shard it there, allocate their shards (`to_empty`), and receive the weights from rank 0
(`set_model_state_dict(..., broadcast_from_rank0=True)`).

The step is the one of training/pretrain.py (its data pipeline, `forward_batch`, AdamW groups, cosine schedule,
clipping) or of `MossSpeechSFTTrainer` (the collator, each channel normalised by its target count over all processes),
so tests/test_fsdp2.py compares its losses with a single-process run of the real scripts. Launched by torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_cpu_worker.py --mode pretrain --model DIR \\
        --data DIR --out result.json [--steps 4 --batch_size 2 --lr 1e-3 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM  # noqa: E402
from modeling_moss_speech.threads import add_threads_argument, set_threads  # noqa: E402
from modeling_moss_speech.trainer.stages import apply_training_stage  # noqa: E402


def fsdp_settings(path: Path) -> dict:
    """The `fsdp_config` of an accelerate config file, checked for what this worker implements."""
    config = load_config_from_file(str(path))
    if config.distributed_type != "FSDP":
        raise ValueError(f"{path}: distributed_type is {config.distributed_type!r}, not FSDP.")
    fsdp = config.fsdp_config
    if int(fsdp.get("fsdp_version", 1)) != 2 or fsdp.get("fsdp_auto_wrap_policy") != "TRANSFORMER_BASED_WRAP":
        raise ValueError(f"{path}: this worker implements fsdp_version 2 with TRANSFORMER_BASED_WRAP, got {fsdp}.")
    return fsdp


def load_sharded(model_dir: str, fsdp: dict, stage: str) -> tuple[torch.nn.Module, dict]:
    """The model, sharded as `fsdp` says; with cpu_ram_efficient_loading only rank 0 reads the checkpoint."""
    rank = dist.get_rank()
    efficient = bool(fsdp.get("fsdp_cpu_ram_efficient_loading", False))
    if efficient and rank != 0:
        with torch.device("meta"):
            model = MossSpeechForCausalLM(MossSpeechConfig.from_pretrained(model_dir))
    else:
        model = MossSpeechForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    full_before = {n: p.device.type for n, p in model.named_parameters()}
    full_sd = model.state_dict() if rank == 0 else {}
    apply_training_stage(model, stage, verbose=False)

    names = fsdp["fsdp_transformer_layer_cls_to_wrap"]
    names = {n.strip() for n in (names.split(",") if isinstance(names, str) else names)}
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"no module of the classes {sorted(names)} to wrap.")
    reshard = bool(fsdp.get("fsdp_reshard_after_forward", True))
    for module in units:
        fully_shard(module, reshard_after_forward=reshard)
    fully_shard(model)

    if efficient:
        if rank != 0:
            model.to_empty(device="cpu")  # this rank's shards only
            model.init_weights()  # the non-persistent buffers (rotary frequencies); the weights come from rank 0
        set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True,
                                                                      broadcast_from_rank0=True))
    del full_sd
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    info = {"units": len(units) + 1, "devices_before_sharding": sorted(set(full_before.values())),
            "local_parameters": local, "parameters": sum(p.numel() for p in model.parameters()),
            "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
            "is_fsdp": isinstance(model, FSDPModule)}
    return model, info


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().double().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def pretrain_steps(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """pretrain.py's step, the global batch split over the ranks as accelerate's prepared DataLoader splits it."""
    import pretrain
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    rank, world = dist.get_rank(), dist.get_world_size()
    config = model.config
    source = pretrain.GridSource([{"path": args.data, "kind": "auto"}], config.modality_pad_token_id)
    plan = pretrain.plan_epoch(source, 0, args.seed, args.max_length, True, None)
    loader = DataLoader(pretrain.PackedRows(source, plan, config), batch_size=args.batch_size, shuffle=False,
                        collate_fn=pretrain.RowCollator(config, True))
    batches = list(loader)
    if len(batches) < args.steps * world:
        raise ValueError(f"{len(batches)} batches in the first epoch, {args.steps * world} needed.")
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    history = []
    for step in range(args.steps):
        out = pretrain.forward_batch(model, batches[step * world + rank])
        out.loss.backward()  # FSDP2 averages the gradients over the ranks: the single process's accumulated mean
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        means = mean_over_ranks(torch.stack([out.loss, out.text_loss, out.audio_loss]))
        history.append({"step": step + 1, "loss": means[0].item(), "text_loss": means[1].item(),
                        "audio_loss": means[2].item(), "grad_norm": float(grad_norm.full_tensor()
                                                                          if isinstance(grad_norm, DTensor)
                                                                          else grad_norm)})
    return history


def sft_steps(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """`MossSpeechSFTTrainer`'s step: each channel's loss normalised by its targets over every rank's batch."""
    import datasets
    from transformers import get_scheduler

    from modeling_moss_speech import MossSpeechProcessor
    from modeling_moss_speech.trainer.sft import MossSpeechDataCollator, channel_target_counts

    rank, world = dist.get_rank(), dist.get_world_size()
    processor = MossSpeechProcessor.from_pretrained(args.processor)
    collator = MossSpeechDataCollator(processor, max_length=args.max_length)
    data = datasets.load_from_disk(args.data)
    if len(data) < args.steps * world * args.batch_size:
        raise ValueError(f"{len(data)} conversations, {args.steps * world * args.batch_size} needed.")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.steps)
    history = []
    for step in range(args.steps):
        first = (step * world + rank) * args.batch_size  # sequential order, consecutive batches to the ranks
        batch = collator([data[i] for i in range(first, first + args.batch_size)])
        local = channel_target_counts(batch["labels"])
        total = local.clone()
        dist.all_reduce(total)
        out = model(**batch, use_cache=False)
        weights = local / total.clamp(min=1)
        # times the world size: FSDP2 averages the gradients, the loss is a sum of the ranks' shares
        loss = (out.text_loss * weights[0] + out.audio_loss * weights[1]) * world
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        channel = torch.stack([out.text_loss * local[0], out.audio_loss * local[1]]).detach().double()
        dist.all_reduce(channel)
        history.append({"step": step + 1, "loss": mean_over_ranks(loss).item(),
                        "text_loss": (channel[0] / total[0]).item(), "audio_loss": (channel[1] / total[1]).item(),
                        "grad_norm": float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor)
                                           else grad_norm)})
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("pretrain", "sft"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--processor", default=None, help="the processor directory (sft)")
    parser.add_argument("--out", required=True, help="JSON file written by rank 0")
    parser.add_argument("--save", default=None, help="write the trained weights (gathered) to this safetensors file")
    parser.add_argument("--accelerate_config", default=str(REPO / "training" / "configs" / "fsdp2.yaml"))
    parser.add_argument("--stage", default="stage2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--lr_scheduler_type", default="linear")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    dist.init_process_group("gloo")
    torch.manual_seed(args.seed)
    fsdp = fsdp_settings(Path(args.accelerate_config))
    model, info = load_sharded(args.model, fsdp, args.stage)
    model.train()
    history = (pretrain_steps if args.mode == "pretrain" else sft_steps)(model, args)
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    infos = [None] * dist.get_world_size()
    dist.all_gather_object(infos, info)
    if dist.get_rank() == 0:
        if args.save:
            save_file({k: v.contiguous() for k, v in gathered.items()}, args.save)
        Path(args.out).write_text(json.dumps({"history": history, "ranks": infos, "fsdp_config": fsdp,
                                              "world_size": dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

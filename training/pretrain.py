"""MOSS-Speech pre-training with Accelerate (stage I: frozen text backbone; stage II: joint, with text mixed in).

Launch (one process, or any accelerate config in `training/configs/`):

    accelerate launch [--config_file training/configs/ddp.yaml] training/pretrain.py \\
        --config training/configs/stage1.yaml [--max_steps 10 --datasets data/a '{path: data/b, kind: text}' ...]

The recipe is a YAML mapping of the fields of `PretrainArguments` (`training/pretrain_arguments.py`; every key with
its help: `python training/pretrain.py --help`); `--snake_case` flags override it. The data pipeline (sources, seeded
epoch plans, packed rows, collation) is `training/pretrain_data.py`; this file is the loop. `main(argv)` runs it
in-process.

Loss (`training_loss`): per micro-batch, the text-channel plus the audio-channel mean cross entropy (labels from
`trainer.sft.grid_labels`), averaged over the accumulated micro-batches; with `align_weight` > 0, plus that
weight times `alignment_loss` on a batch of `align_dataset` pairs (an experiment: see the nano checkpoint's
eval/findings.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from pretrain_arguments import PretrainArguments, make_parser
from pretrain_data import AlignPairs, GridSource, PackedRows, RowCollator, plan_epoch
from torch.utils.data import DataLoader

from modeling_moss_speech import MossSpeechForCausalLM
from modeling_moss_speech.modeling_moss_speech import from_text_model
from modeling_moss_speech.threads import set_threads
from modeling_moss_speech.trainer.stages import apply_training_stage, check_fsdp_active

logger = logging.getLogger("moss_speech.pretrain")


def forward_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The training/eval forward of one collated batch (no cache, so packed sequences stay separate)."""
    kwargs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            kwargs[key] = batch[key]
    return model(**kwargs)


def training_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The objective of one micro-batch: the model output whose `loss` is backpropagated (text + audio channel
    cross entropy); `text_loss` and `audio_loss` are logged beside it."""
    return forward_batch(model, batch)


def alignment_loss(model: torch.nn.Module, pairs: dict[str, torch.Tensor], num_layers: int,
                   temperature: float = 0.0, teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """How far the hidden states after a spoken question are from those after the same question as text.

    Compared at the output of every trunk layer and of the text tail (`num_layers` entries of `hidden_states` after
    the embeddings). The text side is the target (no gradient), computed by `teacher` (a frozen checkpoint) or, when
    None, by `model` itself: speech is pulled toward where text already is. Pairs with `weights` (grids of equal
    length): the weighted mean of `1 - cosine` row by row. Otherwise the `suffix` final rows both grids share
    (system and assistant turn); `temperature` 0: mean `1 - cosine`; > 0: InfoNCE over the batch (each spoken
    question against every pair's text, same-fact pairs masked out).
    """
    def layer_states(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        out = m(input_ids=ids, use_cache=False, output_hidden_states=True)
        return torch.stack(out.hidden_states[1: 1 + num_layers], dim=1)  # (B, layers, L, H)

    if "weights" in pairs:
        with torch.no_grad():
            target = layer_states(teacher if teacher is not None else model, pairs["text_ids"])
        distance = 1 - torch.nn.functional.cosine_similarity(layer_states(model, pairs["speech_ids"]), target, dim=-1)
        weights = pairs["weights"].to(distance.dtype)[:, None, :]
        return (distance * weights).sum() / ((weights > 0).sum() * num_layers).clamp(min=1)

    suffix = int(pairs["suffix"].min())

    def states(m: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        layers = layer_states(m, ids)
        index = lengths.to(ids.device)[:, None] - suffix + torch.arange(suffix, device=ids.device)[None, :]
        return torch.gather(layers, 2, index[:, None, :, None].expand(-1, num_layers, -1, layers.shape[-1]))

    with torch.no_grad():
        target = states(teacher if teacher is not None else model, pairs["text_ids"], pairs["text_lengths"])
    spoken = states(model, pairs["speech_ids"], pairs["speech_lengths"])
    if not temperature:
        return (1 - torch.nn.functional.cosine_similarity(spoken, target, dim=-1)).mean()
    spoken = torch.nn.functional.normalize(spoken.transpose(0, 1).flatten(2), dim=-1)  # (layers, B, suffix * H)
    target = torch.nn.functional.normalize(target.transpose(0, 1).flatten(2), dim=-1)
    logits = spoken @ target.transpose(1, 2) / temperature  # (layers, B, B)
    group = pairs["group"].to(logits.device)
    same_fact = (group[:, None] == group[None, :]) & ~torch.eye(len(group), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same_fact, float("-inf"))
    labels = torch.arange(len(group), device=logits.device).expand(logits.shape[0], -1)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


class TrainingProgress:
    """Step and data position, saved with `accelerator.save_state` (registered for checkpointing).

    `data` holds the settings that decide which rows each process reads; a resume with other values would continue
    from the wrong place in the data, so `check_resume` rejects it.
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.data = dict(data)
        self.saved_data: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "data": json.dumps(self.data, sort_keys=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.saved_data = json.loads(state["data"]) if "data" in state else None

    def check_resume(self, path: str) -> None:
        """Raise if the checkpoint was written with other data settings than this run's."""
        if self.saved_data is None:
            return
        changed = {k: (self.saved_data.get(k), v) for k, v in self.data.items() if self.saved_data.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume exactly from {path!r}: the data settings changed ({details}); resume "
                             "with the checkpoint's values (the data position depends on them).")


def build_model(cfg: PretrainArguments) -> MossSpeechForCausalLM:
    """Load the MOSS-Speech checkpoint, or split the Qwen3 text model, in float32."""
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.model is not None:
        model = MossSpeechForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, **kwargs)
    else:
        from transformers import AutoModelForCausalLM

        text_model = AutoModelForCausalLM.from_pretrained(cfg.init_from_text_model, dtype=torch.float32, **kwargs)
        model = from_text_model(text_model, cfg.num_shared_layers, audio_vocab_size=cfg.audio_vocab_size,
                                **cfg.config_overrides)
        del text_model
    return model.float()


def _checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(r"checkpoint-(\d+)", name)
            if match:
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def save_checkpoint(accelerator, output_dir: str, step: int, save_total_limit: int | None) -> str:
    """`accelerator.save_state` into output_dir/checkpoint-<step>; prune old ones beyond `save_total_limit`."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and save_total_limit is not None:
        for _, old in _checkpoint_dirs(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", path)
    return path


@torch.no_grad()
def evaluate(model, accelerator, loader: DataLoader) -> dict[str, float]:
    """Token-weighted mean loss per channel over the eval rows of every process."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # text sum, audio sum, text n, audio n
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = forward_batch(model, batch)
        n_text = (batch["labels"][:, 1:, 0] != -100).sum()
        n_audio = (batch["labels"][:, 1:, 1] != -100).sum()
        sums += torch.stack([out.text_loss.double() * n_text, out.audio_loss.double() * n_audio,
                             n_text.double(), n_audio.double()])
    sums = accelerator.reduce(sums, reduction="sum")
    model.train()
    text = (sums[0] / sums[2].clamp(min=1)).item()
    audio = (sums[1] / sums[3].clamp(min=1)).item()
    return {"eval_loss": text + audio, "eval_text_loss": text, "eval_audio_loss": audio,
            "eval_text_tokens": int(sums[2].item()), "eval_audio_tokens": int(sums[3].item())}


def _setup_logging(is_main: bool) -> None:
    if not any(getattr(h, "_moss_pretrain", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s pretrain: %(message)s", "%H:%M:%S"))
        handler._moss_pretrain = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run pre-training from `argv` (`--config recipe.yaml` and flags; default `sys.argv[1:]`).

    Returns the logged history (also written to output_dir/metrics.jsonl), the eval history and the final step.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    (cfg,) = make_parser().parse_args_and_config(argv)
    set_threads(cfg.threads)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=cfg.log_with,
        project_dir=cfg.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters)],
    )
    _setup_logging(accelerator.is_main_process)
    check_fsdp_active(accelerator.distributed_type)
    logger.info("accelerate: %d process(es), %s (backend %s), device %s, mixed precision %s",
                accelerator.num_processes, accelerator.distributed_type, accelerator.state.backend,
                accelerator.device, accelerator.mixed_precision)
    logger.info("recipe: %s", json.dumps(dataclasses.asdict(cfg), default=str))
    set_seed(cfg.seed)

    model = build_model(cfg)
    config = model.config
    trainable = apply_training_stage(model, cfg.stage, verbose=accelerator.is_main_process)
    if trainable == 0:
        raise ValueError(f"stage {cfg.stage!r} leaves no trainable parameter.")
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()

    source = GridSource(cfg.datasets, config.modality_pad_token_id)
    logger.info("training data: %d sequences (%d text-only) from %d dataset(s)", len(source),
                int(source.text_only.sum()), len(cfg.datasets))
    eval_loader = None
    if cfg.eval_datasets:
        eval_source = GridSource(cfg.eval_datasets, config.modality_pad_token_id)
        eval_plan = plan_epoch(eval_source, 0, cfg.seed, cfg.max_length, cfg.pack, None, shuffle=False)
        eval_bs = cfg.eval_batch_size or cfg.per_device_batch_size
        # every process gets the same number of batches (padded with empty rows), its own rows i::num_processes
        chunk = eval_bs * accelerator.num_processes
        padded = -(-eval_plan.num_rows // chunk) * chunk
        eval_rows = PackedRows(eval_source, eval_plan, config, extra_rows=padded - eval_plan.num_rows)
        shard = torch.utils.data.Subset(eval_rows, range(accelerator.process_index, padded, accelerator.num_processes))
        eval_loader = DataLoader(shard, batch_size=eval_bs, collate_fn=RowCollator(config, cfg.pack))

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
    )
    # the prepared scheduler steps once per process per optimizer step: scale its horizon to match
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps * accelerator.num_processes,
                                                cfg.max_steps * accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
            cfg.per_device_batch_size
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = TrainingProgress({
        "datasets": [d["path"] for d in cfg.datasets], "num_processes": accelerator.num_processes,
        "per_device_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "max_length": cfg.max_length,
        "pack": cfg.pack, "seed": cfg.seed, "text_mix_ratio": cfg.text_mix_ratio,
    })
    accelerator.register_for_checkpointing(progress)

    if cfg.resume_from:
        path = cfg.resume_from
        if path == "latest":
            found = _checkpoint_dirs(cfg.output_dir)
            if not found:
                raise ValueError(f"resume_from='latest' but {cfg.output_dir!r} holds no checkpoint-<step> directory.")
            path = found[-1][1]
        if not os.path.isdir(path):
            raise ValueError(f"recipe key 'resume_from' must be a checkpoint directory, got {path!r}.")
        accelerator.load_state(path)
        progress.check_resume(path)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, progress.step, progress.epoch,
                    progress.batches_in_epoch)

    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "pretrain_recipe.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(dataclasses.asdict(cfg), handle, sort_keys=False)
    if cfg.log_with:
        accelerator.init_trackers(cfg.tracker_project, config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    collator = RowCollator(config, cfg.pack)
    align = AlignPairs(cfg.align_dataset, cfg.align_batch_size, cfg.seed + progress.step) if cfg.align_weight else None
    if align is not None and align.form == "weights" and cfg.align_temperature:
        raise ValueError(f"align_dataset {cfg.align_dataset!r} holds row-by-row pairs (`weights`), which are compared "
                         f"by 1 - cosine only; align_temperature must be 0, got {cfg.align_temperature}.")
    teacher = None
    if align is not None and cfg.align_teacher:
        teacher = MossSpeechForCausalLM.from_pretrained(cfg.align_teacher).to(accelerator.device).eval()
        teacher.requires_grad_(False)
    history: list[dict[str, Any]] = []
    eval_history: list[dict[str, Any]] = []
    # loss, text, audio, alignment (micro-batch sums; alignment 0 when off)
    window = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # sequences, text-only sequences
    window_steps, grad_norm = 0, None
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="pretrain", dynamic_ncols=True,
               disable=not (cfg.progress_bar and accelerator.is_local_main_process))

    def record(entry: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        accelerator.log(entry, step=entry["step"])

    def run_eval() -> None:
        result = {"step": progress.step, **evaluate(model, accelerator, eval_loader)}
        eval_history.append(result)
        record(result)
        logger.info("step %d eval: loss %.4f (text %.4f, audio %.4f)", progress.step, result["eval_loss"],
                    result["eval_text_loss"], result["eval_audio_loss"])

    while progress.step < cfg.max_steps:
        plan = plan_epoch(source, progress.epoch, cfg.seed, cfg.max_length, cfg.pack, cfg.text_mix_ratio)
        loader = DataLoader(PackedRows(source, plan, config), batch_size=cfg.per_device_batch_size, shuffle=False,
                            collate_fn=collator, num_workers=cfg.num_workers)
        loader = accelerator.prepare(loader)
        batches = accelerator.skip_first_batches(loader, progress.batches_in_epoch) if progress.batches_in_epoch \
            else loader
        finished = False
        for batch in batches:
            progress.batches_in_epoch += 1
            with accelerator.accumulate(model):
                out = training_loss(model, batch)
                loss, aligned = out.loss, torch.zeros_like(out.loss)
                if align is not None:
                    pairs = {k: v.to(accelerator.device) for k, v in align.sample().items()}
                    aligned = alignment_loss(model, pairs, config.num_shared_layers + config.num_modality_layers,
                                             cfg.align_temperature, teacher)
                    loss = loss + cfg.align_weight * aligned
                accelerator.backward(loss)
                window += torch.stack([out.loss, out.text_loss, out.audio_loss, aligned]).detach().double()
                counts += torch.stack([batch["num_sequences"].sum(), batch["num_text_only"].sum()]).double()
                if accelerator.sync_gradients:
                    if cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            window_steps += 1
            bar.update(1)
            if progress.step % cfg.log_every == 0 or progress.step == cfg.max_steps:
                means = accelerator.reduce(window, reduction="mean") / (window_steps * cfg.gradient_accumulation_steps)
                totals = accelerator.reduce(counts.clone(), reduction="sum")
                entry = {"step": progress.step, "loss": means[0].item(), "text_loss": means[1].item(),
                         "audio_loss": means[2].item(), "lr": scheduler.get_last_lr()[0],
                         "grad_norm": None if grad_norm is None else float(grad_norm),
                         "sequences": int(totals[0].item()), "text_only_sequences": int(totals[1].item()),
                         "epoch": progress.epoch}
                if align is not None:
                    entry["align_loss"] = means[3].item()
                history.append(entry)
                record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                logger.info("step %d: loss %.4f (text %.4f, audio %.4f) lr %.3g", progress.step, entry["loss"],
                            entry["text_loss"], entry["audio_loss"], entry["lr"])
                window.zero_()
                window_steps = 0
            if eval_loader is not None and cfg.eval_every and progress.step % cfg.eval_every == 0:
                run_eval()
            if cfg.save_every and progress.step % cfg.save_every == 0:
                save_checkpoint(accelerator, cfg.output_dir, progress.step, cfg.save_total_limit)
            if progress.step >= cfg.max_steps:
                finished = True
                break
        if not finished:  # the epoch's rows are used up: the next epoch has a new seeded order
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()

    if eval_loader is not None and not (eval_history and eval_history[-1]["step"] == progress.step):
        run_eval()
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        cfg.output_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
    )
    logger.info("saved the final model to %s", cfg.output_dir)
    accelerator.end_training()
    return {"history": history, "eval": eval_history, "step": progress.step, "output_dir": cfg.output_dir,
            "trainable_parameters": trainable, "num_processes": accelerator.num_processes}


if __name__ == "__main__":
    main()

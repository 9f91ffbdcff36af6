"""Train the MOSS-Speech-Nano text model: a tiny Qwen3 that learns every fact of the nano world as text.

    python training/train_text_model.py --corpus data/nano/corpus --tokenizer outputs/nano/tokenizer \\
        --output outputs/nano/text_model --max_minutes 5

This is the "text LLM" that `from_text_model` later splits into MOSS-Speech (trunk + two tails). It is trained on
ALL facts (train and held-out: held-out facts are seen as text only, never as speech) in the exact text-to-text chat
form the processor builds (`MossSpeechProcessor.training_rows`: user question, the default system turn placed after
it as the release does, then the assistant answer and its `<|im_end|>`; loss on the answer rows only), with:

- the text-output system prompt (the T->T mode), and, with `--audio_system_prompt` (default), the same conversation
  under the audio-output system prompt, so the trunk computes the answer in the context spoken answers are asked in;
- with `--plain_lines` (default), plain `question` `answer` `<|endoftext|>` lines (each segment tokenized on its own,
  as the pre-training grids are), loss on every token: the form of the interleaved pre-training sequences.

Training stops at `--max_steps`, at `--max_minutes`, or (with `--stop_at_accuracy`, after `--min_steps`) at the
first evaluation whose exact-match accuracy reaches it. The learning rate warms up linearly, then follows a cosine to
10 % that ends at `--max_steps` or at the time budget, whichever comes first.

Evaluation: greedy decoding of every fact in the T->T chat form, exact match of the decoded answer. The output
directory holds the model (safetensors), its generation config (greedy, stops at `<|im_end|>` / `<|endoftext|>`),
the tokenizer (with the nano processor's files), `text_eval.json` (accuracy overall, per fact split and per
category, and every wrong answer) and `train_log.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from modeling_moss_speech.apps.script_utils import ScriptArgumentParser, nano_processor, threads_field
from modeling_moss_speech.apps.script_utils import nano_special_ids as special_ids
from modeling_moss_speech.apps.script_utils import read_nano_facts as read_facts
from modeling_moss_speech.threads import set_threads

IGNORE = -100


# --------------------------------------------------------------------------------------------------------- data


def chat_example(processor: Any, question: str, answer: str, modality: str = "text") -> tuple[list[int], list[int]]:
    """Input ids and labels (answer rows only) of one Q->A text chat, exactly as `training_rows` lays it out."""
    (item,) = processor.training_rows(
        [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]], output_modality=modality)
    ids = item["input_ids"][:, 0].tolist()
    labels = [token if trained else IGNORE for token, trained in zip(ids, item["assistant_masks"].tolist())]
    return ids, labels


def plain_example(processor: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """`question` `answer` `<|endoftext|>` as separately tokenized segments; every token is a target."""
    tokenize = processor.tokenizer
    ids = (tokenize(question.strip(), add_special_tokens=False)["input_ids"]
           + tokenize(answer.strip(), add_special_tokens=False)["input_ids"] + [processor.text_pad_token_id])
    return list(ids), list(ids)


def build_examples(processor: Any, facts: Sequence[dict], audio_system_prompt: bool = True,
                   plain_lines: bool = True) -> list[tuple[list[int], list[int]]]:
    """Every training example of the text model (see the module docstring)."""
    examples = []
    for fact in facts:
        examples.append(chat_example(processor, fact["question"], fact["answer"], "text"))
        if audio_system_prompt:
            examples.append(chat_example(processor, fact["question"], fact["answer"], "audio"))
        if plain_lines:
            examples.append(plain_example(processor, fact["question"], fact["answer"]))
    return examples


def epoch_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int,
                  rng: random.Random, bucket: int = 16) -> list[list[int]]:
    """One shuffled epoch as batches of example indices, similar lengths batched together (less padding).

    The shuffled order is cut into chunks of `bucket` batches, each chunk sorted by length and cut into batches;
    the batches are shuffled again. Every example appears once (the last batch may be smaller).
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * bucket):
        chunk = sorted(order[start : start + batch_size * bucket], key=lambda i: len(examples[i][0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on padding)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------------------- model


def make_config(vocab_size: int, ids: dict[str, int], hidden_size: int = 192, num_layers: int = 4, num_heads: int = 3,
                num_kv_heads: int = 1, head_dim: int = 64, intermediate_size: int = 512,
                max_position_embeddings: int = 1024) -> Qwen3Config:
    """The nano text model's Qwen3 config (untied embeddings: MOSS-Speech ties nothing)."""
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=ids["pad_token_id"], bos_token_id=None,
        eos_token_id=[ids["pad_token_id"], ids["im_end_token_id"]],
    )


def generation_config(ids: dict[str, int], max_new_tokens: int = 16) -> GenerationConfig:
    """Greedy decoding that stops at `<|endoftext|>` or `<|im_end|>`."""
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=ids["pad_token_id"],
                            eos_token_id=[ids["pad_token_id"], ids["im_end_token_id"]])


@torch.no_grad()
def evaluate_facts(model: Qwen3ForCausalLM, processor: Any, facts: Sequence[dict], batch_size: int = 128,
                   max_new_tokens: int = 12) -> dict[str, Any]:
    """Greedy T->T exact match on `facts` (prompt: the processor's text chat prompt); accuracy overall and by group.

    Returns `accuracy`, `correct`, `total`, `by_split` and `by_category` (accuracies) and `errors` (fact_id,
    question, expected, got).
    """
    was_training = model.training
    model.eval()
    ids = special_ids(processor.tokenizer)
    stop = {ids["pad_token_id"], ids["im_end_token_id"]}
    gen = generation_config(ids, max_new_tokens)
    answers = []
    for start in range(0, len(facts), batch_size):
        chunk = facts[start : start + batch_size]
        prompts = processor([[{"role": "user", "content": f["question"]}] for f in chunk], output_modality="text")
        input_ids = prompts["input_ids"][..., 0]
        out = model.generate(input_ids=input_ids, attention_mask=prompts["attention_mask"], generation_config=gen)
        for row in out[:, input_ids.shape[1]:].tolist():
            tokens = []
            for token in row:
                if token in stop:
                    break
                tokens.append(token)
            answers.append(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    model.train(was_training)

    groups: dict[str, dict[str, list[int]]] = {"by_split": defaultdict(lambda: [0, 0]),
                                               "by_category": defaultdict(lambda: [0, 0])}
    errors = []
    for fact, got in zip(facts, answers):
        ok = got == fact["answer"].strip()
        for group, key in (("by_split", fact.get("fact_split", "all")), ("by_category", fact.get("category", "all"))):
            groups[group][key][0] += int(ok)
            groups[group][key][1] += 1
        if not ok:
            errors.append({"fact_id": fact.get("fact_id"), "question": fact["question"], "expected": fact["answer"],
                           "got": got})
    correct = len(facts) - len(errors)
    return {"accuracy": correct / max(len(facts), 1), "correct": correct, "total": len(facts),
            **{group: {k: v[0] / v[1] for k, v in sorted(values.items())} for group, values in groups.items()},
            "errors": errors}


# --------------------------------------------------------------------------------------------------------- train


def train(args: TrainTextModelArguments) -> dict[str, Any]:
    """Train, evaluate and save the text model; returns the final evaluation with training statistics."""
    set_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = special_ids(tokenizer)
    processor = nano_processor(tokenizer)
    facts = read_facts(args.corpus)
    if args.limit_facts:
        facts = facts[: args.limit_facts]
    examples = build_examples(processor, facts, args.audio_system_prompt, args.plain_lines)

    config = make_config(len(tokenizer), ids, args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads,
                         args.head_dim, args.intermediate_size)
    model = Qwen3ForCausalLM(config)
    model.generation_config = generation_config(ids)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"text model: {n_params / 1e6:.2f}M parameters, {len(facts)} facts, {len(examples)} examples", flush=True)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate,
                                  betas=(0.9, 0.98))

    budget = args.max_minutes * 60 if args.max_minutes else math.inf

    def lr_at(step: int, elapsed: float) -> float:
        """Linear warmup, then cosine to 10 % at the end of training: at max_steps, or at the time budget when that
        comes first (so a budget-bound run still anneals; such a run is not bit-reproducible)."""
        if step < args.warmup_steps:
            return args.learning_rate * (step + 1) / args.warmup_steps
        progress = min(1.0, max((step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps),
                                elapsed / budget))
        return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    os.makedirs(args.output, exist_ok=True)
    log_path = os.path.join(args.output, "train_log.jsonl")
    open(log_path, "w").close()
    start, step, order, cursor = time.monotonic(), 0, [], 0
    rng = random.Random(args.seed)
    window, result, result_step, stopped = [], None, -1, "max_steps"
    model.train()
    while step < args.max_steps:
        if cursor >= len(order):  # a new shuffled epoch
            order, cursor = epoch_batches(examples, args.batch_size, rng), 0
        batch = collate([examples[i] for i in order[cursor]], ids["pad_token_id"])
        cursor += 1
        lr = lr_at(step, time.monotonic() - start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.append(loss.item())
        elapsed = time.monotonic() - start
        if step % args.log_every == 0:
            entry = {"step": step, "loss": sum(window) / len(window), "lr": lr,
                     "seconds": round(elapsed, 1), "seconds_per_step": round(elapsed / step, 4)}
            window = []
            print(json.dumps(entry), flush=True)
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        if args.eval_every and step % args.eval_every == 0:
            result, result_step = evaluate_facts(model, processor, facts), step
            entry = {"step": step, "accuracy": result["accuracy"], "by_split": result["by_split"],
                     "seconds": round(time.monotonic() - start, 1)}
            print(json.dumps(entry), flush=True)
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
            if args.stop_at_accuracy is not None and step >= args.min_steps \
                    and result["accuracy"] >= args.stop_at_accuracy:
                stopped = "accuracy"
                break
        if time.monotonic() - start >= budget:
            stopped = "max_minutes"
            break
    train_seconds = time.monotonic() - start
    if result_step != step:
        result = evaluate_facts(model, processor, facts)
    result.update(step=step, stopped=stopped, train_seconds=round(train_seconds, 1),
                  seconds_per_step=round(train_seconds / max(step, 1), 4), parameters=n_params,
                  examples=len(examples))
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)  # tokenizer + processor config: the directory is a baseline for eval
    with open(os.path.join(args.output, "text_eval.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    summary = {k: v for k, v in result.items() if k != "errors"}
    print(json.dumps(summary), flush=True)
    return result


@dataclass
class TrainTextModelArguments:
    """Flags of `training/train_text_model.py` (see the module docstring)."""

    corpus: str = field(default="data/nano/corpus", metadata={"help": "Nano corpus (DatasetDict with a facts split)."})
    tokenizer: str = field(default="outputs/nano/tokenizer", metadata={
        "help": "processing/build_nano_tokenizer.py's output."})
    output: str = field(default="outputs/nano/text_model", metadata={"help": "Output directory."})
    max_minutes: float = field(default=5.0, metadata={"help": "Wall-clock budget (0: none)."})
    max_steps: int = field(default=2000, metadata={"help": "Optimizer steps (the LR schedule's length)."})
    min_steps: int = field(default=0, metadata={"help": "No early stop before this step."})
    stop_at_accuracy: float | None = field(default=None, metadata={
        "help": "Stop at the first evaluation (after --min_steps) with this exact-match accuracy (default: never; "
                "train to --max_steps or --max_minutes)."})
    eval_every: int = field(default=250, metadata={"help": "Steps between evaluations (0: only at the end)."})
    log_every: int = field(default=50, metadata={"help": "Steps between log lines."})
    batch_size: int = field(default=64, metadata={"help": "Examples per batch."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warmup steps."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and data order."})
    threads: int | None = threads_field()
    limit_facts: int = field(default=0, metadata={"help": "Use only the first N facts (tests)."})
    audio_system_prompt: bool = field(default=True, metadata={
        "help": "Also train each chat under the audio-output system prompt (answer in text)."})
    plain_lines: bool = field(default=True, metadata={"help": "Also train plain question-answer lines."})
    hidden_size: int = field(default=192, metadata={"help": "Qwen3 hidden size."})
    num_layers: int = field(default=4, metadata={"help": "Qwen3 decoder layers."})
    num_heads: int = field(default=3, metadata={"help": "Attention heads."})
    num_kv_heads: int = field(default=1, metadata={"help": "Key/value heads."})
    head_dim: int = field(default=64, metadata={"help": "Dimension of each head."})
    intermediate_size: int = field(default=512, metadata={"help": "MLP intermediate size."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}.")


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `TrainTextModelArguments`)."""
    return ScriptArgumentParser(TrainTextModelArguments, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line and train; returns the final evaluation (also in `<output>/text_eval.json`)."""
    (args,) = make_parser().parse_args_and_config(argv)
    return train(args)


if __name__ == "__main__":
    main()
